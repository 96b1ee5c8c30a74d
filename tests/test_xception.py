"""Xception as a whole: the real ImageNet weights against stored Keras activations and
gradients, parameter and multiply-add counts, the summary, shape errors, both backends.

The stored references (tests/reference/network_*.npz) were made by make_network.py with
TensorFlow alone; test_xception_tf.py repeats every comparison live and in full.
"""
import sys

import numpy as np
import pytest

import minixcept
from conftest import REFERENCE_DIR, relative_error

sys.path.insert(0, str(REFERENCE_DIR))
import make_any_size as any_size  # noqa: E402
import make_network as reference  # noqa: E402  (no TensorFlow at import: constants and photo loading)

# The bar for the whole network with real weights in float32, at every named layer (README, "How it is checked").
WHOLE_NETWORK_TOLERANCE = 1e-4
# Whole-network gradients are compared in float64 (make_network.py says why not float32):
# there the two implementations agree to about 4e-14, so anything above 1e-10 is a bug.
FLOAT64_TOLERANCE = 1e-10

FULL_SHAPE = (reference.FULL_SIDE, reference.FULL_SIDE, 3)
SMALL_SHAPE = (reference.SMALL_SIDE, reference.SMALL_SIDE, 3)


# -- helpers shared with test_xception_tf.py --------------------------------------------
def assert_within(errors, what, tolerance=WHOLE_NETWORK_TOLERANCE):
    """Assert every {name: relative error} is within tolerance; print and report the worst."""
    name, error = max(errors.items(), key=lambda item: item[1])
    print(f'\n{what}: worst relative error {error:.2e} at {name} ({len(errors)} compared)')
    failing = {k: f'{v:.2e}' for k, v in errors.items() if not v <= tolerance}
    assert not failing, f'{what}: above {tolerance:g} at {failing}; worst {error:.2e} at {name}'


def as_float64(model):
    """The model with every parameter in float64 (inputs must then be float64 too)."""
    for layer in model.layers:
        layer.astype(np.float64)
    return model


def stored(name):
    with np.load(REFERENCE_DIR / f'network_{name}.npz') as arrays:
        return dict(arrays)


# -- the real weights against stored Keras results -----------------------------------
def assert_matches_forward_summary(model, expected, what):
    """Every one of the 131 named layers of ``model`` on the fixture's photo against the
    statistics and corner slice Keras stored (make_network.forward_summary), and the 2048
    average-pooled features in full.

    |mean(a) - mean(b)|, |std(a) - std(b)|, |max|a| - max|b|| and the corner's largest
    difference are each at most max |a - b|, so each must be within 1e-4 * max |b|.
    """
    x = minixcept.backend.to_device(minixcept.preprocess_input(expected['image']))
    with minixcept.no_grad():
        _, activations = model.forward(x, capture='all')
    assert list(activations) == list(expected['names'])
    assert len(activations) == 131

    errors = {}
    for i, name in enumerate(map(str, expected['names'])):
        ours = minixcept.asnumpy(activations[name]).astype(np.float64)
        differences = (abs(ours.mean() - expected['mean'][i]), abs(ours.std() - expected['std'][i]),
                       abs(np.abs(ours).max() - expected['max_abs'][i]),
                       np.abs(ours[reference.FORWARD_SLICE] - expected['corner'][i]).max())
        errors[name] = max(differences) / expected['max_abs'][i]
    pooled = activations['block14_sepconv2_act'].mean(axis=(1, 2))[0]
    errors['pooled features (2048)'] = relative_error(pooled, expected['pooled'])
    assert_within(errors, what)


@pytest.mark.slow
def test_every_layer_matches_stored_keras_activations(xp, notop_weights):
    """A cat photo at 299 px through the model built for 299 x 299."""
    expected = stored('forward')
    model = minixcept.Xception(include_top=False, weights=notop_weights, input_shape=FULL_SHAPE)
    assert_matches_forward_summary(model, expected, f"forward vs stored Keras ({expected['photo']})")


@pytest.mark.parametrize('height, width', any_size.SIZES)
def test_any_size_model_matches_stored_keras(xp, notop_weights, height, width):
    """The model built for any size (input_shape=None, as Keras's default without the top)
    on a photo at 224 x 224 and at 180 x 240, against Keras's model built the same way."""
    with np.load(REFERENCE_DIR / any_size.forward_fixture(height, width)) as arrays:
        expected = dict(arrays)
    assert expected['image'].shape == (1, height, width, 3)
    model = minixcept.Xception(include_top=False, weights=notop_weights, input_shape=None)
    assert model.input_shape == (None, None, 3)
    assert_matches_forward_summary(model, expected, f"any size, {height} x {width} vs stored Keras")


@pytest.mark.parametrize('training', [False, True], ids=['bn_inference', 'bn_training'])
def test_backward_matches_stored_gradient_tape(xp, training, notop_weights):
    """2 x 96 x 96 x 3 photos, a random gradient on block14_sepconv2_act, float64: the output,
    the input gradient and weight gradients from every flow; in training mode also the
    batch statistics behind three updated moving statistics."""
    expected = stored('backward_training' if training else 'backward_inference')
    model = as_float64(minixcept.Xception(include_top=False, weights=notop_weights, input_shape=SMALL_SHAPE))
    before = {name: model.get_layer(name).get_weights()[2:] for name in reference.MOVING_STATISTICS_OF}
    x = minixcept.preprocess_input(expected['images']).astype(np.float64)
    y = minixcept.asnumpy(model.forward(xp.asarray(x), training=training))
    dx = minixcept.asnumpy(model.backward(xp.asarray(expected['upstream'].astype(np.float64))))

    corner_difference = np.abs(y[reference.FORWARD_SLICE] - expected['output_corner']).max()
    errors = {'output corner': corner_difference / expected['output_max_abs'],
              'input gradient (sample)': relative_error(dx[reference.INPUT_GRADIENT_SAMPLE],
                                                        expected['dx_sample'])}
    for layer, weight, where in reference.GRADIENT_SAMPLES:
        ours = minixcept.asnumpy(model.get_layer(layer).grads[weight])[where]
        errors[f'{layer}/{weight}'] = relative_error(ours, expected[f'grad/{layer}/{weight}'])
    if training:
        momentum = model.get_layer('batch_normalization').momentum
        for name, (mean_before, variance_before) in before.items():
            layer = model.get_layer(name)
            for key, old in (('moving_mean', mean_before), ('moving_variance', variance_before)):
                # the batch statistic implied by the move: (new - momentum * old) / (1 - momentum)
                implied = lambda moved: (moved - momentum * old) / (1 - momentum)  # noqa: E731
                errors[f'{name}/{key}'] = relative_error(implied(minixcept.asnumpy(layer.params[key])),
                                                         implied(expected[f'{key}/{name}']))
    assert_within(errors, f"backward vs stored GradientTape, batch-norm {'training' if training else 'inference'}",
                  FLOAT64_TOLERANCE)


# -- counts and the summary ------------------------------------------------------------
@pytest.mark.parametrize('include_top, middle_blocks, key', [
    (True, 8, 'params_top'), (False, 8, 'params_notop'), (False, 12, 'params_middle12_notop')])
def test_parameter_counts_match_keras(include_top, middle_blocks, key):
    counts = stored('counts')
    model = minixcept.Xception(include_top=include_top, input_shape=FULL_SHAPE, middle_blocks=middle_blocks)
    assert model.count_params() == counts[key]
    if middle_blocks == 12:
        assert len(model.layers) == counts['layers_middle12_notop']


def test_keras_counts_are_the_published_ones():
    """The stored Keras counts are the ones Keras documents for Xception."""
    counts = stored('counts')
    assert (counts['params_top'], counts['params_notop']) == (22_910_480, 20_861_480)


def test_multiply_adds_match_keras():
    model = minixcept.Xception(include_top=True, input_shape=FULL_SHAPE)
    assert model.multiply_adds() == stored('counts')['multiply_adds_top']
    assert model.multiply_adds() == pytest.approx(8.36e9, rel=1e-3)


def test_summary_lists_every_layer_and_the_totals():
    counts = stored('counts')
    model = minixcept.Xception(include_top=True, input_shape=FULL_SHAPE)
    lines = []
    model.summary(print_fn=lines.append)
    text = '\n'.join(lines)
    for layer in model.layers:
        assert f'{layer.name} ({type(layer).__name__})' in text
    assert '(None, 10, 10, 2048)' in text                           # block14's output at 299 px
    assert f"Total params: {int(counts['params_top']):,}" in text
    assert f"{int(counts['multiply_adds_top']):,}" in lines[-1]


def any_size_counts():
    with np.load(REFERENCE_DIR / 'any_size_counts.npz') as arrays:
        return {key: arrays[key] for key in arrays}


@pytest.mark.parametrize('include_top, frozen, key', [
    (False, False, 'notop'), (True, False, 'top'), (False, True, 'notop_frozen_before_block14')])
def test_trainable_split_matches_keras(include_top, frozen, key):
    """Trainable / non-trainable counts as Keras's summary gives them: batch-norm's moving
    statistics are never trained, and a frozen layer trains nothing."""
    counts = any_size_counts()
    model = minixcept.Xception(include_top=include_top, middle_blocks=8)
    if frozen:
        for layer in model.layers[:model.layers.index(model.get_layer(any_size.FROZEN_BEFORE))]:
            layer.trainable = False
    split = (model.count_params(trainable=True), model.count_params(trainable=False))
    assert split == (counts[f'trainable_{key}'], counts[f'non_trainable_{key}'])
    assert sum(split) == model.count_params()
    lines = []
    model.summary(print_fn=lines.append)
    assert f'Trainable params: {split[0]:,}' in lines and f'Non-trainable params: {split[1]:,}' in lines


def test_notop_split_is_the_published_one():
    """The stored Keras split is the one the issue quotes from Keras's summary."""
    counts = any_size_counts()
    assert (counts['trainable_notop'], counts['non_trainable_notop']) == (20_806_952, 54_528)


def test_input_shape_none_decides_as_keras_default():
    """input_shape=None: (None, None, 3) without the top, (299, 299, 3) with it, as Keras decides;
    left out, it is the documented 299 x 299 either way."""
    counts = any_size_counts()
    notop = minixcept.Xception(include_top=False, input_shape=None)
    top = minixcept.Xception(include_top=True, input_shape=None)
    assert minixcept.Xception(include_top=False).input_shape == (299, 299, 3)
    assert [str(side) for side in notop.input_shape] == list(counts['notop_input_shape'])
    assert top.input_shape == tuple(counts['top_input_shape'])
    assert minixcept.Xception(include_top=False, input_shape=(None, None, 3)).input_shape == (None, None, 3)
    assert notop.output_shape() == (None, None, None, 2048)
    assert notop.output_shape('block1_conv1') == (None, None, None, 32)
    assert minixcept.Xception(include_top=False, input_shape=(None, 150, 3)).output_shape() == (None, None, 5, 2048)


def test_summary_of_the_any_size_model():
    """None for the free sizes; multiply-adds only for a size passed in, equal to Keras's there."""
    counts = any_size_counts()
    model = minixcept.Xception(include_top=False, input_shape=None)
    lines = []
    model.summary(print_fn=lines.append)
    text = '\n'.join(lines)
    assert '(None, None, None, 2048)' in text and 'Mult-adds' not in lines[2]
    assert 'input_size' in lines[-1]
    with pytest.raises(minixcept.ShapeError, match='input_size'):
        model.multiply_adds()

    expected = int(counts['multiply_adds_notop_180x240'])
    assert model.multiply_adds((180, 240)) == model.multiply_adds((180, 240, 3)) == expected
    lines = []
    model.summary(print_fn=lines.append, input_size=(180, 240))
    text = '\n'.join(lines)
    assert '(None, 6, 8, 2048)' in text and 'Mult-adds' in lines[2]
    assert f'{expected:,}' in lines[-1] and '(180, 240, 3)' in lines[-1]
    assert model.multiply_adds(299) == model.multiply_adds((299, 299))
    with pytest.raises(minixcept.ShapeError, match=r'\(1, 70, 240, 3\)|\(None, 70, 240, 3\)'):
        model.multiply_adds((70, 240))


# -- wrong shapes ----------------------------------------------------------------------
@pytest.mark.parametrize('input_shape, shown', [
    ((70, 299, 3), '(70, 299, 3)'),          # a side below 71
    ((299, 64, 3), '(299, 64, 3)'),
    ((299, 299, 1), '(299, 299, 1)'),        # one channel
    ((299, 299), '(299, 299)'),              # not (height, width, channels)
])
def test_constructor_rejects_shapes_keras_rejects(input_shape, shown):
    with pytest.raises(minixcept.ShapeError) as error:
        minixcept.Xception(include_top=False, input_shape=input_shape)
    message = str(error.value)
    assert shown in message                                          # what it got
    assert '(height, width, 3)' in message and '71' in message      # what it takes
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize('batch_shape', [
    (71, 71, 3),             # no batch axis
    (1, 1, 71, 71, 3),       # one axis too many
    (1, 71, 71, 4),          # four channels
    (1, 70, 71, 3),          # a side below the model's (and below 71)
])
def test_forward_names_the_shape_received_and_expected(xp, batch_shape):
    model = minixcept.Xception(include_top=False, input_shape=(71, 71, 3))
    with pytest.raises(minixcept.ShapeError) as error:
        model.forward(xp.zeros(batch_shape, dtype=xp.float32))
    message = str(error.value)
    assert str(batch_shape) in message
    assert '(N, 71, 71, 3)' in message


@pytest.mark.parametrize('include_top, input_shape, weights, shown', [
    (True, (None, None, 3), None, 'needs a fixed input size'),       # Keras: the top needs a static shape
    (True, (224, 224, 3), 'imagenet', '(299, 299, 3)'),              # the ImageNet top takes 299 only
    (False, (None, 64, 3), None, '(None, 64, 3)'),
])
def test_constructor_rejects_what_keras_rejects_with_free_sizes(include_top, input_shape, weights, shown):
    with pytest.raises(minixcept.ShapeError) as error:
        minixcept.Xception(include_top=include_top, weights=weights, input_shape=input_shape)
    assert shown in str(error.value)


@pytest.mark.parametrize('batch_shape', [(1, 70, 71, 3), (1, 71, 70, 3), (1, 70, 70, 3), (1, 71, 71, 4)])
def test_any_size_model_rejects_sides_below_71_when_called(xp, batch_shape):
    model = minixcept.Xception(include_top=False, input_shape=None)
    with pytest.raises(minixcept.ShapeError) as error:
        model.forward(xp.zeros(batch_shape, dtype=xp.float32))
    message = str(error.value)
    assert str(batch_shape) in message and '(N, None, None, 3)' in message
    if batch_shape[-1] == 3:
        assert '>= 71' in message


@pytest.mark.parametrize('height, width', [(71, 71), (71, 90)])
def test_any_size_model_runs_from_71(xp, height, width):
    """The smallest side Keras takes, on both the plain layers and the inference engine."""
    model = minixcept.Xception(include_top=False, pooling='avg', input_shape=None)
    x = xp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, height, width, 3)).astype(np.float32))
    with minixcept.no_grad():
        y, captured = model.forward(x, capture=['block14_sepconv2_act'])
    assert captured['block14_sepconv2_act'].shape == (1, 3, -(-width // 32), 2048)
    assert y.shape == (1, 2048)
    np.testing.assert_allclose(model.predict(minixcept.asnumpy(x)), minixcept.asnumpy(y), rtol=1e-4, atol=1e-5)


# -- finding layers and setting weights -------------------------------------------------
def test_get_layer_of_an_unknown_name_lists_the_closest():
    model = minixcept.Xception(include_top=False, middle_blocks=1)
    with pytest.raises(KeyError) as error:
        model.get_layer('block1_conv_bn')
    message = str(error.value)
    assert "'block1_conv_bn'" in message and "'block1_conv1_bn'" in message and "'block1_conv2_bn'" in message
    with pytest.raises(KeyError) as error:
        model.get_layer('predictions')              # nothing close: no suggestions
    assert 'closest' not in str(error.value)
    assert model.get_layer('block1_conv1_bn').name == 'block1_conv1_bn'


@pytest.fixture
def two_models():
    """Two small Xceptions with different random weights (middle flow of one block)."""
    minixcept.set_seed(1)
    first = minixcept.Xception(include_top=True, classes=3, input_shape=(71, 71, 3), middle_blocks=1)
    second = minixcept.Xception(include_top=True, classes=3, input_shape=(71, 71, 3), middle_blocks=1)
    return first, second


def assert_weights_equal(ours, expected):
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        np.testing.assert_array_equal(a, b)


def test_set_weights_round_trip(xp, two_models):
    source, target = two_models
    weights = source.get_weights()
    assert len(weights) == sum(len(layer.weight_names) for layer in source.layers)
    assert not np.array_equal(weights[0], target.get_weights()[0])
    target.set_weights(weights)
    assert_weights_equal(target.get_weights(), weights)
    x = xp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32))
    np.testing.assert_array_equal(minixcept.asnumpy(target.forward(x)), minixcept.asnumpy(source.forward(x)))
    for layer in target.layers:
        assert all(isinstance(p, xp.ndarray) and p.dtype == np.float32 for p in layer.params.values())


def test_set_weights_casts_numbers_as_keras_does(two_models):
    source, target = two_models
    target.set_weights([w.astype(np.float64) for w in source.get_weights()])
    assert all(w.dtype == np.float32 for w in target.get_weights())
    assert_weights_equal(target.get_weights(), source.get_weights())


@pytest.mark.parametrize('change, error, shown', [
    (lambda w: w[:-1], minixcept.ShapeError, 'got a list of'),                          # one array short
    (lambda w: w + [w[-1]], minixcept.ShapeError, 'got a list of'),                     # one too many
    (lambda w: w[:-1] + [w[-1][:2]], minixcept.ShapeError, "'predictions' 'bias'"),     # the last one's shape
    (lambda w: [w[0].transpose(0, 1, 3, 2)] + w[1:], minixcept.ShapeError, "'block1_conv1' 'kernel'"),
    (lambda w: w[:-1] + [w[-1].astype(np.complex64)], TypeError, "'predictions' 'bias'"),
    (lambda w: w[:-1] + [np.array(['a', 'b', 'c'])], TypeError, "'predictions' 'bias'"),
], ids=['count_short', 'count_long', 'shape_last', 'shape_first', 'complex', 'strings'])
def test_set_weights_mismatch_sets_nothing(two_models, change, error, shown):
    """Every array is checked before any is set: a mismatch at the last weight leaves the
    first layers as they were."""
    source, target = two_models
    before = target.get_weights()
    with pytest.raises(error) as raised:
        target.set_weights(change(source.get_weights()))
    assert shown in str(raised.value) and "'xception'" in str(raised.value)
    assert_weights_equal(target.get_weights(), before)


def test_capturing_an_unknown_layer_raises_key_error(xp):
    model = minixcept.Xception(include_top=False, input_shape=(71, 71, 3))
    with pytest.raises(KeyError, match='block15_sepconv1'):
        model.forward(xp.zeros((1, 71, 71, 3), dtype=xp.float32), capture=['block1_conv1', 'block15_sepconv1'])


# -- either backend ----------------------------------------------------------------------
def test_runs_forward_and_backward_on_the_backend(xp):
    """Everything the model hands back lives on the backend of its input."""
    minixcept.set_seed(0)
    model = minixcept.Xception(include_top=True, input_shape=(71, 71, 3), classes=5)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32))
    y, captured = model.forward(x, training=True, capture=['block1_conv1_act', 'add_11', 'avg_pool'])
    assert isinstance(y, xp.ndarray) and y.shape == (2, 5) and y.dtype == np.float32
    assert {name: tuple(a.shape) for name, a in captured.items()} == {
        'block1_conv1_act': (2, 35, 35, 32), 'add_11': (2, 3, 3, 1024), 'avg_pool': (2, 2048)}
    assert all(isinstance(a, xp.ndarray) for a in captured.values())
    np.testing.assert_allclose(minixcept.asnumpy(y).sum(axis=1), 1, rtol=1e-5)     # softmax rows

    dx = model.backward(xp.asarray(rng.standard_normal((2, 5)).astype(np.float32)))
    assert isinstance(dx, xp.ndarray) and dx.shape == x.shape
    for layer in model.layers:
        for name, grad in layer.grads.items():
            assert isinstance(grad, xp.ndarray), f'{layer.name}/{name}'
            assert grad.shape == layer.params[name].shape, f'{layer.name}/{name}'
    assert set(model.get_layer('predictions').grads) == {'kernel', 'bias'}
    assert np.isfinite(minixcept.asnumpy(dx)).all()
