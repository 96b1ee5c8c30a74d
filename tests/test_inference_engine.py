"""The inference engine of minixcept.engines.inference against the plain layers it must match.

Every fused step is compared with the plain layers' forward pass on the same weights:
random kernels *and* random batch-norm statistics (so that folding is exercised), odd and
even sizes, tiles forced tiny so that tile edges, halo rows and tiles of several images
are all crossed, and the work shared between threads (by images or by blocks of rows).
Agreement: max|a - b| / max|b| <= 1e-5 (float32 rounding of a different summation order);
max pooling must agree exactly. Also: nothing is overwritten that is still read (the residual's input, the
caller's array, captured or returned outputs), and buffers are reused between batches.
"""
import numpy as np
import pytest

import minixcept
from conftest import relative_error
from minixcept import layers as L
from minixcept.engines import inference as fast, kernels
from minixcept.engines.inference import InferenceEngine
from minixcept.layers.base import no_grad
from minixcept.model import Model

TOLERANCE = 1e-5


def use_tiles(monkeypatch, tile_bytes):
    """Make the engine cut its work into tiles of ``tile_bytes`` and blocks of three tiles."""
    monkeypatch.setattr(kernels, 'TILE_BYTES', tile_bytes)
    monkeypatch.setattr(kernels, 'BLOCK_BYTES', 3 * tile_bytes)


@pytest.fixture(params=['default tiles, one thread', 'tiny tiles, four threads'])
def threads(request, monkeypatch):
    """Run once with the engine's tile sizes on one thread, and once with tiles of a few rows
    shared out between four threads (more than the test batches have images, so the threads
    share each step's blocks), so that even small inputs cross many tiles and blocks.
    Returns the number of threads to give the engine."""
    if request.param.startswith('tiny'):
        use_tiles(monkeypatch, 2 * 1024)
        return 4
    return 1


def randomise(model, rng):
    """Random weights everywhere, batch-norm statistics included (the default ones, mean 0
    and variance 1, would make folding look right even if it were wrong)."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.params['gamma'].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                               rng.normal(0, 0.2, c), rng.uniform(0.5, 1.5, c)])
        elif layer.weight_names:
            layer.set_weights([w + rng.normal(0, 0.05, w.shape) for w in layer.get_weights()])
    return model


def plain_forward(model, x, capture=None):
    with no_grad():
        return model.forward(x, training=False, capture=capture)


def chain(input_shape, *layers):
    """A model of layers applied one after another."""
    model = Model(input_shape)
    for layer in layers:
        model.add(layer)
    return model


def random_input(xp, rng, shape):
    return xp.asarray(rng.standard_normal(shape).astype(np.float32))


def assert_matches_plain(model, x, capture=None, threads=1):
    """The engine's output (and captured layers) against the plain forward pass."""
    expected = plain_forward(model, x, capture)
    got = InferenceEngine(model, threads=threads)(x, capture=capture)
    if capture is None:
        expected, got = (expected, {}), (got, {})
    assert relative_error(got[0], expected[0]) <= TOLERANCE
    assert sorted(got[1]) == sorted(expected[1])
    for name in expected[1]:
        assert relative_error(got[1][name], expected[1][name]) <= TOLERANCE, name


# -- Xception, whole ----------------------------------------------------------------------------

@pytest.mark.parametrize('side, include_top, pooling, tile_kb, threads, batch', [
    (71, True, None, None, 1, 3), (80, False, 'max', 16, 2, 3), (75, False, None, 4, 3, 3),
    (72, False, 'avg', 8, 2, 1)])
def test_xception_matches_plain(xp, monkeypatch, rng, side, include_top, pooling, tile_kb, threads, batch):
    """Threads split a batch of 3 into shares of 2 + 1 or 1 + 1 + 1, or share out the blocks
    of each step of a batch of 1."""
    if tile_kb is not None:
        use_tiles(monkeypatch, tile_kb * 1024)
    model = minixcept.Xception(include_top=include_top, input_shape=(side, side, 3), pooling=pooling,
                               classes=5, middle_blocks=1)
    randomise(model, rng)
    assert_matches_plain(model, random_input(xp, rng, (batch, side, side, 3)), threads=threads)


def test_xception_capture_matches_plain(xp, rng):
    """Capturing every layer turns fusion off where it would hide a layer; capturing a few
    keeps the rest fused. Both give what the plain forward captures."""
    model = randomise(minixcept.Xception(include_top=False, input_shape=(72, 72, 3), pooling='avg',
                                         middle_blocks=1), rng)
    x = random_input(xp, rng, (2, 72, 72, 3))
    assert_matches_plain(model, x, capture='all')
    last_relu = model.layers[-2].name                   # with one middle block, block7_sepconv2_act
    assert_matches_plain(model, x, threads=2, capture=['block1_conv1', 'block2_sepconv1_bn', 'block3_sepconv1_act',
                                            'add_1', 'block5_sepconv2_act', last_relu])


def test_xception_plan_folds_and_fuses():
    """Every batch-norm is folded into its convolution and every ReLU is fused, except where
    fusing would be wrong; only the global pooling runs through a plain layer."""
    model = minixcept.Xception(include_top=False, input_shape=(71, 71, 3), pooling='avg', middle_blocks=2)
    steps = InferenceEngine(model).steps
    by_layer = {name: step for step in steps for name in step.layers}
    assert set(by_layer) == {layer.name for layer in model.layers}
    assert [s.layers for s in steps if isinstance(s, fast.LayerStep)] == [('global_average_pooling2d',)]
    for layer in model.layers:
        if isinstance(layer, (L.BatchNormalization, L.Activation)):
            assert len(by_layer[layer.name].layers) > 1, f'{layer.name} runs on its own'
    # The block input is read by the shortcut too: its ReLU is applied on the copy the
    # separable convolution reads, and the block input itself is left as it is.
    assert by_layer['block3_sepconv1_act'] is by_layer['block3_sepconv1']
    assert by_layer['block3_sepconv1_act'].inputs == ('add',)
    assert all(step.in_place for step in steps if isinstance(step, fast.AddStep))


# -- one step at a time ---------------------------------------------------------------------------

@pytest.mark.parametrize('side', [9, 10])
@pytest.mark.parametrize('strides, padding', [(1, 'same'), (2, 'same'), (1, 'valid'), (2, 'valid')])
def test_separable_steps(xp, threads, rng, side, strides, padding):
    """ReLU -> SeparableConv2D (with bias) -> BN -> ReLU, and the same without the extras."""
    fused = chain((side, side, 6), L.ReLU(), L.SeparableConv2D(7, 3, strides, padding), L.BatchNormalization(),
                  L.ReLU())
    bare = chain((side, side, 6), L.SeparableConv2D(5, 3, strides, padding, use_bias=False))
    for model in (fused, bare):
        randomise(model, rng)
        assert_matches_plain(model, random_input(xp, rng, (3, side, side, 6)), threads=threads)


@pytest.mark.parametrize('side', [9, 10])
@pytest.mark.parametrize('kernel_size, strides, padding', [(3, 2, 'valid'), (3, 1, 'valid'), (1, 2, 'same'),
                                                           (3, 1, 'same'), (5, 2, 'same')])
def test_convolution_steps(xp, threads, rng, side, kernel_size, strides, padding):
    """Conv2D (im2col) -> BN -> ReLU as block 1 has it, the 1x1 stride-2 shortcut, and more."""
    model = chain((side, side, 4), L.Conv2D(6, kernel_size, strides, padding), L.BatchNormalization(), L.ReLU())
    randomise(model, rng)
    assert_matches_plain(model, random_input(xp, rng, (3, side, side, 4)), threads=threads)


@pytest.mark.parametrize('strides, padding', [(1, 'same'), (2, 'same'), (2, 'valid')])
def test_lone_depthwise_and_pointwise_steps(xp, threads, rng, strides, padding):
    model = chain((11, 11, 5), L.ReLU(), L.DepthwiseConv2D(3, strides, padding), L.BatchNormalization(),
                  L.ReLU(), L.PointwiseConv2D(4, use_bias=True), L.BatchNormalization())
    randomise(model, rng)
    assert_matches_plain(model, random_input(xp, rng, (2, 11, 11, 5)), threads=threads)


@pytest.mark.parametrize('side', [9, 10, 11])
@pytest.mark.parametrize('pool_size, strides, padding', [(3, 2, 'same'), (2, None, 'valid'), (3, 1, 'same'),
                                                         (3, 2, 'valid')])
def test_max_pool_step_is_exact(xp, threads, rng, side, pool_size, strides, padding):
    """Max pooling involves no rounding: the two 1-D passes must give the plain layer's values
    exactly, ties (small integers) and all-negative windows (the -inf padding) included."""
    model = chain((side, side, 3), L.MaxPooling2D(pool_size, strides, padding))
    x = xp.asarray(rng.integers(-4, 2, (2, side, side, 3)).astype(np.float32))
    expected = plain_forward(model, x)
    got = InferenceEngine(model, threads=threads)(x)
    assert got.shape == expected.shape
    assert bool((got == expected).all())


def test_residual_graph_in_place_only_where_safe(xp, threads, rng):
    """A tensor read twice is never overwritten: the ReLU and add in place are taken only
    where nothing reads their input later, and the caller's array is never written."""
    model = Model((8, 8, 4))
    a = model.add(L.Conv2D(6, 3, padding='same'), 'input')
    r = model.add(L.ReLU(), a)                                  # read by the separable only: fused
    s = model.add(L.SeparableConv2D(6, 3, padding='same'), r)
    b = model.add(L.BatchNormalization(), s)
    total = model.add(L.Add(), b, a)                           # a was read before: b is overwritten
    relu = model.add(L.ReLU(), total)                          # total is read again below: not in place
    c = model.add(L.Conv2D(6, 1), relu)
    model.add(L.Add(), c, total)
    input_relu = model.add(L.ReLU(), 'input')                   # reads the caller's array: not in place
    model.add(L.Add(), input_relu, 'input')
    randomise(model, rng)
    x = random_input(xp, rng, (2, 8, 8, 4))
    x_before = x.copy()
    assert_matches_plain(model, x, threads=threads)
    assert_matches_plain(model, x, capture=[a, b, total], threads=threads)
    assert bool((x == x_before).all())
    steps = {step.output: step for step in InferenceEngine(model).steps}
    assert steps[total].in_place and not steps[relu].in_place and not steps[input_relu].in_place


def test_outputs_survive_the_next_batch(xp, rng):
    """Buffers are reused from one call to the next, but never the ones handed to the caller."""
    model = randomise(chain((12, 12, 4), L.Conv2D(8, 3, padding='same'), L.BatchNormalization(), L.ReLU(),
                            L.SeparableConv2D(8, 3, padding='same'), L.BatchNormalization()), rng)
    engine, name = InferenceEngine(model, threads=1), model.layers[2].name
    first, second = random_input(xp, rng, (2, 12, 12, 4)), random_input(xp, rng, (2, 12, 12, 4))
    y_first, captured_first = engine(first, capture=[name])
    y_again = engine(first)
    y_second = engine(second)
    expected_first, expected_captured = plain_forward(model, first, capture=[name])
    assert relative_error(y_first, expected_first) <= TOLERANCE
    assert relative_error(captured_first[name], expected_captured[name]) <= TOLERANCE
    assert relative_error(y_again, expected_first) <= TOLERANCE
    assert relative_error(y_second, plain_forward(model, second)) <= TOLERANCE


def test_predict_fast_equals_plain(xp, rng):
    model = randomise(minixcept.Xception(include_top=False, input_shape=(71, 71, 3), pooling='avg',
                                         middle_blocks=1), rng)
    x = rng.standard_normal((5, 71, 71, 3)).astype(np.float32)
    fast_features = model.predict(x, batch_size=2)
    plain_features = model.predict(x, batch_size=2, fast=False)
    assert isinstance(fast_features, np.ndarray) and fast_features.shape == (5, 2048)
    assert relative_error(fast_features, plain_features) <= TOLERANCE


def test_memory_is_reused_and_outputs_let_go(rng):
    """After the first batch the pool holds all the memory a batch needs: it stops growing.
    And the engine keeps no hold on what it returned."""
    import gc
    import weakref
    model = randomise(chain((16, 16, 4), L.Conv2D(8, 3, padding='same'), L.BatchNormalization(), L.ReLU(),
                            L.SeparableConv2D(8, 3, padding='same'), L.BatchNormalization(), L.ReLU(),
                            L.SeparableConv2D(8, 3, padding='same')), rng)
    engine = InferenceEngine(model, threads=2)
    x = rng.standard_normal((4, 16, 16, 4)).astype(np.float32)
    engine(x)
    held = [pool.nbytes for pool in engine.buffers]
    y = engine(x)
    assert min(held) > 0 and [pool.nbytes for pool in engine.buffers] == held
    returned = weakref.ref(y)
    del y
    gc.collect()
    assert returned() is None


def test_threads_leave_gradients_on(rng):
    """The no_grad switch is global: threads must not leave it off behind them."""
    from minixcept.layers.base import grad_enabled
    model = randomise(chain((8, 8, 3), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU()), rng)
    InferenceEngine(model, threads=2)(rng.standard_normal((4, 8, 8, 3)).astype(np.float32))
    assert grad_enabled()
    with no_grad():
        InferenceEngine(model, threads=2)(rng.standard_normal((4, 8, 8, 3)).astype(np.float32))
        assert not grad_enabled()
    assert grad_enabled()


def test_classification_head_runs_through_its_layers(rng):
    """A head of Dense and Dropout layers has nothing to fuse: the engine runs each layer's own
    forward (Dropout returns its input unchanged at inference), threads and all."""
    head = minixcept.Sequential([L.Dense(8, activation='relu'), L.Dropout(0.5), L.Dense(1)], input_shape=(16,))
    features = rng.standard_normal((7, 16)).astype(np.float32)
    assert relative_error(head.predict(features, batch_size=4),
                          head.predict(features, batch_size=4, fast=False)) <= TOLERANCE
    assert all(isinstance(step, fast.LayerStep) for step in InferenceEngine(head).steps)
