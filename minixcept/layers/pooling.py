"""Max pooling and the two global poolings.

MaxPooling2D pads with -inf, never with zeros: a zero pad would win the max
wherever every real value in the window is negative, which Xception's
pre-activation tensors often are - the output would silently hold zeros Keras does not
have, and the gradient would go to the pad and be cropped away. The gradient of a max
goes only to the input that won it (the others could move a little without changing
y); where several tie, to the first in the window (row-major), as TensorFlow's
MaxPoolGrad does. At a tie the max has no derivative and any split of dy among the tied
inputs is a valid choice; one winner keeps the total equal to dy (handing dy to every tied
input would multiply it), and the same winner as TensorFlow makes the gradients
comparable to the last bit. We record the winning offset k = p * kw + q per
output value in the forward pass, and the backward pass is a loop over the
offsets with strided slices, like the convolutions:

    dx_pad[n, i*sh + p, j*sw + q, c] += dy[n, i, j, c]   where argmax[n, i, j, c] == p * kw + q

Xception pools 3x3 at stride 2, so neighbouring windows share a row or column: an input
that wins two windows receives both gradients, which the += adds.

Global max pooling follows TensorFlow's reduce_max instead, which shares dy equally among
tied maxima (the mean of the valid choices); ties there are rare outside all-zero channels.
"""
import numpy as np

from ..backend import get_array_module
from ..padding import as_pair, check_padding, crop_spatial, pad_spatial, window, window_geometry
from .base import Layer, check_rank


def max_pool2d_forward(x, pool_size, strides, padding):
    """x: (N, H, W, C) -> y (N, H_out, W_out, C); cache = (x.shape, argmax, pool_size, strides, padding).

    argmax (N, H_out, W_out, C) holds the winning offset p * kw + q, as int8.
    """
    xp = get_array_module(x)
    kh, kw = pool_size
    out_hw, pads = window_geometry(x.shape[1:3], pool_size, strides, padding)
    x_pad = pad_spatial(x, pads, value=-np.inf)
    y = window(x_pad, 0, 0, out_hw, strides).copy()
    argmax = xp.zeros(y.shape, dtype=np.int8)
    for p in range(kh):
        for q in range(kw):
            if p == q == 0:
                continue
            candidate = window(x_pad, p, q, out_hw, strides)
            better = candidate > y                         # strict: ties keep the earlier offset
            y = xp.maximum(y, candidate)
            argmax = xp.where(better, np.int8(p * kw + q), argmax)
    return y, (x.shape, argmax, pool_size, strides, padding)


def max_pool2d_backward(dy, cache):
    """dy: (N, H_out, W_out, C) -> dx (N, H, W, C)."""
    x_shape, argmax, pool_size, strides, padding = cache
    xp = get_array_module(dy)
    kh, kw = pool_size
    out_hw, pads = window_geometry(x_shape[1:3], pool_size, strides, padding)
    (top, bottom), (left, right) = pads
    dx_pad = xp.zeros((x_shape[0], x_shape[1] + top + bottom, x_shape[2] + left + right, x_shape[3]),
                      dtype=dy.dtype)
    for p in range(kh):
        for q in range(kw):
            window(dx_pad, p, q, out_hw, strides)[...] += dy * (argmax == p * kw + q)
    return crop_spatial(dx_pad, pads)


class MaxPooling2D(Layer):
    """Keras's MaxPooling2D(pool_size=(2, 2), strides=None, padding='valid'); strides default to pool_size."""

    def __init__(self, pool_size=(2, 2), strides=None, padding='valid', **kwargs):
        super().__init__(**kwargs)
        self.pool_size = as_pair(pool_size, 'pool_size')
        self.strides = as_pair(strides, 'strides') if strides is not None else self.pool_size
        self.padding = check_padding(padding)

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return max_pool2d_forward(x, self.pool_size, self.strides, self.padding)

    def _backward(self, dy, cache):
        return max_pool2d_backward(dy, cache), {}

    def compute_output_shape(self, input_shape):
        (h, w), _ = window_geometry(input_shape[1:3], self.pool_size, self.strides, self.padding)
        return (input_shape[0], h, w, input_shape[-1])


def global_average_pool2d_forward(x):
    """x: (N, H, W, C) -> y (N, C), the mean over H and W. Cache: x's shape."""
    return x.mean(axis=(1, 2)), x.shape


def global_average_pool2d_backward(dy, x_shape):
    """Each of the H*W inputs gets dy / (H*W)."""
    xp = get_array_module(dy)
    n, h, w, c = x_shape
    return xp.broadcast_to((dy / (h * w))[:, None, None, :], x_shape).copy()


def global_max_pool2d_forward(x):
    """x: (N, H, W, C) -> y (N, C), the max over H and W. Cache: (x, y)."""
    y = x.max(axis=(1, 2))
    return y, (x, y)


def global_max_pool2d_backward(dy, cache):
    """The gradient goes to the maximum; where several inputs tie for it, it is shared
    equally between them, as TensorFlow's gradient of reduce_max does."""
    x, y = cache
    winners = x == y[:, None, None, :]                                  # (N, H, W, C)
    share = winners / winners.sum(axis=(1, 2), keepdims=True)
    return (share * dy[:, None, None, :]).astype(dy.dtype)


class GlobalAveragePooling2D(Layer):
    """Keras's GlobalAveragePooling2D(): (N, H, W, C) -> (N, C)."""

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return global_average_pool2d_forward(x)

    def _backward(self, dy, cache):
        return global_average_pool2d_backward(dy, cache), {}

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


class GlobalMaxPooling2D(Layer):
    """Keras's GlobalMaxPooling2D(): (N, H, W, C) -> (N, C)."""

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return global_max_pool2d_forward(x)

    def _backward(self, dy, cache):
        return global_max_pool2d_backward(dy, cache), {}

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
