"""PointwiseConv2D: a 1x1 convolution, which is one matrix product.

The pointwise half of a separable convolution mixes channels at every pixel
independently. Flattening the pixels of the whole batch into rows makes it a
single matrix product:

    y[(n, i, j), o] = sum over c of x[(n, i, j), c] * pointwise_kernel[0, 0, c, o]

    forward:   Y  = X @ K              X: (N*H*W, C_in), K: (C_in, C_out)
    backward:  dX = dY @ K.T           dK = X.T @ dY

Why those two: Y[r, o] = sum over c of X[r, c] K[c, o], so dY[r, o] reaches K[c, o] times
X[r, c], summed over every row r (every pixel of every image): X.T @ dY; and reaches
X[r, c] times K[c, o], summed over the outputs o: dY @ K.T. A 1x1 window has no
neighbours and needs no padding: an M x M input stays M x M, only the channels change.
"""
import numpy as np

from .. import checks
from .base import Layer, check_rank, glorot_uniform, init_rng


def pointwise_conv2d_forward(x, pointwise_kernel, bias=None):
    """x: (N, H, W, C_in); pointwise_kernel: (1, 1, C_in, C_out); bias: (C_out,) or None.

    Returns y: (N, H, W, C_out) and cache = (x, pointwise_kernel).
    """
    n, h, w, c_in = x.shape
    kernel = pointwise_kernel.reshape(c_in, -1)                # (C_in, C_out)
    y = x.reshape(-1, c_in) @ kernel                           # (N*H*W, C_out)
    if bias is not None:
        y += bias
    return y.reshape(n, h, w, kernel.shape[1]), (x, pointwise_kernel)


def pointwise_conv2d_backward(dy, cache):
    """dy: (N, H, W, C_out) -> dx (N, H, W, C_in), dpointwise_kernel (1, 1, C_in, C_out), dbias (C_out,)."""
    x, pointwise_kernel = cache
    c_in, c_out = pointwise_kernel.shape[2:]
    x_rows = x.reshape(-1, c_in)                               # (N*H*W, C_in)
    dy_rows = dy.reshape(-1, c_out)                            # (N*H*W, C_out)
    dx = (dy_rows @ pointwise_kernel.reshape(c_in, c_out).T).reshape(x.shape)
    dkernel = (x_rows.T @ dy_rows).reshape(pointwise_kernel.shape)
    return dx, dkernel, dy_rows.sum(axis=0)


class PointwiseConv2D(Layer):
    """A 1x1 convolution with Keras's kernel layout (1, 1, C_in, C_out); no bias by default,
    as inside Xception's separable convolutions."""

    def __init__(self, filters, use_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = checks.integer(filters, 'filters', f"layer {self.name!r}", minimum=1)
        self.use_bias = checks.flag(use_bias, 'use_bias', f"layer {self.name!r}")
        self.weight_names = ('pointwise_kernel', 'bias') if use_bias else ('pointwise_kernel',)

    def build(self, input_shape):
        super().build(input_shape)
        self._new_param('pointwise_kernel', glorot_uniform((1, 1, input_shape[-1], self.filters), init_rng()))
        if self.use_bias:
            self._new_param('bias', np.zeros(self.filters, np.float32))

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return pointwise_conv2d_forward(x, self.params['pointwise_kernel'], self.params.get('bias'))

    def _backward(self, dy, cache):
        dx, dkernel, dbias = pointwise_conv2d_backward(dy, cache)
        return dx, self.named(dkernel, dbias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.filters,)

    def multiply_adds(self, input_shape):
        return input_shape[1] * input_shape[2] * input_shape[3] * self.filters
