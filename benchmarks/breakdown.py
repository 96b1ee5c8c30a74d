#!/usr/bin/env python3
"""Where the time of Xception's passes goes, step by step, beside each kind of step's own floor.

    python benchmarks/breakdown.py                          # batch 8, 299 px, 3 rounds
    python benchmarks/breakdown.py --batch 1 --size 71 --rounds 1     # a smoke test
    python benchmarks/breakdown.py --json breakdown.json    # also write the results as JSON

Two passes of the notop Xception (global average pooling) with the ImageNet weights
(``python weights/fetch.py``) on one random batch: the forward pass through the inference
engine (``minixcept.engines.inference.InferenceEngine``, what ``Model.predict`` runs) and
forward + backward through the training engine (``minixcept.engines.training.GradientEngine``:
loss = sum(y * dy), gradients for every weight and the input, batch-norm on its moving
statistics, as in ``three_way.py``).

How the steps are timed. The engines run a batch in shares, one thread per core; a step's
time is only honest on one thread, so the breakdown runs each engine with ``threads=1`` and
NumPy's BLAS held to one thread (threadpoolctl) - one core does all the work, and the floors
below are one core's. The script wraps the ``run`` method of each step of the inference
engine's plan, and the ``forward`` and ``backward`` methods of each step of the training
engine's plan, with ``time.perf_counter`` timers (instance attributes set here and removed
after; the package is not changed). Inside the fused steps it also times the kernel functions
the steps call (``gather_rows``, ``depthwise_tile``, ``im2col_tile``, ``bias_and_relu``,
``max_pool_tile`` in the inference engine; ``depthwise_rows``, ``depthwise_kernel_gradient``,
``conv_rows``, ``conv_kernel_gradient``, ``gather_rows``, ``max_pool_tile_with_argmax``,
``max_pool2d_backward`` in the training engine), by replacing the engine module's name for
each with a timed wrapper while the instrumented pass runs. A separable convolution is one
step in both engines (depthwise 3x3, then the pointwise product, with the batch-norm folded
in); its time is split into the depthwise part (the timed tile gathers and depthwise kernels,
the leading ReLU inside them) and the pointwise part (the rest of the step: the matrix
products, the folded batch-norm's shift and the trailing ReLU, the step's own bookkeeping).
"outside the steps" is the instrumented pass's time less the sum of its steps: the engine's
loop and buffer pools and, backward, the sums of the gradients of tensors read twice (the
block inputs that feed a shortcut). Each round runs, in turn (reversed every other round):
the one-thread engine as it is, the one-thread engine instrumented, and the engine with its
default threads for reference; after a warm-up call each, the table gives the median over
the rounds of each kind's total (summed over the network), in ms per photo.

The floors, measured here on one thread:

- product rate: NumPy's float32 matrix products (``np.matmul``) on each product kind's own
  shapes at this batch (the pointwise convolutions as (N*H*W, C_in) @ (C_in, C_out), the full
  convolutions as their im2col products, the shortcut 1x1 stride-2 convolutions on their strided
  rows), each distinct shape timed best of three after a warm-up, as ``three_way.py``'s floor;
  for forward + backward also the two backward products of each shape (dx = dy @ W.T,
  dW = x.T @ dy). A depthwise convolution's multiply-adds are counted at the pointwise rate.
- memory bandwidth: the better of a large ``np.copyto`` (read + write) and ``np.add``
  (two reads + a write) over 256 MiB arrays, best of five.

A kind's floor is the larger of its multiply-adds at its product rate and its bytes at the
memory bandwidth (the bound column says which). Bytes: every tensor a step must read or write,
once each - its inputs and outputs, the weights, and in training the caches it keeps and reads
back - but not its scratch (tiles that stay in the CPU cache); a stride-2 1x1 convolution reads
only the pixels its windows cover. In the inference engine the depthwise output of a
separable step stays in cache: the depthwise part counts reading the input, the pointwise
part writing the output.

The report names the CPU, its vector width, NumPy's BLAS and its kernel, the threads, the load
average before and after, the cores other processes took during the run (``three_way.py``'s
helpers), and which minixcept package (folder, git commit) it measured.
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import forward  # noqa: E402  (the weights, the default-threads runners)
import three_way  # noqa: E402  (the machine, the load, the package measured)

FEATURES = 2048
BANDWIDTH_MIB = 256

# The kinds of step, in the order of the table.
FULL_CONV = 'full conv (im2col)'
SHORTCUT = 'shortcut conv 1x1/2'
DEPTHWISE = 'depthwise 3x3'
POINTWISE = 'pointwise product'
BATCH_NORM = 'batch-norm (not folded)'
RELU = 'ReLU'
MAX_POOL = 'max-pool 3x3/2'
ADD = 'residual add'
GLOBAL_POOL = 'global average pool'
FUSED_AWAY = 'fused away (pass-through)'
OUTSIDE = 'outside the steps'
ORDER = [FULL_CONV, SHORTCUT, DEPTHWISE, POINTWISE, BATCH_NORM, RELU, MAX_POOL, ADD, GLOBAL_POOL, FUSED_AWAY]
PRODUCT_KINDS = (FULL_CONV, SHORTCUT, POINTWISE)

WHAT = {
    FULL_CONV: 'block1 conv1 (3x3/2) and conv2 (3x3): im2col a tile at a time, one product a block',
    SHORTCUT: 'the 1x1 stride-2 convolutions on the shortcuts of blocks 2, 3, 4 and 13',
    DEPTHWISE: "the separable convolutions' depthwise half: padded tiles (the leading ReLU applied "
               'as the rows are copied), 9 multiply-adds a pixel',
    POINTWISE: "the separable convolutions' 1x1 half: its matrix products (backward: dz and the kernel "
               "gradient), the folded batch-norm's shift, in the inference engine the trailing ReLU, "
               'the rest of the step',
    BATCH_NORM: 'a batch-norm that runs on its own',
    RELU: 'a ReLU that runs on its own',
    MAX_POOL: 'max pooling tile by tile',
    ADD: 'the residual adds (backward: dy passed on to both inputs)',
    GLOBAL_POOL: "the layer's own forward (and backward)",
    FUSED_AWAY: 'layers whose work a convolution does (a folded batch-norm, a fused ReLU): '
                'their step passes its input on',
    OUTSIDE: "the engine's loop and buffer pools; backward, the gradient sums where a tensor "
             'is read twice',
}

# The kernel functions timed inside the steps: (engine module, name, what it does).
INFERENCE_PARTS = (('gather_rows', 'tile gather (padded rows, leading ReLU)'),
                   ('depthwise_tile', 'depthwise taps'),
                   ('im2col_tile', 'im2col'),
                   ('bias_and_relu', 'bias + ReLU'),
                   ('max_pool_tile', 'max over windows'))
TRAINING_PARTS = (('depthwise_rows', 'depthwise rows (forward; backward dx)'),
                  ('depthwise_kernel_gradient', 'depthwise kernel gradient'),
                  ('conv_rows', 'conv rows (forward; stride-1 backward dx)'),
                  ('conv_kernel_gradient', 'conv kernel gradient'),
                  ('gather_rows', 'tile gather'),
                  ('max_pool_tile_with_argmax', 'max over windows, with argmax'),
                  ('max_pool2d_backward', 'max-pool backward tiles'))
DEPTHWISE_PARTS = {'gather_rows', 'depthwise_tile', 'depthwise_rows', 'depthwise_kernel_gradient'}
REST = 'the rest (products, bookkeeping)'


# -- the instruments --------------------------------------------------------------------------

class Probe:
    """perf_counter timers around methods of the plan's step objects and around an engine
    module's kernel functions. ``seconds[(phase, index)]``: a step's time; ``parts[(phase,
    index, name)]``: the time of kernel function ``name`` inside it. One thread only."""

    def __init__(self):
        self.seconds, self.parts = defaultdict(float), defaultdict(float)
        self.current = None
        self._undo = []

    def reset(self):
        self.seconds.clear()
        self.parts.clear()

    def time_method(self, obj, name, phase, index):
        original, had_own = getattr(obj, name), name in vars(obj)
        probe = self

        def timed(*args, **kwargs):
            outer, probe.current = probe.current, (phase, index)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                probe.seconds[(phase, index)] += time.perf_counter() - start
                probe.current = outer
        setattr(obj, name, timed)
        self._undo.append(lambda: setattr(obj, name, original) if had_own else delattr(obj, name))

    def time_function(self, module, name):
        original = getattr(module, name)
        probe = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                where = probe.current or ('outside', -1)
                probe.parts[where + (name,)] += time.perf_counter() - start
        setattr(module, name, timed)
        self._undo.append(lambda: setattr(module, name, original))

    def remove(self):
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def one_core():
    """NumPy's BLAS on one thread (process-wide while it lasts)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api='blas'):
        yield


# -- what each step is and what it must do ------------------------------------------------------

class Costs:
    """Per-photo element counts of the model's tensors at this size, and what a layer costs; a
    layer's weights are read (and their gradients written) once a batch, so they count
    1 / batch of their size a photo."""

    def __init__(self, model, size, batch, itemsize=4):
        self.model, self.batch, self.itemsize = model, batch, itemsize
        self.shapes = model.shapes_at(size)

    def elements(self, name):
        return int(np.prod(self.shapes[name][1:]))

    def layer(self, name):
        return self.model.get_layer(name)

    def conv(self, layer, input_name):
        """(multiply-adds, elements of the input the windows read, of the output, of the kernel,
        product shape (rows a photo, K, N)) of a Conv2D."""
        _, oh, ow, c_out = self.shapes[layer.name]
        (kh, kw), c_in = layer.kernel_size, self.shapes[input_name][-1]
        touched = min(self.elements(input_name), oh * ow * kh * kw * c_in)
        kernel = layer.params['kernel'].size / self.batch
        return (layer.multiply_adds(self.shapes[input_name]), touched, oh * ow * c_out, kernel,
                (oh * ow, kh * kw * c_in, c_out))

    def separable(self, layer, input_name):
        """(depthwise multiply-adds, pointwise multiply-adds, input elements, depthwise output
        elements, output elements, depthwise kernel, pointwise kernel, product shape)."""
        _, oh, ow, c_out = self.shapes[layer.name]
        (kh, kw), c_in = layer.kernel_size, self.shapes[input_name][-1]
        return (oh * ow * kh * kw * c_in, oh * ow * c_in * c_out, self.elements(input_name), oh * ow * c_in,
                oh * ow * c_out, layer.params['depthwise_kernel'].size / self.batch,
                layer.params['pointwise_kernel'].size / self.batch, (oh * ow, c_in, c_out))


def conv_kind(layer):
    from minixcept.layers import Conv2D
    if isinstance(layer, Conv2D):
        return SHORTCUT if layer.kernel_size == (1, 1) and layer.strides != (1, 1) else FULL_CONV
    return type(layer).__name__


def inference_accounts(step, costs):
    """[(kind, macs, bytes, product shape or None, parts that are this kind's or None)] for one
    step of the inference engine, per photo (forward only)."""
    from minixcept.engines import inference
    from minixcept.layers import Conv2D, DepthwiseConv2D, GlobalAveragePooling2D, SeparableConv2D
    from minixcept.engines.plan import CONVOLUTIONS
    f = costs.itemsize
    x = step.inputs[0]
    if isinstance(step, (inference.WindowedConvStep, inference.PointwiseStep)):
        conv = next(costs.layer(n) for n in step.layers if isinstance(costs.layer(n), CONVOLUTIONS))
        if isinstance(conv, Conv2D):
            macs, touched, out, kernel, shape = costs.conv(conv, x)
            return [(conv_kind(conv), macs, f * (touched + out + kernel), shape, None)]
        if isinstance(conv, SeparableConv2D):
            dmacs, pmacs, n_in, _, out, dk, pk, shape = costs.separable(conv, x)
            return [(DEPTHWISE, dmacs, f * (n_in + dk), None, DEPTHWISE_PARTS),
                    (POINTWISE, pmacs, f * (out + pk), shape, 'rest')]
        macs = conv.multiply_adds(costs.shapes[x])
        out = costs.elements(conv.name)
        kind = DEPTHWISE if isinstance(conv, DepthwiseConv2D) else POINTWISE
        weights = sum(v.size for v in conv.params.values()) / costs.batch
        shape = None if kind == DEPTHWISE else (out // costs.shapes[conv.name][-1],) + conv.params[
            'pointwise_kernel'].shape[2:]
        return [(kind, macs, f * (costs.elements(x) + out + weights), shape, None)]
    out = costs.elements(step.output)
    if isinstance(step, inference.MaxPoolStep):
        return [(MAX_POOL, 0, f * (costs.elements(x) + out), None, None)]
    if isinstance(step, inference.AddStep):
        return [(ADD, 0, f * 3 * out, None, None)]
    if isinstance(step, inference.ReluStep):
        return [(RELU, 0, f * 2 * out, None, None)]
    layer = costs.layer(step.layers[0])
    kind = GLOBAL_POOL if isinstance(layer, GlobalAveragePooling2D) else type(layer).__name__
    return [(kind, layer.multiply_adds(costs.shapes[x]), f * (costs.elements(x) + out), None, None)]


def training_accounts(step, costs):
    """[(kind, (forward macs, backward macs), (forward bytes, backward bytes), product shape or
    None, parts or None)] for one step of the training engine, per photo."""
    from minixcept.engines import training
    from minixcept.layers import (Activation, BatchNormalization, Conv2D, GlobalAveragePooling2D,
                                  MaxPooling2D, SeparableConv2D)
    f = costs.itemsize
    layer, x = step.layer, step.node.inputs[0]
    if isinstance(step, training.FusedAwayStep):
        return [(FUSED_AWAY, (0, 0), (0, 0), None, None)]
    if isinstance(step, training.AddStep):
        return [(ADD, (0, 0), (f * 3 * costs.elements(layer.name), 0), None, None)]
    n_in, out = costs.elements(x), costs.elements(layer.name)
    if isinstance(layer, Conv2D):
        macs, touched, out, k, shape = costs.conv(layer, x)
        return [(conv_kind(layer), (macs, 2 * macs),
                 (f * (touched + out + k), f * (out + touched + n_in + 2 * k)), shape, None)]
    if isinstance(layer, SeparableConv2D) and isinstance(step, training.FastStep):
        dmacs, pmacs, n_in, z, out, dk, pk, shape = costs.separable(layer, x)
        return [(DEPTHWISE, (dmacs, 2 * dmacs), (f * (n_in + z + dk), f * (z + 2 * n_in + 2 * dk)), None,
                 DEPTHWISE_PARTS),
                (POINTWISE, (pmacs, 2 * pmacs), (f * (z + out + pk), f * (out + 2 * z + 2 * pk)), shape, 'rest')]
    if isinstance(layer, Activation):
        return [(RELU if layer.activation == 'relu' else f'Activation {layer.activation}', (0, 0),
                 (f * 2 * n_in, f * 3 * n_in), None, None)]
    if isinstance(layer, BatchNormalization):
        return [(BATCH_NORM, (0, 0), (f * 2 * n_in, f * 3 * n_in), None, None)]
    if isinstance(layer, MaxPooling2D):                     # + the int8 argmax, kept and read back
        return [(MAX_POOL, (0, 0), (f * (n_in + out) + out, f * (out + n_in) + out), None, None)]
    kind = GLOBAL_POOL if isinstance(layer, GlobalAveragePooling2D) else type(layer).__name__
    macs = layer.multiply_adds(costs.shapes[x])
    return [(kind, (macs, 2 * macs), (f * (n_in + out), f * (out + n_in)), None, None)]


def fan_out_bytes(model, costs):
    """Bytes a photo of the backward pass's gradient sums where a tensor is read more than once
    (two reads and a write each): the engine does them between the steps."""
    return sum(costs.itemsize * 3 * (len(readers) - 1) * costs.elements(name)
               for name, readers in model.readers().items() if len(readers) > 1)


# -- the floors ---------------------------------------------------------------------------------

def product_rates(shapes_by_kind, batch, repeats=3):
    """{kind: {'forward': G multiply-adds/s, 'training': G multiply-adds/s, 'per_shape': [...]}}:
    np.matmul's float32 rate on that kind's product shapes at this batch, on the current BLAS
    threads, each distinct shape timed best of ``repeats`` after a warm-up: forward y = x @ W
    alone, and for training with its backward products dx = dy @ W.T and dW = x.T @ dy."""
    rng = np.random.default_rng(2)
    timed = {}

    def seconds(m, k, n):
        if (m, k, n) not in timed:
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32)
            g = rng.standard_normal((m, n), dtype=np.float32)
            y, dx, dw = np.empty((m, n), np.float32), np.empty((m, k), np.float32), np.empty((k, n), np.float32)
            best = []
            for call in (lambda: np.matmul(a, w, out=y), lambda: np.matmul(g, w.T, out=dx),
                         lambda: np.matmul(a.T, g, out=dw)):
                call()                                                   # warm-up
                best.append(min(three_way._timed(call) for _ in range(repeats)))
            timed[(m, k, n)] = best
        return timed[(m, k, n)]

    rates = {}
    for kind, shapes in shapes_by_kind.items():
        counted = defaultdict(int)
        for rows, k, n in shapes:
            counted[(rows * batch, k, n)] += 1
        macs = forward_s = training_s = 0.0
        per_shape = []
        for (m, k, n), count in counted.items():
            y_s, dx_s, dw_s = seconds(m, k, n)
            macs += m * k * n * count
            forward_s += y_s * count
            training_s += (y_s + dx_s + dw_s) * count
            per_shape.append({'shape': [m, k, n], 'count': count,
                              **{f'{what}_gmacs_per_s': round(m * k * n / s / 1e9, 1)
                                 for what, s in (('y', y_s), ('dx', dx_s), ('dw', dw_s))}})
        rates[kind] = {'forward': macs / forward_s / 1e9, 'training': 3 * macs / training_s / 1e9,
                       'per_shape': per_shape}
    return rates


def memory_bandwidth(mib=BANDWIDTH_MIB, repeats=5):
    """(GB/s of the better of the two, {'copy': GB/s, 'add': GB/s}) on one thread: np.copyto
    over ``mib`` MiB (a read and a write), np.add of two such arrays into a third."""
    n = mib * 2 ** 20 // 4
    a, b, c = (np.ones(n, np.float32) for _ in range(3))                # touched: no page faults timed
    copy = min(three_way._timed(lambda: np.copyto(c, a)) for _ in range(repeats))
    add = min(three_way._timed(lambda: np.add(a, b, out=c)) for _ in range(repeats))
    rates = {'copy': 2 * a.nbytes / copy / 1e9, 'add': 3 * a.nbytes / add / 1e9}
    return max(rates.values()), rates


# -- the passes ---------------------------------------------------------------------------------

def inference_pass(model, costs, batch):
    """(engine on one thread, [(phase, call(x, dy))], [(phase, index, step, accounts)], instrument(probe))."""
    from minixcept.engines import inference
    engine = inference.InferenceEngine(model, threads=1)
    steps = engine.steps                     # the kept plan that engine(x) runs
    entries = [('forward', i, step, [(kind, (macs, 0), (nbytes, 0), shape, parts)
                                     for kind, macs, nbytes, shape, parts in inference_accounts(step, costs)])
               for i, step in enumerate(steps)]

    def instrument(probe):
        for i, step in enumerate(steps):
            probe.time_method(step, 'run', 'forward', i)
        for name, _ in INFERENCE_PARTS:
            probe.time_function(inference, name)
    return engine, [('forward', lambda x, dy: engine(x))], entries, instrument


def training_pass(model, costs, batch):
    from minixcept.engines import training
    engine = training.GradientEngine(model, threads=1)
    # The TrainingPlan the engine's forward(x, training=False) runs (kept, the same objects).
    plan = engine._plan(False, None, None, fast=True)
    entries = [(None, i, step, training_accounts(step, costs)) for i, step in enumerate(plan.steps)]

    def instrument(probe):
        for i, step in enumerate(plan.steps):
            probe.time_method(step, 'forward', 'forward', i)
            probe.time_method(step, 'backward', 'backward', i)
        for name, _ in TRAINING_PARTS:
            probe.time_function(training, name)

    return engine, [('forward', lambda x, dy: engine.forward(x, training=False)),
                    ('backward', lambda x, dy: engine.backward(dy))], entries, instrument


def kind_seconds(entries, probe, phases):
    """{(kind, phase): seconds} and {(kind, part name): seconds} of one instrumented call."""
    by_kind, by_part = defaultdict(float), defaultdict(float)
    for _, i, _, accounts in entries:
        for phase in phases:
            if (phase, i) not in probe.seconds:
                continue
            total = probe.seconds[(phase, i)]
            parts = {name: s for (p, j, name), s in probe.parts.items() if p == phase and j == i}
            mine = 0.0
            for kind, _, _, _, which in accounts:
                if which is None:
                    share = total
                    for name, s in parts.items():
                        by_part[(kind, name)] += s
                    by_part[(kind, REST)] += total - sum(parts.values())
                elif which == 'rest':
                    share = total - mine
                    by_part[(kind, REST)] += share
                else:
                    share = sum(s for name, s in parts.items() if name in which)
                    for name, s in parts.items():
                        if name in which:
                            by_part[(kind, name)] += s
                mine += share
                by_kind[(kind, phase)] += share
    return by_kind, by_part


def run_pass(label, make, model, costs, x, dy, rounds):
    """Time one pass: rounds of (one thread as it is, one thread instrumented, default threads),
    the order reversed every other round, after a warm-up call each."""
    engine, calls, entries, instrument = make(model, costs, len(x))
    phases = tuple(phase for phase, _ in calls)
    default = forward.runners(None, model, None, 'forward' if phases == ('forward',) else 'backward',
                              bn_training=False, with_plain=False)['minixcept']
    probe = Probe()

    def call():
        """{phase: seconds} of one pass."""
        seconds = {}
        for phase, run in calls:
            start = time.perf_counter()
            run(x, dy)
            seconds[phase] = time.perf_counter() - start
        return seconds

    with one_core():
        call()                                               # warm-up: plans, pools
        instrument(probe)
        try:
            call()                                           # the instrumented one's warm-up
            recorded = {i for (_, i) in probe.seconds}
            if recorded != {i for _, i, _, _ in entries}:
                raise SystemExit(f'{label}: the engine ran other step objects than its plan '
                                 f'({len(recorded)} of {len(entries)} recorded): nothing to break down')
        finally:
            probe.remove()
    default(x, dy)                                           # warm-up
    timings = {key: [] for key in ('plain', 'instrumented', 'default_threads', 'outside', 'kinds', 'parts',
                                   'phases', 'steps')}

    def one_thread_plain():
        with one_core():
            timings['plain'].append(sum(call().values()))

    def one_thread_instrumented():
        probe.reset()
        with one_core():
            instrument(probe)
            try:
                wall = call()
            finally:
                probe.remove()
        timings['instrumented'].append(sum(wall.values()))
        by_kind, by_part = kind_seconds(entries, probe, phases)
        timings['kinds'].append(by_kind)
        timings['parts'].append(by_part)
        steps = {phase: sum(s for (p, _), s in probe.seconds.items() if p == phase) for phase in phases}
        timings['outside'].append({phase: wall[phase] - steps[phase] for phase in phases})
        timings['phases'].append(wall)
        timings['steps'].append(dict(probe.seconds))

    def default_threads():
        start = time.perf_counter()
        default(x, dy)
        timings['default_threads'].append(time.perf_counter() - start)

    order = [one_thread_plain, one_thread_instrumented, default_threads]
    for round_ in range(rounds):
        for run in (order if round_ % 2 == 0 else order[::-1]):
            run()
    return type(engine).__name__, entries, timings, phases       # the engine (its pools) can go


def summarise(label, entries, timings, phases, batch, rates, bandwidth, extra_outside_bytes):
    """The table's rows: per kind, steps, multiply-adds, bytes, time, floor, bound, ratio, share."""
    ms = 1e3 / batch
    rows = {}
    for _, i, step, accounts in entries:
        for kind, macs, nbytes, shape, _ in accounts:
            row = rows.setdefault(kind, {'kind': kind, 'steps': 0, 'macs': [0, 0], 'bytes': [0, 0], 'shapes': []})
            row['steps'] += 1
            row['macs'] = [a + b for a, b in zip(row['macs'], macs)]
            row['bytes'] = [a + b for a, b in zip(row['bytes'], nbytes)]
            if shape is not None:
                row['shapes'].append(shape)
    rows[OUTSIDE] = {'kind': OUTSIDE, 'steps': 0, 'macs': [0, 0],
                     'bytes': [0, extra_outside_bytes if 'backward' in phases else 0], 'shapes': []}
    pointwise_rate = rates.get(POINTWISE, (None,))[0]
    result = []
    for kind in sorted(rows, key=lambda k: (ORDER + [k, OUTSIDE]).index(k)):
        row = rows[kind]
        rounds = (timings['outside'] if kind == OUTSIDE else
                  [{p: r.get((kind, p), 0.0) for p in phases} for r in timings['kinds']])
        per_phase = {phase: statistics.median(r[phase] for r in rounds) * ms for phase in phases}
        time_ms = statistics.median(sum(r.values()) for r in rounds) * ms
        macs = sum(row['macs'][:len(phases)])
        nbytes = sum(row['bytes'][:len(phases)])
        rate = rates[kind][0] if kind in rates else pointwise_rate
        product_ms = macs / (rate * 1e9) * 1e3 if macs and rate else 0.0
        memory_ms = nbytes / (bandwidth * 1e9) * 1e3
        floor = max(product_ms, memory_ms)
        result.append({
            'kind': kind, 'what': WHAT.get(kind, ''), 'steps': row['steps'], 'multiply_adds_per_photo': macs,
            'bytes_per_photo': nbytes, 'ms_per_photo': time_ms,
            **({f'{phase}_ms_per_photo': per_phase[phase] for phase in phases} if len(phases) > 1 else {}),
            'floor_ms_per_photo': floor,
            'bound': ('products' if product_ms >= memory_ms else 'memory') if floor else '-',
            'product_floor_ms': product_ms, 'memory_floor_ms': memory_ms,
            'gmacs_per_s_used': rate if macs else None,
            'time_over_floor': time_ms / floor if floor else None})
    total = sum(r['ms_per_photo'] for r in result)
    for r in result:
        r['share'] = r['ms_per_photo'] / total if total else None
    return result


def parts_summary(timings, batch, names, rows):
    """The timed kernel functions inside each kind (and the rest of its steps), for the kinds
    with any: [{'kind', 'part', 'what', 'ms_per_photo', 'share_of_kind'}]."""
    ms = 1e3 / batch
    totals = {r['kind']: r['ms_per_photo'] for r in rows}
    keys = {key for r in timings['parts'] for key in r}
    kinds = {kind for kind, part in keys if part != REST}
    out = []
    for kind, part in sorted(keys, key=lambda k: ((ORDER + [k[0]]).index(k[0]), k[1] == REST, k[1])):
        if kind not in kinds:
            continue
        value = statistics.median(r.get((kind, part), 0.0) for r in timings['parts']) * ms
        out.append({'kind': kind, 'part': part, 'what': names.get(part, ''), 'ms_per_photo': value,
                    'share_of_kind': value / totals[kind] if totals.get(kind) else None})
    return out


def step_medians(entries, timings, batch, phases):
    """Per step: its class, the layers it runs, its kinds, and its median ms a photo per phase."""
    ms = 1e3 / batch
    out = []
    for _, i, step, accounts in entries:
        out.append({'index': i, 'step': type(step).__name__,
                    'layers': list(step.layers) if hasattr(step, 'layers') and not hasattr(step, 'node')
                    else [step.layer.name],
                    'kinds': [a[0] for a in accounts],
                    **{f'{phase}_ms_per_photo': round(statistics.median(r.get((phase, i), 0.0)
                                                                        for r in timings['steps']) * ms, 4)
                       for phase in phases}})
    return out


# -- the report ---------------------------------------------------------------------------------

def table(rows, phases):
    split = len(phases) > 1
    head = ('| kind | steps | G mult-adds/photo | MB/photo | ms/photo | ' + ('fwd ms | bwd ms | ' if split else '')
            + 'floor ms/photo | bound | time / floor | share |')
    lines = [head, '|---|---:|---:|---:|---:|' + ('---:|---:|' if split else '') + '---:|---|---:|---:|']
    for r in rows:
        ratio = f"{r['time_over_floor']:.2f}" if r['time_over_floor'] else '-'
        phase_cells = (f"{r['forward_ms_per_photo']:.2f} | {r['backward_ms_per_photo']:.2f} | " if split else '')
        lines.append(f"| {r['kind']} | {r['steps'] or '-'} | {r['multiply_adds_per_photo'] / 1e9:.3f} | "
                     f"{r['bytes_per_photo'] / 1e6:.1f} | {r['ms_per_photo']:.2f} | {phase_cells}"
                     f"{r['floor_ms_per_photo']:.2f} | {r['bound']} | {ratio} | {100 * r['share']:.1f}% |")
    return '\n'.join(lines)


def parts_table(parts):
    lines = ['| kind | inside its steps | ms/photo | share of the kind |', '|---|---|---:|---:|']
    for p in parts:
        what = p['part'] if p['part'] == REST else f"{p['part']}: {p['what']}"
        share = f"{100 * p['share_of_kind']:.0f}%" if p['share_of_kind'] is not None else '-'
        lines.append(f"| {p['kind']} | {what} | {p['ms_per_photo']:.2f} | {share} |")
    return '\n'.join(lines)


def plan_line(model, entries):
    """How many steps of each class, and how many batch-norms and ReLUs run inside a convolution."""
    from minixcept.engines.plan import is_relu
    from minixcept.layers import BatchNormalization
    classes = defaultdict(int)
    inside = set()
    for _, _, step, accounts in entries:
        classes[type(step).__name__] += 1
        if hasattr(step, 'node'):                         # the training engine: a step per layer
            if type(step).__name__ == 'FusedAwayStep':
                inside.add(step.layer.name)
        elif len(step.layers) > 1:                        # the inference engine: a step runs several
            inside.update(step.layers)
    layers = [node.layer for node in model.nodes]
    norms = [layer.name for layer in layers if isinstance(layer, BatchNormalization)]
    relus = [layer.name for layer in layers if is_relu(layer)]
    return (f"{len(entries)} steps for {len(layers)} layers (" + ', '.join(f'{n} {k}' for k, n in classes.items())
            + f"); batch-norms folded into a convolution: {sum(n in inside for n in norms)} of {len(norms)}; "
            f"ReLUs run inside a convolution: {sum(n in inside for n in relus)} of {len(relus)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=299, help='image side in pixels (at least 71)')
    parser.add_argument('--rounds', type=int, default=3, help='timed rounds per pass (median)')
    parser.add_argument('--json', type=Path, help='also write the results here as JSON')
    args = parser.parse_args(argv)
    load_before = three_way.load_average()
    busy_before, mine_before = three_way.cpu_seconds()
    wall_before = time.perf_counter()
    package = three_way.use_package(None)
    machine = three_way.describe_cpu()
    path = forward.weights_path()
    if path is None:
        raise SystemExit('the ImageNet notop weights are needed: python weights/fetch.py')
    import minixcept
    model = minixcept.Xception(include_top=False, input_shape=(args.size, args.size, 3), pooling='avg')
    model.load_weights(path)
    print(f"# {machine['cpu']} ({machine['cpu_family_model']}), {machine['cores']} cores, {machine['vector_width']}; "
          f"NumPy BLAS: {three_way.blas_line(machine)}; BLAS environment: {machine['blas_environment']}; "
          f"load average {load_before}", flush=True)
    print(f"# minixcept measured: {three_way.package_line(package)}", flush=True)

    x = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((args.batch, FEATURES)).astype(np.float32)
    costs = Costs(model, args.size, args.batch)

    passes = {}
    for label, make in (('forward', inference_pass), ('forward + backward', training_pass)):
        passes[label] = run_pass(label, make, model, costs, x, dy, args.rounds)
        print(f"# {label}: timed ({args.rounds} rounds)", flush=True)

    shapes = defaultdict(list)                 # the inference plan's products: the same layers
    for _, _, _, accounts in passes['forward'][1]:
        for kind, _, _, shape, _ in accounts:
            if shape is not None:
                shapes[kind].append(shape)
    with one_core():
        bandwidth, bandwidths = memory_bandwidth()
        products = product_rates(shapes, args.batch)
    forward_rates = {k: (r['forward'], r['per_shape']) for k, r in products.items()}
    training_rates = {k: (r['training'], r['per_shape']) for k, r in products.items()}

    busy_after, mine_after = three_way.cpu_seconds()
    wall = time.perf_counter() - wall_before
    others = (None if busy_before is None else
              round(max((busy_after - busy_before) - (mine_after - mine_before), 0.0) / wall, 2))
    report = {'machine': machine, 'package': package,
              'run': {'batch': args.batch, 'size': args.size, 'rounds': args.rounds, 'weights': path.name,
                      'batch_norm': 'moving statistics',
                      'breakdown_threads': 'engine threads=1, BLAS on 1 thread (threadpoolctl)'},
              'load_average_before': load_before,
              'floor': {'memory_gb_per_s': bandwidth, 'memory_gb_per_s_each': bandwidths,
                        'memory_arrays_mib': BANDWIDTH_MIB,
                        'products': products},
              'passes': {}}
    ms = 1e3 / args.batch
    from minixcept.engines.kernels import engine_workers
    default_threads = engine_workers(None).threads               # what an engine takes by default
    for label, (engine, entries, timings, phases) in passes.items():
        rates = forward_rates if label == 'forward' else training_rates
        rows = summarise(label, entries, timings, phases, args.batch, rates, bandwidth,
                         fan_out_bytes(model, costs))
        names = dict(INFERENCE_PARTS if label == 'forward' else TRAINING_PARTS)
        counted = sum(r['multiply_adds_per_photo'] for r in rows) / (1 if label == 'forward' else 3)
        if abs(counted - model.multiply_adds(args.size)) > 1e-6 * counted:
            raise SystemExit(f'{label}: the kinds count {counted:,.0f} multiply-adds a photo, the model '
                             f'{model.multiply_adds(args.size):,.0f}: a step the breakdown does not know')
        whole = {key: statistics.median(timings[key]) * ms for key in ('plain', 'instrumented', 'default_threads')}
        report['passes'][label] = {
            'engine': engine, 'plan': plan_line(model, entries), 'kinds': rows,
            'parts': parts_summary(timings, args.batch, names, rows),
            'sum_of_kinds_ms': sum(r['ms_per_photo'] for r in rows),
            'floor_ms': sum(r['floor_ms_per_photo'] for r in rows),
            'one_thread_ms': whole['plain'], 'one_thread_instrumented_ms': whole['instrumented'],
            'default_threads_ms': whole['default_threads'], 'default_threads': default_threads,
            'instrumented_phases_ms': {p: statistics.median(r[p] for r in timings['phases']) * ms for p in phases},
            'rounds_ms': {key: [round(v * ms, 2) for v in timings[key]]
                          for key in ('plain', 'instrumented', 'default_threads')},
            'steps': step_medians(entries, timings, args.batch, phases)}
    report['load_average_after'] = three_way.load_average()
    report['other_processes_cores'] = others
    report['wall_seconds'] = round(wall, 1)

    print()
    print(f"Machine: {machine['cpu']} ({machine['cpu_family_model']}), {machine['cores']} cores, "
          f"{machine['vector_width']}")
    print(f"NumPy {machine['numpy']}, BLAS: {three_way.blas_line(machine)}; "
          f"BLAS environment: {machine['blas_environment']}")
    print(f"minixcept: {three_way.package_line(package)}")
    print(f"Load average (1, 5, 15 min): before {load_before}, after {report['load_average_after']} "
          f"(counting this run's own threads); other processes took {others} cores on average "
          f"over the {wall:.0f} s run")
    print(f"Batch {args.batch}, {args.size} px, ImageNet notop weights, batch-norm on its moving statistics; "
          f"median of {args.rounds} rounds. The breakdown runs each engine on ONE thread (threads=1) with "
          f"BLAS held to one thread: one core's times, beside one core's floors.")
    print(f"Floors (one thread): memory {bandwidth:.1f} GB/s (copy {bandwidths['copy']:.1f}, add "
          f"{bandwidths['add']:.1f}); products, G mult-adds/s: forward "
          + ', '.join(f'{k} {r:.1f}' for k, (r, _) in forward_rates.items())
          + '; forward + backward ' + ', '.join(f'{k} {r:.1f}' for k, (r, _) in training_rates.items())
          + f' ({DEPTHWISE} counted at the {POINTWISE} rate)')
    for label, result in report['passes'].items():
        phases = passes[label][3]
        print()
        print(f"## {label} ({result['engine']}): {result['plan']}")
        print(table(result['kinds'], phases))
        print(f"- the whole pass on one thread: {result['one_thread_ms']:.2f} ms/photo as it is, "
              f"{result['one_thread_instrumented_ms']:.2f} instrumented (the timers cost "
              f"{result['one_thread_instrumented_ms'] - result['one_thread_ms']:+.2f}); the kinds add up to "
              f"{result['sum_of_kinds_ms']:.2f} against a floor of {result['floor_ms']:.2f} "
              f"({result['sum_of_kinds_ms'] / result['floor_ms']:.2f}x)")
        if len(phases) > 1:
            print('- instrumented, by phase: ' + ', '.join(
                f'{p} {v:.2f}' for p, v in result['instrumented_phases_ms'].items()) + ' ms/photo')
        print(f"- for reference, the engine with its default threads ({result['default_threads']}), as "
              f"predict and three_way.py run it: {result['default_threads_ms']:.2f} ms/photo "
              f"(the one-thread pass takes {result['one_thread_ms'] / result['default_threads_ms']:.2f}x as long)")
        if result['parts']:
            print()
            print(parts_table(result['parts']))
            print()
        for key, values in result['rounds_ms'].items():
            print(f"- rounds, {key.replace('_', ' ')}: {' '.join(f'{v:.1f}' for v in values)} ms/photo")
    print()
    print('Kinds: ' + '; '.join(f'{k}: {WHAT[k]}' for k in ORDER + [OUTSIDE]
                                if any(r['kind'] == k for p in report['passes'].values() for r in p['kinds'])))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
