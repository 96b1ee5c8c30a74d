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
@pytest.mark.slow
def test_every_layer_matches_stored_keras_activations(xp, notop_weights):
    """A cat photo at 299 px: every one of the 131 named layers, by the statistics and the
    corner slice Keras stored, and the 2048 average-pooled features in full.

    |mean(a) - mean(b)|, |std(a) - std(b)|, |max|a| - max|b|| and the corner's largest
    difference are each at most max |a - b|, so each must be within 1e-4 * max |b|.
    """
    expected = stored('forward')
    model = minixcept.Xception(include_top=False, weights=notop_weights, input_shape=FULL_SHAPE)
    x = xp.asarray(minixcept.preprocess_input(expected['image']))
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
    assert_within(errors, f"forward vs stored Keras ({expected['photo']})")


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
