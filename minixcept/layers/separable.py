"""SeparableConv2D: a depthwise convolution followed directly by a pointwise one.

This is Xception's building block: the 3x3 depthwise step filters each channel
on its own, the 1x1 pointwise step mixes the channels. Keras puts nothing
between them (no batch-norm, no ReLU), and the bias, when there is one, is added
after the pointwise step. Xception uses no bias here (its batch-norm follows).

The backward pass is the chain rule through the two halves, in reverse order: with
z = depthwise(x) and y = pointwise(z), dz = pointwise backward of dy, then dx (and the
depthwise kernel's gradient) = depthwise backward of dz.

Why it is cheaper: a full k x k convolution from C_in to C_out channels has
k*k*C_in*C_out weights (and multiply-adds per pixel); this one k*k*C_in + C_in*C_out.
From 16 to 32 channels with 3 x 3: 656 instead of 4,608. Depthwise first (Keras's order)
filters the C_in input channels rather than the C_out output ones, which is cheaper
whenever the layer widens: pointwise first would cost C_in*C_out + k*k*C_out = 800
(examples/separable_cost.py prints all of these from the layers themselves).
"""
import numpy as np

from ..padding import as_pair, check_padding, window_geometry
from .. import checks
from .base import Layer, check_rank, glorot_uniform, init_rng
from .depthwise import depthwise_conv2d_backward, depthwise_conv2d_forward
from .pointwise import pointwise_conv2d_backward, pointwise_conv2d_forward


def separable_conv2d_forward(x, depthwise_kernel, pointwise_kernel, bias, strides, padding):
    """x: (N, H, W, C_in); depthwise_kernel: (kh, kw, C_in, 1); pointwise_kernel: (1, 1, C_in, C_out).

    Returns y: (N, H_out, W_out, C_out) and cache = (depthwise cache, pointwise cache).
    """
    z, depthwise_cache = depthwise_conv2d_forward(x, depthwise_kernel, None, strides, padding)  # (N, Ho, Wo, C_in)
    y, pointwise_cache = pointwise_conv2d_forward(z, pointwise_kernel, bias)                  # (N, Ho, Wo, C_out)
    return y, (depthwise_cache, pointwise_cache)


def separable_conv2d_backward(dy, cache):
    """Returns dx, ddepthwise_kernel, dpointwise_kernel, dbias."""
    depthwise_cache, pointwise_cache = cache
    dz, dpointwise_kernel, dbias = pointwise_conv2d_backward(dy, pointwise_cache)
    dx, ddepthwise_kernel, _ = depthwise_conv2d_backward(dz, depthwise_cache)
    return dx, ddepthwise_kernel, dpointwise_kernel, dbias


class SeparableConv2D(Layer):
    """Keras's SeparableConv2D(filters, kernel_size, strides=1, padding='valid', use_bias=True),
    with depth_multiplier 1. Weights in Keras order: depthwise_kernel, pointwise_kernel[, bias]."""

    def __init__(self, filters, kernel_size, strides=1, padding='valid', use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = checks.integer(filters, 'filters', f"layer {self.name!r}", minimum=1)
        self.kernel_size = as_pair(kernel_size, 'kernel_size')
        self.strides = as_pair(strides, 'strides')
        self.padding = check_padding(padding)
        self.use_bias = checks.flag(use_bias, 'use_bias', f"layer {self.name!r}")
        self.weight_names = ('depthwise_kernel', 'pointwise_kernel') + (('bias',) if use_bias else ())

    def build(self, input_shape):
        super().build(input_shape)
        c_in = input_shape[-1]
        self._new_param('depthwise_kernel', glorot_uniform(self.kernel_size + (c_in, 1), init_rng()))
        self._new_param('pointwise_kernel', glorot_uniform((1, 1, c_in, self.filters), init_rng()))
        if self.use_bias:
            self._new_param('bias', np.zeros(self.filters, np.float32))

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return separable_conv2d_forward(x, self.params['depthwise_kernel'], self.params['pointwise_kernel'],
                                        self.params.get('bias'), self.strides, self.padding)

    def _backward(self, dy, cache):
        dx, ddepthwise, dpointwise, dbias = separable_conv2d_backward(dy, cache)
        return dx, self.named(ddepthwise, dpointwise, dbias)

    def compute_output_shape(self, input_shape):
        (h, w), _ = window_geometry(input_shape[1:3], self.kernel_size, self.strides, self.padding)
        return (input_shape[0], h, w, self.filters)

    def multiply_adds(self, input_shape):
        _, h, w, c_out = self.compute_output_shape(input_shape)
        kh, kw = self.kernel_size
        return h * w * input_shape[-1] * (kh * kw + c_out)
