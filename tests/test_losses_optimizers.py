"""Losses and optimizers against Keras 3, and the losses' gradients by central differences.

Losses: BinaryCrossentropy and SparseCategoricalCrossentropy, from logits and from
probabilities, on typical predictions and on extreme ones: probabilities exactly at
Keras's clip boundaries (1e-7 and 1 - 1e-7 in float32), just inside and beyond them,
and logits large enough to overflow a naive exp. The mean loss and its gradient are
compared over the batch, and then each example alone (a batch of one), so that the
huge gradients near the clip cannot hide an error on an ordinary example.

Optimizers: a few steps of SGD (with and without momentum, Nesterov) and Adam on the
same weights and the same gradients as keras.optimizers.
"""
import numpy as np
import pytest

from conftest import relative_error
from minixcept import asnumpy, gradcheck, losses
from minixcept import layers as L
from minixcept import optimizers
from reference import make_layers

FORWARD_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = 5e-5
LOSSES = {'binary': losses.BinaryCrossentropy, 'sparse': losses.SparseCategoricalCrossentropy}


def close(ours, reference, tolerance):
    """relative_error within tolerance. Where Keras gives exactly zero (a gradient the clip
    stopped, or a value below float32's smallest normal number, which TensorFlow flushes to
    zero and NumPy keeps), ours must be below that smallest normal number too."""
    if not np.any(reference):
        return float(np.abs(asnumpy(ours)).max()) < np.finfo(np.float32).tiny
    return relative_error(ours, reference) <= tolerance


# -- losses against Keras ----------------------------------------------------------------

@pytest.mark.filterwarnings('error')        # no overflow warnings from huge logits either
@pytest.mark.parametrize('case_id', make_layers.case_ids('losses'))
def test_loss_and_gradient_match_keras(case_id, expected, xp):
    loss_case = make_layers.case(case_id)
    inputs, reference = expected(case_id)
    loss = LOSSES[loss_case.kind](from_logits=loss_case.from_logits)

    value = loss.forward(xp.asarray(inputs['pred']), inputs['labels'])
    assert relative_error(value, reference['loss']) <= FORWARD_TOLERANCE
    assert close(loss.backward(), reference['dpred'], GRADIENT_TOLERANCE)

    for row in range(len(inputs['pred'])):
        value = loss.forward(xp.asarray(inputs['pred'][row:row + 1]), inputs['labels'][row:row + 1])
        assert close(value, reference['losses'][row], FORWARD_TOLERANCE), \
            f"example {row}: prediction {inputs['pred'][row]}, label {inputs['labels'][row]}"
        assert close(loss.backward(), reference['dpreds'][row:row + 1], GRADIENT_TOLERANCE), \
            f"example {row}: prediction {inputs['pred'][row]}, label {inputs['labels'][row]}"


def test_extreme_cases_reach_the_clip():
    """The probability cases hold values at, inside and beyond both clip boundaries."""
    for case_id in ('losses/binary_probabilities_extreme', 'losses/sparse_probabilities_extreme'):
        pred = make_layers.expected(case_id)[0]['pred']
        for boundary in (np.float32(1e-7), np.float32(1 - 1e-7)):
            assert (pred == boundary).any() and (pred < boundary).any() and (pred > boundary).any()


# -- loss gradients by central differences -----------------------------------------------

@pytest.mark.parametrize('kind', ['binary', 'sparse'])
@pytest.mark.parametrize('from_logits', [True, False], ids=['logits', 'probabilities'])
def test_loss_gradient_matches_central_differences(kind, from_logits, xp):
    """Away from the clip boundaries, where the loss is smooth, in float64."""
    rng = np.random.default_rng(8)
    if kind == 'binary':
        labels = rng.integers(0, 2, (6, 1)).astype(np.float64)
        pred = rng.standard_normal((6, 1)) if from_logits else rng.uniform(0.05, 0.95, (6, 1))
    else:
        labels = rng.integers(0, 4, 6)
        pred = rng.standard_normal((6, 4)) if from_logits else rng.uniform(0.05, 0.95, (6, 4))
    pred = xp.asarray(pred)
    loss = LOSSES[kind](from_logits=from_logits)
    dout = float(rng.standard_normal())          # the upstream gradient of a scalar is a scalar
    errors = gradcheck.check_gradients(lambda: loss.forward(pred, labels),
                                       lambda d: {'pred': d * loss.backward()}, {'pred': pred}, dout)
    assert errors['pred'] < 1e-6, errors


# -- optimizers against Keras ------------------------------------------------------------

@pytest.mark.parametrize('case_id', make_layers.case_ids('optimizers'))
def test_optimizer_steps_match_keras(case_id, expected, xp):
    """The same start and the same gradients; after every step, the weights and the total
    change since the start (a small number that the weights alone would hide)."""
    optimizer_case = make_layers.case(case_id)
    inputs, reference = expected(case_id)
    layer = L.Dense(3)
    layer.build((None, 4))
    layer.set_weights([inputs['w0'], inputs['w1']])
    optimizer = getattr(optimizers, optimizer_case.optimizer)(**optimizer_case.args)
    for step in range(optimizer_case.steps):
        layer.grads = {'kernel': xp.asarray(inputs[f'g0_step{step}']), 'bias': xp.asarray(inputs[f'g1_step{step}'])}
        optimizer.apply_gradients([layer])
        for i, weight in enumerate(layer.get_weights()):
            keras_weight = reference[f'w{i}_step{step}']
            assert relative_error(weight, keras_weight) <= FORWARD_TOLERANCE, f'step {step}, w{i}'
            assert relative_error(weight - inputs[f'w{i}'], keras_weight - inputs[f'w{i}']) <= GRADIENT_TOLERANCE, \
                f'step {step}, w{i}: the change since the start'


def test_optimizer_skips_frozen_layers(xp):
    layer = L.Dense(2, trainable=False)
    layer.build((None, 3))
    before = layer.get_weights()
    layer.grads = {'kernel': xp.ones((3, 2), np.float32), 'bias': xp.ones(2, np.float32)}
    optimizers.SGD(learning_rate=0.1).apply_gradients([layer])
    for old, new in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(old, new)
