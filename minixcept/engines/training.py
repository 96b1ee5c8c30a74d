"""Fast training passes: a model's forward *and* backward pass, rearranged for the CPU.

``minixcept.engines.inference`` speeds up inference; this module does the same for the pass that
training needs, where every layer must keep what its backward step reads and every
weight gets a gradient. The mathematics is the layers' own; tests/test_fastgrad.py
checks the outputs, the input gradient and every weight's gradient against
``model.forward`` + ``model.backward``. What changes:

- **One thread per core, each on its share of the batch**, with the BLAS library held
  to one thread. The gradient of a batch is the sum of the gradients of its parts, so
  each thread runs forward and backward on its share with caches of its own, and the
  weight gradients are added up at the end. (On two cores this alone is about 1.7x
  faster than one thread driving a two-thread BLAS: the element-wise work no longer
  leaves a core idle, and no matrix product waits for a core another process has
  taken.) A batch-norm on batch statistics mixes the examples: there the shares add up
  their sums (``ShareSums``: sum and squared deviations forward, sum(dy) and
  sum(dy * x_hat) backward) and each goes on with the whole batch's numbers. Only
  dropout in training, which draws its masks from one generator in sequence, makes the
  whole batch run as one share.
- **Depthwise convolutions tile by tile** (stride 1, any padding), in the CPU cache, with
  ``fast.py``'s padded row tiles and multiply-adds. Their backward pass is the same
  kind of work: the input gradient of a stride-1 depthwise convolution is a depthwise
  convolution of the output gradient with the kernel turned 180 degrees,

      dx[n, i, j, c] = sum over p, q of dz_pad[n, i + p, j + q, c] * kernel[kh-1-p, kw-1-q, c]

  where dz_pad is dz padded by (kh-1-top, kh-1-bottom) rows and (kw-1-left, kw-1-right)
  columns, and the kernel gradient sums, tile by tile, the products of each shifted
  input window with dz.
- **Batch-norm on moving statistics folded into the convolution before it**, forward and
  backward (see ``FoldedBatchNorm``): one matrix product gives the batch-norm's output, and
  the product that gives the kernel gradient also gives gamma's. A batch-norm that cannot
  fold, or that trains on batch statistics, runs in whole-array passes with its per-channel
  numbers repeated along W (see ``fast.along_width``).
- **A ReLU before a separable convolution runs inside it**: applied while the depthwise
  step copies its input rows into the padded tile, and its mask applied to the input
  gradient tile by tile; the ReLU's output is never stored.
- **Full convolutions as im2col a block of rows at a time** and one matrix product per
  block, and **max pooling tile by tile**, each tile through the plain layer's own code.
- **Other ReLUs in one pass** (the maximum with a row of zeros), keeping only their output.
- **Memory kept from pass to pass.** Each share's outputs, caches, gradients and scratch
  come from a buffer pool (``fast.BufferPool``) that the engine keeps: fresh memory costs a
  page fault per page on first write, and on a virtual machine a pass through fresh memory
  took up to twice as long. A gradient goes back to the pool as soon as the layer below
  has used it; the caches go back after the backward pass. What the engine returns, and
  every layer's ``grads``, are ordinary arrays of the caller's.

Every other layer (and every layer on a GPU) runs its own ``_forward`` / ``_backward``.

    engine = GradientEngine(model)
    y = engine.forward(x, training=False)          # like model.forward
    dx = engine.backward(dy)                       # like model.backward: fills layer.grads
"""
import contextlib
import math
import threading

import numpy as np

from .inference import (BufferPool, _extent, along_width, depthwise_tile, engine_workers, gather_rows,
                   im2col_tile, plan_blocks, single_threaded_blas)
from ..layers import Activation, Add, BatchNormalization, Conv2D, Dropout, MaxPooling2D, SeparableConv2D
from ..layers.pooling import max_pool2d_backward, max_pool2d_forward
from ..padding import window, window_geometry

# Batch-norm's gamma gradient is summed over pieces of about this many bytes of x and dy.
SUM_BYTES = 256 * 1024


# -- memory -------------------------------------------------------------------------------------

_running = threading.local()           # .buffers, .share: the pool and the ShareSums of the share this thread runs


class ShareSums:
    """Sums over the shares of one batch, for a layer whose statistics span the whole batch
    (batch-norm on batch statistics): ``sums(arrays)``, called by every share's thread at the
    same layer with its own partial sums, returns the totals to each of them, added in share
    order so that every share gets the same numbers."""

    def __init__(self, count):
        self.count = count
        self._parts = [None] * count
        self._barrier = threading.Barrier(count)

    def __call__(self, index, *partial):
        if self.count == 1:
            return partial
        self._parts[index] = partial
        self._barrier.wait()                   # every share has put its part
        totals = tuple(sum(part[i] for part in self._parts) for i in range(len(partial)))
        self._barrier.wait()                   # every share has read them: the parts may change
        return totals

    def abort(self):
        """Release the shares waiting: one of them failed (they raise BrokenBarrierError)."""
        self._barrier.abort()


def share_sums(*partial):
    """The totals over the running batch's shares of these partial sums (the partial sums
    themselves outside an engine, or with one share)."""
    share = getattr(_running, 'share', None)
    return partial if share is None else share[1](share[0], *partial)


def new_array(shape, dtype):
    """An uninitialised array for a large output or cache: from the buffer pool of the share
    that the calling thread runs (see ``GradientEngine``), else a fresh ``np.empty``."""
    buffers = getattr(_running, 'buffers', None)
    return np.empty(shape, dtype) if buffers is None else buffers.empty(shape, dtype)


def new_like(array):
    return new_array(array.shape, array.dtype)


def done_with(*arrays):
    """Hand scratch arrays from ``new_array`` back to the running share's pool (if any)."""
    buffers = getattr(_running, 'buffers', None)
    if buffers is not None:
        for array in arrays:
            if array is not None:
                buffers.give_back(array)


# -- depthwise convolution, tile by tile ----------------------------------------------------------

def _tiles(n_images, out_h, row_bytes):
    return [tile for _, tiles in plan_blocks(n_images, out_h, row_bytes, np) for tile in tiles]


def depthwise_rows(x, kernel, pads, out, relu=False, mask=None):
    """Stride-1 depthwise convolution of x, zero-padded by ``pads``, into ``out``, tile by tile.

    x: (N, H, W, C); kernel: (kh, kw, C); pads: ((top, bottom), (left, right));
    out: (N, H + top + bottom - kh + 1, W + left + right - kw + 1, C). Returns out.
    relu: convolve ReLU(x) instead, applied as the rows are copied into the padded tile.
    mask: an array like out; where it is <= 0, out is set to 0 (the backward pass of a ReLU
    whose input was ``mask``), while each tile is still in cache.
    """
    kh, kw, channels = kernel.shape
    n, out_h, out_w, _ = out.shape
    taps = along_width(kernel, out_w)                                     # (kh, kw, W_out, C)
    tiles = _tiles(n, out_h, out_w * channels * x.itemsize)
    tile_images, tile_rows = max(_extent(tile) for tile in tiles)
    x_tile = new_array((tile_images, tile_rows + kh - 1, x.shape[2] + sum(pads[1]), channels), x.dtype)
    products = new_array((tile_images, tile_rows, out_w, channels), x.dtype)
    positive = new_array(products.shape, bool) if mask is not None else None
    relu_zeros = np.zeros(x.shape[2:], x.dtype) if relu else None
    for images, top, bottom in tiles:
        padded = gather_rows(x, images, top, bottom, kh, 1, pads, x_tile, relu_zeros=relu_zeros)
        part = out[images, top:bottom]
        depthwise_tile(padded, taps, (1, 1), part, products[:part.shape[0], :part.shape[1]])
        if mask is not None:
            where = np.greater(mask[images, top:bottom], 0, out=positive[:part.shape[0], :part.shape[1]])
            np.multiply(part, where, out=part)
    done_with(x_tile, products, positive)
    return out


def depthwise_kernel_gradient(x, dz, kernel_size, pads, relu=False):
    """dkernel[p, q, c] = sum over n, i, j of x_pad[n, i + p, j + q, c] * dz[n, i, j, c], for a
    stride-1 depthwise convolution; summed tile by tile (``einsum`` multiplies and adds in
    one pass, with no array of products). relu: of ReLU(x). Returns (kh, kw, C)."""
    kh, kw = kernel_size
    n, out_h, out_w, channels = dz.shape
    tiles = _tiles(n, out_h, out_w * channels * x.itemsize)
    tile_images, tile_rows = max(_extent(tile) for tile in tiles)
    x_tile = new_array((tile_images, tile_rows + kh - 1, x.shape[2] + sum(pads[1]), channels), x.dtype)
    dkernel = np.zeros((kh, kw, channels), x.dtype)
    relu_zeros = np.zeros(x.shape[2:], x.dtype) if relu else None
    for images, top, bottom in tiles:
        padded = gather_rows(x, images, top, bottom, kh, 1, pads, x_tile, relu_zeros=relu_zeros)
        dz_part = dz[images, top:bottom]
        for p in range(kh):
            for q in range(kw):
                dkernel[p, q] += np.einsum('nijc,nijc->c', window(padded, p, q, dz_part.shape[1:3], (1, 1)),
                                           dz_part)
    done_with(x_tile)
    return dkernel


def backward_pads(kernel_size, pads):
    """The padding of dz under which the 180-degree-turned kernel gives dx (see the module
    docstring): kh-1-top rows above, kh-1-bottom below, likewise for the columns."""
    (kh, kw), ((top, bottom), (left, right)) = kernel_size, pads
    return (kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)


# -- full convolution: im2col a block at a time ---------------------------------------------------

def im2col_blocks(x, kernel_size, strides, pads, out_hw):
    """Yield (images slice, first row, end row, columns) for blocks of output rows, where
    columns (n, rows, W_out, kh, kw, C_in) are the block's im2col rows, built tile by tile
    in cache (``fast.im2col_tile``). The array is reused: use it before the next block."""
    (kh, kw), (sh, _) = kernel_size, strides
    n, c_in = x.shape[0], x.shape[3]
    out_h, out_w = out_hw
    blocks = plan_blocks(n, out_h, out_w * kh * kw * c_in * x.itemsize, np)
    block_images, block_rows = max(_extent(block) for block, _ in blocks)
    tile_images, tile_rows = max(_extent(tile) for _, tiles in blocks for tile in tiles)
    x_tile = new_array((tile_images, (tile_rows - 1) * sh + kh, x.shape[2] + sum(pads[1]), c_in), x.dtype)
    columns = new_array((block_images, block_rows, out_w, kh, kw, c_in), x.dtype)
    for (images, top, bottom), tiles in blocks:
        block = columns[:images.stop - images.start, :bottom - top]
        for tile_images_, tile_top, tile_bottom in tiles:
            padded = gather_rows(x, tile_images_, tile_top, tile_bottom, kh, sh, pads, x_tile)
            first = tile_images_.start - images.start
            im2col_tile(padded, kernel_size, strides,
                        block[first:first + tile_images_.stop - tile_images_.start,
                              tile_top - top:tile_bottom - top])
        yield images, top, bottom, block
    done_with(x_tile, columns)


def conv_rows(x, kernel, strides, pads, out):
    """A full convolution of x, zero-padded by ``pads``, into ``out``: per block of output rows,
    im2col in cache and one matrix product with the kernel as a (kh*kw*C_in, C_out) matrix."""
    kh, kw, _, c_out = kernel.shape
    matrix = kernel.reshape(-1, c_out)
    for images, top, bottom, columns in im2col_blocks(x, (kh, kw), strides, pads, out.shape[1:3]):
        np.matmul(columns.reshape(-1, matrix.shape[0]), matrix, out=out[images, top:bottom].reshape(-1, c_out))
    return out


def conv_kernel_gradient(x, dy, kernel_shape, strides, pads):
    """dkernel = columns.T @ dy, summed block by block with the im2col columns rebuilt from x."""
    dkernel = np.zeros((math.prod(kernel_shape[:3]), kernel_shape[3]), x.dtype)
    for images, top, bottom, columns in im2col_blocks(x, kernel_shape[:2], strides, pads, dy.shape[1:3]):
        dkernel += columns.reshape(-1, dkernel.shape[0]).T @ dy[images, top:bottom].reshape(-1, kernel_shape[3])
    return dkernel.reshape(kernel_shape)


# -- the fast layers ------------------------------------------------------------------------------
#
# Each is a pair: (y, cache) = forward(layer, x, training, ...), or None where the pair does not
# take the case, and (dx, {layer name: its grads}) = backward(layer, dy, cache). FAST_LAYERS, at
# the end, lists them by layer type.

class FoldedBatchNorm:
    """A batch-norm on its moving statistics, folded into the convolution before it.

    With u = columns @ K + b the convolution's output (columns: im2col rows, or the depthwise
    output of a separable convolution) and scale = gamma * inv_std, the batch-norm's output

        y = (u - mean) * scale + beta = columns @ (K * scale) + (b - mean) * scale + beta

    is one matrix product with a folded kernel and bias, and u is never stored. Backward,
    with dy the gradient of y and G = columns.T @ dy (the product the kernel gradient needs
    anyway):

        dcolumns = dy @ (K * scale).T        dK = G * scale        db = sum(dy) * scale
        dbeta = sum(dy)                      dgamma = sum(dy * (u - mean)) * inv_std
                                                    = (sum over rows of K * G + (b - mean) * dbeta) * inv_std

    since sum(dy * u) = sum(dy * (columns @ K)) + b * sum(dy) and sum over the rows of
    dy * (columns @ K) is the column sum of K * G. So the batch-norm costs no pass of its own.
    """

    def __init__(self, layer):
        p = layer.params
        self.layer = layer
        self.inv_std = 1.0 / np.sqrt(p['moving_variance'] + layer.epsilon)
        self.scale = p['gamma'] * self.inv_std

    def fold(self, matrix, bias):
        """(K * scale, (b - mean) * scale + beta) for K: (K rows, C_out), b: (C_out,) or None."""
        p = self.layer.params
        shift = p['beta'] - p['moving_mean'] * self.scale
        return matrix * self.scale, shift if bias is None else shift + bias * self.scale

    def gradients(self, matrix, bias, g, dbeta):
        """(dK, db or None, {'gamma', 'beta'}) from G = columns.T @ dy and dbeta = sum(dy)."""
        offset = -self.layer.params['moving_mean'] if bias is None else bias - self.layer.params['moving_mean']
        dgamma = ((matrix * g).sum(axis=0) + offset * dbeta) * self.inv_std
        return (g * self.scale, None if bias is None else dbeta * self.scale,
                {'gamma': dgamma, 'beta': dbeta})


def _matrix_and_bias(kernel, bias, bn):
    """The kernel as a (rows, C_out) matrix and the bias, folded with ``bn`` when given."""
    matrix = kernel.reshape(-1, kernel.shape[-1])
    return bn.fold(matrix, bias) if bn is not None else (matrix, bias)


def _parameter_gradients(layer, kernel, bias, g, dy, bn, *leading):
    """{layer name: grads[, batch-norm name: grads]} from G = columns.T @ dy; ``leading`` are
    the gradients of the layer's weights that come before its kernel (a depthwise kernel)."""
    dbeta = dy.sum(axis=(0, 1, 2))
    if bn is None:
        return {layer.name: layer.named(*leading, g.reshape(kernel.shape), dbeta if bias is not None else None)}
    dmatrix, dbias, bn_grads = bn.gradients(kernel.reshape(g.shape), bias, g, dbeta)
    return {layer.name: layer.named(*leading, dmatrix.reshape(kernel.shape), dbias), bn.layer.name: bn_grads}


def conv_forward(layer, x, training, bn=None):
    """Conv2D [+ folded batch-norm] through ``conv_rows``; keeps only x, as the plain layer does."""
    kernel = layer.params['kernel']
    matrix, bias = _matrix_and_bias(kernel, layer.params.get('bias'), bn)
    (out_h, out_w), pads = window_geometry(x.shape[1:3], layer.kernel_size, layer.strides, layer.padding)
    y = conv_rows(x, matrix.reshape(kernel.shape), layer.strides, pads,
                  new_array((x.shape[0], out_h, out_w, kernel.shape[3]), x.dtype))
    if bias is not None:
        y += along_width(bias, out_w)
    return y, (x, pads, bn)


def conv_backward(layer, dy, cache):
    """With stride 1, dx is the convolution of dy with the kernel turned 180 degrees and its
    channel axes swapped (the backward padding as for depthwise); with a larger stride each
    offset's share of dy @ kernel.T is added back through its strided window (col2im)."""
    x, pads, bn = cache
    kernel, bias = layer.params['kernel'], layer.params.get('bias')
    kh, kw, c_in, c_out = kernel.shape
    matrix, _ = _matrix_and_bias(kernel, bias, bn)
    dy = np.ascontiguousarray(dy)
    if layer.strides == (1, 1):
        turned = np.ascontiguousarray(matrix.reshape(kernel.shape)[::-1, ::-1].transpose(0, 1, 3, 2))
        dx = conv_rows(dy, turned, (1, 1), backward_pads((kh, kw), pads), new_like(x))
    else:
        out_hw = dy.shape[1:3]
        columns = (dy.reshape(-1, c_out) @ matrix.T).reshape(dy.shape[:3] + (kh, kw, c_in))
        (top, bottom), (left, right) = pads
        dx_pad = new_array((x.shape[0], x.shape[1] + top + bottom, x.shape[2] + left + right, c_in), x.dtype)
        dx_pad[...] = 0
        for p in range(kh):
            for q in range(kw):
                window(dx_pad, p, q, out_hw, layer.strides)[...] += columns[:, :, :, p, q]
        dx = dx_pad[:, top:top + x.shape[1], left:left + x.shape[2]]
    g = conv_kernel_gradient(x, dy, kernel.shape, layer.strides, pads).reshape(-1, c_out)
    return dx, _parameter_gradients(layer, kernel, bias, g, dy, bn)


def separable_forward(layer, x, training, bn=None, relu=False):
    """[ReLU ->] SeparableConv2D [-> folded batch-norm] with stride 1: depthwise tile by tile
    into z (ReLU applied as the rows are copied in), then one matrix product. Keeps x (before
    the ReLU) and z. None where it does not apply."""
    if layer.strides != (1, 1):
        return None
    p = layer.params
    n, _, _, c_in = x.shape
    (out_h, out_w), pads = window_geometry(x.shape[1:3], layer.kernel_size, (1, 1), layer.padding)
    z = depthwise_rows(x, p['depthwise_kernel'][:, :, :, 0], pads, new_array((n, out_h, out_w, c_in), x.dtype),
                       relu=relu)
    matrix, bias = _matrix_and_bias(p['pointwise_kernel'], p.get('bias'), bn)   # (C_in, C_out)
    y = new_array((n, out_h, out_w, matrix.shape[1]), x.dtype)
    np.matmul(z.reshape(-1, c_in), matrix, out=y.reshape(-1, matrix.shape[1]))
    if bias is not None:
        y += along_width(bias, out_w)
    return y, (x, z, pads, bn, relu)


def separable_backward(layer, dy, cache):
    """The pointwise half as two matrix products, then the depthwise half tile by tile, the
    ReLU's mask applied to dx while each tile is in cache."""
    x, z, pads, bn, relu = cache
    p = layer.params
    kernel, bias = p['pointwise_kernel'], p.get('bias')
    matrix, _ = _matrix_and_bias(kernel, bias, bn)
    dy = np.ascontiguousarray(dy)
    dy_rows = dy.reshape(-1, matrix.shape[1])                                 # (N*H*W, C_out)
    dz = new_like(z)                                                          # (N, H, W, C_in)
    np.matmul(dy_rows, matrix.T, out=dz.reshape(-1, matrix.shape[0]))
    g = z.reshape(-1, matrix.shape[0]).T @ dy_rows                            # (C_in, C_out)
    ddepthwise = depthwise_kernel_gradient(x, dz, layer.kernel_size, pads, relu=relu)[..., None]
    turned = p['depthwise_kernel'][::-1, ::-1, :, 0]
    dx = depthwise_rows(dz, turned, backward_pads(layer.kernel_size, pads), new_like(x),
                        mask=x if relu else None)
    return dx, _parameter_gradients(layer, kernel, bias, g, dy, bn, ddepthwise)


def batch_norm_forward(layer, x, training):
    """BatchNormalization on its moving statistics, for (N, H, W, C) inputs: one multiply
    and one add with per-channel rows. None where it does not apply (batch statistics)."""
    if (training and layer.trainable) or x.ndim != 4:
        return None
    p = layer.params
    inv_std = 1.0 / np.sqrt(p['moving_variance'] + layer.epsilon)
    scale = p['gamma'] * inv_std
    width = x.shape[2]
    y = np.multiply(x, along_width(scale, width), out=new_like(x))
    y += along_width(p['beta'] - p['moving_mean'] * scale, width)
    return y, (x, inv_std, scale)


def batch_norm_backward(layer, dy, cache):
    """dx = dy * gamma * inv_std, dbeta = sum(dy), dgamma = sum(dy * (x - mean)) * inv_std,
    all three a piece of rows at a time, so that dy and x are read from memory once."""
    x, inv_std, scale = cache
    n, h, width, channels = x.shape
    scale_row, mean_row = along_width(scale, width), along_width(layer.params['moving_mean'], width)
    dx = new_like(dy)
    rows = max(1, SUM_BYTES // (width * channels * x.itemsize))
    centred = np.empty((min(rows, h), width, channels), x.dtype)
    dgamma, dbeta = np.zeros(channels, x.dtype), np.zeros(channels, x.dtype)
    for image in range(n):
        for top in range(0, h, rows):
            dy_piece = dy[image, top:top + rows]
            np.multiply(dy_piece, scale_row, out=dx[image, top:top + rows])
            dbeta += dy_piece.sum(axis=(0, 1))
            piece = centred[:dy_piece.shape[0]]
            np.subtract(x[image, top:top + rows], mean_row, out=piece)
            dgamma += np.einsum('ijc,ijc->c', piece, dy_piece)
    return dx, {layer.name: {'gamma': dgamma * inv_std, 'beta': dbeta}}


def batch_norm_train_forward(layer, x, training):
    """BatchNormalization on batch statistics, for (N, H, W, C) inputs, with the batch shared
    out between threads: the mean and the (biased) variance are sums over the whole batch,
    gathered from every share (``share_sums``), in two passes as the plain layer computes them.
    The moving statistics move once, by the share with the first examples. None where it does
    not apply (moving statistics: see ``batch_norm_forward``)."""
    if not (training and layer.trainable) or x.ndim != 4:
        return None
    p = layer.params
    width = x.shape[2]
    total, count = share_sums(x.sum(axis=(0, 1, 2), dtype=x.dtype), x.size // x.shape[-1])
    mean = total / count
    centred = np.subtract(x, along_width(mean, width), out=new_like(x))
    (variance,) = share_sums(np.einsum('nijc,nijc->c', centred, centred))
    variance = variance / count
    done_with(centred)
    inv_std = 1.0 / np.sqrt(variance + layer.epsilon)
    scale = p['gamma'] * inv_std
    y = np.multiply(x, along_width(scale, width), out=new_like(x))
    y += along_width(p['beta'] - mean * scale, width)
    share = getattr(_running, 'share', None)
    if share is None or share[0] == 0:
        p['moving_mean'] = p['moving_mean'] * layer.momentum + mean * (1 - layer.momentum)
        p['moving_variance'] = p['moving_variance'] * layer.momentum + variance * (1 - layer.momentum)
    return y, (x, mean, inv_std, count)


def batch_norm_train_backward(layer, dy, cache):
    """dx = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma), with dbeta = sum(dy) and
    dgamma = sum(dy * x_hat) over the whole batch (m values per channel), gathered from every
    share. Each share reports its own part of dbeta and dgamma; the engine adds them up."""
    x, mean, inv_std, count = cache
    width = x.shape[2]
    x_hat = np.subtract(x, along_width(mean, width), out=new_like(x))
    x_hat *= along_width(inv_std, width)
    dbeta_part = dy.sum(axis=(0, 1, 2))
    dgamma_part = np.einsum('nijc,nijc->c', dy, x_hat)
    dbeta, dgamma = share_sums(dbeta_part, dgamma_part)
    dx = np.multiply(dy, count, out=new_like(dy))
    dx -= along_width(dbeta, width)
    x_hat *= along_width(dgamma, width)
    dx -= x_hat
    dx *= along_width(layer.params['gamma'] * inv_std / count, width)
    done_with(x_hat)
    return dx, {layer.name: {'gamma': dgamma_part, 'beta': dbeta_part}}


def max_pool_forward(layer, x, training):
    """MaxPooling2D tile by tile: each tile of output rows gets its (-inf-)padded input rows,
    and the plain layer's own forward runs on that tile with 'valid' padding, in cache. Keeps
    the winning offsets (int8) for the whole output, as the plain layer does."""
    n, _, width, channels = x.shape
    (kh, _), (sh, _) = layer.pool_size, layer.strides
    (out_h, out_w), pads = window_geometry(x.shape[1:3], layer.pool_size, layer.strides, layer.padding)
    y = new_array((n, out_h, out_w, channels), x.dtype)
    argmax = new_array(y.shape, np.int8)
    tiles = _tiles(n, out_h, sh * width * channels * x.itemsize)
    tile_images, tile_rows = max(_extent(tile) for tile in tiles)
    x_tile = new_array((tile_images, (tile_rows - 1) * sh + kh, width + sum(pads[1]), channels), x.dtype)
    for images, top, bottom in tiles:
        padded = gather_rows(x, images, top, bottom, kh, sh, pads, x_tile, fill=-np.inf)
        y[images, top:bottom], (_, argmax[images, top:bottom], *_) = max_pool2d_forward(
            padded, layer.pool_size, layer.strides, 'valid')
    done_with(x_tile)
    return y, (x.shape, argmax, pads)


def max_pool_backward(layer, dy, cache):
    """Each tile of dy goes back through the plain layer's backward into the padded rows its
    windows covered, and the part of those rows inside the input is added into dx:
    neighbouring tiles share a halo row. (The padding, -inf, never wins a max, so nothing is
    lost.) dx comes out contiguous, as the matrix products of the layer below want it."""
    x_shape, argmax, pads = cache
    n, h, width, channels = x_shape
    (kh, _), (sh, _) = layer.pool_size, layer.strides
    (top_pad, _), (left, right) = pads
    dx = new_array(x_shape, dy.dtype)
    dx[...] = 0
    for images, top, bottom in _tiles(n, dy.shape[1], sh * width * channels * dy.itemsize):
        rows_in = (bottom - top - 1) * sh + kh
        tile_shape = (images.stop - images.start, rows_in, width + left + right, channels)
        dx_tile = max_pool2d_backward(dy[images, top:bottom], (tile_shape, argmax[images, top:bottom],
                                                               layer.pool_size, layer.strides, 'valid'))
        first = top * sh - top_pad                     # the input row under the tile's first row
        inside = slice(max(first, 0), min(first + rows_in, h))
        dx[images, inside] += dx_tile[:, inside.start - first:inside.stop - first, left:left + width]
    return dx, {layer.name: {}}


def relu_forward(layer, x, training):
    """A ReLU not fused into a convolution: one pass (the zero repeated along W, see
    ``fast.along_width``); keeps its output, whose positive entries are where x was positive."""
    if layer.activation != 'relu':
        return None
    y = np.maximum(x, np.zeros(x.shape[-2:] if x.ndim > 2 else x.shape[-1:], x.dtype), out=new_like(x))
    return y, y


def relu_backward(layer, dy, y):
    positive = np.greater(y, 0, out=new_array(y.shape, bool))
    dx = np.multiply(dy, positive, out=new_like(dy))
    done_with(positive)
    return dx, {layer.name: {}}


# For each layer type, its fast (forward, backward) pairs; the first whose forward takes the
# case (does not return None) runs.
FAST_LAYERS = {
    Activation: [(relu_forward, relu_backward)],
    MaxPooling2D: [(max_pool_forward, max_pool_backward)],
    Conv2D: [(conv_forward, conv_backward)],
    SeparableConv2D: [(separable_forward, separable_backward)],
    BatchNormalization: [(batch_norm_forward, batch_norm_backward),
                         (batch_norm_train_forward, batch_norm_train_backward)],
}


def _passed_on(dy, _cache):
    """The backward step of a layer fused into a convolution next to it (a batch-norm folded
    into the one before it, a ReLU into the separable one after it): the convolution's own
    backward step does its work."""
    return dy, {}


def _layer_forward(layer, inputs, training, fused=None):
    """(y, cache, backward function) for one layer on one share of the batch. fused: the
    keyword arguments that fuse neighbouring layers into it (``plan_fusion``), or None."""
    if isinstance(layer, Add):                  # two inputs, no parameters, no cache
        a, b = inputs
        y = (np.add(a, b, out=new_like(a)) if isinstance(a, np.ndarray) and a.shape == b.shape
             else layer.forward(a, b))          # (which names the shapes when they differ)
        return y, None, lambda dy, _: ((dy, dy), {layer.name: {}})
    x, = inputs
    for forward, backward in FAST_LAYERS.get(type(layer), []) if isinstance(x, np.ndarray) else []:
        result = forward(layer, x, training, **(fused or {}))
        if result is not None:
            return result[0], result[1], lambda dy, cache, backward=backward: backward(layer, dy, cache)
    y, cache = layer._forward(x, training)

    def plain_backward(dy, cache):
        dx, grads = layer._backward(dy, cache)
        return dx, {layer.name: grads}
    return y, cache, plain_backward


def plan_fusion(model, training):
    """Which layers fuse into a convolution next to them, in this mode.

    Returns ({convolution name: keyword arguments for its fast forward}, {names of the layers
    fused away}). A batch-norm on its moving statistics that alone reads a Conv2D's or a
    stride-1 SeparableConv2D's output folds into it (``bn``); a ReLU whose output only a
    stride-1 SeparableConv2D reads runs inside it (``relu``): applied as the depthwise step
    copies its input rows, and its mask applied to that step's input gradient. A fused
    layer's output is never the model's output. (Fusion keeps the mathematics: the tests
    compare fused pairs with the plain layers.)
    """
    readers = {}
    for node in model.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node.layer)
    last = model.nodes[-1].layer.name

    def sole_reader(name):
        reading = readers.get(name, [])
        return reading[0] if name != last and len(reading) == 1 else None

    def stride_one_separable(layer):
        return isinstance(layer, SeparableConv2D) and layer.strides == (1, 1)

    fused, absorbed = {}, set()
    for node in model.nodes:
        layer, reader = node.layer, sole_reader(node.layer.name)
        if ((isinstance(layer, Conv2D) or stride_one_separable(layer)) and isinstance(reader, BatchNormalization)
                and not (training and reader.trainable)):
            fused.setdefault(layer.name, {})['bn'] = FoldedBatchNorm(reader)
            absorbed.add(reader.name)
        if isinstance(layer, Activation) and layer.activation == 'relu' and stride_one_separable(reader):
            fused.setdefault(reader.name, {})['relu'] = True
            absorbed.add(layer.name)
    return fused, absorbed


# -- the engine -----------------------------------------------------------------------------------

class GradientEngine:
    """A model's forward and backward pass for training, faster on the CPU (see the module
    docstring). Same results as ``model.forward`` / ``model.backward`` up to float32
    rounding: the output, the input gradient, and each layer's ``grads``.

    threads: how many shares a batch is cut into, each run on its own thread while BLAS is
    held to one thread (default: one per usable core when threadpoolctl is installed, else 1).
    A batch with fewer examples than threads, a batch through active dropout in training,
    and GPU arrays run as one share on the calling thread, with BLAS's own threads.
    """

    def __init__(self, model, threads=None):
        self.model = model
        self.workers = engine_workers(threads)
        self.threads = self.workers.threads
        # Share i's outputs, caches and gradients come from buffers[i], kept from pass to pass:
        # fresh memory costs a page fault per page on first write, which on a virtual machine
        # can take longer than the arithmetic on it.
        self.buffers = [BufferPool() for _ in range(self.threads)]
        self._shares = None                      # per share: (slice of the batch, its node records)

    def needs_one_share(self, training):
        """Whether the batch must run as one share in this mode: a dropout layer draws its
        masks from one generator, example after example, and shares would draw them in
        another order; and a batch-norm on batch statistics of other than (N, H, W, C)
        inputs runs the plain layer, which sees only its own share. (On (N, H, W, C) inputs
        the shares add up their sums, see ``ShareSums``. On a GPU a batch is always one share.)"""
        if not training:
            return False
        for node in self.model.nodes:
            layer = node.layer
            if isinstance(layer, Dropout) and layer.rate > 0:
                return True
            if (isinstance(layer, BatchNormalization) and layer.trainable
                    and len(self.model.output_shape(node.inputs[0])) != 4):
                return True
        return False

    def _share_slices(self, x, training):
        if (self.threads == 1 or len(x) < self.threads or not isinstance(x, np.ndarray)
                or self.needs_one_share(training)):
            return [slice(0, len(x))]
        bounds = np.linspace(0, len(x), self.threads + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _each_share(self, function, count):
        """Run function(share index) for every share, with that share's buffer pool: on the
        calling thread when there is one share, else on the workers with BLAS held to one
        thread. Returns the results in order."""
        results = [None] * count
        sums = ShareSums(count)

        def run(index, _slot=0):
            _running.buffers, _running.share = self.buffers[index], (index, sums)
            try:
                results[index] = function(index)
            except threading.BrokenBarrierError:
                pass                             # another share failed: its error is the one raised
            except BaseException:
                sums.abort()                     # let the shares waiting for this one go
                raise
            finally:
                _running.buffers = _running.share = None
        if count == 1:
            run(0)
            return results
        with single_threaded_blas() or contextlib.nullcontext():
            self.workers.each(run, list(range(count)))
        return results

    def _release(self):
        """Drop the caches of the last forward pass and take back all the memory lent for it."""
        self._shares = None
        for buffers in self.buffers:
            buffers.give_back_all()

    def forward(self, x, training=False):
        """Like ``model.forward(x, training)``; keeps what ``backward`` needs."""
        model = self.model
        model.check_input(x)
        self._release()
        last_use = model._last_use()
        slices = self._share_slices(x, training)
        fused, absorbed = plan_fusion(model, training) if isinstance(x, np.ndarray) else ({}, set())

        def run(index):
            tensors, records = {'input': x[slices[index]]}, []
            for position, node in enumerate(model.nodes):
                layer = node.layer
                if not layer.built:
                    layer.build(tensors[node.inputs[0]].shape)
                inputs = [tensors[name] for name in node.inputs]
                if layer.name in absorbed:           # a convolution next to it does its work
                    y, cache, backward = inputs[0], None, _passed_on
                else:
                    y, cache, backward = _layer_forward(layer, inputs, training, fused.get(layer.name))
                tensors[layer.name] = y
                records.append((cache, backward))
                for name in node.inputs:
                    if last_use[name] == position:
                        del tensors[name]
            return tensors[model.nodes[-1].layer.name], records

        results = self._each_share(run, len(slices))
        self._shares = [(share, records) for share, (_, records) in zip(slices, results)]
        outputs = [y for y, _ in results]
        return outputs[0].copy() if len(outputs) == 1 else np.concatenate(outputs)   # not pool memory

    def backward(self, dy):
        """Like ``model.backward(dy)`` after this engine's ``forward``: returns the gradient of
        the input and fills every layer's ``grads`` (summed over the shares)."""
        if self._shares is None:
            raise RuntimeError(f"model {self.model.name!r}: the engine's backward needs its forward first")
        nodes, shares = self.model.nodes, self._shares

        def run(index):
            share, records = shares[index]
            pending, grads = {nodes[-1].layer.name: dy[share]}, {}
            buffers = self.buffers[index]

            def spent(array):
                """Back to the pool, unless a gradient still waiting is this array or a view of it
                (an Add passes its dy on to both inputs; a linear activation passes it through)."""
                if isinstance(array, np.ndarray) and not any(np.may_share_memory(array, g) for g in pending.values()):
                    buffers.give_back(array)

            for node, (cache, backward) in zip(reversed(nodes), reversed(records)):
                dy_node = pending.pop(node.layer.name)
                input_grads, layer_grads = backward(dy_node, cache)
                grads.update(layer_grads)
                if len(node.inputs) == 1:
                    input_grads = (input_grads,)
                used = [dy_node]
                for name, g in zip(node.inputs, input_grads):
                    if name not in pending:
                        pending[name] = g
                    else:                                   # a tensor read twice: its gradients add
                        earlier = pending.pop(name)
                        pending[name] = (earlier + g if not isinstance(g, np.ndarray) else
                                         np.add(earlier, g, out=new_array(np.broadcast_shapes(earlier.shape, g.shape),
                                                                          np.result_type(earlier, g))))
                        used += [earlier, g]
                for array in used:                          # once every input has its gradient
                    spent(array)
            return pending['input'].copy(), grads                      # not pool memory

        results = self._each_share(run, len(shares))
        self._release()                            # the caches are spent
        for node in nodes:
            parts = [grads.get(node.layer.name, {}) for _, grads in results]     # a fused ReLU has none
            for part in parts[1:]:                  # add the other shares' into the first's (fresh arrays)
                for name, gradient in part.items():
                    parts[0][name] += gradient
            node.layer.grads = parts[0]
        dxs = [dx for dx, _ in results]
        return dxs[0] if len(dxs) == 1 else np.concatenate(dxs)
