"""Losses with their gradients, reduced as Keras reduces them: the mean over the batch.

Each loss object remembers what its ``forward`` saw, so ``backward()`` needs no
argument and returns d(loss)/d(pred) with the batch mean already folded in.
"""
import numpy as np

from . import checks
from .backend import asnumpy, get_array_module
from .errors import ShapeError
from .layers.activation import sigmoid_forward

EPSILON = 1e-7          # Keras's backend epsilon, used to clip probabilities


def _inside_clip(pred):
    """Where clipping to [EPSILON, 1 - EPSILON] passes the gradient: everywhere but strictly
    outside. As in TensorFlow's clip_by_value, a value exactly on a boundary keeps its gradient."""
    return (pred >= EPSILON) & (pred <= 1 - EPSILON)


def _labels(loss, pred, y, per_row=False):
    """The door of a loss: pred an array of floats, y one number per value of pred (or per row,
    ``per_row``) in any shape, returned as a NumPy array; each loss checks the range of y."""
    who = type(loss).__name__
    checks.array(pred, 'pred', who, rank=2 if per_row else None)
    count = pred.shape[0] if per_row else pred.size
    y = asnumpy(checks.numbers_array(y, 'y', who))
    if y.size != count:
        raise ShapeError(f"{who}: y must hold {count} labels for pred of shape {tuple(pred.shape)}, "
                         f"got shape {tuple(y.shape)}")
    if y.dtype.kind == 'f' and not np.isfinite(y).all():
        raise ValueError(f"{who}: y must be finite, got {y[~np.isfinite(y)][0]}")
    return y


def _saved(loss):
    if loss._saved is None:
        raise RuntimeError(f"{type(loss).__name__}: backward needs a forward pass first")
    return loss._saved


class BinaryCrossentropy:
    """Keras's BinaryCrossentropy(from_logits=False).

    pred: (N, 1) or (N,) probabilities, or logits when from_logits=True; y: 0/1 of the same size.

    from logits z (stable form):  loss = max(z, 0) - z * y + log(1 + exp(-|z|)),  dloss/dz = sigmoid(z) - y
    from probabilities p, as Keras 3 clips them to [eps, 1 - eps]:
        loss = -(y * log(p) + (1 - y) * log(1 - p)),  dloss/dp = (1 - y) / (1 - p) - y / p
    """

    def __init__(self, from_logits=False):
        self.from_logits = checks.flag(from_logits, 'from_logits', type(self).__name__)
        self._saved = None

    def forward(self, pred, y):
        """Labels y in [0, 1]: 0 and 1, or soft targets between them as Keras takes them."""
        y = _labels(self, pred, y)
        if y.min() < 0 or y.max() > 1:
            raise ValueError(f"BinaryCrossentropy: y must lie in [0, 1] (the classes 0 and 1), "
                             f"got values {sorted(set(y[(y < 0) | (y > 1)].tolist()))[:5]}")
        xp = get_array_module(pred)
        y = xp.asarray(y, dtype=pred.dtype).reshape(pred.shape)
        if self.from_logits:
            per_example = xp.maximum(pred, 0) - pred * y + xp.log1p(xp.exp(-xp.abs(pred)))
        else:
            p = xp.clip(pred, EPSILON, 1 - EPSILON)
            per_example = -(y * xp.log(p) + (1 - y) * xp.log(1 - p))
        self._saved = (pred, y)
        return per_example.mean()

    def backward(self):
        pred, y = _saved(self)
        xp = get_array_module(pred)
        n = pred.size
        if self.from_logits:
            # sigmoid(z) - y, but for z >= 0 written as (1 - y) - sigmoid(-z): sigmoid(z) rounds
            # to 1 there, and the gradient of a confident, right example would round to 0
            sigmoid_z, sigmoid_minus_z = sigmoid_forward(pred)[0], sigmoid_forward(-pred)[0]
            return xp.where(pred >= 0, (1 - y) - sigmoid_minus_z, sigmoid_z - y) / n
        p = xp.clip(pred, EPSILON, 1 - EPSILON)
        inside = _inside_clip(pred)
        return ((1 - y) / (1 - p) - y / p) * inside / n


class SparseCategoricalCrossentropy:
    """Keras's SparseCategoricalCrossentropy(from_logits=False).

    pred: (N, K) probabilities, or logits when from_logits=True; y: (N,) integer classes.

    from logits z:  loss = -log softmax(z)[y],  dloss/dz = softmax(z) - onehot(y)
    from probabilities p: Keras clips p to [eps, 1 - eps] and takes log(p) as logits,
        so loss = -log(p_y / sum_k p_k),  dloss/dp_k = 1 / sum_j p_j - [k == y] / p_y
    """

    def __init__(self, from_logits=False):
        self.from_logits = checks.flag(from_logits, 'from_logits', type(self).__name__)
        self._saved = None

    def forward(self, pred, y):
        """Labels y: N whole numbers in 0..K-1."""
        y = _labels(self, pred, y, per_row=True)
        if y.dtype.kind == 'b' or (y != np.round(y)).any() or y.min() < 0 or y.max() >= pred.shape[1]:
            raise ValueError(f"SparseCategoricalCrossentropy: y must be class indices, whole numbers in "
                             f"0..{pred.shape[1] - 1} for pred of shape {tuple(pred.shape)}, "
                             f"got {sorted(set(y.ravel().tolist()))[:5]}")
        xp = get_array_module(pred)
        y = xp.asarray(y.reshape(-1).astype(int))
        rows = xp.arange(pred.shape[0])
        if self.from_logits:
            shifted = pred - pred.max(axis=-1, keepdims=True)
            log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
        else:
            p = xp.clip(pred, EPSILON, 1 - EPSILON)
            log_probs = xp.log(p) - xp.log(p.sum(axis=-1, keepdims=True))
        self._saved = (pred, y, log_probs)
        return -log_probs[rows, y].mean()

    def backward(self):
        pred, y, log_probs = _saved(self)
        xp = get_array_module(pred)
        n = pred.shape[0]
        rows = xp.arange(n)
        if self.from_logits:
            grad = xp.exp(log_probs)
            grad[rows, y] -= 1
            return grad / n
        p = xp.clip(pred, EPSILON, 1 - EPSILON)
        inside = _inside_clip(pred)
        grad = xp.broadcast_to(1 / p.sum(axis=-1, keepdims=True), p.shape).copy()
        grad[rows, y] -= 1 / p[rows, y]
        return grad * inside / n
