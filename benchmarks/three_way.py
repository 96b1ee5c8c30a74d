#!/usr/bin/env python3
"""Xception on the CPU three ways: minixcept (NumPy), TensorFlow and PyTorch, side by side,
beside the machine's matrix-product floor.

    python benchmarks/three_way.py                          # batch 8, 299 px, 5 rounds
    python benchmarks/three_way.py --batch 1 --size 96 --rounds 1     # a smoke test
    python benchmarks/three_way.py --json three_way.json    # also write the report as JSON
    python benchmarks/three_way.py --package-path /tmp/before     # another checkout's minixcept

Needs TensorFlow (the ``reference`` extra) and PyTorch (the ``bench`` extra); without PyTorch
it runs minixcept and TensorFlow only and says so. All three run in this one process on the
same random batch with the same ImageNet notop weights (the file ``python weights/fetch.py``
makes), each the notop base with global average pooling.

The PyTorch network is written here, from the architecture, independently of minixcept's
graph: ``nn.Conv2d`` with ``groups=C`` for the depthwise convolutions, TensorFlow's 'same'
padding as an explicit ``F.pad`` (asymmetric at stride 2: the smaller half before), batch-norm
with epsilon 1e-3, max pooling padded with -inf. Its weights are read from the HDF5 file with
h5py (``layer_names`` and each group's ``weight_names``) and transposed to PyTorch's layouts.
Its output is checked against minixcept's before anything is timed (max |a - b| / max |b| must
be under 1e-4). Eager PyTorch runs in both memory formats, NCHW and channels_last; the table
takes the better of the two.

Timing, as in ``forward.py``: a warm-up call each, then ``--rounds`` rounds in which the
runners take turns (the order reversed every other round), median seconds per call.
forward: minixcept's ``Model.predict`` (the inference engine), TensorFlow's Keras model in a
``tf.function``, PyTorch under ``torch.inference_mode``. forward + backward: loss =
sum(y * dy) for a fixed random dy, gradients for every weight and the input, batch-norm on its
moving statistics: minixcept's training engine, TensorFlow's ``GradientTape`` in a
``tf.function``, PyTorch's autograd.

The floor: the float32 matrix products of Xception's pointwise convolutions at this batch and
size, timed alone on NumPy's BLAS with its default threads; their multiply-adds over their
time is the rate, G multiply-adds/s, timed before the rounds and after them (each after a
pause, since the other frameworks' thread pools spin on after their work), the better
counting. The forward floor is the whole network's multiply-adds
(8.36 G a photo at 299 px) at that rate, forward + backward three times it.

The report names the CPU (lscpu), its vector width (AVX2 / AVX-512 flags), NumPy's BLAS, its
kernel and threads (threadpoolctl), PyTorch's and TensorFlow's threads and the load average
before and after, and the CPU that other processes took during the run (/proc/stat less
this process's own time: the load average counts the run's own threads too), and which
minixcept it measured: the package's folder and the git commit of the checkout it is in,
with whether the package's files differ from that commit.

``--package-path DIR`` measures the minixcept package in DIR (a checkout or ``git worktree`` of
another commit, e.g. the state before a change) with this script, its PyTorch network, floor
and timing, so that a before and an after run differ in the package alone. ``PYTHONPATH``
does not do it: this script puts its own checkout first on ``sys.path``. The package is
imported from DIR before anything else imports minixcept, and the run stops if it came from
anywhere else.
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
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import forward  # noqa: E402  (benchmarks/forward.py: the TensorFlow and minixcept runners, the timing)

AGREEMENT = 1e-4
FEATURES = 2048


# -- the machine --------------------------------------------------------------------------------

def lscpu():
    try:
        text = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {key.strip(): value.strip() for key, _, value in
            (line.partition(':') for line in text.splitlines()) if value}


def load_average():
    return [round(v, 2) for v in os.getloadavg()]


def cpu_seconds():
    """(busy CPU seconds of the whole machine, of this process) so far: the difference over
    a run is what other processes took, which the load average (it counts this process's own
    threads too) does not say. The machine's figure is Linux's /proc/stat; elsewhere None."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    mine = own.ru_utime + own.ru_stime
    try:
        fields = [int(v) for v in Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None, mine
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)           # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK'), mine


def time_rounds(named, x, dy, rounds):
    """As forward.time_interleaved (a warm-up call each, then rounds taking turns, the order
    reversed every other round), keeping every round's seconds."""
    outputs = {name: run(x, dy) for name, run in named.items()}
    seconds = {name: [] for name in named}
    order = list(named)
    for round_ in range(rounds):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            named[name](x, dy)
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


def describe_cpu():
    """The machine, NumPy and its BLAS, without the frameworks (``describe_machine`` adds them;
    ``breakdown.py`` uses this alone)."""
    info = lscpu()
    flags = set(info.get('Flags', '').split())
    width = ('AVX-512 (512-bit)' if 'avx512f' in flags else 'AVX2 (256-bit)' if 'avx2' in flags
             else 'AVX (256-bit)' if 'avx' in flags else 'SSE (128-bit)' if flags else 'unknown')
    from threadpoolctl import threadpool_info
    blas = [{'library': p.get('internal_api'), 'version': p.get('version'),
             'kernel': p.get('architecture'), 'threads': p.get('num_threads')}
            for p in threadpool_info() if p.get('user_api') == 'blas']
    environment = {name: os.environ[name] for name in ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE',
                                                       'OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS')
                   if name in os.environ}
    machine = {
        'date': datetime.date.today().isoformat(),
        'cpu': info.get('Model name', platform.processor() or 'unknown'),
        'cpu_family_model': f"family {info.get('CPU family', '?')}, model {info.get('Model', '?')}",
        'cores': forward.usable_cores(),
        'vector_width': width,
        'python': platform.python_version(),
        'numpy': np.__version__,
        'numpy_blas': blas,
        'blas_environment': environment or 'none set',
    }
    return machine


def describe_machine(tf, torch):
    machine = describe_cpu()
    machine['tensorflow'] = tf.__version__
    machine['tensorflow_threads'] = (f"intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, "
                                     f"inter-op {tf.config.threading.get_inter_op_parallelism_threads() or 'default'}")
    if torch is not None:
        machine['torch'] = torch.__version__
        machine['torch_threads'] = torch.get_num_threads()
        machine['torch_cpu_capability'] = torch.backends.cpu.get_cpu_capability()
    return machine


def use_package(path):
    """Import minixcept from the checkout at ``path`` (default: this script's own), first on
    sys.path, and say which one it is: {'path': the package's folder, 'commit': the git
    commit of its checkout (None outside git), 'package_files_changed': whether the files
    under minixcept/ differ from that commit (git status)}. Stops the run if minixcept was
    already imported from elsewhere, or comes from elsewhere."""
    root = Path(path).resolve() if path is not None else REPO
    if not (root / 'minixcept' / '__init__.py').exists():
        raise SystemExit(f'--package-path {root}: no minixcept/__init__.py there')
    if 'minixcept' not in sys.modules:
        sys.path.insert(0, str(root))
    import minixcept
    package = Path(minixcept.__file__).resolve().parent
    if package != root / 'minixcept':
        raise SystemExit(f'minixcept was imported from {package}, not from {root / "minixcept"}')

    def git(*words):
        try:
            done = subprocess.run(['git', '-C', str(root), *words], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None
    commit = git('rev-parse', 'HEAD')
    changed = git('status', '--porcelain', '--', 'minixcept')
    return {'path': str(package), 'commit': commit,
            'package_files_changed': None if changed is None else bool(changed)}


def package_line(package):
    state = ('' if package['package_files_changed'] is None else
             ', package files changed since the commit' if package['package_files_changed'] else ', clean')
    return f"{package['path']} (git {package['commit'] or 'unknown'}{state})"


def blas_line(machine):
    return '; '.join(f"{b['library']} {b['version']}, {b['kernel']} kernel, {b['threads']} threads"
                     for b in machine['numpy_blas']) or 'none found'


# -- the PyTorch network, written from the architecture -----------------------------------------

def build_torch_xception(torch):
    """Xception without its top, global average pooling, NCHW, in eager PyTorch. Keras's layer
    names are kept so that the weights can be loaded by name."""
    nn, F = torch.nn, torch.nn.functional

    def same_pads(size, kernel, stride):
        """TensorFlow's 'same': (before, after) for one spatial dimension."""
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    class SamePad(nn.Module):
        def __init__(self, kernel, stride, value=0.0):
            super().__init__()
            self.kernel, self.stride, self.value = kernel, stride, value

        def forward(self, x):
            top, bottom = same_pads(x.shape[2], self.kernel, self.stride)
            left, right = same_pads(x.shape[3], self.kernel, self.stride)
            if top == bottom == left == right == 0:
                return x
            return F.pad(x, (left, right, top, bottom), value=self.value)

    class Separable(nn.Module):
        """Depthwise 3x3 'same', then pointwise 1x1; no bias, nothing between."""
        def __init__(self, cin, cout):
            super().__init__()
            self.pad = SamePad(3, 1)
            self.depthwise = nn.Conv2d(cin, cin, 3, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

        def forward(self, x):
            return self.pointwise(self.depthwise(self.pad(x)))

    class MaxPoolSame(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad = SamePad(3, 2, value=float('-inf'))

        def forward(self, x):
            return F.max_pool2d(self.pad(x), 3, 2)

    def bn(channels):
        return nn.BatchNorm2d(channels, eps=1e-3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict()
            self.residuals = []               # (conv name, bn name) in the order of the blocks
            add = self.layers.__setitem__
            add('block1_conv1', nn.Conv2d(3, 32, 3, stride=2, bias=False))
            add('block1_conv1_bn', bn(32))
            add('block1_conv2', nn.Conv2d(32, 64, 3, bias=False))
            add('block1_conv2_bn', bn(64))
            # blocks 2-4 and 13: a strided 1x1 convolution on the shortcut
            for block, cin, c1, c2 in ((2, 64, 128, 128), (3, 128, 256, 256), (4, 256, 728, 728),
                                       (13, 728, 728, 1024)):
                k = len(self.residuals)
                conv, norm = f'residual{k}_conv', f'residual{k}_bn'
                add(conv, nn.Conv2d(cin, c2, 1, stride=2, bias=False))
                add(norm, bn(c2))
                self.residuals.append((conv, norm))
                add(f'block{block}_sepconv1', Separable(cin, c1))
                add(f'block{block}_sepconv1_bn', bn(c1))
                add(f'block{block}_sepconv2', Separable(c1, c2))
                add(f'block{block}_sepconv2_bn', bn(c2))
            for block in range(5, 13):
                for i in (1, 2, 3):
                    add(f'block{block}_sepconv{i}', Separable(728, 728))
                    add(f'block{block}_sepconv{i}_bn', bn(728))
            add('block14_sepconv1', Separable(1024, 1536))
            add('block14_sepconv1_bn', bn(1536))
            add('block14_sepconv2', Separable(1536, 2048))
            add('block14_sepconv2_bn', bn(2048))
            self.pool = MaxPoolSame()

        def forward(self, x):
            L = self.layers
            x = F.relu(L['block1_conv1_bn'](L['block1_conv1'](x)))
            x = F.relu(L['block1_conv2_bn'](L['block1_conv2'](x)))
            for k, block in enumerate((2, 3, 4, 13)):
                conv, norm = self.residuals[k]
                shortcut = L[norm](L[conv](x))
                y = x if block == 2 else F.relu(x)           # block 2 has no leading ReLU
                y = L[f'block{block}_sepconv1_bn'](L[f'block{block}_sepconv1'](y))
                y = L[f'block{block}_sepconv2_bn'](L[f'block{block}_sepconv2'](F.relu(y)))
                x = self.pool(y) + shortcut
                if block == 4:
                    for middle in range(5, 13):               # the middle flow
                        y = x
                        for i in (1, 2, 3):
                            y = L[f'block{middle}_sepconv{i}_bn'](L[f'block{middle}_sepconv{i}'](F.relu(y)))
                        x = x + y
            x = F.relu(L['block14_sepconv1_bn'](L['block14_sepconv1'](x)))
            x = F.relu(L['block14_sepconv2_bn'](L['block14_sepconv2'](x)))
            return x.mean(dim=(2, 3))

    return Net()


def read_keras_weights(path):
    """{layer name: [arrays in the file's order]} from a legacy Keras HDF5 weights file."""
    import h5py

    def text(value):
        return value.decode() if isinstance(value, bytes) else str(value)
    weights = {}
    with h5py.File(path, 'r') as f:
        group = f['model_weights'] if 'model_weights' in f else f
        for name in map(text, group.attrs['layer_names']):
            names = [text(n) for n in group[name].attrs['weight_names']]
            if names:
                weights[name] = [np.asarray(group[name][n]) for n in names]
    return weights


def load_torch_weights(torch, net, path):
    """Keras kernels (kh, kw, Cin, Cout), depthwise (kh, kw, C, 1), pointwise (1, 1, Cin, Cout)
    into PyTorch's (Cout, Cin / groups, kh, kw); batch-norm as gamma, beta, mean, variance.
    The shortcut layers' names differ between files (conv2d_1 or conv2d): they are taken in
    the file's order."""
    weights = read_keras_weights(path)
    shortcut_convs = [n for n in weights if n.startswith('conv2d')]
    shortcut_bns = [n for n in weights if n.startswith('batch_normalization')]
    if len(shortcut_convs) != 4 or len(shortcut_bns) != 4:
        raise ValueError(f'{path}: expected 4 shortcut convolutions and batch-norms, found '
                         f'{shortcut_convs} and {shortcut_bns}')
    names = dict(zip((c for c, _ in net.residuals), shortcut_convs))
    names.update(zip((b for _, b in net.residuals), shortcut_bns))
    used = set()

    def put(parameter, array):
        array = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if tuple(parameter.shape) != tuple(array.shape):
            raise ValueError(f'{path}: shape {tuple(array.shape)} for a parameter of {tuple(parameter.shape)}')
        parameter.data.copy_(array)

    with torch.no_grad():
        for ours, module in net.layers.items():
            theirs = names.get(ours, ours)
            arrays = weights[theirs]
            used.add(theirs)
            if isinstance(module, torch.nn.BatchNorm2d):
                gamma, beta, mean, variance = arrays
                put(module.weight, gamma)
                put(module.bias, beta)
                put(module.running_mean, mean)
                put(module.running_var, variance)
            elif isinstance(module, torch.nn.Conv2d):
                (kernel,) = arrays
                put(module.weight, kernel.transpose(3, 2, 0, 1))
            else:                                                     # separable
                depthwise, pointwise = arrays
                put(module.depthwise.weight, depthwise.transpose(2, 3, 0, 1))
                put(module.pointwise.weight, pointwise.transpose(3, 2, 0, 1))
    left = set(weights) - used
    if left:
        raise ValueError(f'{path}: layers with weights not loaded: {sorted(left)}')
    return net.eval()


def multiply_adds(torch, net, size):
    """Multiply-adds of one photo's forward pass (convolutions only: what matters), and the
    pointwise convolutions' matrix shapes (rows per photo, Cin, Cout)."""
    total, pointwise = 0, []

    def count(module, inputs, output):
        nonlocal total
        cin = module.in_channels // module.groups
        kh, kw = module.kernel_size
        total += output.numel() * cin * kh * kw
        if module.kernel_size == (1, 1) and module.stride == (1, 1):
            pointwise.append((output.shape[2] * output.shape[3], module.in_channels, module.out_channels))
    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        net(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total, pointwise


def torch_runners(torch, net, mode):
    """{'PyTorch NCHW': ..., 'PyTorch channels_last': ...}: callables (x, dy) -> output, NHWC
    numpy in and out (the forward's features, or the input gradient)."""
    import copy
    result = {}
    for layout, memory_format in (('NCHW', torch.contiguous_format), ('channels_last', torch.channels_last)):
        model = copy.deepcopy(net).to(memory_format=memory_format)
        for parameter in model.parameters():
            parameter.requires_grad_(mode != 'forward')

        def to_torch(x, memory_format=memory_format):
            return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)

        if mode == 'forward':
            def run(x, dy, model=model, to_torch=to_torch):
                with torch.inference_mode():
                    return model(to_torch(x)).numpy()
        else:
            parameters = list(model.parameters())

            def run(x, dy, model=model, to_torch=to_torch, parameters=parameters):
                inputs = to_torch(x).requires_grad_(True)
                loss = (model(inputs) * torch.from_numpy(dy)).sum()
                grads = torch.autograd.grad(loss, [inputs] + parameters)
                return grads[0].permute(0, 2, 3, 1).numpy()
        result[f'PyTorch {layout}'] = run
    return result


# -- the floor ----------------------------------------------------------------------------------

#: Seconds of rest before the floor is timed, so that other frameworks' threads have stopped spinning.
FLOOR_PAUSE = 2.0


def matmul_floor(pointwise, batch, repeats=3):
    """NumPy's float32 rate on Xception's pointwise products at this batch: (G multiply-adds/s
    over all of them, with each distinct shape timed best of ``repeats``; the per-shape rates)."""
    rng = np.random.default_rng(2)
    shapes = {}
    for rows, cin, cout in pointwise:
        shapes[(rows * batch, cin, cout)] = shapes.get((rows * batch, cin, cout), 0) + 1
    total_macs = total_seconds = 0.0
    per_shape = []
    for (m, k, n), count in shapes.items():
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        np.matmul(a, b, out=out)                                   # warm-up
        best = min(_timed(lambda: np.matmul(a, b, out=out)) for _ in range(repeats))
        macs = m * k * n
        total_macs += macs * count
        total_seconds += best * count
        per_shape.append({'shape': [m, k, n], 'count': count, 'gmacs_per_s': round(macs / best / 1e9, 1)})
    return total_macs / total_seconds / 1e9, per_shape


def _timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# -- the models at any size -------------------------------------------------------------------

def build_ours_and_keras(path, size):
    import keras
    import minixcept
    ours = minixcept.Xception(include_top=False, input_shape=(size, size, 3), pooling='avg')
    ours.load_weights(path)
    theirs = keras.applications.Xception(include_top=False, input_shape=(size, size, 3), pooling='avg',
                                         weights=str(path))
    return ours, theirs


# -- the report ---------------------------------------------------------------------------------

def table(report):
    floor_ms = report['floor']['forward_ms_per_photo']
    lines = ['| batch {batch}, {size} px, ms/photo | minixcept | TensorFlow | PyTorch (best layout) '
             '| minixcept / better peer | floor | minixcept / floor |'.format(**report['run']),
             '|---|---:|---:|---:|---:|---:|---:|']
    for row in report['passes']:
        floor = floor_ms * (1 if row['pass'] == 'forward' else 3)
        torch_ms = row.get('torch_ms')
        torch_text = f"{torch_ms:.1f} ({row['torch_layout']})" if torch_ms else 'n/a'
        lines.append(f"| {row['pass']} | {row['minixcept_ms']:.1f} | {row['tensorflow_ms']:.1f} | {torch_text} | "
                     f"{row['ratio_to_better_peer']:.2f} | {floor:.1f} | {row['minixcept_ms'] / floor:.2f} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=299, help='image side in pixels (at least 71)')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per pass (median)')
    parser.add_argument('--json', type=Path, help='also write the report here as JSON')
    parser.add_argument('--package-path', type=Path, metavar='DIR',
                        help="measure the minixcept package in this checkout (default: this script's own)")
    args = parser.parse_args(argv)
    package = use_package(args.package_path)          # before anything imports minixcept
    load_before = load_average()
    busy_before, mine_before = cpu_seconds()
    wall_before = time.perf_counter()

    tf = forward.import_tensorflow()
    try:
        import torch
    except ImportError:
        torch = None
        print('# PyTorch not installed (pip install -e .[bench]): timing minixcept and TensorFlow only',
              file=sys.stderr)
    machine = describe_machine(tf, torch)
    path = forward.weights_path()
    if path is None:
        raise SystemExit('the ImageNet notop weights are needed: python weights/fetch.py')
    ours, theirs = build_ours_and_keras(path, args.size)
    print(f"# {machine['cpu']} ({machine['cpu_family_model']}), {machine['cores']} cores, {machine['vector_width']}; "
          f"NumPy BLAS: {blas_line(machine)}; BLAS environment: {machine['blas_environment']}; "
          f"load average {load_before}", flush=True)
    print(f"# minixcept measured: {package_line(package)}", flush=True)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((args.batch, FEATURES)).astype(np.float32)

    net = None
    agreement = {}
    if torch is not None:
        net = load_torch_weights(torch, build_torch_xception(torch), path)
        with torch.inference_mode():
            torch_features = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
        our_features = ours.predict(x, batch_size=args.batch)
        agreement['torch_vs_minixcept_forward'] = forward.relative_error(torch_features, our_features)
        print(f"# PyTorch vs minixcept features: max|a-b|/max|b| = "
              f"{agreement['torch_vs_minixcept_forward']:.1e}", flush=True)
        if not agreement['torch_vs_minixcept_forward'] < AGREEMENT:
            raise SystemExit(f'PyTorch network disagrees with minixcept by '
                             f"{agreement['torch_vs_minixcept_forward']:.1e} (bar {AGREEMENT:g}): nothing timed")
        macs, pointwise = multiply_adds(torch, net, args.size)
    else:
        macs, pointwise = None, None

    # The floor is timed before the rounds and again after them, each after a pause: TensorFlow's
    # and PyTorch's pools keep their threads spinning for a while after their last operation,
    # and a product timed meanwhile shares the cores with them. The better of the two counts.
    floors = []
    if pointwise:
        time.sleep(FLOOR_PAUSE)
        floors.append(matmul_floor(pointwise, args.batch))

    passes = []
    for name, mode in (('forward', 'forward'), ('forward + backward', 'backward')):
        named = forward.runners(tf, ours, theirs, mode, bn_training=False, with_plain=False)
        if net is not None:
            named.update(torch_runners(torch, net, mode))
        rounds, outputs = time_rounds(named, x, dy, args.rounds)
        ms = {runner: statistics.median(s) / args.batch * 1e3 for runner, s in rounds.items()}
        row = {'pass': name, 'minixcept_ms': ms['minixcept'], 'tensorflow_ms': ms['TensorFlow'],
               'median_ms': {k: round(v, 2) for k, v in ms.items()},
               'rounds_ms': {k: [round(v / args.batch * 1e3, 1) for v in s] for k, s in rounds.items()}}
        what = 'features' if mode == 'forward' else 'input gradient'
        agreement[f'{name}: minixcept vs TensorFlow {what}'] = forward.relative_error(
            outputs['minixcept'], outputs['TensorFlow'])
        peers = [ms['TensorFlow']]
        if net is not None:
            layout = min(('NCHW', 'channels_last'), key=lambda lay: ms[f'PyTorch {lay}'])
            row['torch_ms'], row['torch_layout'] = ms[f'PyTorch {layout}'], layout
            peers.append(row['torch_ms'])
            agreement[f'{name}: PyTorch ({layout}) vs minixcept {what}'] = forward.relative_error(
                outputs[f'PyTorch {layout}'], outputs['minixcept'])
        row['better_peer'] = 'TensorFlow' if ms['TensorFlow'] <= min(peers) else 'PyTorch'
        row['ratio_to_better_peer'] = ms['minixcept'] / min(peers)
        passes.append(row)
        print(f"{name:20s} " + '  '.join(f'{k} {v:.1f}' for k, v in ms.items()) + ' ms/photo', flush=True)

    if pointwise:
        time.sleep(FLOOR_PAUSE)
        floors.append(matmul_floor(pointwise, args.batch))
    rate, per_shape = max(floors, key=lambda floor: floor[0]) if floors else (None, [])
    print('# floor, G multiply-adds/s: ' + ', '.join(f'{r:.1f}' for r, _ in floors)
          + ' (before the rounds, after them; the better counts)', flush=True)
    busy_after, mine_after = cpu_seconds()
    wall = time.perf_counter() - wall_before
    others = (None if busy_before is None else
              round(max((busy_after - busy_before) - (mine_after - mine_before), 0.0) / wall, 2))
    macs_per_photo = macs if macs is not None else 8_355_355_496 * (args.size / 299) ** 2
    report = {
        'machine': machine,
        'package': package,
        'run': {'batch': args.batch, 'size': args.size, 'rounds': args.rounds,
                'weights': path.name, 'batch_norm': 'moving statistics'},
        'load_average_before': load_before,
        'passes': passes,
        'floor': {'pointwise_gmacs_per_s': rate, 'per_shape': per_shape,
                  'timed_gmacs_per_s': [round(r, 1) for r, _ in floors],
                  'multiply_adds_per_photo': macs_per_photo,
                  'forward_ms_per_photo': macs_per_photo / (rate * 1e9) * 1e3 if rate else None},
        'agreement': agreement,
        'load_average_after': load_average(),
        'other_processes_cores': others,
        'wall_seconds': round(wall, 1),
    }
    for row in passes:
        if rate:
            floor = report['floor']['forward_ms_per_photo'] * (1 if row['pass'] == 'forward' else 3)
            row['floor_ms'] = floor
            row['ratio_to_floor'] = row['minixcept_ms'] / floor

    print()
    print(f"Machine: {machine['cpu']} ({machine['cpu_family_model']}), {machine['cores']} cores, "
          f"{machine['vector_width']}")
    print(f"NumPy {machine['numpy']}, BLAS: {blas_line(machine)}; BLAS environment: {machine['blas_environment']}")
    print(f"minixcept: {package_line(package)}")
    print(f"TensorFlow {machine['tensorflow']} ({machine['tensorflow_threads']}); PyTorch "
          f"{machine.get('torch', 'not installed')} ({machine.get('torch_threads', '-')} threads, "
          f"{machine.get('torch_cpu_capability', '-')})")
    print(f"Load average (1, 5, 15 min): before {load_before}, after {report['load_average_after']} "
          f"(counting this run's own threads); other processes took {others} cores on average "
          f"over the {wall:.0f} s run")
    if rate:
        print(f"Floor: {rate:.1f} G multiply-adds/s on the pointwise products; "
              f"{macs_per_photo / 1e9:.2f} G multiply-adds a photo -> "
              f"{report['floor']['forward_ms_per_photo']:.1f} ms/photo forward, 3x that forward + backward")
        print(table(report))
    for row in passes:
        for runner, values in row['rounds_ms'].items():
            print(f"- {row['pass']}, {runner}: rounds {' '.join(f'{v:.1f}' for v in values)} ms/photo")
    for key, value in agreement.items():
        print(f'- {key}: max|a-b|/max|b| = {value:.1e}')
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
