"""The training engine of minixcept.engines.training against the plain layers it must match.

Each fast layer pair (forward, backward) is compared with the layer's own ``forward_step`` /
``backward_step`` on the same random weights and inputs, in float32, with tiles forced tiny so
that tile edges and halo rows are crossed: outputs, input gradients and weight gradients
within max|a - b| / max|b| <= 1e-5. The whole engine (threads sharing out the batch, the
weight gradients added up) is compared with ``model.forward`` + ``model.backward`` on a small
Xception in float64, within 1e-10: in float32 a different summation order can move a
pre-activation across a ReLU's kink, and then the two backward passes legitimately differ
(tests/test_xception_tf.py meets the same thing against TensorFlow).
"""
import copy
import dataclasses

import numpy as np
import pytest

import minixcept
from conftest import relative_error
from minixcept.engines import training as fastgrad
from minixcept import layers as L
from minixcept.engines.kernels import Workers
from minixcept.engines.plan import GraphPlan
from minixcept.engines.training import GradientEngine
from minixcept.model import Model
from test_inference_engine import chain, randomise, use_tiles

TOLERANCE = 1e-5
FLOAT64_TOLERANCE = 1e-10


@pytest.fixture(params=['default tiles', 'tiny tiles'])
def tiles(request, monkeypatch):
    if request.param == 'tiny tiles':
        use_tiles(monkeypatch, 2 * 1024)
        monkeypatch.setattr(fastgrad, 'SUM_BYTES', 1024)


def built(layer, input_shape, rng):
    layer.build(input_shape)
    if isinstance(layer, L.BatchNormalization):
        c = input_shape[-1]
        layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                           rng.normal(0, 0.2, c), rng.uniform(0.5, 1.5, c)])
    else:
        layer.set_weights([rng.normal(0, 0.3, w.shape) for w in layer.get_weights()])
    return layer


def assert_pair_matches_plain(layer, forward, backward, x, rng, training=False):
    """The fast pair against the layer's own pair: output, input gradient, weight gradients."""
    expected_y, cache = layer.forward_step(x, training)
    dy = rng.standard_normal(expected_y.shape).astype(x.dtype)
    expected_dx, expected_grads = layer.backward_step(dy, cache)
    result = forward(layer, x, training)
    assert result is not None, f'the fast path does not take {layer}'
    y, fast_cache = result
    dx, grads_by_layer = backward(layer, dy, fast_cache)
    assert list(grads_by_layer) == [layer.name]
    grads = grads_by_layer[layer.name]
    assert y.shape == expected_y.shape and dx.shape == x.shape
    assert relative_error(y, expected_y) <= TOLERANCE
    assert relative_error(dx, expected_dx) <= TOLERANCE
    assert set(grads) == set(expected_grads)
    for name in grads:
        assert grads[name].shape == expected_grads[name].shape
        assert relative_error(grads[name], expected_grads[name]) <= TOLERANCE, name


# -- one layer at a time --------------------------------------------------------------------------

@pytest.mark.parametrize('side', [9, 10])
@pytest.mark.parametrize('kernel_size, padding, use_bias', [(3, 'same', False), (3, 'valid', True),
                                                            (5, 'same', True), (2, 'same', False)])
def test_separable_matches_plain(tiles, rng, side, kernel_size, padding, use_bias):
    """Stride 1, odd and even kernels (an even 'same' kernel pads unevenly, so the backward
    padding differs from the forward one), with and without bias."""
    layer = built(L.SeparableConv2D(6, kernel_size, padding=padding, use_bias=use_bias), (3, side, side, 5), rng)
    x = rng.standard_normal((3, side, side, 5)).astype(np.float32)
    assert_pair_matches_plain(layer, fastgrad.fast_separable_forward, fastgrad.fast_separable_backward, x, rng)


def test_separable_with_stride_is_left_to_the_layer(rng):
    layer = built(L.SeparableConv2D(4, 3, strides=2, padding='same'), (1, 8, 8, 3), rng)
    assert fastgrad.fast_pass_for(layer, training=False, rank=4) is None


@pytest.mark.parametrize('side', [9, 10])
@pytest.mark.parametrize('kernel_size, strides, padding, use_bias', [
    (3, 2, 'valid', False), (3, 1, 'valid', True), (3, 1, 'same', False), (1, 2, 'same', False),
    (2, 1, 'same', True), (3, 2, 'same', True), (1, 1, 'valid', False)])
def test_convolution_matches_plain(tiles, rng, side, kernel_size, strides, padding, use_bias):
    """Xception's stem (3x3 stride 2 valid, 3x3 stride 1 valid) and shortcuts (1x1 stride 2),
    and the cases around them: 'same' padding, even kernels, bias."""
    layer = built(L.Conv2D(6, kernel_size, strides=strides, padding=padding, use_bias=use_bias),
                  (2, side, side, 4), rng)
    x = rng.standard_normal((2, side, side, 4)).astype(np.float32)
    assert_pair_matches_plain(layer, fastgrad.fast_conv_forward, fastgrad.fast_conv_backward, x, rng)


@pytest.mark.parametrize('training, trainable', [(False, True), (True, False)])
def test_batch_norm_on_moving_statistics_matches_plain(tiles, rng, training, trainable):
    """At inference, and when training with a frozen batch-norm (which uses its moving statistics)."""
    layer = built(L.BatchNormalization(), (3, 7, 6, 5), rng)
    layer.trainable = trainable
    x = rng.normal(0.3, 2.0, (3, 7, 6, 5)).astype(np.float32)
    assert_pair_matches_plain(layer, fastgrad.fast_batch_norm_forward, fastgrad.fast_batch_norm_backward, x, rng,
                              training=training)


@pytest.mark.parametrize('convolution, use_bias', [
    (lambda: L.SeparableConv2D(6, 3, padding='same', use_bias=False), False),
    (lambda: L.SeparableConv2D(6, 3, padding='same'), True),
    (lambda: L.Conv2D(6, 3, strides=2, use_bias=False), False), (lambda: L.Conv2D(6, 3, padding='same'), True),
    (lambda: L.Conv2D(6, 1, strides=2, padding='same', use_bias=False), False)])
def test_batch_norm_folded_into_the_convolution_matches_plain(tiles, rng, convolution, use_bias):
    """Convolution then batch-norm on moving statistics, as one fused pair, against the two
    plain layers: the batch-norm's output, the input gradient, and the gradients of both
    layers' weights. The statistics are the batch's own, with some channels' means several
    standard deviations from zero (up to 7 in Xception's ImageNet weights): where the folded
    gamma gradient, a difference of two sums, would lose precision if it were going to."""
    conv = built(convolution(), (3, 9, 10, 4), rng)
    assert ('bias' in conv.params) == use_bias
    for name, weights in conv.params.items():               # three channels with a large mean ...
        if name == 'depthwise_kernel':
            weights[...] = np.abs(weights)
        elif name != 'bias':
            weights[..., :3] = np.abs(weights[..., :3])
    x = (rng.standard_normal((3, 9, 10, 4)) + 5).astype(np.float32)
    u, conv_cache = conv.forward_step(x, False)
    mean, std = u.mean(axis=(0, 1, 2)), u.std(axis=(0, 1, 2))
    assert (np.abs(mean) / std).max() > 5                  # ... several standard deviations
    bn = built(L.BatchNormalization(), u.shape, rng)
    bn.set_weights([rng.uniform(0.5, 1.5, len(mean)), rng.normal(0, 0.2, len(mean)), mean, std ** 2])
    expected_y, bn_cache = bn.forward_step(u, False)
    dy = rng.standard_normal(expected_y.shape).astype(np.float32)
    du, expected_bn_grads = bn.backward_step(dy, bn_cache)
    expected_dx, expected_conv_grads = conv.backward_step(du, conv_cache)
    fast_pass = fastgrad.fast_pass_for(conv, training=False, rank=4)
    forward, backward = fast_pass.forward, fast_pass.backward
    y, cache = forward(conv, x, False, fastgrad.Fused(batch_norm=fastgrad.FoldedBatchNorm(bn)))
    dx, grads = backward(conv, dy, cache)
    assert relative_error(y, expected_y) <= TOLERANCE
    assert relative_error(dx, expected_dx) <= TOLERANCE
    assert grads.keys() == {conv.name, bn.name}
    for layer_grads, expected_grads in [(grads[conv.name], expected_conv_grads), (grads[bn.name], expected_bn_grads)]:
        assert layer_grads.keys() == expected_grads.keys()
        for name in expected_grads:
            assert relative_error(layer_grads[name], expected_grads[name]) <= TOLERANCE, name


def test_xception_fusion_plan():
    """In Xception every batch-norm alone reads the convolution before it: all fold when they
    use their moving statistics, none when they train on batch statistics, all again when
    frozen. Every ReLU that only a separable convolution reads runs inside it; the others are
    the stem's two (read by a Conv2D, and by block 2's convolution and shortcut) and the last
    one (read by the global pooling)."""
    model = minixcept.Xception(include_top=False, input_shape=(71, 71, 3), pooling='avg', middle_blocks=1)
    batch_norms = {layer.name for layer in model.layers if isinstance(layer, L.BatchNormalization)}
    relus = {layer.name for layer in model.layers if isinstance(layer, L.Activation)}
    unfused_relus = {'block1_conv1_act', 'block1_conv2_act', model.layers[-2].name}   # the last, before pooling
    assert model.layers[-2].name in relus
    fused, absorbed = fastgrad.plan_fusion(GraphPlan(model, training=False))
    assert absorbed == batch_norms | (relus - unfused_relus)
    assert {f.batch_norm.layer.name for f in fused.values() if f.batch_norm is not None} == batch_norms
    assert sum(f.leading_relu for f in fused.values()) == len(relus - unfused_relus)
    fused, absorbed = fastgrad.plan_fusion(GraphPlan(model, training=True))
    assert absorbed == relus - unfused_relus and not any(f.batch_norm is not None for f in fused.values())
    for layer in model.layers:
        layer.trainable = False
    assert fastgrad.plan_fusion(GraphPlan(model, training=True))[1] == batch_norms | (relus - unfused_relus)


@pytest.mark.parametrize('kernel_size, padding', [(3, 'same'), (2, 'same'), (3, 'valid')])
def test_relu_fused_into_separable_matches_plain(tiles, rng, kernel_size, padding):
    """ReLU then separable convolution as one fused pair, against the two plain layers; about
    half the inputs negative, some exactly zero (where the ReLU's gradient is 0, as in Keras)."""
    relu = L.ReLU()
    conv = built(L.SeparableConv2D(6, kernel_size, padding=padding), (3, 9, 10, 5), rng)
    x = rng.standard_normal((3, 9, 10, 5)).astype(np.float32)
    x[:, ::4] = 0
    r, relu_cache = relu.forward_step(x, False)
    expected_y, conv_cache = conv.forward_step(r, False)
    dy = rng.standard_normal(expected_y.shape).astype(np.float32)
    dr, expected_grads = conv.backward_step(dy, conv_cache)
    expected_dx, _ = relu.backward_step(dr, relu_cache)
    y, cache = fastgrad.fast_separable_forward(conv, x, False, fastgrad.Fused(leading_relu=True))
    dx, grads = fastgrad.fast_separable_backward(conv, dy, cache)
    assert relative_error(y, expected_y) <= TOLERANCE
    assert relative_error(dx, expected_dx) <= TOLERANCE
    assert np.all(dx[x <= 0] == 0)
    assert grads.keys() == {conv.name}
    for name in expected_grads:
        assert relative_error(grads[conv.name][name], expected_grads[name]) <= TOLERANCE, name


@pytest.mark.parametrize('side', [9, 10, 11])
@pytest.mark.parametrize('pool_size, strides, padding', [(3, 2, 'same'), (2, None, 'valid'), (3, 1, 'same'),
                                                         (3, 2, 'valid')])
def test_max_pool_matches_plain(tiles, rng, side, pool_size, strides, padding):
    """The output exactly (a max involves no rounding); the input gradient within rounding (where
    windows overlap, the parts from neighbouring tiles are added in another order)."""
    layer = L.MaxPooling2D(pool_size, strides, padding=padding)
    layer.build((3, side, side, 4))
    x = rng.standard_normal((3, side, side, 4)).astype(np.float32)
    x[:, ::3, ::2] = 0.5                                   # ties: the first in the window wins
    assert_pair_matches_plain(layer, fastgrad.fast_max_pool_forward, fastgrad.fast_max_pool_backward, x, rng)
    np.testing.assert_array_equal(fastgrad.fast_max_pool_forward(layer, x, False)[0], layer.forward_step(x, False)[0])


@pytest.mark.parametrize('shape', [(3, 5, 6, 4), (7, 5)])
def test_relu_matches_plain(rng, shape):
    layer = L.ReLU()
    layer.build(shape)
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[::5] = 0                                       # the kink: gradient 0, as in Keras
    assert_pair_matches_plain(layer, fastgrad.fast_relu_forward, fastgrad.fast_relu_backward, x, rng)
    assert fastgrad.fast_pass_for(L.Activation('sigmoid'), training=False, rank=x.ndim) is None


def test_batch_norm_on_batch_statistics_is_left_to_the_layer(rng):
    layer = built(L.BatchNormalization(), (3, 7, 6, 5), rng)
    assert fastgrad.fast_pass_for(layer, training=True, rank=4).forward is fastgrad.fast_batch_norm_train_forward


# -- the engine -----------------------------------------------------------------------------------

def float64_xception(rng, side=71):
    minixcept.set_seed(0)                      # the same initial weights whatever ran before
    model = randomise(minixcept.Xception(include_top=False, input_shape=(side, side, 3), pooling='avg',
                                         middle_blocks=1), rng)
    for layer in model.layers:
        layer.astype('float64')
    return model


def run_plain(model, x, dy, training):
    y = model.forward(x, training=training)
    dx = model.backward(dy)
    return y, dx, {layer.name: dict(layer.grads) for layer in model.layers}


def run_engine(model, x, dy, training, threads):
    engine = GradientEngine(model, threads=threads)
    y = engine.forward(x, training=training)
    dx = engine.backward(dy)
    return y, dx, {layer.name: dict(layer.grads) for layer in model.layers}


def assert_same_pass(got, expected, tolerance):
    (y, dx, grads), (expected_y, expected_dx, expected_grads) = got, expected
    assert relative_error(y, expected_y) <= tolerance
    assert relative_error(dx, expected_dx) <= tolerance
    assert grads.keys() == expected_grads.keys()
    for layer, layer_grads in expected_grads.items():
        assert grads[layer].keys() == layer_grads.keys(), layer
        for name, expected_grad in layer_grads.items():
            assert relative_error(grads[layer][name], expected_grad) <= tolerance, (layer, name)


@pytest.mark.parametrize('threads, batch', [(1, 2), (2, 3), (3, 3)])
def test_xception_engine_matches_plain_at_inference_statistics(monkeypatch, rng, threads, batch):
    """Batch-norm on its moving statistics (as when fine-tuning a pretrained base): the batch is
    shared out between the threads (2 + 1, or 1 + 1 + 1) and the weight gradients added up."""
    use_tiles(monkeypatch, 8 * 1024)
    model = float64_xception(rng)
    x = rng.uniform(-1, 1, (batch, 71, 71, 3))
    dy = rng.standard_normal((batch, 2048))
    expected = run_plain(model, x, dy, training=False)
    assert_same_pass(run_engine(model, x, dy, False, threads), expected, FLOAT64_TOLERANCE)


@pytest.mark.parametrize('threads, batch', [(1, 3), (2, 3), (3, 3), (2, 5)])
def test_xception_engine_matches_plain_with_batch_statistics(monkeypatch, rng, threads, batch):
    """Training with batch statistics: the shares add up their sums for every batch-norm's mean,
    variance and gradient sums, so each share normalises with the whole batch's statistics;
    the outputs, all gradients and the moving statistics (moved once) equal the plain pass's."""
    use_tiles(monkeypatch, 8 * 1024)
    model = float64_xception(rng)
    twin = copy.deepcopy(model)
    x = rng.uniform(-1, 1, (batch, 71, 71, 3))
    dy = rng.standard_normal((batch, 2048))
    expected = run_plain(model, x, dy, training=True)
    engine = GradientEngine(twin, threads=threads)
    assert len(engine._share_slices(x, training=True)) == threads
    got_y = engine.forward(x, training=True)
    got = (got_y, engine.backward(dy), {layer.name: dict(layer.grads) for layer in twin.layers})
    assert_same_pass(got, expected, FLOAT64_TOLERANCE)
    # max |a - b| / max |b| per array, as everywhere else: element by element, a moving mean
    # within rounding of zero (the difference of two sums of order 1) has no relative precision
    for layer, twin_layer in zip(model.layers, twin.layers):
        for name in layer.params:
            assert relative_error(twin_layer.params[name], layer.params[name]) <= 1e-12, (layer.name, name)


def test_batch_norm_on_batch_statistics_alone_matches_plain(rng):
    """The batch-statistics pair outside an engine (one share): against the plain layer, with
    the moving statistics moved the same way."""
    layer = built(L.BatchNormalization(), (3, 7, 6, 5), rng)
    plain, fast, initial = copy.deepcopy(layer), copy.deepcopy(layer), copy.deepcopy(layer)
    x = rng.normal(0.3, 2.0, (3, 7, 6, 5)).astype(np.float32)
    assert_pair_matches_plain(layer, fastgrad.fast_batch_norm_train_forward, fastgrad.fast_batch_norm_train_backward, x,
                              rng, training=True)
    plain.forward_step(x, True)
    fastgrad.fast_batch_norm_train_forward(fast, x, True)
    for name in ('moving_mean', 'moving_variance'):
        assert not np.allclose(fast.params[name], initial.params[name])        # they did move ...
        np.testing.assert_allclose(fast.params[name], plain.params[name], rtol=1e-6)   # ... alike


def test_a_failing_share_does_not_leave_the_others_waiting(rng):
    """Shares wait for each other at every batch-norm on batch statistics; when one fails, the
    others are let go and the error reaches the caller."""
    model = chain((6, 6, 3), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU())
    engine = GradientEngine(model, threads=2)
    x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    x[3, 0, 0, 0] = np.nan                                 # only the second share sees it

    conv_pass = fastgrad.fast_pass_for(model.layers[0], training=True, rank=4)

    def fail_on_nan(layer, x, *arguments):
        if np.isnan(x).any():
            raise FloatingPointError('a NaN in the input')
        return conv_pass.forward(layer, x, *arguments)
    passes = fastgrad.FAST_PASSES
    fastgrad.FAST_PASSES = tuple(dataclasses.replace(p, forward=fail_on_nan) if p is conv_pass else p
                                 for p in passes)
    try:
        with pytest.raises(FloatingPointError, match='NaN'):
            engine.forward(x, training=True)
    finally:
        fastgrad.FAST_PASSES = passes
    engine.forward(np.nan_to_num(x), training=True)       # and the engine still works


def test_float32_xception_engine_matches_plain_output(rng):
    """In float32 the forward output agrees within float32 rounding (see the module docstring
    for why the backward pass is compared in float64)."""
    model = randomise(minixcept.Xception(include_top=False, input_shape=(71, 71, 3), pooling='avg',
                                         middle_blocks=1), rng)
    x = rng.uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32)
    expected = model.forward(x)
    got = GradientEngine(model, threads=2).forward(x)
    assert got.dtype == np.float32
    assert relative_error(got, expected) <= TOLERANCE


def test_one_share_only_for_active_dropout(rng):
    """Dropout in training draws its masks in sequence from one generator: then the batch runs as
    one share. Batch-norm, on either statistics, shares out; so does dropout at inference."""
    model = chain((6, 6, 3), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU(), L.GlobalAveragePooling2D(),
                  L.Dropout(0.0), L.Dense(2))
    engine = GradientEngine(model, threads=2)
    x = np.zeros((4, 6, 6, 3), np.float32)
    assert not engine.needs_one_share(training=True)
    assert len(engine._share_slices(x, training=True)) == 2
    assert len(engine._share_slices(x[:1], training=True)) == 1          # fewer examples than threads
    model.layers[4].rate = 0.5
    assert engine.needs_one_share(training=True) and not engine.needs_one_share(training=False)
    assert len(engine._share_slices(x, training=True)) == 1


def test_batch_norm_on_features_in_training_runs_one_share(rng):
    """A batch-norm on (N, D) features takes the plain layer, which sees only its own share:
    in training such a model runs as one share, and matches the plain pass."""
    head = minixcept.Sequential([L.Dense(6), L.BatchNormalization(), L.ReLU(), L.Dense(3)], input_shape=(5,))
    randomise(head, rng)
    for layer in head.layers:
        layer.astype('float64')
    engine = GradientEngine(head, threads=2)
    x = rng.standard_normal((6, 5))
    dy = rng.standard_normal((6, 3))
    assert engine.needs_one_share(training=True) and not engine.needs_one_share(training=False)
    expected = run_plain(copy.deepcopy(head), x, dy, training=True)
    assert_same_pass(run_engine(head, x, dy, True, threads=2), expected, FLOAT64_TOLERANCE)


def test_dropout_in_training_matches_plain(rng):
    """A head with active dropout runs as one share and draws the same masks as the plain pass."""
    head = minixcept.Sequential([L.Dense(8, activation='relu'), L.Dropout(0.5), L.Dense(3)], input_shape=(5,))
    x = rng.standard_normal((6, 5)).astype(np.float32)
    dy = rng.standard_normal((6, 3)).astype(np.float32)
    minixcept.set_seed(7)
    expected = run_plain(head, x, dy, training=True)
    minixcept.set_seed(7)
    assert_same_pass(run_engine(head, x, dy, True, threads=2), expected, TOLERANCE)


@pytest.mark.parametrize('threads', [1, 2, 3])
@pytest.mark.parametrize('activation, use_bias', [('relu', True), (None, False), (None, True)])
def test_dense_matches_plain(rng, threads, activation, use_bias):
    """The dense pair cuts its products into parts by the kernel's columns (forward) and rows
    (backward), each written into its own slice of y, dkernel and dx: sizes that do not
    divide evenly (300 inputs, 130 units) cross the parts' edges."""
    layer = built(L.Dense(130, activation=activation, use_bias=use_bias), (7, 300), rng)
    workers = Workers(threads)
    parts = fastgrad._parts(130, workers)
    assert len(parts) == (1 if threads == 1 else 2) and parts[-1].stop == 130
    x = rng.standard_normal((7, 300)).astype(np.float32)
    share = fastgrad.Share(workers=workers)
    assert_pair_matches_plain(layer, lambda layer, x, training: fastgrad.fast_dense_forward(
        layer, x, training, share=share), fastgrad.fast_dense_backward, x, rng)


def test_head_with_dropout_cuts_its_products_for_the_threads(monkeypatch, rng):
    """The cat/dog head's shape, scaled down: Dense(relu) -> Dropout -> Dense. Dropout makes the
    batch one share; its products are small, so the dense pairs cut them into parts for the
    engine's threads (BLAS on one thread). Same pass as the plain layers, dropout masks too."""
    head = minixcept.Sequential([L.Dense(256, activation='relu'), L.Dropout(0.5), L.Dense(1)], input_shape=(512,))
    randomise(head, rng)
    engine = GradientEngine(head, threads=2)
    plan = engine._plan(True, None, None)
    assert [type(step).__name__ for step in plan.steps] == ['FastStep', 'PlainStep', 'FastStep']
    seen = []
    real_each = Workers.each

    def each(workers, function, items):
        seen.append((workers.threads, len(items)))
        return real_each(workers, function, items)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    dy = rng.standard_normal((32, 1)).astype(np.float32)
    minixcept.set_seed(3)
    expected = run_plain(copy.deepcopy(head), x, dy, training=True)
    minixcept.set_seed(3)
    monkeypatch.setattr(Workers, 'each', each)
    got = engine.forward(x, training=True), engine.backward(dy), {layer.name: dict(layer.grads) for layer in head.layers}
    assert_same_pass(got, expected, TOLERANCE)
    assert (2, 4) in seen                                 # the 256-wide products went out in four parts


@pytest.mark.parametrize('optimizer', [lambda: minixcept.optimizers.Adam(1e-3),
                                       lambda: minixcept.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                                       lambda: minixcept.optimizers.SGD(0.1, momentum=0.9),
                                       lambda: minixcept.optimizers.SGD(0.1)])
def test_optimizer_updates_in_slices_on_the_threads_give_the_same_numbers(monkeypatch, rng, optimizer):
    """``run_elementwise`` cuts a large parameter into slices for the threads (here slices of 1,000
    numbers, the last one short, over 4,250): three steps give exactly the numbers of the whole-
    array update, and a small parameter (the bias) runs whole."""
    monkeypatch.setattr(fastgrad, 'ELEMENTWISE_PART', 1000)
    head = minixcept.Sequential([L.Dense(50)], input_shape=(85,))
    randomise(head, rng)
    twin = copy.deepcopy(head)
    engine = GradientEngine(head, threads=2)
    calls = []
    real = engine.workers.each
    engine.workers.each = lambda function, items: (calls.append(len(items)), real(function, items))
    ours, theirs = optimizer(), optimizer()
    for _ in range(3):
        grads = [rng.standard_normal(w.shape).astype(np.float32) for w in head.get_weights()]
        for model in (head, twin):
            model.layers[0].grads = dict(zip(('kernel', 'bias'), (g.copy() for g in grads)))
        ours.apply_gradients(head.layers, run=engine.run_elementwise)
        theirs.apply_gradients(twin.layers)
    assert calls == [5, 5, 5]
    for a, b in zip(head.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_backward_needs_a_forward_first(rng):
    model = chain((6, 6, 3), L.Conv2D(4, 3), L.ReLU())
    engine = GradientEngine(model)
    with pytest.raises(RuntimeError, match='forward'):
        engine.backward(np.zeros((1, 4, 4, 4), np.float32))
    engine.forward(np.zeros((1, 6, 6, 3), np.float32))
    engine.backward(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match='forward'):               # the caches are spent
        engine.backward(np.zeros((1, 4, 4, 4), np.float32))


def test_wrong_input_shape_is_named(rng):
    model = chain((6, 6, 3), L.Conv2D(4, 3))
    with pytest.raises(minixcept.ShapeError, match=r'\(N, 6, 6, 3\)'):
        GradientEngine(model).forward(np.zeros((1, 5, 6, 3), np.float32))


@pytest.mark.parametrize('threads', [1, 2])
def test_memory_is_reused_and_results_belong_to_the_caller(rng, threads):
    """After the first pass the buffer pools hold what a pass needs and stop growing; what
    forward and backward returned (and each layer's grads) is not pool memory, so the next
    pass leaves it alone."""
    model = randomise(chain((12, 12, 3), L.Conv2D(8, 3, padding='same'), L.BatchNormalization(), L.ReLU(),
                            L.SeparableConv2D(8, 3, padding='same'), L.BatchNormalization(),
                            L.MaxPooling2D(3, 2, padding='same'), L.ReLU(), L.SeparableConv2D(4, 3)), rng)
    engine = GradientEngine(model, threads=threads)
    x = rng.standard_normal((4, 12, 12, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 4, 4, 4)).astype(np.float32)
    y, dx = engine.forward(x), engine.backward(dy)
    grads = model.layers[0].grads['kernel']
    kept = y.copy(), dx.copy(), grads.copy()
    held = [pool.nbytes for pool in engine.buffers]
    assert min(held) > 0
    y2 = engine.forward(rng.standard_normal(x.shape).astype(np.float32))
    engine.backward(rng.standard_normal(dy.shape).astype(np.float32))
    assert [pool.nbytes for pool in engine.buffers] == held
    assert not np.allclose(y2, y)
    for array, copy_ in zip((y, dx, grads), kept):
        np.testing.assert_array_equal(array, copy_)


@pytest.mark.parametrize('threads', [1, 2])
def test_fan_out_gradients_add_and_shared_gradients_survive(rng, threads):
    """A graph where a tensor is read by a residual add and by a layer after it, and an add
    whose gradient goes on, one array, to both its inputs: the engine recycles spent gradients
    into its pool, and must never recycle one that an input still waits for. Compared with the
    plain pass in float64."""
    model = Model((8, 8, 3))
    a = model.add(L.Conv2D(4, 3, padding='same', name='a'))
    c = model.add(L.SeparableConv2D(4, 3, padding='same', name='c'), 'input')
    s = model.add(L.Add(name='s'), a, c)
    d = model.add(L.SeparableConv2D(4, 3, padding='same', name='d'), a)
    model.add(L.Add(name='out'), s, d)
    model.add(L.ReLU(name='relu'))
    model.add(L.SeparableConv2D(5, 3, name='last'))
    randomise(model, rng)
    for layer in model.layers:
        layer.astype('float64')
    x = rng.standard_normal((4, 8, 8, 3))
    dy = rng.standard_normal((4, 6, 6, 5))
    expected = run_plain(model, x, dy, training=False)
    assert_same_pass(run_engine(model, x, dy, False, threads), expected, FLOAT64_TOLERANCE)


@pytest.mark.parametrize('training', [False, True])
def test_engine_runs_on_every_backend(xp, rng, training):
    """On NumPy the fast pairs run; on CuPy every layer runs its own pair as one share. Either
    way the engine gives the plain pass's output, input gradient and weight gradients. (No
    bias before a batch-norm: with batch statistics its gradient is zero up to rounding.)"""
    model = randomise(chain((9, 9, 3), L.Conv2D(8, 3, padding='same', use_bias=False), L.BatchNormalization(),
                            L.ReLU(),
                            L.SeparableConv2D(8, 3, padding='same', use_bias=False), L.BatchNormalization(),
                            L.MaxPooling2D(3, 2, padding='same'), L.GlobalAveragePooling2D(), L.Dense(2)), rng)
    for layer in model.layers:
        layer.astype('float64')
        for name, value in layer.params.items():
            layer.params[name] = xp.asarray(value)
    x = xp.asarray(rng.standard_normal((4, 9, 9, 3)))
    dy = xp.asarray(rng.standard_normal((4, 2)))
    expected = run_plain(copy.deepcopy(model), x, dy, training)
    y, dx, grads = run_engine(model, x, dy, training, threads=2)
    assert type(y) is type(x) and type(dx) is type(x)
    numpy_pass = lambda p: (minixcept.asnumpy(p[0]), minixcept.asnumpy(p[1]),        # noqa: E731
                            {k: {n: minixcept.asnumpy(g) for n, g in v.items()} for k, v in p[2].items()})
    assert_same_pass(numpy_pass((y, dx, grads)), numpy_pass(expected), FLOAT64_TOLERANCE)
