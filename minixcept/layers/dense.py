"""Dense and Dropout: the layers of a classification head.

Dense:    y = activation(x @ kernel + bias)       x: (N, in), kernel: (in, out), bias: (out,)
backward: dz = activation'(dy);  dkernel = x.T @ dz;  dbias = sum over N of dz;  dx = dz @ kernel.T

From z[n, o] = sum over i of x[n, i] kernel[i, o] + bias[o]: kernel[i, o] meets x[n, i] in
every example n (hence x.T @ dz, a sum over the batch), x[n, i] meets kernel[i, o] for
every output o (hence dz @ kernel.T), and the bias is added once per example.

Dropout (training only): each value is kept with probability 1 - rate and the
kept ones are scaled by 1 / (1 - rate) ("inverted dropout"), so nothing needs
rescaling at inference; the backward pass applies the same mask and scale.
"""
import numpy as np

from ..backend import get_array_module
from .activation import activation_pair
from .. import checks
from .base import Layer, check_rank, glorot_uniform, init_rng


def dense_forward(x, kernel, bias):
    """x: (N, in) -> y (N, out). Cache: (x, kernel)."""
    y = x @ kernel
    if bias is not None:
        y = y + bias
    return y, (x, kernel)


def dense_backward(dy, cache):
    """dy: (N, out) -> dx (N, in), dkernel (in, out), dbias (out,)."""
    x, kernel = cache
    return dy @ kernel.T, x.T @ dy, dy.sum(axis=0)


class Dense(Layer):
    """Keras's Dense(units, activation=None, use_bias=True); activation is None, 'relu',
    'sigmoid' or 'softmax' (the ImageNet top uses softmax)."""

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.units = checks.integer(units, 'units', f"layer {self.name!r}", minimum=1)
        self.activation = activation
        self.use_bias = checks.flag(use_bias, 'use_bias', f"layer {self.name!r}")
        self._activation_forward, self._activation_backward = activation_pair(activation)
        self.weight_names = ('kernel', 'bias') if use_bias else ('kernel',)

    def build(self, input_shape):
        super().build(input_shape)
        self._new_param('kernel', glorot_uniform((input_shape[-1], self.units), init_rng()))
        if self.use_bias:
            self._new_param('bias', np.zeros(self.units, np.float32))

    def _forward(self, x, training):
        check_rank(self, x, 2)
        z, dense_cache = dense_forward(x, self.params['kernel'], self.params.get('bias'))
        y, activation_cache = self._activation_forward(z)
        return y, (dense_cache, activation_cache)

    def _backward(self, dy, cache):
        dense_cache, activation_cache = cache
        dz = self._activation_backward(dy, activation_cache)
        dx, dkernel, dbias = dense_backward(dz, dense_cache)
        return dx, self.named(dkernel, dbias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def multiply_adds(self, input_shape):
        return int(input_shape[-1]) * self.units


def dropout_forward(x, rate, rng):
    """Inverted dropout. Returns y and the cache: the scaled mask (0 or 1 / (1 - rate))."""
    xp = get_array_module(x)
    keep = rng.random(x.shape) >= rate                                     # NumPy draws, so seeds agree across backends
    mask = xp.asarray(keep, dtype=x.dtype) / x.dtype.type(1 - rate)
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask


class Dropout(Layer):
    """Keras's Dropout(rate, seed=None): active only when training=True."""

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = checks.number(rate, 'rate', f"layer {self.name!r}", 0, 1, high_open=True)
        self.rng = np.random.default_rng(seed) if seed is not None else None

    def _forward(self, x, training):
        if not training or self.rate == 0:
            return x, None
        return dropout_forward(x, self.rate, self.rng or init_rng())

    def _backward(self, dy, mask):
        return (dy if mask is None else dropout_backward(dy, mask)), {}
