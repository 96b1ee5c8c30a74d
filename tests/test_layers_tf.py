"""Every layer against TensorFlow/Keras 3 in float32.

Each case of tests/reference/make_layers.py runs twice: against the results
stored in layers_<family>.npz, and against Keras run now on the same stored
inputs (skipped without TensorFlow locally, required in CI). The forward output
must be within 2e-5 and every gradient (input and each trained weight, of
<y, dy> for the stored random dy) within 5e-5, as max|a - b| / max|b|.
"""
import numpy as np
import pytest

from conftest import relative_error
from minixcept import layers as L
from reference import make_layers

FORWARD_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = 5e-5


class ReplayedMask:
    """Stands in for Dropout's random generator and draws Keras's mask again.

    Dropout keeps a value where ``rng.random(shape) >= rate``; this returns 1 where
    Keras kept one and 0 where it dropped one, so both libraries use the same mask.
    """

    def __init__(self, keep):
        self.keep = keep

    def random(self, shape):
        assert tuple(shape) == self.keep.shape
        return np.where(self.keep, 1.0, 0.0)


def minixcept_layer(layer_case, inputs):
    """The minixcept layer for a case, with the stored weights (Keras order)."""
    layer = getattr(L, layer_case.layer)(**layer_case.args)
    layer.build(layer_case.input_shape)
    layer.set_weights([inputs[f'w{i}'] for i in range(len(layer.weight_names))])
    return layer


def compare_layer(case_id, inputs, reference, xp):
    """{what: relative error} for the output, every gradient and any updated statistic."""
    layer_case = make_layers.case(case_id)
    layer = minixcept_layer(layer_case, inputs)
    if 'keep' in reference:
        layer.rng = ReplayedMask(reference['keep'])
    xs = [xp.asarray(inputs[name]) for name in layer_case.inputs]
    y = layer.forward(*xs, training=layer_case.training)
    errors = {'y': relative_error(y, reference['y'])}
    input_grads = layer.backward(xp.asarray(inputs['dy']))
    if len(xs) == 1:
        input_grads = (input_grads,)
    for name, grad in zip(layer_case.inputs, input_grads):
        errors[f'd{name}'] = relative_error(grad, reference[f'd{name}'])
    for i, name in enumerate(layer.weight_names):
        if f'dw{i}' in reference:
            errors[f'd{name}'] = relative_error(layer.grads[name], reference[f'dw{i}'])
    for name in ('moving_mean', 'moving_variance'):
        if name in reference:
            errors[name] = relative_error(layer.params[name], reference[name])
    return errors


@pytest.mark.parametrize('case_id', make_layers.case_ids(*make_layers.LAYER_CASES))
def test_layer_matches_keras(case_id, expected, xp):
    inputs, reference = expected(case_id)
    errors = compare_layer(case_id, inputs, reference, xp)
    gradient_errors = [error for what, error in errors.items() if what.startswith('d')]
    assert len(gradient_errors) == len([what for what in reference if what.startswith('d')]), \
        f'compared {sorted(errors)}, but Keras gave {sorted(reference)}'
    assert errors['y'] <= FORWARD_TOLERANCE, errors
    assert max(gradient_errors) <= GRADIENT_TOLERANCE, errors
    for statistic in ('moving_mean', 'moving_variance'):
        assert (statistic in errors) == (statistic in reference)
        assert errors.get(statistic, 0) <= FORWARD_TOLERANCE, errors


def test_max_pool_cases_would_fail_with_zero_padding():
    """The 'negative' max-pool cases are there to catch a zero pad: make sure they can."""
    for name in ('max_3x3_s2_same_odd', 'max_3x3_s2_same_even', 'max_2x2_same_odd'):
        inputs, reference = make_layers.expected(f'pooling/{name}')
        assert inputs['x'].max() < 0 and reference['y'].max() < 0


def test_dropout_training_case_keeps_and_drops():
    _, reference = make_layers.expected('dense/dropout_training')
    assert 0 < reference['keep'].sum() < reference['keep'].size
