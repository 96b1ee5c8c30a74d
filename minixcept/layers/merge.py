"""Add: the residual connection.

y = a + b. In the backward pass the gradient fans out unchanged to both inputs:
da = db = dy. Where one tensor feeds two branches (Xception's block input feeds
both the separable convolutions and the shortcut), the gradients arriving from
the two branches are *added*; the model does that sum, this layer only splits.
"""
from .base import Layer


class Add(Layer):
    """Keras's Add(): the elementwise sum of two tensors of the same shape."""

    def forward(self, a, b, training=False):
        if a.shape != b.shape:
            from ..errors import ShapeError
            raise ShapeError(f"layer {self.name!r} adds tensors of different shapes "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        if not self.built:
            self.build(a.shape)
        self._cache = True
        return a + b

    __call__ = forward

    def backward(self, dy):
        """Returns (da, db): both are dy."""
        self.grads = {}
        return dy, dy
