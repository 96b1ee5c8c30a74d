"""Add: the residual connection.

y = a + b. In the backward pass the gradient fans out unchanged to both inputs:
da = db = dy. Where one tensor feeds two branches (Xception's block input feeds
both the separable convolutions and the shortcut), the gradients arriving from
the two branches are *added*; the model does that sum, this layer only splits.

Why both: y = a + b gives dy/da = dy/db = 1, so each input gets dy whole; and a loss that
depends on a tensor through two paths changes with it along both, so its derivative is
the sum of the two (the multivariable chain rule). Keeping only one branch's gradient
gives an array of the right shape and no error - and a wrong gradient.
"""
from .. import checks
from ..errors import ShapeError
from .base import Layer


class Add(Layer):
    """Keras's Add(): the elementwise sum of two tensors of the same shape."""

    def forward(self, a, b, training=False):
        self.check_input(a, 'a')
        self.check_input(b, 'b')
        if a.shape != b.shape:
            raise ShapeError(f"layer {self.name!r} adds tensors of different shapes "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        if not self.built:
            self.build(a.shape)
        self._cache = (None, tuple(a.shape))
        return a + b

    __call__ = forward

    def backward(self, dy):
        """Returns (da, db): both are dy."""
        checks.array(dy, 'dy', f"layer {self.name!r}")
        if self._cache is not None:
            checks.shape(dy, self._cache[1], "dy (the last forward's output shape)", f"layer {self.name!r}")
        self.grads = {}
        return dy, dy
