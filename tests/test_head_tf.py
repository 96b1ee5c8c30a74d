"""The classification head of the cat/dog recipe against Keras 3: loss and every weight gradient.

    Dense(256) -> ReLU -> Dropout(0.5) -> Dense(1) with BinaryCrossentropy,
    Dense(256) -> ReLU -> Dropout(0.5) -> Dense(3) with SparseCategoricalCrossentropy,

each ending either in logits (from_logits=True) or in a sigmoid / softmax
(from_logits=False), built with minixcept.Sequential on the weights and data of
tests/reference/make_layers.py, against the stored Keras results and, when
TensorFlow is installed, against Keras run now.

Dropout: the two libraries draw masks from different random generators, so the
'inference' cases run with training=False (dropout passes everything through) and
the 'training' cases replay the mask Keras drew (read off its dropout output) in
minixcept's Dropout, which makes the two computations identical.

Keras, handed a sigmoid or softmax output with from_logits=False, quietly computes
the loss from the logits behind it; minixcept computes it from the probabilities.
The two agree to float32 rounding while no probability reaches the clip at 1e-7.
"""
import pytest

from conftest import relative_error
from minixcept import Sequential, losses
from minixcept import layers as L
from reference import make_layers
from test_layers_tf import ReplayedMask

FORWARD_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = 5e-5


def head_and_loss(head, inputs, keep):
    """The minixcept head with the stored weights, and its loss."""
    dropout = L.Dropout(head.rate)
    dropout.rng = ReplayedMask(keep)              # used only when training
    model = Sequential([L.Dense(head.hidden), L.ReLU(), dropout,
                        L.Dense(head.classes, activation=head.activation)], input_shape=(head.features,))
    model.layers[0].set_weights([inputs['w0'], inputs['w1']])
    model.layers[3].set_weights([inputs['w2'], inputs['w3']])
    loss_class = losses.BinaryCrossentropy if head.classes == 1 else losses.SparseCategoricalCrossentropy
    return model, loss_class(from_logits=head.from_logits)


@pytest.mark.parametrize('case_id', make_layers.case_ids('head'))
def test_head_loss_and_gradients_match_keras(case_id, expected, xp):
    head = make_layers.case(case_id)
    inputs, reference = expected(case_id)
    model, loss = head_and_loss(head, inputs, reference['keep'])

    predictions = model.forward(xp.asarray(inputs['x']), training=head.training)
    value = loss.forward(predictions, inputs['labels'])
    model.backward(loss.backward())

    errors = {'loss': relative_error(value, reference['loss'])}
    first, last = model.layers[0], model.layers[3]
    for i, (layer, name) in enumerate([(first, 'kernel'), (first, 'bias'), (last, 'kernel'), (last, 'bias')]):
        errors[f'{layer.name}.{name}'] = relative_error(layer.grads[name], reference[f'dw{i}'])
    assert errors.pop('loss') <= FORWARD_TOLERANCE
    assert max(errors.values()) <= GRADIENT_TOLERANCE, errors


def test_training_cases_drop_units_that_matter():
    """A replayed mask must drop some active ReLU units and keep others, or the training
    cases would test nothing the inference ones do not."""
    for case_id in make_layers.case_ids('head'):
        if make_layers.case(case_id).training:
            inputs, reference = make_layers.expected(case_id)
            active = inputs['x'] @ inputs['w0'] + inputs['w1'] > 0
            assert (active & ~reference['keep']).any() and (active & reference['keep']).any(), case_id
