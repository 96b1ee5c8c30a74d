"""BatchNormalization, in inference and in training mode, as Keras 3 does it.

Per channel c (the last axis), with statistics over every other axis:

    x_hat = (x - mean) / sqrt(var + epsilon)          epsilon = 1e-3, Keras's default
    y     = gamma * x_hat + beta

Inference uses the stored moving_mean and moving_variance. Training uses the
batch's own mean and *biased* variance, and then moves the stored statistics
toward them:

    moving = moving * momentum + batch_statistic * (1 - momentum)       momentum = 0.99

Backward, with m values per channel and inv_std = 1 / sqrt(var + epsilon):

    dbeta  = sum(dy)                 dgamma = sum(dy * x_hat)
    inference (statistics are constants):  dx = dy * gamma * inv_std
    training  (statistics depend on x):    dx = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)

Where the training formula comes from, per channel: let g = dy * gamma, the gradient of
x_hat. Moving x_k moves x_hat_k directly, and every x_hat_j through the mean and the
variance: d mean / d x_k = 1 / m, d var / d x_k = 2 (x_k - mean) / m, and
d inv_std / d var = -inv_std^3 / 2. Summing g_j times each path,

    dx_k = inv_std * (g_k - mean(g) - x_hat_k * mean(g * x_hat))
           direct     through the mean   through the variance

and mean(g) = gamma * dbeta / m, mean(g * x_hat) = gamma * dgamma / m give the line above.

At inference a batch-norm is a per-channel affine map, y = x * scale + shift with
scale = gamma * inv_std and shift = beta - moving_mean * scale. After a convolution
u = conv(x, K) + b, whose output channel c is column c of K, that map can be taken into
the convolution itself (*folded*):

    BN(conv(x, K) + b) = conv(x, K * scale) + (b - moving_mean) * scale + beta

``fold_batch_norm`` computes the new kernel and bias; the engines run every inference
batch-norm of Xception this way, at no cost of its own.

The cache keeps only x, gamma, the mean and inv_std; x_hat is recomputed.
"""
import numpy as np

from ..backend import get_array_module
from .. import checks
from .base import Layer


def _reduce_axes(x):
    return tuple(range(x.ndim - 1))                     # every axis but the channels


def batch_norm_forward(x, gamma, beta, mean, variance, epsilon):
    """Normalise x with the given per-channel mean and variance (each of shape (C,)).

    Returns y like x and cache = (x, gamma, mean, inv_std, batch_statistics=False).
    """
    xp = get_array_module(x)
    inv_std = 1.0 / xp.sqrt(variance + epsilon)           # (C,)
    scale = gamma * inv_std
    y = x * scale + (beta - mean * scale)
    return y, (x, gamma, mean, inv_std, False)


def batch_norm_train_forward(x, gamma, beta, epsilon):
    """Normalise x with its own batch statistics.

    Returns y, the batch mean and biased variance (C,), and cache = (x, gamma, mean, inv_std, True).
    """
    axes = _reduce_axes(x)
    mean = x.mean(axis=axes)                              # (C,)
    variance = ((x - mean) ** 2).mean(axis=axes)          # biased, as Keras 3 uses
    y, (_, _, _, inv_std, _) = batch_norm_forward(x, gamma, beta, mean, variance, epsilon)
    return y, mean, variance, (x, gamma, mean, inv_std, True)


def batch_norm_backward(dy, cache):
    """Returns dx like dy, dgamma (C,), dbeta (C,)."""
    x, gamma, mean, inv_std, batch_statistics = cache
    axes = _reduce_axes(x)
    x_hat = (x - mean) * inv_std                          # recomputed, not cached
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    if not batch_statistics:
        return dy * (gamma * inv_std), dgamma, dbeta
    m = x.size // x.shape[-1]
    dx = (gamma * inv_std / m) * (m * dy - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def fold_batch_norm(kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon):
    """A convolution followed by an inference batch-norm, as one convolution (module docstring).

    kernel: (..., C_out), e.g. Conv2D (kh, kw, C_in, C_out), pointwise (1, 1, C_in, C_out), or
    a (rows, C_out) matrix; bias: (C_out,) or None; the batch-norm's weights: (C_out,) each.
    Returns (kernel * scale, (bias - moving_mean) * scale + beta).
    """
    xp = get_array_module(kernel)
    scale = gamma / xp.sqrt(moving_variance + epsilon)           # (C_out,)
    shift = beta - moving_mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return kernel * scale, shift


class BatchNormalization(Layer):
    """Keras's BatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3).

    Weights in Keras order: gamma, beta, moving_mean, moving_variance; only gamma and
    beta are trained. ``training=True`` uses batch statistics unless the layer is
    frozen (``trainable = False``), which, as in Keras, always runs it in inference mode.
    """

    weight_names = ('gamma', 'beta', 'moving_mean', 'moving_variance')
    non_trainable_weight_names = ('moving_mean', 'moving_variance')     # moved by forward, not by gradients

    def __init__(self, epsilon=1e-3, momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = checks.number(epsilon, 'epsilon', f"layer {self.name!r}", 0, low_open=True)
        self.momentum = checks.number(momentum, 'momentum', f"layer {self.name!r}", 0, 1)

    def build(self, input_shape):
        super().build(input_shape)
        channels = input_shape[-1]
        self._new_param('gamma', np.ones(channels, np.float32))
        self._new_param('beta', np.zeros(channels, np.float32))
        self._new_param('moving_mean', np.zeros(channels, np.float32))
        self._new_param('moving_variance', np.ones(channels, np.float32))

    def _forward(self, x, training):
        p = self.params
        if training and self.trainable:
            y, mean, variance, cache = batch_norm_train_forward(x, p['gamma'], p['beta'], self.epsilon)
            p['moving_mean'] = p['moving_mean'] * self.momentum + mean * (1 - self.momentum)
            p['moving_variance'] = p['moving_variance'] * self.momentum + variance * (1 - self.momentum)
            self.weights_changed()
            return y, cache
        return batch_norm_forward(x, p['gamma'], p['beta'], p['moving_mean'], p['moving_variance'],
                                  self.epsilon)

    def _backward(self, dy, cache):
        dx, dgamma, dbeta = batch_norm_backward(dy, cache)
        return dx, {'gamma': dgamma, 'beta': dbeta}

    def fold_into(self, kernel, bias):
        """``fold_batch_norm`` with this layer's moving statistics: (folded kernel, folded bias)."""
        p = self.params
        return fold_batch_norm(kernel, bias, p['gamma'], p['beta'], p['moving_mean'], p['moving_variance'],
                               self.epsilon)

    # multiply_adds stays 0: at inference batch-norm folds into the preceding convolution,
    # and the usual 8.36 G figure for Xception counts convolutions and the classifier only.
