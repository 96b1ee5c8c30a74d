"""Fast inference: a model's forward pass, planned again for speed on the CPU.

The layers in ``minixcept.layers`` compute exactly what the textbook says, one
layer at a time, each allocating its output. That is the version to read. For
inference (``Model.predict``) this module runs the same mathematics with the
work rearranged; tests/test_fast_paths.py checks every step against the plain
layers. ``InferenceEngine(model)`` reads the model's nodes and plans a shorter
list of *steps*:

- **Batch-norm folded into the convolution before it.** At inference a
  batch-norm is a per-channel affine map ``y = x * scale + shift``, so
  ``BN(X @ K) = X @ (K * scale) + shift``: the kernel absorbs the scale and the
  shift becomes a bias.
- **ReLU fused.** Before a separable convolution it is applied while the input
  rows are copied into the zero-padded tile the depthwise step reads anyway;
  after a convolution whose output nobody else reads it runs in place. It never
  runs in place on a tensor something else still reads: in Xception's blocks
  3-13 the residual shortcut reads the *pre*-ReLU block input.
- **Work in cache-sized pieces.** A windowed step works through its output a
  block of rows at a time: for each small tile of the block, copy the input rows
  it needs into a padded scratch tile and run the depthwise multiply-adds (or
  im2col) on it while it is in the CPU cache; then one matrix product mixes the
  channels of the whole block, and bias and ReLU follow while its output is
  still in cache. Main memory sees each input read once and each output written
  once. (At 299 px a block-2 tensor of a batch of 8 is 88 MB, larger than any
  cache; matrix products on a few thousand rows are also faster than on 170,000.)
- **Depthwise convolution as kh*kw multiply-adds** into preallocated arrays, with
  the weights repeated along W so that NumPy runs one long loop per row; with 256
  channels or more, as one ``einsum`` over a strided view of all the windows.
- **Max pooling as two 1-D passes**: the max over a 3x3 window is the max over
  its three rows of each row's max over three columns.
- **The residual add in place**, into a tensor nobody reads afterwards.
- **Memory reused between batches.** Large outputs come from a small pool that
  takes them back when no step reads them any more: fresh memory costs a page
  fault per page on first write, which for the entry flow's tensors costs about
  as much as the arithmetic on them.
- **One thread per core**, each on its share of the batch (or, for a single photo,
  on its share of each step's blocks), with the BLAS library held to one thread
  (see ``InferenceEngine``).

Everything else (global pooling, the classifier head) runs through the layer's
own ``forward``. The engine copies the weights it folds when it is built: build
a new one after changing a model's weights. It never writes into the array it
is given.

    engine = InferenceEngine(model)
    y = engine(x)                                  # x: (N, H, W, C), like model.forward
    y, acts = engine(x, capture=['block3_pool'])   # outputs of named layers, as model.forward
    print(engine.describe())                       # which layers each step runs
"""
import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import get_array_module
from ..layers import (Activation, Add, BatchNormalization, Conv2D, DepthwiseConv2D, MaxPooling2D,
                     PointwiseConv2D, SeparableConv2D)
from ..layers.base import no_grad
from ..padding import window, window_geometry

try:
    from threadpoolctl import ThreadpoolController
except ImportError:                           # optional: without it the engine runs on one thread
    ThreadpoolController = None

# Work is split twice. A *block* is what one matrix product multiplies: a few MB of rows, a
# few thousand, where BLAS runs at full speed (many small calls spend their time starting and
# synchronising) and the block's output is still in cache for the bias and ReLU. A *tile* is
# what the element-wise work (padding, depthwise multiply-adds, im2col) does at a time:
# small enough that its input rows, products and partial sums stay in the CPU cache.
BLOCK_BYTES = 8 * 1024 * 1024
TILE_BYTES = 512 * 1024


# -- folding --------------------------------------------------------------------------------------

def fold_batch_norm(kernel, bias, batch_norm):
    """Fold an inference batch-norm into the convolution before it.

    kernel: (..., C_out), e.g. Conv2D (kh, kw, C_in, C_out) or pointwise (1, 1, C_in, C_out);
    bias: (C_out,) or None. With scale = gamma / sqrt(moving_variance + epsilon),

        BN(conv(x, K) + b) = conv(x, K * scale) + (b - moving_mean) * scale + beta

    Returns (folded kernel, folded bias); without a batch-norm, the inputs unchanged.
    """
    if batch_norm is None:
        return kernel, bias
    xp = get_array_module(kernel)
    p = batch_norm.params
    scale = p['gamma'] / xp.sqrt(p['moving_variance'] + batch_norm.epsilon)       # (C_out,)
    shift = p['beta'] - p['moving_mean'] * scale
    if bias is not None:
        shift = shift + bias * scale
    return kernel * scale, shift


# -- blocks and tiles -----------------------------------------------------------------------------

def split_rows(images, top, bottom, row_bytes, target_bytes, out_h):
    """Split the output rows [top, bottom) of ``images`` (a slice) into pieces of about
    ``target_bytes``: groups of whole images when an image is small, else runs of rows of
    one image. Returns [(images slice, first row, end row)], each piece contiguous in memory.
    """
    whole_images = top == 0 and bottom == out_h
    image_bytes = row_bytes * out_h
    if whole_images and image_bytes <= target_bytes:
        per_piece = max(1, target_bytes // image_bytes)
        return [(slice(i, min(images.stop, i + per_piece)), 0, out_h)
                for i in range(images.start, images.stop, per_piece)]
    rows = max(1, target_bytes // row_bytes)
    return [(slice(i, i + 1), first, min(bottom, first + rows))
            for i in range(images.start, images.stop) for first in range(top, bottom, rows)]


def plan_blocks(n_images, out_h, row_bytes, xp, at_least=1):
    """[(block, [tiles])] covering an output (N, H_out, ...) whose rows each mean ``row_bytes``
    of work, in ``at_least`` blocks where the rows allow (so that that many threads can share
    them). On a GPU one block of one tile covers everything: there the cost is in kernel
    launches, not in cache misses."""
    everything = (slice(0, n_images), 0, out_h)
    if xp is not np:
        return [(everything, [everything])]
    block_bytes = min(BLOCK_BYTES, -(-n_images * out_h * row_bytes // at_least))
    return [(block, split_rows(*block, row_bytes, TILE_BYTES, out_h))
            for block in split_rows(*everything, row_bytes, block_bytes, out_h)]


def gather_rows(x, images, top, bottom, window_h, stride_h, pads, out, fill=0.0, relu_zeros=None):
    """Copy into ``out`` the padded input rows that output rows [top, bottom) read.

    x: (N, H, W, C); pads: ((top, bottom), (left, right)) as TensorFlow pads; out: a scratch
    array of at least (images, (bottom - top - 1) * stride_h + window_h, W + left + right, C).
    Rows and columns outside x get ``fill`` (0 for convolutions, -inf for max pooling).
    relu_zeros: zeros (W, C) to apply ReLU on the way, or None. Returns the filled part of ``out``.
    """
    xp = get_array_module(x)
    h, w = x.shape[1:3]
    (pad_top, _), (left, right) = pads
    n = images.stop - images.start
    rows = (bottom - top - 1) * stride_h + window_h
    tile = out[:n, :rows, :w + left + right]
    first = top * stride_h - pad_top                  # the input row under the tile's first row
    src_top, src_bottom = max(first, 0), min(first + rows, h)
    dst_top, dst_bottom = src_top - first, src_bottom - first
    tile[:, :dst_top] = fill
    tile[:, dst_bottom:] = fill
    tile[:, dst_top:dst_bottom, :left] = fill
    tile[:, dst_top:dst_bottom, left + w:] = fill
    inside = tile[:, dst_top:dst_bottom, left:left + w]
    source = x[images, src_top:src_bottom]
    if relu_zeros is not None:
        xp.maximum(source, relu_zeros, out=inside)
    else:
        inside[...] = source
    return tile


# -- the operations on one tile -------------------------------------------------------------------

def along_width(values, width):
    """(..., C) -> (..., width, C): per-channel values repeated along W, contiguous.

    NumPy's element-wise loops are fastest when every operand is contiguous across the
    inner axes: then a row of W*C values is one SIMD loop. A (C,) vector broadcast along W
    breaks that into W short loops, and a Python scalar (the 0 of a ReLU) takes a slower
    path still (np.maximum(x, 0) runs at about a third of the speed of np.maximum(x, zeros)).
    So depthwise weights, biases and the ReLU's zero are repeated along W once per step.
    """
    xp = get_array_module(values)
    repeated = xp.broadcast_to(values[..., None, :], values.shape[:-1] + (width, values.shape[-1]))
    return xp.ascontiguousarray(repeated)


def depthwise_tile(x_tile, taps, strides, out, scratch):
    """Depthwise convolution of a padded tile, as kh*kw multiply-adds.

    x_tile: (n, rows_in, Wp, C) padded input rows; taps: (kh, kw, W_out, C), the kernel
    (kh, kw, C) repeated along W by ``along_width``; out, scratch: (n, rows, W_out, C).

        out[n, i, j, c] = sum over p, q of x_tile[n, i*sh + p, j*sw + q, c] * taps[p, q, j, c]

    Each product goes into ``scratch`` and is added in place: no temporaries. With many
    channels (NumPy only), one ``einsum`` over a view of all the windows does the same sum
    in a single pass instead of 2*kh*kw - 1 (see ``EINSUM_MIN_CHANNELS``).
    """
    xp = get_array_module(x_tile)
    kh, kw = taps.shape[:2]
    out_hw = out.shape[1:3]
    if xp is np and x_tile.shape[-1] >= EINSUM_MIN_CHANNELS:
        return np.einsum('nijpqc,pqc->nijc', all_windows(x_tile, (kh, kw), out_hw, strides), taps[:, :, 0], out=out)
    xp.multiply(window(x_tile, 0, 0, out_hw, strides), taps[0, 0], out=out)
    for p in range(kh):
        for q in range(kw):
            if p or q:
                xp.multiply(window(x_tile, p, q, out_hw, strides), taps[p, q], out=scratch)
                out += scratch
    return out


# einsum's multiply-add loop runs along the channels; from about this many channels it beats
# the separate multiplies and adds (on this project's machines: 1.2-1.4x faster with 256 and
# 728 channels, 1.3x slower with 128).
EINSUM_MIN_CHANNELS = 256


def all_windows(x_tile, kernel_size, out_hw, strides):
    """A read-only view (n, out_h, out_w, kh, kw, C) of a NumPy tile (n, rows_in, Wp, C):
    element [n, i, j, p, q, c] is x_tile[n, i*sh + p, j*sw + q, c]. No copy: the two window
    axes step through the same memory as the row and column axes."""
    (kh, kw), (out_h, out_w), (sh, sw) = kernel_size, out_hw, strides
    s_n, s_row, s_col, s_c = x_tile.strides
    return np.lib.stride_tricks.as_strided(
        x_tile, (x_tile.shape[0], out_h, out_w, kh, kw, x_tile.shape[3]),
        (s_n, s_row * sh, s_col * sw, s_row, s_col, s_c), writeable=False)


def im2col_tile(x_tile, kernel_size, strides, out):
    """The im2col columns of a padded tile: out[n, i, j, p, q, :] = x_tile[n, i*sh + p, j*sw + q, :].

    x_tile: (n, rows_in, Wp, C_in); out: (n, rows, W_out, kh, kw, C_in), laid out (p, q, c) like
    a Conv2D kernel reshaped to (kh*kw*C_in, C_out), so the convolution is one matrix product.
    """
    kh, kw = kernel_size
    out_hw = out.shape[1:3]
    for p in range(kh):
        for q in range(kw):
            out[:, :, :, p, q, :] = window(x_tile, p, q, out_hw, strides)
    return out


def bias_and_relu(y, bias_row, zeros_row):
    """y += bias_row, then y = max(y, 0) in place, each when given.

    y: (n, rows, W, C); bias_row, zeros_row: (W, C) from ``along_width``, or None.
    """
    xp = get_array_module(y)
    if bias_row is not None:
        y += bias_row
    if zeros_row is not None:
        xp.maximum(y, zeros_row, out=y)
    return y


def max_pool_tile(x_tile, pool_size, strides, out, row_max):
    """Max pooling of a (-inf-)padded tile as two 1-D passes.

    x_tile: (n, rows_in, Wp, C); out: (n, rows, W_out, C); row_max: scratch of at least
    (n, rows_in, W_out, C). The max over a kh x kw window is the max over its kh rows of each
    row's max over kw columns: (kw - 1) + (kh - 1) maxima per output instead of kh*kw - 1 (the
    first pass on about sh times as many rows), and exactly the plain layer's result (a max
    involves no rounding).
    """
    xp = get_array_module(x_tile)
    (kh, kw), (sh, sw) = pool_size, strides
    rows_in, (out_h, out_w) = x_tile.shape[1], out.shape[1:3]
    row_max = row_max[:x_tile.shape[0], :rows_in]                               # (n, rows_in, W_out, C)
    row_max[...] = window(x_tile, 0, 0, (rows_in, out_w), (1, sw))
    for q in range(1, kw):
        xp.maximum(row_max, window(x_tile, 0, q, (rows_in, out_w), (1, sw)), out=row_max)
    out[...] = window(row_max, 0, 0, (out_h, out_w), (sh, 1))
    for p in range(1, kh):
        xp.maximum(out, window(row_max, p, 0, (out_h, out_w), (sh, 1)), out=out)
    return out


# -- memory ---------------------------------------------------------------------------------------

class BufferPool:
    """Arrays for the engine's outputs, taken back and handed out again batch after batch.

    Fresh memory is slow the first time it is written: the kernel must find and clear every
    page (and on a virtual machine the host may have to back it too). For the entry flow's
    tensors that costs about as much as the arithmetic on them. The engine asks this pool for
    each large output and gives it back when no step reads it any more, so after the first
    batch no new memory is touched. A request gets the smallest free block that is large
    enough, viewed with the requested shape; since every batch makes the same requests in
    the same order, the pool stops growing after the first. GPU arrays bypass it (CuPy
    keeps its own pool).
    """

    def __init__(self):
        self._free = []              # flat byte arrays not in use
        self._lent = {}              # id(array handed out) -> (that array, its block)

    def empty(self, shape, dtype, xp=np):
        if xp is not np:
            return xp.empty(shape, dtype=dtype)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        fitting = [i for i, block in enumerate(self._free) if block.nbytes >= nbytes]
        if fitting:
            block = self._free.pop(min(fitting, key=lambda i: self._free[i].nbytes))
        else:
            block = np.empty(nbytes, dtype=np.uint8)
        array = block[:nbytes].view(dtype).reshape(shape)
        self._lent[id(array)] = (array, block)
        return array

    def give_back(self, array, still_used=None):
        """Return an array from ``empty`` to the pool (anything else is ignored), unless it
        shares memory with ``still_used``: an in-place step's output, or a view a layer returned."""
        entry = self._lent.get(id(array))
        if entry is not None and entry[0] is array and not (
                still_used is not None and np.may_share_memory(array, still_used)):
            del self._lent[id(array)]
            self._free.append(entry[1])

    def give_back_all(self):
        """Take back every array lent out: the caller holds none of them any more."""
        self._free.extend(block for _, block in self._lent.values())
        self._lent.clear()

    def forget_lent(self):
        """Arrays still out after a forward pass went to the caller: they are theirs now."""
        self._lent.clear()

    @property
    def nbytes(self):
        return sum(block.nbytes for block in self._free)


# -- threads --------------------------------------------------------------------------------------

class Workers:
    """Runs a function over a list of items on the calling thread and ``threads - 1`` helpers.

    Each thread takes the next item as soon as it is done with one, so a thread that another
    process keeps off its core holds up only the item it is on. ``function(item, slot)`` gets
    the index of the thread running it, to work in scratch arrays of that thread's own.
    NumPy and (single-threaded) BLAS release the GIL inside their loops, so the threads
    really do run at once.
    """

    def __init__(self, threads=1):
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def each(self, function, items):
        if self.threads == 1 or len(items) < 2:
            for item in items:
                function(item, 0)
            return
        pending, lock = iter(items), threading.Lock()

        def work(slot):
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                function(item, slot)
        helpers = [self._pool.submit(work, slot) for slot in range(1, min(self.threads, len(items)))]
        work(0)
        for helper in helpers:
            helper.result()                   # waits, and raises a helper's exception here


ONE_THREAD = Workers(1)


# -- steps: what the engine runs -----------------------------------------------------------------

class Step:
    """One unit of the plan: reads tensors by name, writes ``output``; ``layers`` names the
    model layers it stands for, in order."""

    def __init__(self, layers, inputs, output):
        self.layers = tuple(layers)
        self.inputs = tuple(inputs)
        self.output = output

    def describe(self):
        return ' + '.join(self.layers)

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"


class WindowedConvStep(Step):
    """A convolution over windows, tile by tile, with what the plan fused around it:

        [ReLU] -> Conv2D | SeparableConv2D | DepthwiseConv2D
               -> [BatchNormalization, folded] -> [ReLU, in place]

    Full convolutions go through im2col, separable ones through the depthwise multiply-adds;
    either way the channels are mixed by one matrix product per block of rows.
    """

    def __init__(self, conv, inputs, leading_relu=None, batch_norm=None, relu=None):
        layers = [layer.name for layer in (leading_relu, conv, batch_norm, relu) if layer is not None]
        super().__init__(layers, inputs, layers[-1])
        p = conv.params
        self.leading_relu, self.relu = leading_relu is not None, relu is not None
        self.kernel_size = getattr(conv, 'kernel_size', (1, 1))
        self.strides = getattr(conv, 'strides', (1, 1))
        self.padding = getattr(conv, 'padding', 'valid')
        self.depthwise_kernel = None              # (kh, kw, C_in, 1): separable and depthwise
        self.matrix = None                        # (K, C_out): what each block's rows multiply
        self.full_convolution = isinstance(conv, Conv2D)
        if self.full_convolution:
            kernel, self.bias = fold_batch_norm(p['kernel'], p.get('bias'), batch_norm)
            self.matrix = kernel.reshape(-1, kernel.shape[-1])                # (kh*kw*C_in, C_out)
        elif 'pointwise_kernel' in p:
            self.depthwise_kernel = p.get('depthwise_kernel')
            kernel, self.bias = fold_batch_norm(p['pointwise_kernel'], p.get('bias'), batch_norm)
            self.matrix = kernel.reshape(kernel.shape[2:])                    # (C_in, C_out)
        else:
            # A lone depthwise convolution: its batch-norm scales each channel's taps.
            kernel, self.bias = fold_batch_norm(p['depthwise_kernel'].transpose(0, 1, 3, 2),
                                                p.get('bias'), batch_norm)
            self.depthwise_kernel = kernel.transpose(0, 1, 3, 2)

    def run(self, x, buffers, workers):
        xp = get_array_module(x)
        n, _, _, c_in = x.shape
        (out_h, out_w), pads = window_geometry(x.shape[1:3], self.kernel_size, self.strides, self.padding)
        (kh, kw), (sh, _) = self.kernel_size, self.strides
        c_out = self.matrix.shape[1] if self.matrix is not None else c_in
        columns = kh * kw * c_in if self.full_convolution else c_in           # per output pixel
        y = buffers.empty((n, out_h, out_w, c_out), x.dtype, xp)
        blocks = plan_blocks(n, out_h, out_w * columns * x.itemsize, xp, at_least=workers.threads)
        # Scratch for each thread, sized for the largest block and tile: the matrix product's
        # left-hand rows (depthwise or im2col output) for a block, and per tile its padded
        # input rows and, for the depthwise sum, a block of products.
        block_shape = max(_extent(block) for block, _ in blocks)
        tile_images, tile_rows = max(_extent(tile) for _, tiles in blocks for tile in tiles)
        tile_shape = (tile_images, (tile_rows - 1) * sh + kh, x.shape[2] + sum(pads[1]), c_in)
        lhs_shape = block_shape + ((out_w, kh, kw, c_in) if self.full_convolution else (out_w, c_in))
        scratch = [{'x_tile': xp.empty(tile_shape, dtype=x.dtype),
                    'lhs': xp.empty(lhs_shape, dtype=x.dtype) if self.matrix is not None else None,
                    'products': xp.empty((tile_images, tile_rows, out_w, c_in), dtype=x.dtype)}
                   for _ in range(min(workers.threads, len(blocks)))]
        if not self.full_convolution:
            taps = along_width(self.depthwise_kernel[:, :, :, 0], out_w)           # (kh, kw, W_out, C_in)
        input_zeros = xp.zeros((x.shape[2], c_in), dtype=x.dtype) if self.leading_relu else None
        bias_row = along_width(self.bias, out_w) if self.bias is not None else None
        output_zeros = xp.zeros((out_w, c_out), dtype=x.dtype) if self.relu else None

        def compute_block(block_and_tiles, slot):
            (block_images, block_top, block_bottom), tiles = block_and_tiles
            mine = scratch[slot]
            y_block = y[block_images, block_top:block_bottom]                 # (n, rows, W_out, C_out)
            lhs = y_block if mine['lhs'] is None else mine['lhs'][:y_block.shape[0], :y_block.shape[1]]
            for images, top, bottom in tiles:
                rows_in = gather_rows(x, images, top, bottom, kh, sh, pads, mine['x_tile'],
                                      relu_zeros=input_zeros)
                first = images.start - block_images.start                     # the tile within the block
                part = lhs[first:first + images.stop - images.start, top - block_top:bottom - block_top]
                if self.full_convolution:
                    im2col_tile(rows_in, self.kernel_size, self.strides, part)
                else:
                    products = mine['products'][:part.shape[0], :part.shape[1]]
                    depthwise_tile(rows_in, taps, self.strides, part, products)
            if self.matrix is not None:
                xp.matmul(lhs.reshape(-1, self.matrix.shape[0]), self.matrix,
                          out=y_block.reshape(-1, c_out))                     # (n*rows*W_out, C_out)
            bias_and_relu(y_block, bias_row, output_zeros)

        workers.each(compute_block, blocks)
        return y


def _extent(piece):
    """(images, rows) of a block or tile (images slice, first row, end row)."""
    images, top, bottom = piece
    return images.stop - images.start, bottom - top


class PointwiseStep(Step):
    """A lone PointwiseConv2D [+ folded BatchNormalization] [+ ReLU]: one matrix product."""

    def __init__(self, conv, inputs, leading_relu=None, batch_norm=None, relu=None):
        layers = [layer.name for layer in (leading_relu, conv, batch_norm, relu) if layer is not None]
        super().__init__(layers, inputs, layers[-1])
        kernel, self.bias = fold_batch_norm(conv.params['pointwise_kernel'], conv.params.get('bias'),
                                            batch_norm)
        self.matrix = kernel.reshape(kernel.shape[2:])                        # (C_in, C_out)
        self.leading_relu, self.relu = leading_relu is not None, relu is not None

    def run(self, x, buffers, workers):
        xp = get_array_module(x)
        w, c_in, c_out = x.shape[2], x.shape[3], self.matrix.shape[1]
        rows = xp.maximum(x, xp.zeros((w, c_in), dtype=x.dtype)) if self.leading_relu else x
        y = buffers.empty(x.shape[:3] + (c_out,), x.dtype, xp)
        xp.matmul(rows.reshape(-1, c_in), self.matrix, out=y.reshape(-1, c_out))
        return bias_and_relu(y, along_width(self.bias, w) if self.bias is not None else None,
                             xp.zeros((w, c_out), dtype=x.dtype) if self.relu else None)


class MaxPoolStep(Step):
    def __init__(self, layer, inputs):
        super().__init__([layer.name], inputs, layer.name)
        self.pool_size, self.strides, self.padding = layer.pool_size, layer.strides, layer.padding

    def run(self, x, buffers, workers):
        xp = get_array_module(x)
        n, _, w, channels = x.shape
        (kh, _), (sh, _) = self.pool_size, self.strides
        (out_h, out_w), pads = window_geometry(x.shape[1:3], self.pool_size, self.strides, self.padding)
        y = buffers.empty((n, out_h, out_w, channels), x.dtype, xp)
        tiles = [tile for _, tiles in plan_blocks(n, out_h, sh * w * channels * x.itemsize, xp)
                 for tile in tiles]
        tile_images, tile_rows = max(_extent(tile) for tile in tiles)
        rows_in = (tile_rows - 1) * sh + kh
        scratch = [(xp.empty((tile_images, rows_in, w + sum(pads[1]), channels), dtype=x.dtype),
                    xp.empty((tile_images, rows_in, out_w, channels), dtype=x.dtype))
                   for _ in range(min(workers.threads, len(tiles)))]

        def pool_tile(tile, slot):
            images, top, bottom = tile
            x_tile, row_max = scratch[slot]
            padded = gather_rows(x, images, top, bottom, kh, sh, pads, x_tile, fill=-np.inf)
            max_pool_tile(padded, self.pool_size, self.strides, y[images, top:bottom], row_max)

        workers.each(pool_tile, tiles)
        return y


class ReluStep(Step):
    """A ReLU that could not be fused; in place when its input is read by nothing else."""

    def __init__(self, layer, inputs, in_place):
        super().__init__([layer.name], inputs, layer.name)
        self.in_place = in_place

    def run(self, x, buffers, workers):
        xp = get_array_module(x)
        zeros = xp.zeros(x.shape[-2:], dtype=x.dtype)            # see along_width: faster than 0
        return xp.maximum(x, zeros, out=x if self.in_place else None)

    def describe(self):
        return super().describe() + (' (in place)' if self.in_place else '')


class AddStep(Step):
    """The residual add, written into the first input when nothing reads it afterwards."""

    def __init__(self, layer, inputs, in_place):
        super().__init__([layer.name], inputs, layer.name)
        self.in_place = in_place

    def run(self, a, b, buffers, workers):
        if a.shape != b.shape:
            raise ValueError(f"layer {self.output!r} adds tensors of shapes {a.shape} and {b.shape}")
        xp = get_array_module(a)
        return xp.add(a, b, out=a) if self.in_place else a + b

    def describe(self):
        return super().describe() + (' (in place)' if self.in_place else '')


class LayerStep(Step):
    """Any other layer, run by its own forward (global pooling, Dense, ...)."""

    def __init__(self, layer, inputs):
        super().__init__([layer.name], inputs, layer.name)
        self.layer = layer

    def run(self, *arrays_buffers_workers):
        return self.layer.forward(*arrays_buffers_workers[:-2], training=False)


# -- planning -------------------------------------------------------------------------------------

def _is_relu(layer):
    return isinstance(layer, Activation) and layer.activation == 'relu'


def plan(model, keep=()):
    """The list of steps that computes ``model``'s inference forward pass.

    keep: names of layers whose outputs must be available unchanged (capture); fusion never
    hides or overwrites them. The model's last output is always kept.
    """
    nodes = model.nodes
    position = {node.layer.name: i for i, node in enumerate(nodes)}
    readers = {name: [] for name in ['input'] + list(position)}
    for node in nodes:
        for name in node.inputs:
            readers[name].append(node)
    keep = set(keep) | {nodes[-1].layer.name}

    def sole_reader(name, kind):
        """The node of type ``kind`` that alone reads tensor ``name`` (not kept), or None."""
        if name in keep or len(readers[name]) != 1:
            return None
        reader = readers[name][0]
        return reader if isinstance(reader.layer, kind) else None

    # A ReLU read only by a convolution with windows runs inside that convolution's copy of
    # its input rows: it needs no buffer and no pass of its own.
    leading_relu = {}
    for node in nodes:
        reader = sole_reader(node.layer.name, (SeparableConv2D, DepthwiseConv2D, PointwiseConv2D))
        if _is_relu(node.layer) and reader is not None:
            leading_relu[reader.layer.name] = node
    absorbed = {node.layer.name for node in leading_relu.values()}

    steps, made_by_steps = [], set()
    for node in nodes:
        layer = node.layer
        if layer.name in absorbed:
            continue
        if isinstance(layer, (Conv2D, SeparableConv2D, DepthwiseConv2D, PointwiseConv2D)):
            batch_norm = sole_reader(layer.name, BatchNormalization)
            relu = sole_reader(batch_norm.layer.name if batch_norm else layer.name, Activation)
            if relu is not None and (not _is_relu(relu.layer) or relu.layer.name in absorbed):
                relu = None
            absorbed.update(fused.layer.name for fused in (batch_norm, relu) if fused is not None)
            before = leading_relu.get(layer.name)
            step_class = PointwiseStep if isinstance(layer, PointwiseConv2D) else WindowedConvStep
            step = step_class(layer, before.inputs if before else node.inputs,
                              leading_relu=before.layer if before else None,
                              batch_norm=batch_norm.layer if batch_norm else None,
                              relu=relu.layer if relu else None)
        elif isinstance(layer, MaxPooling2D):
            step = MaxPoolStep(layer, node.inputs)
        elif isinstance(layer, Add) or _is_relu(layer):
            # Overwrite the first input only if one of our steps made it (a fresh buffer, not
            # the caller's array nor a view some layer returned), it is not kept, and no
            # later node reads it.
            first = node.inputs[0]
            in_place = (first in made_by_steps and first not in keep and node.inputs.count(first) == 1
                        and all(position[r.layer.name] <= position[layer.name] for r in readers[first]))
            step = (AddStep if isinstance(layer, Add) else ReluStep)(layer, node.inputs, in_place)
        else:
            step = LayerStep(layer, node.inputs)
        if not isinstance(step, LayerStep):
            made_by_steps.add(step.output)
        steps.append(step)
    return steps


# -- the engine -----------------------------------------------------------------------------------

def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                    # not Linux
        return os.cpu_count() or 1


def engine_workers(threads=None):
    """The threads an engine runs on: ``threads``, by default one per usable core when
    threadpoolctl is installed (it is what holds BLAS to one thread meanwhile), else 1."""
    if threads is None:
        threads = _usable_cores() if ThreadpoolController is not None else 1
    return Workers(int(threads))


_blas_controller = None


def single_threaded_blas():
    """A context manager in which NumPy's BLAS runs on one thread (via threadpoolctl), or
    None when threadpoolctl is not installed. The limit is process-wide while it lasts."""
    global _blas_controller
    if ThreadpoolController is None:
        return None
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api='blas')


class InferenceEngine:
    """A model's inference forward pass, planned into fused steps (see the module docstring).

    model: a built ``Model``. threads: how many threads run a NumPy batch, while the BLAS
    library is held to one thread. With at least as many images as threads, each thread
    takes a contiguous share of the batch and runs every step on it with buffers of its
    own; with fewer (one photo), the threads share each step's blocks of rows. On a few
    cores this beats one thread driving a multi-threaded BLAS: the element-wise work, which
    NumPy runs on the calling thread, no longer leaves the other cores idle, and no matrix
    product stalls waiting for a core that another process has taken (on a busy machine a
    multi-threaded BLAS can run several times slower than a single-threaded one).

    Default: one thread per usable core when threadpoolctl is installed (it is what holds
    BLAS to one thread), else 1: the calling thread, with BLAS's own threads. GPU arrays
    always run on the calling thread.
    """

    def __init__(self, model, threads=None):
        self.model = model
        self.workers = engine_workers(threads)
        self.threads = self.workers.threads
        self.buffers = [BufferPool() for _ in range(self.threads)]        # one pool per share
        self._plans = {}
        self.steps = self._plan(())

    def _plan(self, keep):
        key = frozenset(keep)
        if key not in self._plans:
            self._plans[key] = plan(self.model, key)
        return self._plans[key]

    def __call__(self, x, capture=None):
        """Like ``model.forward(x, training=False, capture=capture)``, faster."""
        model = self.model
        model.check_input(x)
        names = [node.layer.name for node in model.nodes]
        wanted = list(names if capture == 'all' else (capture or ()))
        unknown = set(wanted) - set(names)
        if unknown:
            raise KeyError(f"model {model.name!r} has no layers named {sorted(unknown)}")
        steps = self._plan(wanted)
        with no_grad():                        # here, not in the threads: the switch is global
            if self.threads == 1 or get_array_module(x) is not np:
                y, captured = self._run(steps, x, wanted, self.buffers[0], ONE_THREAD)
            elif len(x) < self.threads:        # too few images to go round: share the blocks
                with single_threaded_blas() or contextlib.nullcontext():
                    y, captured = self._run(steps, x, wanted, self.buffers[0], self.workers)
            else:
                shares = np.array_split(np.arange(len(x)), self.threads)
                results = [None] * len(shares)

                def run_share(index_and_share, _slot):
                    # Share i always takes pool i, whichever thread runs it: a thread that
                    # finishes early may run two shares, and the pools must not grow for it.
                    index, share = index_and_share
                    results[index] = self._run(steps, x[share[0]:share[-1] + 1], wanted, self.buffers[index],
                                               ONE_THREAD)
                with single_threaded_blas() or contextlib.nullcontext():
                    self.workers.each(run_share, list(enumerate(shares)))
                y = np.concatenate([share_y for share_y, _ in results])
                captured = {name: np.concatenate([share[name] for _, share in results]) for name in wanted}
        return y if capture is None else (y, captured)

    @staticmethod
    def _run(steps, x, wanted, buffers, workers):
        """Run the steps on x; returns (output, {wanted name: its output})."""
        last_use = {}
        for position, step in enumerate(steps):
            for name in step.inputs:
                last_use[name] = position
        tensors = {'input': x}
        for position, step in enumerate(steps):
            output = step.run(*(tensors[name] for name in step.inputs), buffers, workers)
            tensors[step.output] = output
            for name in step.inputs:
                if last_use[name] == position and name not in wanted and name != 'input':
                    buffers.give_back(tensors.pop(name), still_used=output)
        buffers.forget_lent()
        return tensors[steps[-1].output], {name: tensors[name] for name in wanted}

    def describe(self):
        """One line per step: the layers it runs."""
        return '\n'.join(f'{i:3d}  {type(step).__name__:17s} {step.describe()}'
                         for i, step in enumerate(self.steps))
