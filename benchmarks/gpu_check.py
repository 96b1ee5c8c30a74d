"""The GPU path, proven and timed in one run: what ``benchmarks/gpu_check.sh`` does on a GPU machine.

    python benchmarks/gpu_check.py --out gpu_check.json [--photos DIR] [--weights FILE]
    python benchmarks/gpu_check.py --dry --out dry.json      # the same code on the CPU, tiny sizes

Needs CuPy, h5py and Pillow; PyTorch (with cuDNN) for the comparison; no TensorFlow and
no network. Writes one JSON file, rewritten after every section so that a run cut short
still leaves what it measured:

- ``tests``: the test suite on real CuPy (``pytest --backends cupy``): passed, failed, skipped.
- ``features``: Xception features of real photos on the GPU against NumPy's on the CPU,
  max |gpu - cpu| / max |cpu| (must be <= 1e-4).
- ``torch``: the same network built in PyTorch from minixcept's graph and weights
  (channels_last, float32, TF32 off), its features checked against minixcept's first.
- ``throughput``: forward passes at batch 1, 32 and 128 and a training step (forward,
  backward, SGD update) at batch 32, minixcept and PyTorch timed in alternating rounds on
  the same input; median milliseconds per batch and photos per second.
- ``floor``: what the hardware allows, from two measurements made here: copying memory
  (bytes/s) and a large float32 matrix product (multiply-adds/s). A forward pass cannot
  beat max(its multiply-adds at that rate, its bytes at that bandwidth), where the bytes
  are every layer's output written and read once plus the weights read once; a training
  step is counted as three forward passes of each.

``--dry`` runs every section on NumPy at 71 px with one middle block and batches of 1, 2
and 3, one round (random weights written to HDF5 and loaded back, the way the real file is loaded),
so that CI proves this script works; without PyTorch its part is skipped with the reason.
``--device-backend cupy`` with ``--dry`` keeps the small sizes but runs the CuPy path:
the test suite does this with its CuPy stand-in installed.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minixcept                                                    # noqa: E402
from minixcept import backend, layers as L                          # noqa: E402
from minixcept.padding import window_geometry                       # noqa: E402

NOTOP_WEIGHTS = REPO / 'weights' / 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'
FEATURE_TOLERANCE = 1e-4

FULL = dict(image_size=299, middle_blocks=8, forward_batches=(1, 32, 128), train_batch=32, photos=16,
            rounds=5, copy_mib=1024, matmul_n=8192, suite=['tests'], suite_backend='cupy', suite_timeout=330)
DRY = dict(image_size=71, middle_blocks=1, forward_batches=(1, 2, 3), train_batch=2, photos=2,
           rounds=1, copy_mib=16, matmul_n=256, suite=['tests/test_padding.py'], suite_backend='standin',
           suite_timeout=120)


class Device:
    """The array module the check runs on and how to wait until its queued work is done."""

    def __init__(self, name):
        backend.use(name)
        self.name, self.xp = name, backend.xp()
        cuda = getattr(self.xp, 'cuda', None)
        self.sync = cuda.Device().synchronize if cuda is not None else (lambda: None)

    def describe(self):
        if self.name == 'numpy':
            return {'backend': 'numpy', 'numpy': np.__version__}
        info = {'backend': 'cupy', 'cupy': getattr(self.xp, '__version__', 'stand-in')}
        try:
            props = self.xp.cuda.runtime.getDeviceProperties(0)
            info['gpu'] = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
            info['cuda_runtime'] = self.xp.cuda.runtime.runtimeGetVersion()
        except AttributeError:
            info['gpu'] = 'none (CuPy stand-in on the CPU)'
        return info


class Report:
    """The JSON file, rewritten after each section."""

    def __init__(self, path):
        self.path, self.data = Path(path), {}

    def __setitem__(self, section, value):
        self.data[section] = value
        self.path.write_text(json.dumps(self.data, indent=2) + '\n')


def timed(function, sync):
    """Seconds for one call, from an idle device to an idle device."""
    sync()
    start = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - start


def alternating(contenders, sync, rounds, budget_s=60.0):
    """{name: median seconds} of each contender, all timed once per round in turn after one
    untimed call each (first calls compile kernels and fill memory pools). A contender whose
    calls exceed ``budget_s`` in all stops early with the rounds it has."""
    times = {name: [] for name in contenders}
    for function in contenders.values():
        timed(function, sync)
    for _ in range(rounds):
        for name, function in contenders.items():
            if sum(times[name]) < budget_s:
                times[name].append(timed(function, sync))
    return {name: statistics.median(values) for name, values in times.items()}


# -- the test suite on CuPy ----------------------------------------------------------------------

def run_test_suite(paths, backend_name, timeout_s):
    """pytest on one backend's tests in a child process; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / 'junit.xml'
        command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', f'--backends={backend_name}',
                   f'--junitxml={junit}', *paths]
        start = time.perf_counter()
        try:
            finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {'command': ' '.join(command[2:]), 'timed_out_after_s': timeout_s}
        counts = {'command': ' '.join(command[2:]), 'exit_code': finished.returncode,
                  'seconds': round(time.perf_counter() - start, 1)}
        if junit.exists():
            suite = ElementTree.parse(junit).getroot()
            suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
            total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ('tests', 'failures', 'errors', 'skipped'))
            counts.update(passed=total - failed - errors - skipped, failed=failed, errors=errors, skipped=skipped)
            counts['failures'] = [case.get('classname', '') + '::' + case.get('name', '')
                                  for case in suite.iter('testcase')
                                  if case.find('failure') is not None or case.find('error') is not None][:30]
        counts['output_tail'] = finished.stdout[-1500:]
        return counts


# -- the network, its weights and photos ---------------------------------------------------------

def build_xception(sizes):
    return minixcept.Xception(include_top=False, weights=None, pooling='avg', middle_blocks=sizes['middle_blocks'],
                              input_shape=(sizes['image_size'],) * 2 + (3,))


def weights_file(args, sizes, scratch):
    """(path, what it is): the ImageNet notop file; in a dry run, or where the file is not on
    this machine, random weights saved to HDF5 (loaded back the same way; timings do not
    depend on the values, and the GPU-against-CPU comparison holds for any weights)."""
    path = Path(args.weights)
    if not args.dry and path.exists():
        return path, f'{path.name} (ImageNet)'
    reason = 'dry run' if args.dry else f'{path} not found'
    path = Path(scratch) / 'random_weights.h5'
    with backend_named('numpy'):
        build_xception(sizes).save_weights(path)
    return path, f'random weights, written and read back as HDF5 ({reason})'


class backend_named:
    """Within: ``name`` is the backend for new arrays."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.previous = backend.current()
        backend.use(self.name)

    def __exit__(self, *exc):
        backend.use(self.previous)


def photos(args, sizes):
    """(uint8 pixels (n, S, S, 3), where they came from): real photos when there are any."""
    from minixcept.files.images import list_photos, load_batch
    folder = Path(args.photos)
    paths = list_photos(folder) if folder.is_dir() else []
    step = max(1, len(paths) // sizes['photos'])
    pixels, _, _ = load_batch(paths[::step][:sizes['photos']], sizes['image_size'])
    if len(pixels):
        return pixels, f'{len(pixels)} photos from {folder.name}/ at {sizes["image_size"]} px'
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (sizes['photos'], sizes['image_size'], sizes['image_size'], 3), dtype=np.uint8),
            f'random pixels: no photos under {folder}')


def relative_error(ours, reference):
    ours, reference = (backend.asnumpy(a).astype(np.float64) for a in (ours, reference))
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# -- the same network in PyTorch -----------------------------------------------------------------

def torch_network(model, torch):
    """An nn.Module that runs ``model``'s graph with PyTorch layers holding its weights.

    Built node by node from the minixcept model, so the two cannot differ in architecture.
    'same' padding is TensorFlow's (asymmetric at stride 2), applied with F.pad; max pooling
    pads with -inf. Tensors are NCHW in shape and channels_last in memory.
    """
    nn, functional = torch.nn, torch.nn.functional

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array))

    def padded(x, layer, kernel_size, value=0.0):
        (_, pads) = window_geometry(tuple(x.shape[2:]), kernel_size, layer.strides, layer.padding)
        (top, bottom), (left, right) = pads
        return functional.pad(x, (left, right, top, bottom), value=value) if top or bottom or left or right else x

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.modules_by_name = nn.ModuleDict()
            self.plan = []
            for node in model.nodes:
                layer = node.layer
                weights = dict(zip(layer.weight_names, layer.get_weights()))
                self.plan.append((layer.name, self._step(layer, weights), node.inputs))

        def _add(self, layer, module):
            self.modules_by_name[layer.name] = module
            return module

        def _step(self, layer, w):
            if isinstance(layer, L.Conv2D):
                conv = self._add(layer, nn.Conv2d(w['kernel'].shape[2], layer.filters, layer.kernel_size,
                                                  stride=layer.strides, bias=layer.use_bias))
                conv.weight.data = tensor(w['kernel'].transpose(3, 2, 0, 1))           # (Cout, Cin, kh, kw)
                if layer.use_bias:
                    conv.bias.data = tensor(w['bias'])
                return lambda x: conv(padded(x, layer, layer.kernel_size))
            if isinstance(layer, L.SeparableConv2D):
                channels = w['depthwise_kernel'].shape[2]
                pair = self._add(layer, nn.Sequential(
                    nn.Conv2d(channels, channels, layer.kernel_size, stride=layer.strides, groups=channels, bias=False),
                    nn.Conv2d(channels, layer.filters, 1, bias=layer.use_bias)))
                pair[0].weight.data = tensor(w['depthwise_kernel'].transpose(2, 3, 0, 1))  # (C, 1, kh, kw)
                pair[1].weight.data = tensor(w['pointwise_kernel'].transpose(3, 2, 0, 1))
                if layer.use_bias:
                    pair[1].bias.data = tensor(w['bias'])
                return lambda x: pair[1](pair[0](padded(x, layer, layer.kernel_size)))
            if isinstance(layer, L.BatchNormalization):
                norm = self._add(layer, nn.BatchNorm2d(len(w['gamma']), eps=layer.epsilon, momentum=1 - layer.momentum))
                for name, value in (('weight', w['gamma']), ('bias', w['beta'])):
                    getattr(norm, name).data = tensor(value)
                norm.running_mean.data, norm.running_var.data = tensor(w['moving_mean']), tensor(w['moving_variance'])
                return norm
            if isinstance(layer, L.Activation) and layer.activation == 'relu':
                return functional.relu
            if isinstance(layer, L.MaxPooling2D):
                return lambda x: functional.max_pool2d(padded(x, layer, layer.pool_size, -math.inf),
                                                       layer.pool_size, layer.strides)
            if isinstance(layer, L.Add):
                return lambda a, b: a + b
            if isinstance(layer, L.GlobalAveragePooling2D):
                return lambda x: x.mean(dim=(2, 3))
            raise TypeError(f'no PyTorch counterpart written for {type(layer).__name__} ({layer.name})')

        def forward(self, x):
            tensors = {'input': x}
            for name, run, inputs in self.plan:
                tensors[name] = run(*(tensors[i] for i in inputs))
            return tensors[self.plan[-1][0]]

    return Graph()


def import_torch(dry):
    try:
        import torch
    except ImportError as error:
        return None, f'PyTorch is not installed ({error})'
    if not dry and not torch.cuda.is_available():
        return None, 'PyTorch sees no CUDA device'
    torch.backends.cuda.matmul.allow_tf32 = False                  # float32 means float32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch, None


# -- the floor -----------------------------------------------------------------------------------

def measure_hardware(device, sizes):
    """Bytes/s copying one array into another, and float32 multiply-adds/s in one matrix product."""
    xp, sync = device.xp, device.sync
    source = xp.ones(sizes['copy_mib'] * 2 ** 18, dtype=np.float32)
    target = xp.empty_like(source)

    def copy():
        target[...] = source
    copy_s = min(timed(copy, sync) for _ in range(5))
    n = sizes['matmul_n']
    a, b = xp.ones((n, n), np.float32), xp.ones((n, n), np.float32)
    matmul_s = min(timed(lambda: a @ b, sync) for _ in range(5))
    return {'copy_bytes_per_s': 2 * source.nbytes / copy_s, 'copy_array_mib': sizes['copy_mib'],
            'matmul_multiply_adds_per_s': n ** 3 / matmul_s, 'matmul_n': n}


def floor_ms(model, batch, hardware, passes=1):
    """Lower bound in ms on one batch: multiply-adds at the matmul rate, or bytes at the copy
    bandwidth (each layer's output written and read once, the weights read once)."""
    activation_bytes = 4 * batch * sum(math.prod(model.output_shape(node.layer.name)[1:]) for node in model.nodes)
    weight_bytes = 4 * model.count_params()
    compute_s = passes * batch * model.multiply_adds() / hardware['matmul_multiply_adds_per_s']
    memory_s = passes * (2 * activation_bytes + weight_bytes) / hardware['copy_bytes_per_s']
    return {'compute_ms': 1e3 * compute_s, 'memory_ms': 1e3 * memory_s, 'floor_ms': 1e3 * max(compute_s, memory_s)}


# -- the run --------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='gpu_check.json')
    parser.add_argument('--dry', action='store_true', help='tiny sizes on the CPU (what CI runs)')
    parser.add_argument('--device-backend', choices=('cupy', 'numpy'), default=None,
                        help="the device's array module (default: cupy, or numpy with --dry)")
    parser.add_argument('--photos', default=str(REPO.parent / 'shared' / 'catdog' / 'validation'))
    parser.add_argument('--weights', default=str(NOTOP_WEIGHTS))
    parser.add_argument('--skip-tests', action='store_true', help='leave out the test suite')
    args = parser.parse_args(argv)
    sizes = DRY if args.dry else FULL
    started = time.perf_counter()
    report = Report(args.out)
    device = Device(args.device_backend or ('numpy' if args.dry else 'cupy'))
    torch, torch_missing = import_torch(args.dry)
    report['machine'] = {'python': platform.python_version(), 'dry': args.dry, **device.describe(),
                         'torch': torch.__version__ if torch else torch_missing, 'sizes': sizes}

    report['tests'] = ({'skipped': '--skip-tests'} if args.skip_tests else
                       run_test_suite(sizes['suite'], sizes['suite_backend'], sizes['suite_timeout']))

    with tempfile.TemporaryDirectory() as scratch:
        weights, weights_source = weights_file(args, sizes, scratch)
        pixels, pixel_source = photos(args, sizes)
        x_host = minixcept.preprocess_input(pixels)
        with backend_named('numpy'):
            cpu_model = build_xception(sizes)
            cpu_model.load_weights(weights)
            cpu_features = cpu_model.predict(x_host, batch_size=len(x_host))
        model = build_xception(sizes)                  # weights land on the device
        model.load_weights(weights)
    device_features = model.predict(x_host, batch_size=len(x_host))
    x_device = minixcept.to_device(x_host)
    with minixcept.no_grad():
        layer_features = model.forward(x_device, training=False)
    errors = {'predict': relative_error(device_features, cpu_features),
              'forward': relative_error(layer_features, cpu_features)}
    report['features'] = {'weights': weights_source, 'input': pixel_source, 'shape': list(cpu_features.shape),
                          'max_relative_error': errors, 'tolerance': FEATURE_TOLERANCE,
                          'ok': max(errors.values()) <= FEATURE_TOLERANCE}

    torch_model = None
    if torch is not None:
        torch_device = 'cuda' if device.name == 'cupy' and torch.cuda.is_available() else 'cpu'
        torch_model = torch_network(model, torch).to(torch_device).to(memory_format=torch.channels_last).eval()
        with torch.no_grad():
            torch_input = torch.from_numpy(x_host.transpose(0, 3, 1, 2).copy()).to(torch_device)
            torch_features = torch_model(torch_input.contiguous(memory_format=torch.channels_last)).cpu().numpy()
        error = relative_error(torch_features, cpu_features)
        report['torch'] = {'device': torch_device, 'cudnn': torch.backends.cudnn.version(),
                           'features_max_relative_error': error, 'ok': error <= FEATURE_TOLERANCE}
    else:
        report['torch'] = {'skipped': torch_missing}

    report['throughput'] = throughput(model, torch, torch_model, device, sizes)
    hardware = measure_hardware(device, sizes)
    floors = {f'forward_batch_{b}': floor_ms(model, b, hardware) for b in sizes['forward_batches']}
    floors[f'training_step_batch_{sizes["train_batch"]}'] = floor_ms(model, sizes['train_batch'], hardware, passes=3)
    report['floor'] = {'hardware': hardware, 'per_batch': floors,
                       'multiply_adds_per_photo': model.multiply_adds(), 'parameters': model.count_params()}
    report['seconds'] = round(time.perf_counter() - started, 1)
    return report.data


def throughput(model, torch, torch_model, device, sizes):
    """Median ms per batch for each contender, in alternating rounds."""
    from minixcept.optimizers import SGD
    xp, rng, results = device.xp, np.random.default_rng(0), {}
    size = sizes['image_size']
    for batch in sizes['forward_batches']:
        x_host = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
        x = xp.asarray(x_host)
        contenders = {'minixcept_layers': lambda: model.forward(x, training=False)}
        engine = inference_engine(model)
        if engine is not None:
            contenders['minixcept_engine'] = lambda: engine(x)
        if torch_model is not None:
            torch_x = torch_input(torch, x_host, next(torch_model.parameters()).device)
            contenders['torch'] = lambda: torch_model(torch_x)
        with minixcept.no_grad(), (torch.no_grad() if torch else contextlib.nullcontext()):
            medians = alternating(contenders, device.sync, sizes['rounds'])
        results[f'forward_batch_{batch}'] = per_batch(medians, batch)

    batch = sizes['train_batch']
    x_host = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    dy_host = rng.standard_normal((batch, model.output_shape(model.nodes[-1].layer.name)[-1])).astype(np.float32)
    x, dy = xp.asarray(x_host), xp.asarray(dy_host)
    optimizer = SGD(learning_rate=1e-6)
    runner = training_engine(model) or model

    def minixcept_step():
        runner.forward(x, training=True)
        runner.backward(dy)
        optimizer.apply_gradients(model.layers)
    contenders = {'minixcept': minixcept_step}
    if torch_model is not None:
        where = next(torch_model.parameters()).device
        torch_x, torch_dy = torch_input(torch, x_host, where), torch.from_numpy(dy_host).to(where)
        torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=1e-6)
        torch_model.train()

        def torch_step():
            torch_optimizer.zero_grad(set_to_none=True)
            torch_model(torch_x).backward(torch_dy)
            torch_optimizer.step()
        contenders['torch'] = torch_step
    results[f'training_step_batch_{batch}'] = per_batch(alternating(contenders, device.sync, sizes['rounds']), batch)
    results['minixcept_training_runner'] = type(runner).__name__
    if torch_model is not None:
        torch_model.eval()
    return results


def torch_input(torch, x_host, where):
    x = torch.from_numpy(x_host.transpose(0, 3, 1, 2).copy()).to(where)
    return x.contiguous(memory_format=torch.channels_last)


def per_batch(medians, batch):
    table = {name: {'ms': 1e3 * s, 'photos_per_s': batch / s} for name, s in medians.items()}
    if 'torch' in medians:
        for name, s in medians.items():
            if name != 'torch':
                table[name]['ratio_to_torch'] = s / medians['torch']
    return table


def inference_engine(model):
    """What ``Model.predict`` runs, or None where this version of the package has no engine."""
    try:
        from minixcept.engines.inference import InferenceEngine
    except ImportError:
        return None
    return InferenceEngine(model)


def training_engine(model):
    try:
        from minixcept.engines.training import GradientEngine
    except ImportError:
        return None
    return GradientEngine(model)


if __name__ == '__main__':
    data = main()
    print(json.dumps({key: data[key] for key in ('tests', 'features', 'torch') if key in data}, indent=2)[:4000])
