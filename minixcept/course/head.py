"""Exercise on the head's loss: binary cross-entropy from a logit, forward and backward
(tour chapter 7).

The learner writes

    binary_crossentropy(logits, labels) -> (loss, dlogits)
        logits (N, 1), labels (N, 1) of 0 and 1; loss the mean over the batch (a number),
        dlogits = d loss / d logits (N, 1)

which is what the textbook's loss object gives, forward then backward
(``minixcept/losses.py``, ``BinaryCrossentropy(from_logits=True)``); the model answer is the
two-line adapter ``binary_crossentropy_from_logits`` below. With p = sigmoid(z):

    loss_i = -(y log p + (1 - y) log(1 - p)) = max(z, 0) - z y + log(1 + exp(-|z|))
    loss = mean_i loss_i,   d loss / d z_i = (sigmoid(z_i) - y_i) / N

Cases: TensorFlow's stored results (tests/reference/layers_losses.npz) on ten typical logits,
then fourteen extreme ones (0, +-17, +-30, +-100 with both labels), where the textbook
formula through log(sigmoid(z)) overflows to inf or nan in float32 and float64 alike. A
wrong result is compared with what the classic mistakes give: the gradient not divided by
the batch size, its sign flipped, the sigmoid left out of it, the loss summed instead of
averaged.
"""
import numpy as np

from ..losses import BinaryCrossentropy
from . import grader
from .grader import FORWARD_TOLERANCE, GRADIENT_TOLERANCE, Wrong

MODEL_ANSWER = ('minixcept.course.head.binary_crossentropy_from_logits (the textbook\'s '
                'minixcept.losses.BinaryCrossentropy(from_logits=True): forward, then backward)')
#: the stored TensorFlow cases: name -> description
TENSORFLOW_CASES = {
    'binary_logits_typical': "TensorFlow, 10 typical logits in [-3.2, 1.9]",
    'binary_logits_extreme': "TensorFlow, 14 extreme logits (0, +-17, +-30, +-100, both labels)",
}


def binary_crossentropy_from_logits(logits, labels):
    """The model answer: the textbook's loss object, forward then backward -> (loss, dlogits)."""
    loss = BinaryCrossentropy(from_logits=True)
    return loss.forward(logits, labels), loss.backward()


# -- what the classic mistakes give -------------------------------------------------------

def _sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))          # 1 / (1 + exp(-z)) without overflow


def _gradient_mistakes(z, y):
    n = z.size
    p = _sigmoid(z)
    return [
        ("the gradient not divided by the batch size N (sigmoid(z) - y for each example; the "
         f"loss is a mean over the {n} examples, so each gets 1/{n} of it)", p - y),
        ("the sign flipped (y - sigmoid(z)); d loss / dz is (sigmoid(z) - y) / N: a logit too "
         "high for its label gets a positive gradient, so a step against it lowers the logit", (y - p) / n),
        ("the sigmoid left out of the gradient ((z - y) / N); the loss reads the probability "
         "sigmoid(z), so dloss/dz = (sigmoid(z) - y) / N", (z - y) / n),
    ]


def _loss_mistakes(z, y):
    stable = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    return [(f"the loss summed over the batch, not averaged (Keras's loss is the mean over the "
             f"{z.size} examples)", stable.sum())]


def _number(value, name):
    """The learner's loss as one float, or Wrong saying what came back."""
    try:
        array = np.asarray(value, dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        raise Wrong(f"{name} is not a number ({type(value).__name__}).") from None
    if array is None or array.size != 1:
        got = 'None' if array is None else f'an array of shape {array.shape}'
        raise Wrong(f"{name} should be one number (the mean over the batch), got {got}.")
    return float(array.reshape(()))


def _overflow(value, z, what):
    """Wrong naming the overflow when ``value`` holds inf or nan."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return                                     # not numbers: grader.compare says so
    if np.isfinite(array).all():
        return
    bad = array.reshape(-1)[~np.isfinite(array.reshape(-1))][0] if array.ndim else float(array)
    large = np.abs(z).max()
    where = '' if not array.ndim else f" at {[int(i) for i in np.argwhere(~np.isfinite(array))[0]]}"
    raise Wrong(f"{what} is {bad}{where}, where TensorFlow gives a finite number (the largest |z| "
                f"here is {large:g}).\nYour result is exactly what the naive formula gives: "
                f"-(y log(sigmoid(z)) + (1 - y) log(1 - sigmoid(z))) overflows - sigmoid(z) rounds to "
                f"1 (or 0) at large |z|, log(0) = -inf, and inf * 0 = nan; exp(-z) itself overflows "
                f"at z = -100 in float32. Write it as max(z, 0) - z y + log(1 + exp(-|z|)) "
                f"(np.log1p), which never takes exp of a positive number.")


def _compare_loss(got, want, mistakes):
    """Wrong unless the loss equals TensorFlow's to FORWARD_TOLERANCE (relative)."""
    if abs(got - want) <= FORWARD_TOLERANCE * max(abs(want), 1e-30):
        return
    message = f"loss is {got:.7g} where TensorFlow gives {want:.7g} (relative difference " \
              f"{abs(got - want) / abs(want):.2g}, allowed {FORWARD_TOLERANCE:g})."
    for description, wrong in mistakes:
        if abs(got - wrong) <= FORWARD_TOLERANCE * abs(want):
            raise Wrong(f"{message}\nYour result is exactly what {description} gives.")
    raise Wrong(message + "\nHint: loss_i = max(z, 0) - z y + log(1 + exp(-|z|)); the loss is their mean.")


def check_binary_crossentropy(binary_crossentropy):
    """Grade ``binary_crossentropy(logits, labels) -> (loss, dlogits)``: logits and labels
    (N, 1), loss the batch mean, dlogits its gradient (N, 1)."""
    cases = []
    for name, description in TENSORFLOW_CASES.items():
        def run(name=name):
            inputs, outputs = grader.fixture('layers_losses', name)
            z, y = inputs['pred'], inputs['labels']                     # float32, as TensorFlow had them
            result = grader.call(binary_crossentropy, z.copy(), y.copy())
            loss, dlogits = grader.parts(result, ('loss', 'dlogits'))
            z64, y64 = z.astype(np.float64), y.astype(np.float64)
            loss = _number(loss, 'loss')
            _overflow(loss, z64, 'loss')
            _compare_loss(loss, float(outputs['loss']), _loss_mistakes(z64, y64))
            _overflow(dlogits, z64, 'dlogits')
            grader.compare('dlogits', dlogits, outputs['dpred'], GRADIENT_TOLERANCE, layout='NK',
                           mistakes=_gradient_mistakes(z64, y64),
                           hint=lambda index, shape: f"d loss / dz_i = (sigmoid(z_i) - y_i) / N; "
                                                     f"here z = {z64[index]:g}, y = {y64[index]:g}.")
        cases.append((description, run))
    return grader.grade('binary cross-entropy from logits', cases, MODEL_ANSWER)


# The model answer, for the tests and the tour.
model_answers = {check_binary_crossentropy: binary_crossentropy_from_logits}
