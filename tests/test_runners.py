"""One runner interface: the model's own layers and the engines run the same passes.

- ``fit`` and ``FineTuneModel`` through the training engine give the plain layers' numbers;
- an engine is kept per model (``predict`` reuses it and its memory) and never runs on stale
  folds: whichever way the weights change, the next pass equals the plain layers';
- ``backward(stop_at=...)`` returns the whole gradient of a tensor that fans out, in both
  runners, against finite differences;
- ``fit`` reports its progress within an epoch, and only for epochs long enough to need it.

The references are the plain layers (themselves checked against TensorFlow and finite
differences elsewhere) or finite differences.
"""
import copy
import io

import numpy as np
import pytest

import minixcept
from conftest import relative_error
from minixcept import gradcheck, layers as L, optimizers
from minixcept.engines import inference, training
from minixcept.model import Model
from minixcept.workflows.finetune import FineTuneModel
from minixcept.workflows.fit import Progress, fit
from test_inference_engine import chain, plain_forward, randomise

TOLERANCE = 1e-5


def small_network(rng, head=True):
    """Conv -> BN -> ReLU -> separable -> BN -> ReLU -> global pooling [-> Dense]: every fusion
    the engines make, on (N, 9, 9, 3) inputs."""
    minixcept.set_seed(int(rng.integers(1000)))
    parts = [L.Conv2D(6, 3, padding='same', use_bias=False), L.BatchNormalization(), L.ReLU(),
             L.SeparableConv2D(8, 3, padding='same', use_bias=False), L.BatchNormalization(), L.ReLU(),
             L.GlobalAveragePooling2D()] + ([L.Dense(1)] if head else [])
    return randomise(chain((9, 9, 3), *parts), rng)


# -- engines kept, folds never stale ------------------------------------------------------------

def test_predict_keeps_one_engine_and_its_memory(rng):
    model = small_network(rng)
    x = rng.standard_normal((4, 9, 9, 3)).astype(np.float32)
    first = model.predict(x, batch_size=2)
    engine = inference.engine_for(model)
    assert inference.engine_for(model) is engine                      # one engine per model
    pooled = sum(buffers.nbytes for buffers in engine.buffers)
    assert pooled > 0                                                 # it kept memory to reuse ...
    second = model.predict(x, batch_size=2)
    assert inference.engine_for(model) is engine
    assert sum(buffers.nbytes for buffers in engine.buffers) == pooled   # ... and needed no more
    np.testing.assert_array_equal(first, second)
    assert relative_error(second, plain_forward(model, x)) <= TOLERANCE


def test_a_kept_engine_does_not_keep_its_model_alive(rng):
    """The engines kept per model go when the model goes: they hold it only weakly."""
    import gc
    import weakref
    model = small_network(rng)
    x = rng.standard_normal((4, 9, 9, 3)).astype(np.float32)
    model.predict(x)
    engine = training.engine_for(model)
    engine.forward(x, training=True)
    engine.backward(np.ones((4, 1), np.float32))
    engine.forward(x, training=False)
    gone = weakref.ref(model)
    del model, engine
    gc.collect()
    assert gone() is None


def _sgd_step(model, x):
    model.forward(x, training=False)
    model.backward(np.ones((len(x), 1), np.float32))
    optimizers.SGD(0.5).apply_gradients(model.layers)


def _set_weights(model, x, rng):
    batch_norm = model.layers[1]
    gamma, beta, mean, variance = batch_norm.get_weights()
    batch_norm.set_weights([gamma, beta, mean + 1.0, variance * 3.0])


def _load_weights(model, x, rng, tmp_path):
    other = randomise(copy.deepcopy(model), rng)
    other.save_weights(tmp_path / 'other.h5')
    model.load_weights(tmp_path / 'other.h5')


def _train_batch_statistics(model, x, rng):
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.momentum = 0.0                                      # the moving statistics jump to the batch's
    model.forward(x, training=True)


def _write_params(model, x, rng):
    conv = model.layers[0]
    conv.params['kernel'] *= -1.0                                     # in place, then said
    conv.weights_changed()


WAYS = {'SGD step': lambda model, x, rng, tmp_path: _sgd_step(model, x),
        'layer.set_weights': lambda model, x, rng, tmp_path: _set_weights(model, x, rng),
        'model.load_weights': _load_weights,
        'model.set_weights': lambda model, x, rng, tmp_path: model.set_weights([w * 1.5 for w in model.get_weights()]),
        'batch statistics moved': lambda model, x, rng, tmp_path: _train_batch_statistics(model, x, rng),
        'params written in place': lambda model, x, rng, tmp_path: _write_params(model, x, rng)}


@pytest.mark.parametrize('way', list(WAYS))
def test_no_stale_fold_after_the_weights_change(rng, tmp_path, way):
    """Each engine runs once (folding the batch-norms), the weights change, and the next pass
    of the kept engines equals the plain layers' with the new weights, not the old."""
    model = small_network(rng)
    x = rng.standard_normal((4, 9, 9, 3)).astype(np.float32)
    before = plain_forward(model, x)
    model.predict(x)
    engine = training.engine_for(model)
    engine.forward(x, training=False)
    engine.backward(np.ones((4, 1), np.float32))

    WAYS[way](model, x, rng, tmp_path)
    expected = plain_forward(model, x)
    assert relative_error(expected, before) > 1e-3                    # the change shows
    assert relative_error(model.predict(x), expected) <= TOLERANCE
    assert relative_error(engine.forward(x, training=False), expected) <= TOLERANCE


# -- the runner interface ---------------------------------------------------------------------

def fan_out_model(rng):
    """c0 is read twice, first by the shortcut ``s`` and then by the ReLU ``r``:

        input -> c0 -> s ----------------> add -> pool
                    `-> r -> c1 -> bn1 -^
    """
    minixcept.set_seed(int(rng.integers(1000)))
    model = Model((6, 6, 2))
    c0 = model.add(L.Conv2D(3, 3, padding='same', name='c0'))
    s = model.add(L.Conv2D(4, 1, name='s'), c0)
    r = model.add(L.ReLU(name='r'), c0)
    c1 = model.add(L.Conv2D(4, 3, padding='same', name='c1'), r)
    bn1 = model.add(L.BatchNormalization(name='bn1'), c1)
    model.add(L.Add(name='add'), bn1, s)
    model.add(L.GlobalAveragePooling2D(name='pool'))
    return randomise(model, rng)


@pytest.mark.parametrize('runner', ['model', 'engine'])
def test_stop_at_returns_the_whole_gradient_of_a_fanned_out_tensor(rng, runner):
    """Stopping at ``r`` returns the gradient of c0's output through both its readers (the
    shortcut runs its backward too), against finite differences in float64."""
    model = fan_out_model(rng)
    for layer in model.layers:
        layer.astype(np.float64)
    x = rng.standard_normal((2, 6, 6, 2))
    dout = rng.standard_normal((2, 4))
    with minixcept.no_grad():
        c0_out = model.forward(x, stop_after='c0')
    run = training.GradientEngine(model, threads=2) if runner == 'engine' else model

    def analytic(d):
        run.forward(x, training=False)
        return {'c0': run.backward(d, stop_at='r')}
    errors = gradcheck.check_gradients(lambda: model.forward(c0_out, start_after='c0'), analytic, {'c0': c0_out},
                                       dout)
    assert errors['c0'] < 1e-6, errors


def test_engine_runs_a_stretch_as_the_model_does(rng):
    """start_after / stop_after / stop_at: the engine's output, gradient and weight gradients
    for a stretch equal the model's own."""
    model = fan_out_model(rng)
    twin = copy.deepcopy(model)
    x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 6, 6, 4)).astype(np.float32)
    expected_y = model.forward(x, training=False, start_after='c0', stop_after='add')
    expected_dx = model.backward(dy, stop_at='r')
    engine = training.GradientEngine(twin, threads=2)
    assert engine.layers == twin.layers and engine.get_layer('c1') is twin.get_layer('c1')
    y = engine.forward(x, training=False, start_after='c0', stop_after='add')
    dx = engine.backward(dy, stop_at='r')
    assert relative_error(y, expected_y) <= TOLERANCE
    assert relative_error(dx, expected_dx) <= TOLERANCE
    for name in ('s', 'c1', 'bn1'):
        for weight, gradient in model.get_layer(name).grads.items():
            assert relative_error(twin.get_layer(name).grads[weight], gradient) <= TOLERANCE, (name, weight)
    assert relative_error(inference.engine_for(model)(x, start_after='c0', stop_after='add'), expected_y) <= TOLERANCE


def test_stopping_inside_a_fusion_is_refused(rng):
    """bn1 folds into c1 in the engine, so c1's output never exists there: stopping at bn1
    (whose input it is) is refused with a message, not answered wrongly."""
    model = fan_out_model(rng)
    engine = training.GradientEngine(model)
    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    engine.forward(x, training=False)
    with pytest.raises(ValueError, match="'c1'"):
        engine.backward(np.ones((2, 4), np.float32), stop_at='bn1')


def assert_same_weights(a, b, tolerance):
    for layer_a, layer_b in zip(a.layers, b.layers):
        for name, wa, wb in zip(layer_a.weight_names, layer_a.get_weights(), layer_b.get_weights()):
            assert relative_error(wa, wb) <= tolerance, (layer_a.name, name)


def test_fit_on_the_engine_equals_fit_on_the_plain_layers(rng):
    """Two epochs of SGD with momentum, batch-norm on batch statistics, batches shared out
    between two threads: the same losses and weights as the plain layers, to float32 rounding
    carried over eight steps."""
    plain = small_network(rng)
    fast = copy.deepcopy(plain)
    x = rng.standard_normal((16, 9, 9, 3)).astype(np.float32)
    y = (rng.random(16) > 0.5).astype(np.int64)
    loss = minixcept.losses.BinaryCrossentropy(from_logits=True)
    runs = {}
    for name, model, use_engine in (('plain', plain, False), ('engine', fast, True)):
        runs[name] = fit(model, x, y, loss, optimizers.SGD(0.05, momentum=0.9), epochs=2, batch_size=4,
                         validation_data=(x[:6], y[:6]), log=None, fast=use_engine)
    engine = training.engine_for(fast)
    assert sum(buffers.nbytes for buffers in engine.buffers) > 0        # it ran, and kept its memory
    for key in ('loss', 'val_loss'):
        np.testing.assert_allclose(runs['engine'].metric(key), runs['plain'].metric(key), rtol=1e-4)
    assert_same_weights(fast, plain, 1e-4)


@pytest.mark.parametrize('bn_statistics', ['moving', 'batch'])
def test_fine_tuning_on_the_engines_equals_the_plain_layers(rng, bn_statistics):
    """A FineTuneModel from the exit flow (block 7 with one middle block) of a small Xception: frozen features, one epoch of fit and
    the fine-tuned weights agree between fast=True (both engines) and fast=False."""
    minixcept.set_seed(4)
    base = randomise(minixcept.Xception(include_top=False, pooling='avg', input_shape=(71, 71, 3),
                                        middle_blocks=1), rng)
    head = minixcept.Sequential([L.Dense(4, activation='relu'), L.Dense(1)], input_shape=(2048,), name='head')
    networks = {fast: FineTuneModel(copy.deepcopy(base), copy.deepcopy(head), 'block7', fast=fast,
                                    bn_statistics=bn_statistics) for fast in (True, False)}
    images = rng.uniform(-1, 1, (4, 71, 71, 3)).astype(np.float32)
    labels = np.array([0, 1, 1, 0])
    features = {fast: network.frozen_features(images) for fast, network in networks.items()}
    assert relative_error(features[True], features[False]) <= TOLERANCE
    assert isinstance(networks[True].base_runner, training.GradientEngine)
    loss = minixcept.losses.BinaryCrossentropy(from_logits=True)
    for fast, network in networks.items():
        fit(network, features[False], labels, loss, optimizers.SGD(0.1), epochs=1, batch_size=2, log=None,
            stop_at=network.first_trainable)
    for fast_layer, plain_layer in zip(networks[True].layers, networks[False].layers):
        for name, a, b in zip(fast_layer.weight_names, fast_layer.get_weights(), plain_layer.get_weights()):
            assert relative_error(a, b) <= 1e-4, (fast_layer.name, name)


# -- progress -----------------------------------------------------------------------------------

class Clock:
    """A stand-in for time.monotonic that moves only when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_is_rate_limited_and_says_how_far(monkeypatch):
    clock = Clock()
    monkeypatch.setattr('minixcept.workflows.fit.time.monotonic', clock)
    stream = io.StringIO()
    progress = Progress(stream, epoch=2, epochs=3, batches=10, photos=160, interval=2.0)
    for batch in range(1, 11):
        clock.now += 0.5                                              # 32 photos/s
        progress.update(batch, 16 * batch)
    progress.finish(10, 160)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3                                            # at 2.0 s, 4.0 s and the end
    assert lines[0] == 'epoch 2/3  batch 4/10  32.0 photos/s  0:03 left'
    assert lines[-1].startswith('epoch 2/3  batch 10/10  32.0 photos/s  0:00 left')


def test_a_short_epoch_writes_no_progress_and_verbose_0_none(monkeypatch, rng):
    model = small_network(rng)
    x = rng.standard_normal((8, 9, 9, 3)).astype(np.float32)
    y = (rng.random(8) > 0.5).astype(np.int64)
    loss = minixcept.losses.BinaryCrossentropy(from_logits=True)
    quick, slow_but_quiet, slow = io.StringIO(), io.StringIO(), io.StringIO()
    fit(model, x, y, loss, optimizers.SGD(0.01), epochs=1, batch_size=4, log=None, progress_stream=quick)
    assert quick.getvalue() == ''
    fit(model, x, y, loss, optimizers.SGD(0.01), epochs=1, batch_size=4, log=None, verbose=0,
        progress_stream=slow_but_quiet, progress_interval=0)
    assert slow_but_quiet.getvalue() == ''
    fit(model, x, y, loss, optimizers.SGD(0.01), epochs=1, batch_size=4, log=None, progress_stream=slow,
        progress_interval=0)
    assert [line.split('  ')[1] for line in slow.getvalue().splitlines()] == ['batch 1/2', 'batch 2/2', 'batch 2/2']
