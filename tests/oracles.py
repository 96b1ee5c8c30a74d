"""Naive loop versions of the windowed layers: the oracles for the vectorised ones.

Each function is the textbook definition written as explicit Python loops over
the batch n, the output row i and column j, the kernel offsets (p, q) and the
channels, on a copy of the input padded by hand. They are slow and meant to be
obviously right; the tests run them on tiny float64 inputs only.

The backward functions loop over the same indices as the forward ones and send
each product's share of the gradient back to the two factors it came from.

They share nothing with minixcept, not even its padding arithmetic, which is
written out again here from TensorFlow's documentation.
"""
import numpy as np


def tf_padding(size, kernel, stride, padding):
    """(output length, pad before, pad after) along one axis, TensorFlow's rule.

    'valid': no padding, as many whole windows as fit.
    'same':  ceil(size / stride) outputs; the padding that needs is split with the
             smaller half before (top, left) and the larger half after.
    """
    if padding == 'valid':
        return (size - kernel) // stride + 1, 0, 0
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def pad(x, kernel_hw, strides, padding, value=0.0):
    """x (N, H, W, C) padded by hand -> (x_padded, (out_h, out_w), (top, left))."""
    n, h, w, c = x.shape
    out_h, top, bottom = tf_padding(h, kernel_hw[0], strides[0], padding)
    out_w, left, right = tf_padding(w, kernel_hw[1], strides[1], padding)
    x_padded = np.full((n, h + top + bottom, w + left + right, c), value, dtype=np.float64)
    for row in range(h):
        for col in range(w):
            x_padded[:, top + row, left + col, :] = x[:, row, col, :]
    return x_padded, (out_h, out_w), (top, left)


def unpad(dx_padded, x_shape, top_left):
    """The gradient of ``pad``: the part of dx_padded that lies over the real input."""
    top, left = top_left
    return dx_padded[:, top:top + x_shape[1], left:left + x_shape[2], :].copy()


# -- full convolution --------------------------------------------------------------------

def conv2d_forward(x, kernel, bias, strides, padding):
    """y[n, i, j, o] = sum_{p, q, c} x_pad[n, i*sh + p, j*sw + q, c] * kernel[p, q, c, o] + bias[o].

    x: (N, H, W, C_in); kernel: (kh, kw, C_in, C_out); bias: (C_out,) or None.
    """
    kh, kw, c_in, c_out = kernel.shape
    x_padded, (out_h, out_w), _ = pad(x, (kh, kw), strides, padding)
    y = np.zeros((x.shape[0], out_h, out_w, c_out))
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                for o in range(c_out):
                    total = 0.0 if bias is None else bias[o]
                    for p in range(kh):
                        for q in range(kw):
                            for c in range(c_in):
                                total += x_padded[n, i * strides[0] + p, j * strides[1] + q, c] * kernel[p, q, c, o]
                    y[n, i, j, o] = total
    return y


def conv2d_backward(dy, x, kernel, strides, padding):
    """Gradients of <conv2d_forward(x, kernel, bias), dy>: (dx, dkernel, dbias)."""
    kh, kw, c_in, c_out = kernel.shape
    x_padded, (out_h, out_w), top_left = pad(x, (kh, kw), strides, padding)
    dx_padded = np.zeros_like(x_padded)
    dkernel = np.zeros(kernel.shape)
    dbias = np.zeros(c_out)
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                for o in range(c_out):
                    dbias[o] += dy[n, i, j, o]
                    for p in range(kh):
                        for q in range(kw):
                            for c in range(c_in):
                                row, col = i * strides[0] + p, j * strides[1] + q
                                dx_padded[n, row, col, c] += kernel[p, q, c, o] * dy[n, i, j, o]
                                dkernel[p, q, c, o] += x_padded[n, row, col, c] * dy[n, i, j, o]
    return unpad(dx_padded, x.shape, top_left), dkernel, dbias


# -- depthwise convolution ---------------------------------------------------------------

def depthwise_conv2d_forward(x, depthwise_kernel, bias, strides, padding):
    """y[n, i, j, c] = sum_{p, q} x_pad[n, i*sh + p, j*sw + q, c] * depthwise_kernel[p, q, c, 0] + bias[c].

    x: (N, H, W, C); depthwise_kernel: (kh, kw, C, 1); bias: (C,) or None.
    """
    kh, kw, channels, _ = depthwise_kernel.shape
    x_padded, (out_h, out_w), _ = pad(x, (kh, kw), strides, padding)
    y = np.zeros((x.shape[0], out_h, out_w, channels))
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(channels):
                    total = 0.0 if bias is None else bias[c]
                    for p in range(kh):
                        for q in range(kw):
                            row, col = i * strides[0] + p, j * strides[1] + q
                            total += x_padded[n, row, col, c] * depthwise_kernel[p, q, c, 0]
                    y[n, i, j, c] = total
    return y


def depthwise_conv2d_backward(dy, x, depthwise_kernel, strides, padding):
    """Gradients of <depthwise_conv2d_forward(...), dy>: (dx, ddepthwise_kernel, dbias)."""
    kh, kw, channels, _ = depthwise_kernel.shape
    x_padded, (out_h, out_w), top_left = pad(x, (kh, kw), strides, padding)
    dx_padded = np.zeros_like(x_padded)
    dkernel = np.zeros(depthwise_kernel.shape)
    dbias = np.zeros(channels)
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(channels):
                    dbias[c] += dy[n, i, j, c]
                    for p in range(kh):
                        for q in range(kw):
                            row, col = i * strides[0] + p, j * strides[1] + q
                            dx_padded[n, row, col, c] += depthwise_kernel[p, q, c, 0] * dy[n, i, j, c]
                            dkernel[p, q, c, 0] += x_padded[n, row, col, c] * dy[n, i, j, c]
    return unpad(dx_padded, x.shape, top_left), dkernel, dbias


# -- max pooling -------------------------------------------------------------------------

def _window_argmax(x_padded, n, i, j, c, pool_size, strides):
    """(row, col) in x_padded of the largest value in one window; the first one, scanning
    row by row, when several are equal. Padding is -inf, so it never wins."""
    best = None
    for p in range(pool_size[0]):
        for q in range(pool_size[1]):
            row, col = i * strides[0] + p, j * strides[1] + q
            if best is None or x_padded[n, row, col, c] > x_padded[n, best[0], best[1], c]:
                best = (row, col)
    return best


def max_pool2d_forward(x, pool_size, strides, padding):
    """y[n, i, j, c] = max over the window of x padded with -inf."""
    x_padded, (out_h, out_w), _ = pad(x, pool_size, strides, padding, value=-np.inf)
    y = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(x.shape[3]):
                    row, col = _window_argmax(x_padded, n, i, j, c, pool_size, strides)
                    y[n, i, j, c] = x_padded[n, row, col, c]
    return y


def max_pool2d_backward(dy, x, pool_size, strides, padding):
    """dx: each dy[n, i, j, c] goes to the one input that won its window."""
    x_padded, (out_h, out_w), top_left = pad(x, pool_size, strides, padding, value=-np.inf)
    dx_padded = np.zeros_like(x_padded)
    for n in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(x.shape[3]):
                    row, col = _window_argmax(x_padded, n, i, j, c, pool_size, strides)
                    dx_padded[n, row, col, c] += dy[n, i, j, c]
    return unpad(dx_padded, x.shape, top_left)
