"""Shared fixtures: the backends to run on, TensorFlow when present, the real weights and photos."""
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
import minixcept
from minixcept import backend

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parent / 'reference'
NOTOP_WEIGHTS = REPO / 'weights' / 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'
CATDOG = REPO.parent / 'shared' / 'catdog'
IN_CI = os.environ.get('CI', '').lower() in ('1', 'true', 'yes')


def _missing(reason):
    """Skip locally, but fail in CI, where everything a test needs is installed on purpose."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must have it)")
    pytest.skip(reason)


BACKENDS = ('numpy', 'standin', 'cupy')
BACKEND_FIXTURES = ('xp', 'device', 'gpu')      # the fixtures parametrised over BACKENDS (or a part)


def pytest_addoption(parser):
    parser.addoption('--backends', default=','.join(BACKENDS),
                     help='comma-separated backends to run the backend-parametrised tests on; tests '
                          'without a backend run only when numpy is among them (--backends=cupy: '
                          'the GPU half alone, as benchmarks/gpu_check.py runs it)')


def pytest_collection_modifyitems(config, items):
    wanted = set(config.getoption('--backends').split(','))
    if wanted - set(BACKENDS):
        raise pytest.UsageError(f'--backends: unknown {sorted(wanted - set(BACKENDS))}, choose from {BACKENDS}')
    if wanted == set(BACKENDS):
        return
    kept, dropped = [], []
    for item in items:
        params = getattr(item, 'callspec', None)
        params = params.params if params is not None else {}
        on = next((params[name] for name in BACKEND_FIXTURES if name in params), 'numpy')
        (kept if on in wanted else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


@contextlib.contextmanager
def array_backend(name):
    """Within: new arrays on 'numpy', on 'standin' (the strict CPU stand-in for CuPy in
    cupy_standin.py, which fails where real CuPy would) or on 'cupy' (a real GPU). Yields
    the array module."""
    previous = backend.current()
    previous_cupy = backend.install_cupy(cupy_standin.module) if name == 'standin' else None
    try:
        backend.use('numpy' if name == 'numpy' else 'cupy')
        yield backend.xp()
    finally:
        if name == 'standin':
            backend.install_cupy(previous_cupy)
        backend.use(previous)


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module to test on: NumPy; the CPU stand-in for CuPy; CuPy when a GPU is present."""
    if request.param == 'cupy' and not backend.gpu_available():
        pytest.skip('no GPU: cupy is not installed or sees no CUDA device')
    with array_backend(request.param) as module:
        yield module


@pytest.fixture(scope='session')
def tf():
    """TensorFlow on the CPU in float32 (TF32 off), or a skip saying it is not installed."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
    try:
        import tensorflow
    except ImportError:
        _missing('TensorFlow is not installed (pip install minixcept[reference])')
    tensorflow.config.experimental.enable_tensor_float_32_execution(False)
    return tensorflow


@pytest.fixture(scope='session')
def notop_weights():
    """The official notop ImageNet weights, fetched once if absent."""
    if not NOTOP_WEIGHTS.exists():
        try:
            from minixcept.files.fetch import fetch
            fetch(include_top=False, dest_dir=NOTOP_WEIGHTS.parent)
        except Exception as error:  # no network or no fetch: say why
            _missing(f'ImageNet notop weights unavailable: {error}')
    return NOTOP_WEIGHTS


@pytest.fixture(scope='session')
def catdog():
    if not CATDOG.is_dir():
        _missing(f'the cat/dog photos are not beside the repository ({CATDOG.name}/ under shared/)')
    return CATDOG


@pytest.fixture(params=['stored', 'live'])
def expected(request):
    """expected(case_id) -> (inputs, Keras results) of a layer, head or loss case from
    tests/reference/make_layers.py: read from its .npz fixture, or computed by Keras now."""
    from reference import make_layers
    live = request.param == 'live'
    if live:
        request.getfixturevalue('tf')            # skips, or fails in CI, without TensorFlow
    return lambda case_id: make_layers.expected(case_id, live=live)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def relative_error(ours, reference):
    """max |a - b| / max |b|: one scale-free number for a comparison with TensorFlow, set against
    the largest reference value so that tiny entries near zero do not dominate."""
    ours, reference = (minixcept.asnumpy(a).astype(np.float64) for a in (ours, reference))
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
