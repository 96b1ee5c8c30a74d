"""DepthwiseConv2D: one small filter per channel, no mixing between channels.

The depthwise half of Xception's separable convolutions. Each channel c of the
input is convolved with its own kh x kw filter ``depthwise_kernel[:, :, c, 0]``:

    y[n, i, j, c] = sum over p, q of x_pad[n, i*sh + p, j*sw + q, c] * depthwise_kernel[p, q, c, 0]

(+ bias[c]). With a 3x3 kernel that is 9 multiplies per output value instead of
the 9 * C_in of a full convolution: the saving that makes Xception affordable.

Gradients follow from the same sum. Every output pixel used the input pixel
under offset (p, q), so

    dx_pad[n, i*sh + p, j*sw + q, c] += dy[n, i, j, c] * depthwise_kernel[p, q, c, 0]
    ddepthwise_kernel[p, q, c, 0]     = sum over n, i, j of x_pad[n, i*sh + p, j*sw + q, c] * dy[n, i, j, c]

Both are written as a loop over the kh*kw offsets with strided slices (no
scatter), so they are deterministic on NumPy and CuPy alike.

Read the first line the other way round, from dx's side: with stride 1, input pixel
(i, j) receives dy from the outputs (i - p, j - q), each weighted by kernel[p, q]. That
is again a depthwise convolution, of dy with the kernel turned 180 degrees,

    dx[n, i, j, c] = sum over p, q of dy_pad[n, i + p, j + q, c] * depthwise_kernel[kh-1-p, kw-1-q, c, 0]

where dy_pad is dy padded by kh-1-top rows above and kh-1-bottom below (likewise for the
columns), top and bottom being the forward pass's padding. So the input gradient costs what
the forward pass costs, and the engines run both through the same tiled code.

With stride s > 1 the outputs sit only at every s-th input position, and the rule holds for
dy *dilated* (the scatter of a "transposed" convolution with stride s, which is what the
strided slices above do directly). Per axis, with H_p = H + top + bottom the padded size:

1. dilate dy: s - 1 zeros between neighbouring entries, length (H_out - 1) * s + 1;
2. pad it by k - 1 zeros before and k - 1 + r after, r = (H + top + bottom - k) mod s being
   the number of padded-input rows no window reaches (their gradient is 0);
3. correlate with the turned kernel (stride 1, 'valid'): this is dx_pad, H_p rows;
4. crop top rows before and bottom after: dx.

Example, k = 3, s = 2, 'same': H = 7 pads (1, 1), H = 8 pads (0, 1); both have H_p = 9 and
r = 0, so dy (4 entries) dilates to 7, pads to (2, 2), and dx_pad is cropped (1, 1) and (0, 1)
respectively. r = 1 for 'valid' on 8 rows, and for a 1x1 kernel at stride 2 on an even size.
At stride 1 (r = 0) steps 2-4 are the padding kh-1-top, kh-1-bottom above. Xception itself
never runs a stride-2 depthwise step (every separable convolution has stride 1): it halves
the resolution in the stem's 3x3 block1_conv1, the 1x1 stride-2 shortcut convolutions and
the 3x3 stride-2 max-pools. Tour chapter 2 derives the rule and draws it in 1-D.
"""
from ..backend import get_array_module
from ..padding import as_pair, check_padding, crop_spatial, pad_spatial, window, window_geometry
import numpy as np

from .. import checks
from .base import Layer, check_rank, glorot_uniform, init_rng


def depthwise_conv2d_forward(x, depthwise_kernel, bias, strides, padding):
    """Forward pass.

    x: (N, H, W, C); depthwise_kernel: (kh, kw, C, 1); bias: (C,) or None.
    Returns y: (N, H_out, W_out, C) and cache = (x, depthwise_kernel, strides, padding).
    """
    xp = get_array_module(x)
    kh, kw, channels, multiplier = depthwise_kernel.shape
    if multiplier != 1:
        raise ValueError(f"only depth_multiplier=1 is supported, kernel has shape {depthwise_kernel.shape}")
    out_hw, pads = window_geometry(x.shape[1:3], (kh, kw), strides, padding)
    x_pad = pad_spatial(x, pads)
    y = xp.zeros((x.shape[0],) + out_hw + (channels,), dtype=x.dtype)       # (N, Ho, Wo, C)
    for p in range(kh):
        for q in range(kw):
            y += window(x_pad, p, q, out_hw, strides) * depthwise_kernel[p, q, :, 0]
    if bias is not None:
        y += bias
    return y, (x, depthwise_kernel, strides, padding)


def depthwise_conv2d_backward(dy, cache):
    """Backward pass.

    dy: (N, H_out, W_out, C). Returns dx (N, H, W, C), ddepthwise_kernel (kh, kw, C, 1)
    and dbias (C,). The padded input is rebuilt from the cached x rather than kept.
    """
    x, depthwise_kernel, strides, padding = cache
    xp = get_array_module(dy)
    kh, kw = depthwise_kernel.shape[:2]
    out_hw, pads = window_geometry(x.shape[1:3], (kh, kw), strides, padding)
    x_pad = pad_spatial(x, pads)
    dx_pad = xp.zeros_like(x_pad)
    ddepthwise_kernel = xp.empty_like(depthwise_kernel)
    for p in range(kh):
        for q in range(kw):
            # per channel, the sum over n, i, j of x * dy, without a product array the size of dy
            ddepthwise_kernel[p, q, :, 0] = xp.einsum('nijc,nijc->c', window(x_pad, p, q, out_hw, strides), dy)
            window(dx_pad, p, q, out_hw, strides)[...] += dy * depthwise_kernel[p, q, :, 0]
    dbias = dy.sum(axis=(0, 1, 2))
    return crop_spatial(dx_pad, pads), ddepthwise_kernel, dbias


class DepthwiseConv2D(Layer):
    """Keras's DepthwiseConv2D(kernel_size, strides=1, padding='valid', use_bias=True),
    with depth_multiplier 1."""

    def __init__(self, kernel_size, strides=1, padding='valid', use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = as_pair(kernel_size, 'kernel_size')
        self.strides = as_pair(strides, 'strides')
        self.padding = check_padding(padding)
        self.use_bias = checks.flag(use_bias, 'use_bias', f"layer {self.name!r}")
        self.weight_names = ('depthwise_kernel', 'bias') if use_bias else ('depthwise_kernel',)

    def build(self, input_shape):
        super().build(input_shape)
        channels = input_shape[-1]
        self._new_param('depthwise_kernel', glorot_uniform(self.kernel_size + (channels, 1), init_rng()))
        if self.use_bias:
            self._new_param('bias', np.zeros(channels, np.float32))

    def _forward(self, x, training):
        check_rank(self, x, 4)
        return depthwise_conv2d_forward(x, self.params['depthwise_kernel'], self.params.get('bias'),
                                        self.strides, self.padding)

    def _backward(self, dy, cache):
        dx, dkernel, dbias = depthwise_conv2d_backward(dy, cache)
        return dx, self.named(dkernel, dbias)

    def compute_output_shape(self, input_shape):
        (h, w), _ = window_geometry(input_shape[1:3], self.kernel_size, self.strides, self.padding)
        return (input_shape[0], h, w, input_shape[-1])

    def multiply_adds(self, input_shape):
        _, h, w, channels = self.compute_output_shape(input_shape)
        return h * w * self.kernel_size[0] * self.kernel_size[1] * channels
