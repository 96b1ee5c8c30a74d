"""The grader of the head's loss (minixcept/course/head.py): binary cross-entropy from a
logit, forward and backward. The textbook's loss object passes; each wrong answer below,
written as a learner writes it, fails with the case, the output and the mistake named."""
import numpy as np
import pytest

from minixcept import course
from minixcept.course.head import binary_crossentropy_from_logits


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def stable_loss(z, y):
    return np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))


# -- right answers, written another way --------------------------------------------------

def right_by_hand(z, y):
    """The stable form and (sigmoid(z) - y) / N, in NumPy."""
    return stable_loss(z, y), (sigmoid(z) - y) / z.size


# -- wrong answers a learner writes --------------------------------------------------------

def naive_formula(z, y):
    """-(y log p + (1 - y) log(1 - p)): fine on typical logits, inf/nan at |z| = 100."""
    p = sigmoid(z)
    return np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))), (p - y) / z.size


def naive_softplus(z, y):
    """y log(1 + e^-z) + (1 - y) log(1 + e^z): exp(100) overflows in float32."""
    return np.mean(y * np.log(1 + np.exp(-z)) + (1 - y) * np.log(1 + np.exp(z))), (sigmoid(z) - y) / z.size


def gradient_not_averaged(z, y):
    return stable_loss(z, y), sigmoid(z) - y


def gradient_sign_flipped(z, y):
    return stable_loss(z, y), (y - sigmoid(z)) / z.size


def gradient_without_sigmoid(z, y):
    return stable_loss(z, y), (z - y) / z.size


def loss_summed(z, y):
    return stable_loss(z, y) * z.size, (sigmoid(z) - y) / z.size


def gradient_flattened(z, y):
    return stable_loss(z, y), ((sigmoid(z) - y) / z.size).ravel()


def test_the_model_answer_and_a_hand_written_one_pass():
    with np.errstate(all='ignore'):
        for answer in (binary_crossentropy_from_logits, right_by_hand):
            verdict = course.check_binary_crossentropy(answer)
            assert verdict, str(verdict)
            assert 'correct - all 2 cases pass' in str(verdict)


WRONG = [
    (naive_formula, ['extreme logits', 'loss is', 'naive formula', 'max(z, 0) - z y + log(1 + exp(-|z|))']),
    (naive_softplus, ['extreme logits', 'loss is nan', 'exp(-z) itself overflows']),
    (gradient_not_averaged, ['typical logits', 'dlogits differs at [0, 0]', 'not divided by the batch size']),
    (gradient_sign_flipped, ['typical logits', 'dlogits differs', 'sign flipped']),
    (gradient_without_sigmoid, ['typical logits', 'dlogits differs', 'sigmoid left out']),
    (loss_summed, ['typical logits', 'loss is', 'summed over the batch']),
    (gradient_flattened, ['dlogits has shape (10,), expected (10, 1)']),
]


@pytest.mark.parametrize('wrong, words', WRONG, ids=[w[0].__name__ for w in WRONG])
def test_each_classic_mistake_fails_with_its_place_named(wrong, words):
    with np.errstate(all='ignore'):
        verdict = course.check_binary_crossentropy(wrong)
    assert not verdict
    text = str(verdict)
    for word in words:
        assert word in text, text
    assert 'Model answer: minixcept.course.head.binary_crossentropy_from_logits' in text


def test_the_naive_formula_passes_the_typical_case_first():
    """The overflow is caught by the extreme case alone: on typical logits the naive
    formula is right, so the verdict counts one case passed."""
    with np.errstate(all='ignore'):
        verdict = course.check_binary_crossentropy(naive_formula)
    assert '(1 case(s) passed before it)' in str(verdict)


def test_an_unwritten_function_is_said_so():
    def stub(z, y):
        raise NotImplementedError
    assert 'not written yet' in str(course.check_binary_crossentropy(stub))
