"""The GPU path end to end, on the CuPy stand-in (and on real CuPy when a GPU is present).

What runs on a GPU, decided here and tested:
- ``Model.predict`` runs the inference engine's planned steps (batch-norm folded, ReLU
  fused) as whole-batch device operations on the calling thread: no worker threads, no
  BLAS pinning, no host buffer pool (CuPy keeps its own memory pool).
- The training engine on device arrays is a runner of the plain layers: every layer's own
  forward and backward, the batch as one share, on the calling thread. Its CPU kernels
  (tiles, fusion, threads) are NumPy-only.
Both are exactly the code the stand-in runs in every test run.
"""
import importlib.util
import json
import threading

import h5py
import numpy as np
import pytest

import minixcept
from conftest import REPO, array_backend, relative_error
from minixcept import backend, layers as L
from minixcept.engines.inference import InferenceEngine
from minixcept.engines.training import GradientEngine

SIZE = 71


@pytest.fixture(params=['standin', 'cupy'])
def gpu(request):
    """A CuPy backend: the stand-in always, the real one when a GPU is present."""
    if request.param == 'cupy' and not backend.gpu_available():
        pytest.skip('no GPU: cupy is not installed or sees no CUDA device')
    with array_backend(request.param) as module:
        yield module


def small_xception():
    minixcept.set_seed(0)
    return minixcept.Xception(include_top=False, pooling='avg', input_shape=(SIZE, SIZE, 3), middle_blocks=1)


def record_layer_calls(model):
    """Wrap every one-input layer's forward and backward to record (layer name, thread) of each
    call. (Add, with two inputs, is the sum an engine writes itself.)"""
    calls = []
    for layer in with_one_input(model):
        for method in ('_forward', '_backward'):
            original = getattr(layer, method)

            def recorded(*args, original=original, name=f'{layer.name}.{method}'):
                calls.append((name, threading.get_ident()))
                return original(*args)
            setattr(layer, method, recorded)
    return calls


def with_one_input(model):
    return [layer for layer in model.layers if not isinstance(layer, L.Add)]


def test_preprocess_input_stays_on_the_device(gpu):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    on_device = minixcept.preprocess_input(gpu.asarray(pixels))
    assert isinstance(on_device, gpu.ndarray) and on_device.dtype == np.float32
    np.testing.assert_array_equal(minixcept.asnumpy(on_device), minixcept.preprocess_input(pixels))


def test_training_engine_on_device_runs_every_plain_layer_on_the_calling_thread(gpu):
    model = small_xception()
    rng = np.random.default_rng(1)
    x = gpu.asarray(rng.standard_normal((4, SIZE, SIZE, 3)).astype(np.float32))
    dy = gpu.asarray(rng.standard_normal((4, 2048)).astype(np.float32))
    expected_y = model.forward(x, training=True)
    expected_dx = model.backward(dy)
    expected_grads = {layer.name: dict(layer.grads) for layer in model.layers}

    calls = record_layer_calls(model)
    engine = GradientEngine(model, threads=2)
    y = engine.forward(x, training=True)
    dx = engine.backward(dy)
    assert isinstance(y, gpu.ndarray) and isinstance(dx, gpu.ndarray)
    names = [name for name, _ in calls]
    assert sorted(names) == sorted(f'{layer.name}.{m}' for layer in with_one_input(model) for m in ('_forward', '_backward'))
    assert {thread for _, thread in calls} == {threading.get_ident()}
    assert relative_error(y, expected_y) <= 1e-6 and relative_error(dx, expected_dx) <= 1e-6
    for layer in model.layers:
        for name, gradient in layer.grads.items():
            assert relative_error(gradient, expected_grads[layer.name][name]) <= 1e-5, (layer.name, name)


def test_the_same_engine_on_numpy_fuses_and_shares_out():
    """The control for the test above: on NumPy the training engine skips the layers it fuses
    and runs shares of the batch on worker threads."""
    model = small_xception()
    calls = record_layer_calls(model)
    engine = GradientEngine(model, threads=2)
    rng = np.random.default_rng(1)
    engine.forward(rng.standard_normal((4, SIZE, SIZE, 3)).astype(np.float32), training=False)
    forwards = [name for name, _ in calls if name.endswith('_forward')]
    assert len(set(forwards)) < len(with_one_input(model))               # fused layers run no forward
    assert len({thread for _, thread in calls}) > 1 or engine.threads == 1


def test_predict_on_device_runs_the_engine_on_the_calling_thread(gpu):
    model = small_xception()
    rng = np.random.default_rng(2)
    x_host = rng.standard_normal((4, SIZE, SIZE, 3)).astype(np.float32)
    x = gpu.asarray(x_host)
    with minixcept.no_grad():
        plain = model.forward(x, training=False)
    calls = record_layer_calls(model)
    engine_output = InferenceEngine(model, threads=2)(x)
    assert isinstance(engine_output, gpu.ndarray)
    assert relative_error(engine_output, plain) <= 1e-5
    assert {thread for _, thread in calls} <= {threading.get_ident()}
    predicted = model.predict(x_host, batch_size=3)                     # host in, host out
    assert type(predicted) is np.ndarray and relative_error(predicted, plain) <= 1e-5


def test_save_and_load_weights_from_device_arrays(xp, tmp_path):
    model = small_xception()
    assert all(isinstance(p, xp.ndarray) for layer in model.layers for p in layer.params.values())
    model.save_weights(tmp_path / 'w.h5')
    with h5py.File(tmp_path / 'w.h5', 'r') as f:
        first = f[f.attrs['layer_names'][0]]
        np.testing.assert_array_equal(first[first.attrs['weight_names'][0]][()], model.layers[0].get_weights()[0])
    minixcept.set_seed(1)
    reloaded = minixcept.Xception(include_top=False, pooling='avg', input_shape=(SIZE, SIZE, 3), middle_blocks=1)
    reloaded.load_weights(tmp_path / 'w.h5')
    for layer, again in zip(model.layers, reloaded.layers):
        for name in layer.weight_names:
            assert isinstance(again.params[name], xp.ndarray)             # loaded onto the device
            np.testing.assert_array_equal(minixcept.asnumpy(again.params[name]), minixcept.asnumpy(layer.params[name]))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, REPO / 'examples' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_catdog_example_end_to_end_with_backend_cupy(gpu, catdog, tmp_path, capsys):
    """The bottleneck recipe with --backend cupy at 71 px on two photos per class, then the
    predict example on its head: features, head training and saving on the device."""
    bottleneck = load_example('catdog_bottleneck')
    out = tmp_path / 'out'
    code = bottleneck.main([str(a) for a in ('--data', catdog, '--image-size', SIZE, '--batch-size', 4, '--epochs', 2,
                                             '--weights', 'random', '--limit', 2, '--out', out, '--backend', 'cupy')])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / 'report.json').read_text())
    assert report['backend'] == 'cupy' and report['n_train'] == report['n_val'] == 4
    assert report['epochs'] == len(report['history']) == 2 and np.isfinite(report['val_loss'])
    with h5py.File(out / 'head.h5', 'r') as f:
        assert len(f.attrs['layer_names']) > 0

    predict = load_example('catdog_predict')
    photos = sorted((catdog / 'validation' / 'dogs').glob('*.jpg'))[:2]
    code = predict.main([str(a) for a in ('--head', out / 'head.h5', '--weights', 'random',
                                          '--backend', 'cupy', *photos)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(captured.out.strip().splitlines()) == 2
