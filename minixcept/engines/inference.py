"""Fast inference: a model's forward pass, planned again for speed on the CPU.

The layers in ``minixcept.layers`` compute exactly what the textbook says, one
layer at a time, each allocating its output. That is the version to read. For
inference (``Model.predict``) this module runs the same mathematics with the
work rearranged; tests/test_inference_engine.py checks every step against the plain
layers. ``InferenceEngine(model)`` reads the model's nodes and plans a shorter
list of *steps*:

- **Batch-norm folded into the convolution before it** (the algebra is taught in
  ``minixcept.layers.normalization``, ``fold_batch_norm``), and the other fusions of
  the shared graph plan (``minixcept.engines.plan``).
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

The work on one tile, the pools and the threads are ``minixcept.engines.kernels``; this
module adds the steps that use them and their plan. Everything else (global pooling, the classifier head) runs through the layer's
own ``forward``. The engine folds the weights when it plans, and plans again
whenever a layer's ``weights_version`` changed since (``set_weights``, an
optimizer step, ``load_weights``): a fold is never stale. It never writes into the
array it is given. ``engine_for(model)`` keeps one engine per model, with its
buffer pools, for ``Model.predict``.

    engine = InferenceEngine(model)
    y = engine(x)                                  # x: (N, H, W, C), like model.forward
    y, acts = engine(x, capture=['block3_pool'])   # outputs of named layers, as model.forward
    y = engine(x, stop_after='block13_sepconv2_bn')  # a stretch, as model.forward
    print(engine.describe())                       # which layers each step runs
"""
import contextlib

import numpy as np

from ..backend import get_array_module
from ..layers import Add, Conv2D, DepthwiseConv2D, MaxPooling2D, PointwiseConv2D, SeparableConv2D
from ..layers.base import no_grad
from ..padding import window_geometry
from . import Engine, KeptPerModel
from .kernels import (ONE_THREAD, along_width, bias_and_relu, depthwise_tile, extent,
                      gather_rows, im2col_tile, max_pool_tile, plan_blocks, single_threaded_blas)
from .plan import CONVOLUTIONS, Fusion, GraphPlan, Kernels, is_relu


# -- steps: what the engine runs -----------------------------------------------------------------

def folded(kernel, bias, batch_norm):
    """The kernel and bias with ``batch_norm`` (a layer, or None) folded in
    (``minixcept.layers.normalization.fold_batch_norm``)."""
    return (kernel, bias) if batch_norm is None else batch_norm.fold_into(kernel, bias)


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
    either way the channels are mixed by one matrix product per block of rows. Equals
    [``activation.relu_forward`` ->] ``conv.conv2d_forward`` | ``separable.separable_conv2d_forward``
    | ``depthwise.depthwise_conv2d_forward`` [-> ``normalization.batch_norm_forward``]
    [-> ``relu_forward``].
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
            kernel, self.bias = folded(p['kernel'], p.get('bias'), batch_norm)
            self.matrix = kernel.reshape(-1, kernel.shape[-1])                # (kh*kw*C_in, C_out)
        elif isinstance(conv, SeparableConv2D):
            self.depthwise_kernel = p.get('depthwise_kernel')
            kernel, self.bias = folded(p['pointwise_kernel'], p.get('bias'), batch_norm)
            self.matrix = kernel.reshape(kernel.shape[2:])                    # (C_in, C_out)
        else:
            # A lone depthwise convolution: its batch-norm scales each channel's taps.
            kernel, self.bias = folded(p['depthwise_kernel'].transpose(0, 1, 3, 2),
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
        block_shape = max(extent(block) for block, _ in blocks)
        tile_images, tile_rows = max(extent(tile) for _, tiles in blocks for tile in tiles)
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


class PointwiseStep(Step):
    """A lone PointwiseConv2D [+ folded BatchNormalization] [+ ReLU]: one matrix product.
    Equals ``pointwise.pointwise_conv2d_forward`` [-> ``batch_norm_forward``] [-> ``relu_forward``]."""

    def __init__(self, conv, inputs, leading_relu=None, batch_norm=None, relu=None):
        layers = [layer.name for layer in (leading_relu, conv, batch_norm, relu) if layer is not None]
        super().__init__(layers, inputs, layers[-1])
        kernel, self.bias = folded(conv.params['pointwise_kernel'], conv.params.get('bias'),
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
    """Max pooling tile by tile, each as two 1-D passes. Equals ``pooling.max_pool2d_forward``."""

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
        tile_images, tile_rows = max(extent(tile) for tile in tiles)
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
    """A ReLU that could not be fused; in place when its input is read by nothing else.
    Equals ``activation.relu_forward``."""

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
    """The residual add, written into the first input when nothing reads it afterwards.
    Equals ``merge.Add.forward``."""

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

# What this engine's steps take into a convolution: a ReLU on its input rows for the convolutions
# without im2col, a folded batch-norm and an output ReLU for all of them.
KERNELS = Kernels(leading_relu=lambda conv: isinstance(conv, (SeparableConv2D, DepthwiseConv2D, PointwiseConv2D)),
                  batch_norm=lambda conv: True, trailing_relu=lambda conv: True)


def plan(model, keep=(), start_after=None, stop_after=None):
    """(steps, release) that compute ``model``'s inference forward pass, or the stretch of it
    after ``start_after`` up to ``stop_after``: the steps in order, and for each step the names
    of the tensors no later step reads.

    keep: names of layers whose outputs must be available unchanged (capture); fusion never
    hides or overwrites them. The stretch's last output is always kept.
    """
    graph = GraphPlan(model, training=False, keep=keep, start_after=start_after, stop_after=stop_after)
    fused, absorbed = graph.fusions(KERNELS)
    steps, made_by_steps, step_of = [], set(), {}
    for position, node in zip(graph.positions, graph.nodes):
        layer = node.layer
        if layer.name in absorbed:
            continue
        if isinstance(layer, CONVOLUTIONS):
            fusion = fused.get(layer.name) or Fusion(node)
            step_class = PointwiseStep if isinstance(layer, PointwiseConv2D) else WindowedConvStep
            step = step_class(layer, fusion.inputs, *(n.layer if n is not None else None for n in
                                                      (fusion.leading_relu, fusion.batch_norm, fusion.relu)))
        elif isinstance(layer, MaxPooling2D):
            step = MaxPoolStep(layer, node.inputs)
        elif isinstance(layer, Add) or is_relu(layer):
            # Overwrite the first input only if one of our steps made it (a fresh buffer, not
            # the caller's array nor a view some layer returned), it is not kept, and no
            # later node reads it.
            first = node.inputs[0]
            in_place = (first in made_by_steps and first not in graph.keep and node.inputs.count(first) == 1
                        and graph.last_use[first] == position)
            step = (AddStep if isinstance(layer, Add) else ReluStep)(layer, node.inputs, in_place)
        else:
            step = LayerStep(layer, node.inputs)
        if not isinstance(step, LayerStep):
            made_by_steps.add(step.output)
        steps.append(step)
        step_of.update({name: len(steps) - 1 for name in step.layers})
    # A tensor's last reader is a node of the graph; the step that runs that node reads it last.
    release = [[] for _ in steps]
    for name, position in graph.last_use.items():
        if position < len(model.nodes) and name != graph.start:
            release[step_of[model.nodes[position].layer.name]].append(name)
    return steps, release




class InferenceEngine(Engine):
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

    @property
    def steps(self):
        """The steps of the whole forward pass (see ``describe``)."""
        return self._plan((), None, None)[0]

    def _plan(self, keep, start_after, stop_after):
        """The plan for this stretch and capture, planned afresh (folding the weights as they are
        now) whenever the weights of a layer in the stretch changed since it was made."""
        keep = frozenset(keep)
        return self.kept_plan((keep, start_after, stop_after), start_after, stop_after,
                              lambda: plan(self.model, keep, start_after, stop_after))

    def forward(self, x, training=False, capture=None, start_after=None, stop_after=None):
        """Like ``model.forward(x, training=False, capture, start_after, stop_after)``, faster.
        Inference only: ``training=True`` is refused (use ``training.GradientEngine``)."""
        if training:
            raise ValueError(f"model {self.model.name!r}: the inference engine runs training=False only")
        model = self.model
        model.check_input(x, start_after)
        first, last = model.stretch(start_after, stop_after)
        names = [node.layer.name for node in model.nodes[first:last + 1]]
        wanted = list(names if capture == 'all' else (capture or ()))
        unknown = set(wanted) - set(names)
        if unknown:
            raise KeyError(f"model {model.name!r} runs no layers named {sorted(unknown)}")
        steps, release = self._plan(wanted, start_after, stop_after)
        start = start_after or 'input'
        with no_grad():                        # here, not in the threads: the switch is global
            if self.threads == 1 or get_array_module(x) is not np:
                y, captured = self._run(steps, release, start, x, wanted, self.buffers[0], ONE_THREAD)
            elif len(x) < self.threads:        # too few images to go round: share the blocks
                with single_threaded_blas() or contextlib.nullcontext():
                    y, captured = self._run(steps, release, start, x, wanted, self.buffers[0], self.workers)
            else:
                shares = np.array_split(np.arange(len(x)), self.threads)
                results = [None] * len(shares)

                def run_share(index_and_share, _slot):
                    # Share i always takes pool i, whichever thread runs it: a thread that
                    # finishes early may run two shares, and the pools must not grow for it.
                    index, share = index_and_share
                    results[index] = self._run(steps, release, start, x[share[0]:share[-1] + 1], wanted,
                                               self.buffers[index], ONE_THREAD)
                with single_threaded_blas() or contextlib.nullcontext():
                    self.workers.each(run_share, list(enumerate(shares)))
                y = np.concatenate([share_y for share_y, _ in results])
                captured = {name: np.concatenate([share[name] for _, share in results]) for name in wanted}
        return y if capture is None else (y, captured)

    def __call__(self, x, capture=None, start_after=None, stop_after=None):
        return self.forward(x, capture=capture, start_after=start_after, stop_after=stop_after)

    @staticmethod
    def _run(steps, release, start, x, wanted, buffers, workers):
        """Run the steps on x; returns (output, {wanted name: its output})."""
        tensors = {start: x}
        for step, spent in zip(steps, release):
            output = step.run(*(tensors[name] for name in step.inputs), buffers, workers)
            tensors[step.output] = output
            for name in spent:
                if name in tensors and name not in wanted:
                    buffers.give_back(tensors.pop(name), still_used=output)
        buffers.forget_lent()
        return tensors[steps[-1].output], {name: tensors[name] for name in wanted}

    def describe(self):
        """One line per step: the layers it runs."""
        return '\n'.join(f'{i:3d}  {type(step).__name__:17s} {step.describe()}'
                         for i, step in enumerate(self.steps))


# The ``InferenceEngine`` kept for ``model`` (made on first use, with its buffer pools, kept
# as long as the model lives): what ``Model.predict`` runs.
engine_for = KeptPerModel(InferenceEngine)
