"""Conv2D: the full convolution of Xception's stem and its 1x1 stride-2 shortcuts.

y[n, i, j, o] = sum over p, q, c of x_pad[n, i*sh + p, j*sw + q, c] * kernel[p, q, c, o] + bias[o]

The sum over the kernel offsets (p, q) is written as a loop: for each offset we
take the strided view of the input that this offset sees at every output pixel
and multiply it, as one matrix product, by the (C_in, C_out) slice of the kernel.
No im2col buffer is built, and the backward pass is the same loop run in reverse.

The gradients come from the same sum. kernel[p, q, c, o] appears once for every output
pixel (n, i, j) of channel o, multiplied by the input under offset (p, q); the input
x_pad[n, i*sh + p, j*sw + q, c] appears once for every offset (p, q) that reaches it and
every output channel o. The chain rule sums dy over exactly those terms:

    dkernel[p, q, c, o]               = sum over n, i, j of x_pad[n, i*sh + p, j*sw + q, c] * dy[n, i, j, o]
    dx_pad[n, i*sh + p, j*sw + q, c] += sum over o of dy[n, i, j, o] * kernel[p, q, c, o]
    dbias[o]                          = sum over n, i, j of dy[n, i, j, o]

and dx is dx_pad with the padding cropped off (the pads are constants). At stride 2 the
window starts i*2 skip every other input row: the strided view for offset p reads, and in
backward writes, only the rows that offset touched, and an input row no window reached
(the last one of an even-sized 'valid' input) gets gradient 0, as it must.
"""
from ..backend import get_array_module
from ..padding import as_pair, check_padding, crop_spatial, pad_spatial, window, window_geometry
import numpy as np

from .. import checks
from .base import Layer, check_rank, glorot_uniform, init_rng


def conv2d_forward(x, kernel, bias, strides, padding):
    """Forward pass of a 2-D convolution.

    x: (N, H, W, C_in); kernel: (kh, kw, C_in, C_out); bias: (C_out,) or None.
    Returns y: (N, H_out, W_out, C_out) and cache = (x, kernel, strides, padding).
    """
    xp = get_array_module(x)
    kh, kw, c_in, c_out = kernel.shape
    n = x.shape[0]
    out_hw, pads = window_geometry(x.shape[1:3], (kh, kw), strides, padding)
    x_pad = pad_spatial(x, pads)
    y = xp.zeros((n * out_hw[0] * out_hw[1], c_out), dtype=x.dtype)
    for p in range(kh):
        for q in range(kw):
            rows = window(x_pad, p, q, out_hw, strides).reshape(-1, c_in)   # (N*Ho*Wo, C_in)
            y += rows @ kernel[p, q]                                          # (N*Ho*Wo, C_out)
    if bias is not None:
        y += bias
    y = y.reshape(n, out_hw[0], out_hw[1], c_out)
    return y, (x, kernel, strides, padding)


def conv2d_backward(dy, cache):
    """Backward pass of ``conv2d_forward``.

    dy: (N, H_out, W_out, C_out). Returns dx (N, H, W, C_in), dkernel like kernel,
    dbias (C_out,). Each kernel offset scatters its share of dx back through the
    same strided view it read from; overlapping windows add.
    """
    x, kernel, strides, padding = cache
    xp = get_array_module(dy)
    kh, kw, c_in, c_out = kernel.shape
    out_hw, pads = window_geometry(x.shape[1:3], (kh, kw), strides, padding)
    x_pad = pad_spatial(x, pads)
    dx_pad = xp.zeros_like(x_pad)
    dy_rows = dy.reshape(-1, c_out)                                          # (N*Ho*Wo, C_out)
    dkernel = xp.empty_like(kernel)
    for p in range(kh):
        for q in range(kw):
            rows = window(x_pad, p, q, out_hw, strides).reshape(-1, c_in)
            dkernel[p, q] = rows.T @ dy_rows                                  # (C_in, C_out)
            window(dx_pad, p, q, out_hw, strides)[...] += (
                dy_rows @ kernel[p, q].T).reshape(dy.shape[:3] + (c_in,))
    dbias = dy_rows.sum(axis=0)
    return crop_spatial(dx_pad, pads), dkernel, dbias


class Conv2D(Layer):
    """Keras's Conv2D(filters, kernel_size, strides=1, padding='valid', use_bias=True)."""

    def __init__(self, filters, kernel_size, strides=1, padding='valid', use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = checks.integer(filters, 'filters', f"layer {self.name!r}", minimum=1)
        self.kernel_size = as_pair(kernel_size, 'kernel_size')
        self.strides = as_pair(strides, 'strides')
        self.padding = check_padding(padding)
        self.use_bias = checks.flag(use_bias, 'use_bias', f"layer {self.name!r}")
        self.weight_names = ('kernel', 'bias') if use_bias else ('kernel',)

    def build(self, input_shape):
        super().build(input_shape)
        shape = self.kernel_size + (input_shape[-1], self.filters)
        self._new_param('kernel', glorot_uniform(shape, init_rng()))
        if self.use_bias:
            self._new_param('bias', np.zeros(self.filters, np.float32))

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return conv2d_forward(x, self.params['kernel'], self.params.get('bias'),
                              self.strides, self.padding)

    def _backward(self, dy, cache):
        dx, dkernel, dbias = conv2d_backward(dy, cache)
        return dx, self.named(dkernel, dbias)

    def compute_output_shape(self, input_shape):
        (h, w), _ = window_geometry(input_shape[1:3], self.kernel_size, self.strides, self.padding)
        return (input_shape[0], h, w, self.filters)

    def multiply_adds(self, input_shape):
        _, h, w, c_out = self.compute_output_shape(input_shape)
        kh, kw = self.kernel_size
        return h * w * kh * kw * input_shape[-1] * c_out
