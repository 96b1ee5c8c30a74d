"""Fast training passes: a model's forward *and* backward pass, rearranged for the CPU.

``minixcept.engines.inference`` speeds up inference; this module does the same for the pass that
training needs, where every layer must keep what its backward step reads and every
weight gets a gradient. The mathematics is the layers' own; tests/test_training_engine.py
checks the outputs, the input gradient and every weight's gradient against
``model.forward`` + ``model.backward``. What changes:

- **One thread per core, each on its share of the batch**, with the BLAS library held
  to one thread. The gradient of a batch is the sum of the gradients of its parts, so
  each thread runs forward and backward on its share with caches of its own, and the
  weight gradients are added up at the end (``GradientEngine.backward``: what one share
  does, then how the shares are summed). On a few cores this beats one thread driving a
  multi-threaded BLAS: the element-wise work no longer leaves a core idle, and no matrix
  product waits for a core another process has taken (benchmarks/RESULTS.md has the
  figures). A batch-norm on batch statistics mixes the examples: there the shares add up
  their sums (``ShareSums``: sum and squared deviations forward, sum(dy) and
  sum(dy * x_hat) backward) and each goes on with the whole batch's numbers; each share's
  fast pass is told which share it runs (a ``Share``, passed to it as an argument). Only
  dropout in training, which draws its masks from one generator in sequence, makes the
  whole batch run as one share.
- **Depthwise convolutions tile by tile** (stride 1, any padding), in the CPU cache, with
  the padded row tiles and multiply-adds of ``minixcept.engines.kernels``. Their backward
  pass is the same kind of work: the input gradient of a stride-1 depthwise convolution is
  a depthwise convolution of the output gradient with the kernel turned 180 degrees (the
  rule is derived in ``minixcept.layers.depthwise``), and the kernel gradient sums, tile by
  tile, the products of each shifted input window with dz.
- **Batch-norm on moving statistics folded into the convolution before it**, forward and
  backward (see ``FoldedBatchNorm``; the folding itself is taught in
  ``minixcept.layers.normalization``): one matrix product gives the batch-norm's output, and
  the product that gives the kernel gradient also gives gamma's. A batch-norm that cannot
  fold, or that trains on batch statistics, runs in whole-array passes with its per-channel
  numbers repeated along W (see ``kernels.along_width``). What fuses with what is decided by
  the graph plan both engines share (``minixcept.engines.plan``).
- **A ReLU before a separable convolution runs inside it**: applied while the depthwise
  step copies its input rows into the padded tile, and its mask applied to the input
  gradient tile by tile; the ReLU's output is never stored.
- **Full convolutions as im2col a block of rows at a time** and one matrix product per
  block, and **max pooling tile by tile**, each tile through the plain layer's own code.
- **Other ReLUs in one pass** (the maximum with a row of zeros), keeping only their output.
- **A classification head's products cut into parts for the threads.** A head with dropout
  runs as one share, and its products are small: BLAS stays on one thread and each dense
  layer's products are cut by the kernel's columns (forward) or rows (backward) into parts
  that the engine's threads take one after another, so a core that another process holds
  delays only the part on it. An optimizer's step is shared out the same way
  (``run_elementwise``: its rule is elementwise, so slices give the same numbers).
- **Memory kept from pass to pass.** Each share's outputs, caches, gradients and scratch
  come from a buffer pool (``kernels.BufferPool``) that the engine keeps: fresh memory costs a
  page fault per page on first write, and on a virtual machine a pass through fresh memory
  took up to twice as long. A gradient goes back to the pool as soon as the layer below
  has used it; the caches go back after the backward pass. What the engine returns, and
  every layer's ``grads``, are ordinary arrays of the caller's.

Every other layer (and every layer on a GPU) runs its own pure pair, through the layer's
``forward_step`` / ``backward_step``.

How it is laid out, for a reader who wants to change it: each fast pass is a pair
``fast_*_forward`` / ``fast_*_backward`` that names, in its docstring, the textbook pair it
must equal (tests/test_training_engine.py holds it to that). ``FAST_PASSES`` lists them with
the cases each takes; ``plan_steps`` reads the shared graph plan and gives every node one
step (``FastStep``, ``PlainStep``, ``AddStep`` or ``FusedAwayStep``), so "not my case" is
said once, when planning, and the inference engine's planned steps work the same way.

The engine offers what ``Model`` offers a training loop (``forward``, ``backward``,
``layers``, ``get_layer``), with the same arguments, so ``workflows.fit`` and fine-tuning run
on either. ``engine_for(model)`` keeps one engine per model.

    engine = GradientEngine(model)
    y = engine.forward(x, training=False)          # like model.forward (start_after, stop_after too)
    dx = engine.backward(dy)                       # like model.backward (stop_at too): fills layer.grads
"""
import contextlib
import threading
from dataclasses import dataclass

import numpy as np

from ..layers import Activation, Add, BatchNormalization, Conv2D, Dense, Dropout, MaxPooling2D, SeparableConv2D
from ..layers.base import grad_enabled
from ..layers.pooling import max_pool2d_backward
from ..padding import window, window_geometry
from . import Engine, KeptPerModel
from .kernels import (SMALL_PRODUCT, along_width, backward_pads, conv_kernel_gradient, conv_rows, depthwise_kernel_gradient,
                      depthwise_rows, done_with, extent, gather_rows, lending_from,
                      max_pool_tile_with_argmax, new_array, new_like, ONE_THREAD, single_threaded_blas, tiles_of)
from .plan import CONVOLUTIONS, GraphPlan, Kernels

# Batch-norm's gamma gradient is summed over pieces of about this many bytes of x and dy.
SUM_BYTES = 256 * 1024


# -- sums over the shares of a batch ------------------------------------------------------------

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


@dataclass(frozen=True)
class Share:
    """The share of the batch a pass runs on, handed to it as an argument: its ``index``
    (share 0 moves a batch-norm's moving statistics), the ``ShareSums`` the shares of one
    batch add their partial sums with (None: the share is the whole batch), and the
    ``workers`` it may cut a product into parts for: the engine's threads when a batch of
    small products runs as one share (BLAS then on one thread), else the share's own thread."""
    index: int = 0
    sums: object = None
    workers: object = ONE_THREAD

    def totals(self, *partial):
        """The totals of these partial sums over the batch's shares (themselves when alone)."""
        return partial if self.sums is None else self.sums(self.index, *partial)


WHOLE_BATCH = Share()          # a pass outside an engine, or a batch run as one share


@dataclass(frozen=True)
class Fused:
    """What the plan fused into a convolution's fast pass: ``batch_norm``, the batch-norm after
    it folded in (a ``FoldedBatchNorm``, or None); ``leading_relu``, the ReLU before it applied
    as the depthwise step copies its input rows, and its mask to that step's input gradient."""
    batch_norm: object = None
    leading_relu: bool = False


NOT_FUSED = Fused()


# -- the fast passes ------------------------------------------------------------------------------
#
# Each is a pair: (y, cache) = forward(layer, x, training, fused, share), every forward called the
# same way, and (dx, {layer name: its grads}) = backward(layer, dy, cache), equal to the textbook
# pair its docstring names. Which cases each
# takes is said by FAST_PASSES, at the end, and decided when the engine plans.

class FoldedBatchNorm:
    """A batch-norm on its moving statistics, folded into the convolution before it.

    With u = columns @ K + b the convolution's output (columns: im2col rows, or the depthwise
    output of a separable convolution), the batch-norm's output y is one matrix product with a
    folded kernel K * scale, scale = gamma * inv_std, and bias (``fold_batch_norm``, taught in
    ``minixcept.layers.normalization``), and u is never stored. Backward,
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
        return self.layer.fold_into(matrix, bias)

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


def fast_conv_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """Conv2D [+ folded batch-norm] through ``conv_rows``; keeps only x, as the plain layer does.
    Equals ``layers.conv.conv2d_forward`` [then ``normalization.batch_norm_forward``]."""
    kernel, bn = layer.params['kernel'], fused.batch_norm
    matrix, bias = _matrix_and_bias(kernel, layer.params.get('bias'), bn)
    (out_h, out_w), pads = window_geometry(x.shape[1:3], layer.kernel_size, layer.strides, layer.padding)
    y = conv_rows(x, matrix.reshape(kernel.shape), layer.strides, pads,
                  new_array((x.shape[0], out_h, out_w, kernel.shape[3]), x.dtype))
    if bias is not None:
        y += along_width(bias, out_w)
    return y, (x, pads, bn)


def fast_conv_backward(layer, dy, cache):
    """With stride 1, dx is the convolution of dy with the kernel turned 180 degrees and its
    channel axes swapped (the backward padding as for depthwise); with a larger stride each
    offset's share of dy @ kernel.T is added back through its strided window (col2im).
    Equals ``layers.conv.conv2d_backward`` [after ``normalization.batch_norm_backward``]."""
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


def fast_separable_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """[ReLU ->] SeparableConv2D [-> folded batch-norm] with stride 1: depthwise tile by tile
    into z (ReLU applied as the rows are copied in), then one matrix product. Keeps x (before
    the ReLU) and z. Stride 1 only (``FAST_PASSES``). Equals [``activation.relu_forward``
    then] ``layers.separable.separable_conv2d_forward`` [then ``batch_norm_forward``]."""
    p, bn, relu = layer.params, fused.batch_norm, fused.leading_relu
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


def fast_separable_backward(layer, dy, cache):
    """The pointwise half as two matrix products, then the depthwise half tile by tile, the
    ReLU's mask applied to dx while each tile is in cache. Equals [``batch_norm_backward``
    then] ``layers.separable.separable_conv2d_backward`` [then ``activation.relu_backward``]."""
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


def fast_batch_norm_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """BatchNormalization on its moving statistics, for (N, H, W, C) inputs: one multiply
    and one add with per-channel rows. Equals ``layers.normalization.batch_norm_forward``."""
    p = layer.params
    inv_std = 1.0 / np.sqrt(p['moving_variance'] + layer.epsilon)
    scale = p['gamma'] * inv_std
    width = x.shape[2]
    y = np.multiply(x, along_width(scale, width), out=new_like(x))
    y += along_width(p['beta'] - p['moving_mean'] * scale, width)
    return y, (x, inv_std, scale)


def fast_batch_norm_backward(layer, dy, cache):
    """dx = dy * gamma * inv_std, dbeta = sum(dy), dgamma = sum(dy * (x - mean)) * inv_std,
    all three a piece of rows at a time, so that dy and x are read from memory once.
    Equals ``layers.normalization.batch_norm_backward`` on moving statistics."""
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


def fast_batch_norm_train_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """BatchNormalization on batch statistics, for (N, H, W, C) inputs, with the batch shared
    out between threads: the mean and the (biased) variance are sums over the whole batch,
    gathered from every share (``share.totals``), in two passes as the plain layer computes
    them. The moving statistics move once, by share 0. Equals
    ``layers.normalization.batch_norm_train_forward`` and the layer's moving-statistics update."""
    p = layer.params
    width = x.shape[2]
    total, count = share.totals(x.sum(axis=(0, 1, 2), dtype=x.dtype), x.size // x.shape[-1])
    mean = total / count
    centred = np.subtract(x, along_width(mean, width), out=new_like(x))
    (variance,) = share.totals(np.einsum('nijc,nijc->c', centred, centred))
    variance = variance / count
    done_with(centred)
    inv_std = 1.0 / np.sqrt(variance + layer.epsilon)
    scale = p['gamma'] * inv_std
    y = np.multiply(x, along_width(scale, width), out=new_like(x))
    y += along_width(p['beta'] - mean * scale, width)
    if share.index == 0:
        p['moving_mean'] = p['moving_mean'] * layer.momentum + mean * (1 - layer.momentum)
        p['moving_variance'] = p['moving_variance'] * layer.momentum + variance * (1 - layer.momentum)
        layer.weights_changed()
    return y, (x, mean, inv_std, count, share)


def fast_batch_norm_train_backward(layer, dy, cache):
    """dx = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma), with dbeta = sum(dy) and
    dgamma = sum(dy * x_hat) over the whole batch (m values per channel), gathered from every
    share (the forward pass's ``Share``, kept in the cache). Each share reports its own part
    of dbeta and dgamma; the engine adds them up. Equals ``layers.normalization.batch_norm_backward``
    on batch statistics."""
    x, mean, inv_std, count, share = cache
    width = x.shape[2]
    x_hat = np.subtract(x, along_width(mean, width), out=new_like(x))
    x_hat *= along_width(inv_std, width)
    dbeta_part = dy.sum(axis=(0, 1, 2))
    dgamma_part = np.einsum('nijc,nijc->c', dy, x_hat)
    dbeta, dgamma = share.totals(dbeta_part, dgamma_part)
    dx = np.multiply(dy, count, out=new_like(dy))
    dx -= along_width(dbeta, width)
    x_hat *= along_width(dgamma, width)
    dx -= x_hat
    dx *= along_width(layer.params['gamma'] * inv_std / count, width)
    done_with(x_hat)
    return dx, {layer.name: {'gamma': dgamma_part, 'beta': dbeta_part}}


def fast_max_pool_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """MaxPooling2D tile by tile: each tile of output rows gets its (-inf-)padded input rows,
    pooled in cache with the winning offsets (``kernels.max_pool_tile_with_argmax``: the plain
    layer's rule, ties to the first). Keeps the offsets (int8) for the whole output, as the
    plain layer does. Equals ``layers.pooling.max_pool2d_forward``."""
    n, _, width, channels = x.shape
    (kh, _), (sh, _) = layer.pool_size, layer.strides
    (out_h, out_w), pads = window_geometry(x.shape[1:3], layer.pool_size, layer.strides, layer.padding)
    y = new_array((n, out_h, out_w, channels), x.dtype)
    argmax = new_array(y.shape, np.int8)
    tiles = tiles_of(n, out_h, sh * width * channels * x.itemsize)
    tile_images, tile_rows = max(extent(tile) for tile in tiles)
    x_tile = new_array((tile_images, (tile_rows - 1) * sh + kh, width + sum(pads[1]), channels), x.dtype)
    for images, top, bottom in tiles:
        padded = gather_rows(x, images, top, bottom, kh, sh, pads, x_tile, fill=-np.inf)
        max_pool_tile_with_argmax(padded, layer.pool_size, layer.strides, y[images, top:bottom],
                                  argmax[images, top:bottom])
    done_with(x_tile)
    return y, (x.shape, argmax, pads)


def fast_max_pool_backward(layer, dy, cache):
    """Each tile of dy goes back through the plain layer's backward into the padded rows its
    windows covered, and the part of those rows inside the input is added into dx:
    neighbouring tiles share a halo row. (The padding, -inf, never wins a max, so nothing is
    lost.) dx comes out contiguous, as the matrix products of the layer below want it.
    Equals ``layers.pooling.max_pool2d_backward`` (which it runs on each tile)."""
    x_shape, argmax, pads = cache
    n, h, width, channels = x_shape
    (kh, _), (sh, _) = layer.pool_size, layer.strides
    (top_pad, _), (left, right) = pads
    dx = new_array(x_shape, dy.dtype)
    dx[...] = 0
    for images, top, bottom in tiles_of(n, dy.shape[1], sh * width * channels * dy.itemsize):
        rows_in = (bottom - top - 1) * sh + kh
        tile_shape = (images.stop - images.start, rows_in, width + left + right, channels)
        dx_tile = max_pool2d_backward(dy[images, top:bottom], (tile_shape, argmax[images, top:bottom],
                                                               layer.pool_size, layer.strides, 'valid'))
        first = top * sh - top_pad                     # the input row under the tile's first row
        inside = slice(max(first, 0), min(first + rows_in, h))
        dx[images, inside] += dx_tile[:, inside.start - first:inside.stop - first, left:left + width]
    return dx, {layer.name: {}}


def fast_relu_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """A ReLU not fused into a convolution: one pass (the zero repeated along W, see
    ``kernels.along_width``); keeps its output, whose positive entries are where x was positive.
    Equals ``layers.activation.relu_forward``."""
    y = np.maximum(x, np.zeros(x.shape[-2:] if x.ndim > 2 else x.shape[-1:], x.dtype), out=new_like(x))
    return y, y


def fast_relu_backward(layer, dy, y):
    """dy where the ReLU's output is positive, 0 elsewhere. Equals ``layers.activation.relu_backward``."""
    positive = np.greater(y, 0, out=new_array(y.shape, bool))
    dx = np.multiply(dy, positive, out=new_like(dy))
    done_with(positive)
    return dx, {layer.name: {}}


#: Parts a thread when a product is cut for the threads (``fast_dense_forward``).
PARTS_A_THREAD = 2


def _parts(size, workers, narrowest=64):
    """Slices cutting ``size`` rows or columns into ``PARTS_A_THREAD`` parts a thread
    (``workers``), none narrower than ``narrowest``: one slice on one thread."""
    count = max(1, min(PARTS_A_THREAD * workers.threads if workers.threads > 1 else 1, size // narrowest))
    bounds = [size * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def fast_dense_forward(layer, x, training, fused=NOT_FUSED, share=WHOLE_BATCH):
    """z = x @ kernel + bias, with the product cut by the kernel's columns into parts that the
    share's threads take one after another (a thread kept off its core holds up only its
    part), then the layer's ReLU if it has one (``fast_relu_forward``). Keeps x and the
    ReLU's output (None without one). Equals ``dense.dense_forward`` (and
    ``activation.relu_forward``)."""
    kernel, bias = layer.params['kernel'], layer.params.get('bias')
    z = new_array((len(x), kernel.shape[1]), np.result_type(x, kernel))

    def columns(part, _slot):
        z[:, part] = x @ kernel[:, part]             # (matmul's out= is slow on a strided slice)
    share.workers.each(columns, _parts(kernel.shape[1], share.workers))
    if bias is not None:
        z += bias
    if layer.activation != 'relu':
        return z, (x, None, share.workers)
    y, _ = fast_relu_forward(layer, z, training)
    done_with(z)
    return y, (x, y, share.workers)


def fast_dense_backward(layer, dy, cache):
    """dz = dy (through the ReLU's backward, ``fast_relu_backward``, if the layer has one), then
    dkernel = x.T @ dz and dx = dz @ kernel.T cut alike by the kernel's rows: part r gives
    dkernel[r] and dx[:, r]. dbias = the sum of dz over the batch. Equals
    ``dense.dense_backward`` (and ``activation.relu_backward``)."""
    x, y, workers = cache
    kernel = layer.params['kernel']
    dz = dy if y is None else fast_relu_backward(layer, dy, y)[0]
    dkernel = np.empty(kernel.shape, dz.dtype)                       # the layer's grads: the caller's arrays
    dx = new_array(x.shape, dz.dtype)

    def rows(part, _slot):
        np.matmul(x[:, part].T, dz, out=dkernel[part])
        dx[:, part] = dz @ kernel[part].T
    workers.each(rows, _parts(kernel.shape[0], workers))
    grads = {'kernel': dkernel}
    if layer.use_bias:
        grads['bias'] = dz.sum(axis=0)
    return dx, {layer.name: grads}


@dataclass(frozen=True)
class FastPass:
    """A fast pair for one layer type, the cases it takes (``takes(layer, training, rank)``,
    rank: that of the layer's input), and the textbook pair it must equal."""
    layer_type: type
    takes: object
    forward: object
    backward: object
    equals: str


def _on_moving_statistics(layer, training, rank):
    return rank == 4 and not (training and layer.trainable)


def _on_batch_statistics(layer, training, rank):
    return rank == 4 and training and layer.trainable


FAST_PASSES = (
    FastPass(Dense, lambda layer, training, rank: rank == 2 and layer.activation in (None, 'relu'),
             fast_dense_forward, fast_dense_backward, 'dense.dense_forward / dense_backward'),
    FastPass(Activation, lambda layer, training, rank: layer.activation == 'relu',
             fast_relu_forward, fast_relu_backward, 'activation.relu_forward / relu_backward'),
    FastPass(MaxPooling2D, lambda layer, training, rank: True,
             fast_max_pool_forward, fast_max_pool_backward, 'pooling.max_pool2d_forward / _backward'),
    FastPass(Conv2D, lambda layer, training, rank: True,
             fast_conv_forward, fast_conv_backward, 'conv.conv2d_forward / _backward'),
    FastPass(SeparableConv2D, lambda layer, training, rank: layer.strides == (1, 1),
             fast_separable_forward, fast_separable_backward, 'separable.separable_conv2d_forward / _backward'),
    FastPass(BatchNormalization, _on_moving_statistics, fast_batch_norm_forward, fast_batch_norm_backward,
             'normalization.batch_norm_forward / batch_norm_backward'),
    FastPass(BatchNormalization, _on_batch_statistics, fast_batch_norm_train_forward,
             fast_batch_norm_train_backward, 'normalization.batch_norm_train_forward / batch_norm_backward'),
)


def fast_pass_for(layer, training, rank):
    """The fast pass that takes this layer in this mode on inputs of this rank, or None: the
    layer's own pair runs."""
    for fast_pass in FAST_PASSES:
        if type(layer) is fast_pass.layer_type and fast_pass.takes(layer, training, rank):
            return fast_pass
    return None


# -- fusions: what a convolution's fast pass takes in ---------------------------------------------

def _stride_one_separable(layer):
    return isinstance(layer, SeparableConv2D) and layer.strides == (1, 1)


# What this engine's fast pairs take into a convolution: a ReLU on its input rows and a folded
# batch-norm for a stride-1 separable convolution; a folded batch-norm for a full convolution.
KERNELS = Kernels(leading_relu=_stride_one_separable,
                  batch_norm=lambda conv: isinstance(conv, Conv2D) or _stride_one_separable(conv),
                  trailing_relu=lambda conv: False)


def plan_fusion(graph):
    """Which layers fuse into a convolution next to them (the shared rules of
    ``minixcept.engines.plan``, with this engine's ``KERNELS``), for a ``GraphPlan``: returns
    ({convolution name: Fused}, {names of the layers fused away}). (Fusion keeps the
    mathematics: the tests compare fused pairs with the plain layers.)"""
    fusions, absorbed = graph.fusions(KERNELS)
    fused = {name: Fused(batch_norm=FoldedBatchNorm(fusion.batch_norm.layer) if fusion.batch_norm else None,
                         leading_relu=fusion.leading_relu is not None)
             for name, fusion in fusions.items()}
    return fused, absorbed


# -- steps: one per node of the plan --------------------------------------------------------------
#
# forward(inputs, training, share) -> (y, cache); backward(dy, cache) -> (gradients of the
# inputs, {layer name: its grads}). The plan gives each node the step that runs it.

class TrainingStep:
    def __init__(self, node):
        self.node, self.layer = node, node.layer


class FastStep(TrainingStep):
    """A layer through its fast pass, with what the plan fused into it."""

    def __init__(self, node, fast_pass, fused=NOT_FUSED):
        super().__init__(node)
        self.fast_pass, self.fused = fast_pass, fused

    def forward(self, inputs, training, share):
        x, = inputs
        return self.fast_pass.forward(self.layer, x, training, self.fused, share)

    def backward(self, dy, cache):
        return self.fast_pass.backward(self.layer, dy, cache)


class PlainStep(TrainingStep):
    """A layer through its own pair (``forward_step`` / ``backward_step``)."""

    def forward(self, inputs, training, share):
        x, = inputs
        return self.layer.forward_step(x, training)

    def backward(self, dy, cache):
        dx, grads = self.layer.backward_step(dy, cache)
        return dx, {self.layer.name: grads}


class AddStep(TrainingStep):
    """The residual add: two inputs, no parameters, no cache; backward passes dy to both."""

    def forward(self, inputs, training, share):
        a, b = inputs
        y = (np.add(a, b, out=new_like(a)) if isinstance(a, np.ndarray) and a.shape == b.shape
             else self.layer.forward(a, b))     # (which names the shapes when they differ)
        return y, None

    def backward(self, dy, cache):
        return (dy, dy), {self.layer.name: {}}


class FusedAwayStep(TrainingStep):
    """A layer fused into a convolution next to it (a batch-norm folded into the one before it,
    a ReLU into the separable one after it): the convolution's pass does its work, forward and
    backward, so this step passes its input on and its gradient back."""

    def forward(self, inputs, training, share):
        return inputs[0], None

    def backward(self, dy, cache):
        return dy, {}


@dataclass
class TrainingPlan:
    """The graph plan of a stretch and mode, a step for each of its nodes, and the fusions."""
    graph: GraphPlan
    steps: list
    fused: dict
    absorbed: set

    @property
    def hidden(self):
        """Tensors the engine never stores: a convolution's output with its batch-norm folded
        in, and the output of every layer fused away but a folded batch-norm (whose output is
        the convolution's)."""
        return ({name for name, fused in self.fused.items() if fused.batch_norm is not None}
                | {step.layer.name for step in self.steps
                   if isinstance(step, FusedAwayStep) and not isinstance(step.layer, BatchNormalization)})


def plan_steps(model, graph, fast=True):
    """A ``TrainingPlan``: for every node of ``graph``, the step that runs it. With ``fast``
    (NumPy arrays), fusions and fast passes where ``FAST_PASSES`` takes the case; without
    (GPU arrays), every layer's own pair."""
    fused, absorbed = plan_fusion(graph) if fast else ({}, set())
    steps = []
    for node in graph.nodes:
        layer = node.layer
        fast_pass = (fast_pass_for(layer, graph.training, len(model.output_shape(node.inputs[0])))
                     if fast and isinstance(layer, (Activation, Dense, MaxPooling2D, BatchNormalization) + CONVOLUTIONS)
                     else None)
        if layer.name in absorbed:
            steps.append(FusedAwayStep(node))
        elif isinstance(layer, Add):
            steps.append(AddStep(node))
        elif fast_pass is not None:
            steps.append(FastStep(node, fast_pass, fused.get(layer.name, NOT_FUSED)))
        else:
            steps.append(PlainStep(node))
    return TrainingPlan(graph, steps, fused, absorbed)


# -- the engine -----------------------------------------------------------------------------------

#: Numbers per slice when an optimizer's update is shared out on the engine's threads
#: (``GradientEngine.run_elementwise``): 2^17 float32 (512 KiB an array) keeps each slice's
#: arrays within a core's cache share and makes a 2,048 x 256 kernel four slices.
ELEMENTWISE_PART = 1 << 17


class GradientEngine(Engine):
    """A model's forward and backward pass for training, rearranged for the CPU (see the module
    docstring). Same results as ``model.forward`` / ``model.backward`` up to float32
    rounding: the output, the input gradient, and each layer's ``grads``. It runs on the
    model's own layers and weights: an optimizer step, ``set_weights`` or ``load_weights``
    between passes is seen by the next one (the folds are made afresh when a layer's
    ``weights_version`` changed).

    threads: how many shares a batch is cut into, each run on its own thread while BLAS is
    held to one thread (``Engine``). A batch with fewer examples than threads, a batch through
    active dropout in training, and GPU arrays run as one share on the calling thread, with
    BLAS's own threads.
    """

    def __init__(self, model, threads=None):
        super().__init__(model, threads)
        self._shares = None                      # per share: (slice of the batch, its step records)
        self._last = None                        # the TrainingPlan of the last forward pass
        self._largest_product = None             # multiply-adds of its largest layer over the batch

    # -- what a runner offers (as Model) -------------------------------------------------------
    @property
    def name(self):
        return self.model.name

    def get_layer(self, name):
        return self.model.get_layer(name)

    def output_shape(self, name=None):
        return self.model.output_shape(name)

    def count_params(self):
        return self.model.count_params()

    def _plan(self, training, start_after, stop_after, fast=True):
        """The TrainingPlan for this stretch and mode (``fast``: for NumPy arrays)."""
        def make():
            graph = GraphPlan(self.model, training, start_after=start_after, stop_after=stop_after)
            return plan_steps(self.model, graph, fast)
        return self.kept_plan((training, start_after, stop_after, fast), start_after, stop_after, make)

    def needs_one_share(self, training, nodes=None):
        """Whether the batch must run as one share in this mode: a dropout layer draws its
        masks from one generator, example after example, and shares would draw them in
        another order; and a batch-norm on batch statistics of other than (N, H, W, C)
        inputs runs the plain layer, which sees only its own share. (On (N, H, W, C) inputs
        the shares add up their sums, see ``ShareSums``. On a GPU a batch is always one share.)
        nodes: the nodes that run (default: all)."""
        if not training:
            return False
        for node in self.model.nodes if nodes is None else nodes:
            layer = node.layer
            if isinstance(layer, Dropout) and layer.rate > 0:
                return True
            if (isinstance(layer, BatchNormalization) and layer.trainable
                    and len(self.model.output_shape(node.inputs[0])) != 4):
                return True
        return False

    def _share_slices(self, x, training, nodes=None):
        if (self.threads == 1 or len(x) < self.threads or not isinstance(x, np.ndarray)
                or self.needs_one_share(training, nodes)):
            return [slice(0, len(x))]
        bounds = np.linspace(0, len(x), self.threads + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def largest_product(self, x, plan):
        """Multiply-adds of the costliest layer of the plan over batch ``x`` (None when unknown):
        how much work one matrix product has, which decides BLAS's threads for a single share."""
        try:
            free = [axis for axis, size in enumerate(self.model.input_shape) if size is None]
            shapes = self.model.shapes_at([x.shape[1 + axis] for axis in free] or None)
            return len(x) * max((node.layer.multiply_adds(shapes[node.inputs[0]]) for node in plan.graph.nodes),
                                default=0)
        except (ValueError, KeyError, TypeError):
            return None

    def _each_share(self, function, count):
        """Run function(share) for every share (a ``Share``: its index, the sums it adds its
        partial sums with, the threads it may cut a product for), with that share's buffer
        pool, and return the results in order. Several shares run on the workers with BLAS
        held to one thread. One share runs on the calling thread: when its largest product is
        small (``SMALL_PRODUCT``), with BLAS on one thread and the engine's threads to cut the
        products into parts (``fast_dense_forward``), else with BLAS's own threads."""
        results = [None] * count
        sums = ShareSums(count)

        def run(index, _slot=0, workers=ONE_THREAD):
            try:
                with lending_from(self.buffers[index]):
                    results[index] = function(Share(index, sums if count > 1 else None, workers))
            except threading.BrokenBarrierError:
                pass                             # another share failed: its error is the one raised
            except BaseException:
                sums.abort()                     # let the shares waiting for this one go
                raise
        if count == 1:
            if self._largest_product is not None and self._largest_product < SMALL_PRODUCT:
                with single_threaded_blas() or contextlib.nullcontext():
                    run(0, workers=self.workers)
            else:
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

    def forward(self, x, training=False, start_after=None, stop_after=None):
        """Like ``model.forward(x, training, start_after=..., stop_after=...)``; keeps what
        ``backward`` needs (nothing under ``no_grad()``)."""
        self.model.check_input(x, start_after)
        self._release()
        plan = self._plan(training, start_after, stop_after, fast=isinstance(x, np.ndarray))
        graph = plan.graph
        slices = self._share_slices(x, training, graph.nodes)
        self._largest_product = self.largest_product(x, plan) if len(slices) == 1 else None

        def run(share):
            tensors, records = {graph.start: x[slices[share.index]]}, []
            for position, node, step in zip(graph.positions, graph.nodes, plan.steps):
                y, cache = step.forward([tensors[name] for name in node.inputs], training, share)
                tensors[node.layer.name] = y
                records.append(cache)
                for name in node.inputs:
                    if graph.last_use[name] == position:
                        del tensors[name]
            return tensors[graph.output], records

        results = self._each_share(run, len(slices))
        outputs = [y for y, _ in results]
        y = outputs[0].copy() if len(outputs) == 1 else np.concatenate(outputs)   # not pool memory
        if grad_enabled():
            self._last = plan
            self._shares = [(share, records) for share, (_, records) in zip(slices, results)]
        else:
            self._release()
        return y

    __call__ = forward

    def backward(self, dy, stop_at=None):
        """Like ``model.backward(dy, stop_at)`` after this engine's ``forward``: returns the
        gradient of that forward's input (or of ``stop_at``'s input, complete where it fans
        out: see ``Model.backward``) and fills the ``grads`` of every layer it ran back
        through. Each share goes back through its own records (``_share_backward``); then
        the shares' weight gradients are summed into the layers (``_sum_into_layers``)."""
        if self._shares is None:
            raise RuntimeError(f"model {self.model.name!r}: the engine's backward needs its forward first "
                               f"(with gradients enabled)")
        plan, shares = self._last, self._shares
        graph = plan.graph
        stop_position, stop_tensor = self.model.backward_stop(stop_at, graph.first, graph.last)
        if stop_tensor in plan.hidden:
            raise ValueError(f"model {self.model.name!r}: the engine fuses {stop_tensor!r} with its neighbour, "
                             f"so it cannot stop at {stop_at!r}; stop at a layer that reads an unfused tensor "
                             f"(e.g. the first layer of a block), or run the model's own backward")
        walked = range(len(graph.nodes) - 1, stop_position - graph.first - 1, -1)     # indices into graph.nodes
        wanted = stop_tensor or graph.start
        results = self._each_share(
            lambda share: self._share_backward(plan, walked, wanted, shares[share.index][1],
                                               dy[shares[share.index][0]], self.buffers[share.index]),
            len(shares))
        self._release()                            # the caches are spent
        self._sum_into_layers([graph.nodes[i].layer for i in walked], [grads for _, grads in results])
        dxs = [dx for dx, _ in results]
        return dxs[0] if len(dxs) == 1 else np.concatenate(dxs)

    @staticmethod
    def _share_backward(plan, walked, wanted, records, dy, buffers):
        """One share's backward pass, node by node from the output down: (the gradient of
        tensor ``wanted``, {layer name: this share's grads}). Where a tensor was read twice,
        its gradients add; a gradient goes back to the share's pool once its reader is done."""
        graph = plan.graph
        pending, grads = {graph.output: dy}, {}

        def spent(array):
            """Back to the pool, unless a gradient still waiting is this array or a view of it
            (an Add passes its dy on to both inputs; a linear activation passes it through)."""
            if isinstance(array, np.ndarray) and not any(np.may_share_memory(array, g) for g in pending.values()):
                buffers.give_back(array)

        for i in walked:
            node = graph.nodes[i]
            dy_node = pending.pop(node.layer.name)
            input_grads, layer_grads = plan.steps[i].backward(dy_node, records[i])
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
        return pending[wanted].copy(), grads                      # not pool memory

    def run_elementwise(self, update, arrays):
        """An optimizer's update of one parameter on this engine's threads (the ``run`` of
        ``Optimizer.apply_gradients``). The update is elementwise, so a large parameter is cut
        into matching slices of ``ELEMENTWISE_PART`` numbers of each array (param, grad, state),
        which the threads take one after another: the same numbers as one update of the
        whole, and a thread kept off its core holds up only the slice it is on. A small
        parameter, GPU arrays, and arrays that are not one contiguous block run whole."""
        size = arrays[0].size
        if (self.threads == 1 or size < 2 * ELEMENTWISE_PART
                or not all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.size == size for a in arrays)):
            update(*arrays)
            return
        flat = [a.reshape(-1) for a in arrays]          # views: the slices write into the arrays
        parts = [slice(start, start + ELEMENTWISE_PART) for start in range(0, size, ELEMENTWISE_PART)]
        self.workers.each(lambda part, _slot: update(*(a[part] for a in flat)), parts)

    @staticmethod
    def _sum_into_layers(layers, grads_of_shares):
        """Each layer's ``grads``: the sum over the shares of that share's grads (the gradient of
        a batch is the sum of its parts'), added into the first share's arrays (fresh ones)."""
        for layer in layers:
            parts = [grads.get(layer.name, {}) for grads in grads_of_shares]     # a fused ReLU has none
            for part in parts[1:]:
                for name, gradient in part.items():
                    parts[0][name] += gradient
            layer.grads = parts[0]


# The ``GradientEngine`` kept for ``model`` (made on first use, with its buffer pools, kept
# as long as the model lives): what ``workflows.fit`` and fine-tuning run on.
engine_for = KeptPerModel(GradientEngine)
