#!/usr/bin/env python3
"""Xception at 299 px on the CPU: minixcept (NumPy) against TensorFlow, side by side.

    python benchmarks/forward.py                        # batches 1, 8, 32; 5 repeats; memory; backward
    python benchmarks/forward.py --batches 8 --repeats 9
    python benchmarks/forward.py --quick                # a smoke test: batch 1, one repeat
    python benchmarks/forward.py --out report.md       # the Markdown report, also to a file

Both frameworks run in this one process on the same random batch, with the same real
weights (the ImageNet notop file that ``python weights/fetch.py`` makes; without it, random
Keras weights copied into minixcept by order). Each model is the notop base with global
average pooling, as the cat/dog recipe uses it.

Timing: one warm-up call each, then ``--repeats`` rounds in which the runners take turns
(TensorFlow, minixcept, ... in alternating order), so that load from other processes on a
shared machine falls on both alike; the table gives each runner's median. TensorFlow runs
its model through a ``tf.function`` (the graph ``model.predict`` also uses); minixcept runs
the fused inference engine that ``Model.predict`` uses (``minixcept.engines.inference``), and at one batch
size also the plain layer-by-layer forward pass, for before/after.

Forward + backward: the whole network, loss = sum(y * dy) for a fixed random dy, gradients
for every weight and for the input: minixcept's training engine (``minixcept.engines.training``:
``GradientEngine.forward`` then ``.backward``), and for before/after also the plain layers'
``forward`` then ``backward``; TensorFlow's ``GradientTape`` in a ``tf.function``. Batch-norm
runs in inference mode (moving statistics, as when fine-tuning a pretrained base) unless
``--bn-training``.

Memory: each framework runs in a child process of its own. After the model and weights are
loaded, the child returns freed heap memory to the system (glibc's malloc_trim), resets the
kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs) and notes its resident memory;
it then runs the warm-up and one timed call, and reports the peak
resident memory (VmHWM) minus that baseline: the memory the pass itself needed, activations,
workspaces and allocator caches included, weights excluded. Linux only; elsewhere the
column says n/a.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')          # the CPU, even where a GPU exists

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SIDE = 299
WEIGHTS = REPO / 'weights' / 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'


# -- the machine --------------------------------------------------------------------------------

def cpu_model():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def blas_description():
    """The BLAS NumPy calls, its kernel and thread count (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return 'unknown (pip install threadpoolctl to see it)'
    pools = [p for p in threadpool_info() if p.get('user_api') == 'blas']
    return '; '.join(f"{p['internal_api']} {p['version']}, kernel {p.get('architecture', '?')}, "
                     f"{p['num_threads']} threads" for p in pools) or 'none found'


def describe_machine(tf):
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    openblas_env = {name: os.environ[name] for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE',
                                                        'OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS')
                    if name in os.environ}
    return {
        'date': datetime.date.today().isoformat(),
        'cpu': cpu_model(),
        'cores': usable_cores(),
        'python': platform.python_version(),
        'numpy': np.__version__,
        'blas': blas_description(),
        'blas_environment': ', '.join(f'{k}={v}' for k, v in openblas_env.items()) or 'none set',
        'tensorflow': tf.__version__,
        'tensorflow_threads': (f"intra-op {intra or f'default ({usable_cores()})'}, "
                               f"inter-op {inter or 'default'}"),
    }


# -- the two models -----------------------------------------------------------------------------

def import_tensorflow():
    import tensorflow as tf
    tf.config.experimental.enable_tensor_float_32_execution(False)
    return tf


def weights_path():
    """The notop ImageNet weights, fetched if absent; None if they cannot be had."""
    if WEIGHTS.exists():
        return WEIGHTS
    try:
        from minixcept.files.fetch import fetch
        return Path(fetch(include_top=False, dest_dir=WEIGHTS.parent, quiet=True))
    except Exception as error:        # offline: say so and go on with random weights
        print(f'# ImageNet weights unavailable ({error}); using random Keras weights', file=sys.stderr)
        return None


def build_models(path, need_keras=True):
    """(minixcept model, Keras model or None) with the same weights."""
    import minixcept
    ours = minixcept.Xception(include_top=False, input_shape=(SIDE, SIDE, 3), pooling='avg')
    if not need_keras:
        if path is not None:
            ours.load_weights(path)
        return ours, None
    import keras
    theirs = keras.applications.Xception(include_top=False, input_shape=(SIDE, SIDE, 3), pooling='avg',
                                         weights=str(path) if path is not None else None)
    if path is not None:
        ours.load_weights(path)
    else:                              # copy Keras's random weights over, layer by layer in order
        with_weights = [layer for layer in theirs.layers if layer.weights]
        mine = [layer for layer in ours.layers if layer.weight_names]
        for keras_layer, layer in zip(with_weights, mine, strict=True):
            layer.set_weights(keras_layer.get_weights())
    return ours, theirs


def random_batch(batch, seed=0):
    """Photos-like inputs in [-1, 1], as preprocess_input makes them."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, SIDE, SIDE, 3)).astype(np.float32)


def runners(tf, ours, theirs, mode, bn_training, with_plain):
    """{name: callable(x, dy) -> output} for the timed passes."""
    import minixcept
    import minixcept.engines.inference
    import minixcept.engines.training
    result = {}
    if mode == 'forward':
        engine = minixcept.engines.inference.InferenceEngine(ours)
        if theirs is not None:
            keras_forward = tf.function(lambda x: theirs(x, training=False))
            result['TensorFlow'] = lambda x, dy: keras_forward(x).numpy()
        result['minixcept'] = lambda x, dy: engine(x)
        if with_plain:
            def plain(x, dy):
                with minixcept.no_grad():
                    return ours.forward(x, training=False)
            result['minixcept plain'] = plain
        return result
    if theirs is not None:
        variables = theirs.trainable_variables

        @tf.function
        def keras_gradients(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = theirs(x, training=bn_training)
                loss = tf.reduce_sum(y * dy)
            return tape.gradient(loss, [x] + variables)
        result['TensorFlow'] = lambda x, dy: keras_gradients(tf.constant(x), tf.constant(dy))[0].numpy()

    engine = minixcept.engines.training.GradientEngine(ours)

    def our_gradients(x, dy):
        engine.forward(x, training=bn_training)
        return engine.backward(dy)
    result['minixcept'] = our_gradients
    if with_plain:
        def plain_gradients(x, dy):
            ours.forward(x, training=bn_training)
            return ours.backward(dy)
        result['minixcept plain'] = plain_gradients
    return result


def relative_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# -- timing -------------------------------------------------------------------------------------

def time_interleaved(named_runners, x, dy, repeats):
    """Median seconds per call of each runner: a warm-up call each, then ``repeats`` rounds
    in which they take turns, the order reversed every other round."""
    outputs = {name: run(x, dy) for name, run in named_runners.items()}          # warm-up
    seconds = {name: [] for name in named_runners}
    order = list(named_runners)
    for round_ in range(repeats):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            named_runners[name](x, dy)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}, outputs


# -- memory, in child processes -----------------------------------------------------------------

def _status_kib(field):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise KeyError(field)


def release_free_memory():
    """Hand memory the process freed (e.g. while reading the weights file) back to the system,
    so that the pass measured cannot hide in it."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):      # not glibc
        pass


def memory_child(runner_name, mode, batch, bn_training):
    """Run in a child process: the peak resident memory one pass needs (MiB), weights excluded."""
    tf = import_tensorflow() if runner_name == 'TensorFlow' else None
    ours, theirs = build_models(weights_path(), need_keras=tf is not None)
    run = runners(tf, ours, theirs, mode, bn_training, with_plain=True)[runner_name]
    x = random_batch(batch)
    dy = np.random.default_rng(1).standard_normal((batch, 2048)).astype(np.float32)
    release_free_memory()
    Path('/proc/self/clear_refs').write_text('5')          # peak RSS := current RSS
    baseline = _status_kib('VmRSS')
    run(x, dy)
    run(x, dy)
    print(json.dumps({'peak_mib': (_status_kib('VmHWM') - baseline) / 1024}))


def measure_memory(runner_name, mode, batch, bn_training):
    if not Path('/proc/self/clear_refs').exists():
        return None
    command = [sys.executable, __file__, '--memory-child', runner_name, mode, str(batch)]
    if bn_training:
        command.append('--bn-training')
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f'# memory of {runner_name} ({mode}, batch {batch}) failed:\n{done.stderr[-2000:]}',
              file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])['peak_mib']


# -- the report ---------------------------------------------------------------------------------

def format_mib(value):
    return 'n/a' if value is None else f'{value:,.0f} MiB'


def report(machine, rows, before_after, notes):
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores usable; Python {machine['python']}",
        f"NumPy {machine['numpy']}, BLAS: {machine['blas']}; BLAS environment: {machine['blas_environment']}",
        f"TensorFlow {machine['tensorflow']} (CPU, oneDNN), threads: {machine['tensorflow_threads']}",
        f"Date: {machine['date']}",
        '',
        '| pass | batch | TensorFlow ms/photo | minixcept ms/photo | minixcept / TF '
        '| TF peak memory | minixcept peak memory |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for row in rows:
        lines.append(f"| {row['pass']} | {row['batch']} | {row['tf_ms']:.1f} | {row['ours_ms']:.1f} | "
                     f"{row['ours_ms'] / row['tf_ms']:.2f} | {format_mib(row['tf_mib'])} | "
                     f"{format_mib(row['ours_mib'])} |")
    if before_after:
        lines += ['', '| minixcept, plain layers against the engines | batch | plain ms/photo | engine ms/photo '
                      '| speed-up | plain peak memory | engine peak memory |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for row in before_after:
            lines.append(f"| {row['pass']} | {row['batch']} | {row['plain_ms']:.1f} | {row['fast_ms']:.1f} | "
                         f"{row['plain_ms'] / row['fast_ms']:.2f}x | {format_mib(row['plain_mib'])} | "
                         f"{format_mib(row['fast_mib'])} |")
    return '\n'.join(lines + [''] + notes) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8, 32])
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds per batch size (median)')
    parser.add_argument('--backward-batch', type=int, default=8)
    parser.add_argument('--before-after-batch', type=int, default=8,
                        help='batch size at which the plain forward pass is timed too')
    parser.add_argument('--bn-training', action='store_true',
                        help='backward pass with batch statistics (default: moving statistics)')
    parser.add_argument('--no-memory', action='store_true', help='skip the child processes')
    parser.add_argument('--quick', action='store_true', help='smoke test: batch 1, one round')
    parser.add_argument('--out', type=Path, help='also write the report (Markdown) here')
    parser.add_argument('--memory-child', nargs=3, metavar=('RUNNER', 'MODE', 'BATCH'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        runner_name, mode, batch = args.memory_child
        return memory_child(runner_name, mode, int(batch), args.bn_training)
    if args.quick:
        args.batches, args.repeats, args.backward_batch, args.before_after_batch = [1], 1, 1, 1

    tf = import_tensorflow()
    machine = describe_machine(tf)
    path = weights_path()
    ours, theirs = build_models(path)
    print(f"# {machine['cpu']}, {machine['cores']} cores; NumPy {machine['numpy']} ({machine['blas']}); "
          f"TensorFlow {machine['tensorflow']}; weights: {path.name if path else 'random'}", flush=True)

    rows, before_after, agreement = [], [], []
    passes = [('forward', b) for b in args.batches] + [('forward + backward', args.backward_batch)]
    for name, batch in passes:
        mode = 'forward' if name == 'forward' else 'backward'
        with_plain = mode == 'backward' or batch == args.before_after_batch
        named = runners(tf, ours, theirs, mode, args.bn_training, with_plain)
        x = random_batch(batch)
        dy = np.random.default_rng(1).standard_normal((batch, 2048)).astype(np.float32)
        seconds, outputs = time_interleaved(named, x, dy, args.repeats)
        what = 'output' if mode == 'forward' else 'input gradient'
        agreement.append(f"{name}, batch {batch}: minixcept vs TensorFlow {what}, max|a-b|/max|b| = "
                         f"{relative_error(outputs['minixcept'], outputs['TensorFlow']):.1e}")
        memory = {} if args.no_memory else {
            runner: measure_memory(runner, mode, batch, args.bn_training) for runner in named}
        row = {'pass': name, 'batch': batch, 'tf_ms': seconds['TensorFlow'] / batch * 1e3,
               'ours_ms': seconds['minixcept'] / batch * 1e3,
               'tf_mib': memory.get('TensorFlow'), 'ours_mib': memory.get('minixcept')}
        rows.append(row)
        print(f"{name:20s} batch {batch:3d}: TensorFlow {row['tf_ms']:7.1f}  minixcept {row['ours_ms']:7.1f} "
              f"ms/photo  ratio {row['ours_ms'] / row['tf_ms']:.2f}", flush=True)
        if with_plain:
            before_after.append({'pass': name, 'batch': batch, 'plain_ms': seconds['minixcept plain'] / batch * 1e3,
                                 'fast_ms': row['ours_ms'], 'plain_mib': memory.get('minixcept plain'),
                                 'fast_mib': row['ours_mib']})
            agreement.append(f"{name}, batch {batch}: minixcept engine vs plain layers {what}, max|a-b|/max|b| = "
                             f"{relative_error(outputs['minixcept'], outputs['minixcept plain']):.1e}")
            print(f"{'':20s} plain layers {before_after[-1]['plain_ms']:7.1f} ms/photo", flush=True)

    notes = [f'Runs: median of {args.repeats} interleaved rounds after a warm-up; forward + backward '
             f"with batch-norm in {'training' if args.bn_training else 'inference'} mode; weights: "
             f"{'ImageNet notop' if path else 'random'}."] + [f'- {line}' for line in agreement]
    text = report(machine, rows, before_after, notes)
    print('\n' + text)
    if args.out:
        args.out.write_text(text)


if __name__ == '__main__':
    sys.exit(main())
