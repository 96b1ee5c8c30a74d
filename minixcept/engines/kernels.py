"""The engines' kernels: the work of one tile, block or thread, shared by both runners.

Nothing here knows about layers or graphs. These are the pieces that make the engines fast
on a CPU, each checked against the textbook's plain formula in the tests:

- **blocks and tiles**: an output is cut into blocks of rows for the matrix products and
  tiles of rows for the element-wise work (``plan_blocks``); ``gather_rows`` copies the
  zero- or -inf-padded input rows a tile reads into scratch, applying a ReLU on the way;
- **the work on one tile**: depthwise multiply-adds (``depthwise_tile``), im2col
  (``im2col_tile``), max pooling as two 1-D passes (``max_pool_tile``) or with the argmax a
  backward pass needs (``max_pool_tile_with_argmax``);
- **whole convolutions tile by tile** for the training engine: stride-1 depthwise
  (``depthwise_rows``, ``depthwise_kernel_gradient``), full convolutions by im2col a block
  at a time (``conv_rows``, ``conv_kernel_gradient``);
- **memory**: ``BufferPool``, arrays handed out and taken back pass after pass, and
  ``new_array`` / ``done_with``, which take them from the pool of the share the calling
  thread runs;
- **threads**: ``Workers`` and ``engine_workers`` (one thread per core), with the BLAS
  library held to one thread meanwhile (``single_threaded_blas``).
"""
import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backend import get_array_module
from ..padding import window

try:
    from threadpoolctl import ThreadpoolController
except ImportError:                           # optional: without it the engines run on one thread
    ThreadpoolController = None

# Work is split twice. A *block* is what one matrix product multiplies: a few MB of rows, a
# few thousand, where BLAS runs at full speed (many small calls spend their time starting and
# synchronising) and the block's output is still in cache for the bias and ReLU. A *tile* is
# what the element-wise work (padding, depthwise multiply-adds, im2col) does at a time:
# small enough that its input rows, products and partial sums stay in the CPU cache.
BLOCK_BYTES = 8 * 1024 * 1024
TILE_BYTES = 512 * 1024


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


def extent(piece):
    """(images, rows) of a block or tile (images slice, first row, end row)."""
    images, top, bottom = piece
    return images.stop - images.start, bottom - top


def tiles_of(n_images, out_h, row_bytes):
    """The tiles of an output (N, H_out, ...) on NumPy, as one flat list (no blocks)."""
    return [tile for _, tiles in plan_blocks(n_images, out_h, row_bytes, np) for tile in tiles]


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
# the separate multiplies and adds, and below it loses to them (benchmarks/RESULTS.md).
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


def max_pool_tile_with_argmax(x_tile, pool_size, strides, out, argmax):
    """Max pooling of a (-inf-)padded tile that also records the winning offset p * kw + q,
    as ``minixcept.layers.pooling.max_pool2d_forward`` does (ties keep the earlier offset).

    x_tile: (n, rows_in, Wp, C); out: (n, rows, W_out, C); argmax: int8 like out. The running
    max is kept in place and the argmax updated by arithmetic, argmax += better * (k - argmax):
    NumPy's masked writes (``np.where``, ``argmax[better] = k``) are far slower than a
    compare and a multiply, and this runs once per tile.
    """
    xp = get_array_module(x_tile)
    kh, kw = pool_size
    out_hw = out.shape[1:3]
    out[...] = window(x_tile, 0, 0, out_hw, strides)
    argmax[...] = 0
    for offset in range(1, kh * kw):                           # offset = p * kw + q, row-major
        candidate = window(x_tile, offset // kw, offset % kw, out_hw, strides)
        better = candidate > out                               # strict: ties keep the earlier offset
        xp.maximum(out, candidate, out=out)
        argmax += better * (offset - argmax)
    return out, argmax


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


# -- memory for the share a thread runs -----------------------------------------------------------

_lending = threading.local()           # .buffers: the pool new_array lends from on this thread (its share's)


@contextlib.contextmanager
def lending_from(buffers):
    """Within it, ``new_array`` on this thread takes from ``buffers`` (a ``BufferPool``)."""
    previous, _lending.buffers = getattr(_lending, 'buffers', None), buffers
    try:
        yield buffers
    finally:
        _lending.buffers = previous


def new_array(shape, dtype):
    """An uninitialised array for a large output or cache: from the buffer pool of the share
    that the calling thread runs (see ``GradientEngine``), else a fresh ``np.empty``."""
    buffers = getattr(_lending, 'buffers', None)
    return np.empty(shape, dtype) if buffers is None else buffers.empty(shape, dtype)


def new_like(array):
    return new_array(array.shape, array.dtype)


def done_with(*arrays):
    """Hand scratch arrays from ``new_array`` back to the running share's pool (if any)."""
    buffers = getattr(_lending, 'buffers', None)
    if buffers is not None:
        for array in arrays:
            if array is not None:
                buffers.give_back(array)


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


#: Multiply-adds under which a matrix product runs on one BLAS thread (the training engine's
#: batch run as one share): a second BLAS thread would make the product wait for its core when
#: another process holds it (a small product's time then grows several times over); the engine
#: cuts such products into parts for its own threads instead, which any free thread takes.
SMALL_PRODUCT = 1 << 26


def single_threaded_blas():
    """A context manager in which NumPy's BLAS runs on one thread (via threadpoolctl), or
    None when threadpoolctl is not installed. The limit is process-wide while it lasts."""
    global _blas_controller
    if ThreadpoolController is None:
        return None
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api='blas')


# -- depthwise convolution, tile by tile ----------------------------------------------------------
#
# Stride 1 only. The input gradient is the same kind of work as the forward pass: a depthwise
# convolution of dz with the kernel turned 180 degrees (``minixcept.layers.depthwise`` says why),
# so both run through ``depthwise_rows``.

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
    tiles = tiles_of(n, out_h, out_w * channels * x.itemsize)
    tile_images, tile_rows = max(extent(tile) for tile in tiles)
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
    tiles = tiles_of(n, out_h, out_w * channels * x.itemsize)
    tile_images, tile_rows = max(extent(tile) for tile in tiles)
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
    """The padding of dz under which the 180-degree-turned kernel gives dx (the rule is derived
    in ``minixcept.layers.depthwise``): kh-1-top rows above, kh-1-bottom below, likewise for
    the columns."""
    (kh, kw), ((top, bottom), (left, right)) = kernel_size, pads
    return (kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)


# -- full convolution: im2col a block at a time ---------------------------------------------------

def im2col_blocks(x, kernel_size, strides, pads, out_hw):
    """Yield (images slice, first row, end row, columns) for blocks of output rows, where
    columns (n, rows, W_out, kh, kw, C_in) are the block's im2col rows, built tile by tile
    in cache (``im2col_tile``). The array is reused: use it before the next block."""
    (kh, kw), (sh, _) = kernel_size, strides
    n, c_in = x.shape[0], x.shape[3]
    out_h, out_w = out_hw
    blocks = plan_blocks(n, out_h, out_w * kh * kw * c_in * x.itemsize, np)
    block_images, block_rows = max(extent(block) for block, _ in blocks)
    tile_images, tile_rows = max(extent(tile) for _, tiles in blocks for tile in tiles)
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
