"""The batch-norm backward check: it passes the textbook's own function and, for each classic
mistake written here on purpose as a learner would write it, fails with a message that names
the case, the output and the mistake."""
import numpy as np
import pytest

from minixcept import course
from minixcept.course.normalization import NUMERICAL_CASES
from minixcept.layers.normalization import batch_norm_backward


def _sums(dy, cache):
    x, gamma, mean, inv_std, batch_statistics = cache
    axes = tuple(range(x.ndim - 1))
    x_hat = (x - mean) * inv_std
    return axes, x.size // x.shape[-1], x_hat, dy.sum(axis=axes), (dy * x_hat).sum(axis=axes)


def _with_training_dx(training_dx):
    """A backward pass that is right at inference and uses ``training_dx`` in training mode."""
    def backward(dy, cache):
        x, gamma, mean, inv_std, batch_statistics = cache
        axes, m, x_hat, dbeta, dgamma = _sums(dy, cache)
        if not batch_statistics:
            return dy * gamma * inv_std, dgamma, dbeta
        return training_dx(dy, gamma, inv_std, x_hat, dbeta, dgamma, m, axes), dgamma, dbeta
    return backward


# -- batch-norm backward passes as learners write them wrong ---------------------------------

without_the_mean_term = _with_training_dx(
    lambda dy, gamma, inv_std, x_hat, dbeta, dgamma, m, axes: gamma * inv_std / m * (m * dy - x_hat * dgamma))
without_the_variance_term = _with_training_dx(
    lambda dy, gamma, inv_std, x_hat, dbeta, dgamma, m, axes: gamma * inv_std / m * (m * dy - dbeta))
inference_formula_in_training = _with_training_dx(
    lambda dy, gamma, inv_std, x_hat, dbeta, dgamma, m, axes: dy * gamma * inv_std)
unbiased_variance_derivative = _with_training_dx(
    lambda dy, gamma, inv_std, x_hat, dbeta, dgamma, m, axes:
        gamma * inv_std * (dy - dbeta / m - x_hat * dgamma / (m - 1)))
without_one_over_m = _with_training_dx(
    lambda dy, gamma, inv_std, x_hat, dbeta, dgamma, m, axes: gamma * inv_std * (m * dy - dbeta - x_hat * dgamma))


def dgamma_without_x_hat(dy, cache):
    dx, _, dbeta = batch_norm_backward(dy, cache)
    return dx, dbeta.copy(), dbeta                           # sum(dy): the x_hat forgotten


def x_hat_from_the_unbiased_variance(dy, cache):
    x, gamma, mean, inv_std, batch_statistics = cache
    if not batch_statistics:
        return batch_norm_backward(dy, cache)
    axes, m = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    inv_std = 1.0 / np.sqrt(x.var(axis=axes, ddof=1) + 1e-3)   # np.var's ddof=1: m - 1
    x_hat = (x - mean) * inv_std
    dbeta, dgamma = dy.sum(axis=axes), (dy * x_hat).sum(axis=axes)
    return gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma), dgamma, dbeta


def training_formula_always(dy, cache):
    x, gamma, mean, inv_std, _ = cache                        # the flag ignored
    return batch_norm_backward(dy, (x, gamma, mean, inv_std, True))


def sums_over_the_first_axis_only(dy, cache):
    dx, _, _ = batch_norm_backward(dy, cache)
    x, gamma, mean, inv_std, _ = cache
    return dx, (dy * (x - mean) * inv_std).sum(axis=0), dy.sum(axis=0)


def test_the_textbook_passes():
    verdict = course.check_batch_norm_backward(batch_norm_backward)
    assert verdict and 'correct - all 5 cases pass' in str(verdict)
    assert course.normalization.model_answers[course.check_batch_norm_backward] is batch_norm_backward


FIRST_CASE = 'Case TensorFlow, training mode, (2, 4, 4, 3) input'


@pytest.mark.parametrize('wrong, words', [
    (without_the_mean_term, [FIRST_CASE, 'dx differs at [0, 0, 0, 0]', 'leaving out the term through the mean']),
    (without_the_variance_term, [FIRST_CASE, 'dx differs', 'leaving out the term through the variance']),
    (inference_formula_in_training, [FIRST_CASE, 'dx differs', 'the inference formula in training mode']),
    (dgamma_without_x_hat, [FIRST_CASE, 'dgamma differs at [0] (channel 0 of 0..2)', 'dgamma = sum(dy)']),
    (unbiased_variance_derivative, [FIRST_CASE, 'dx differs', "unbiased variance, m - 1, in the variance's derivative"]),
    (x_hat_from_the_unbiased_variance, [FIRST_CASE, 'dx differs', 'x_hat recomputed with the unbiased variance']),
    (without_one_over_m, [FIRST_CASE, 'dx differs', 'leaving out the 1 / m']),
    (training_formula_always, ['2 case(s) passed', 'Case TensorFlow, inference mode', 'dx differs',
                               'the training formula at inference']),
    (sums_over_the_first_axis_only, [FIRST_CASE, 'dgamma has shape (4, 4, 3), expected (3,)', 'every axis but the last']),
])
def test_each_mistake_fails_and_is_named(wrong, words):
    verdict = course.check_batch_norm_backward(wrong)
    assert not verdict
    for word in words:
        assert word in str(verdict), (word, str(verdict))


def test_an_unnamed_mistake_gets_the_formula_as_a_hint():
    def dx_doubled(dy, cache):
        dx, dgamma, dbeta = batch_norm_backward(dy, cache)
        return 2 * dx, dgamma, dbeta
    text = str(course.check_batch_norm_backward(dx_doubled))
    assert FIRST_CASE in text and 'Hint: per channel, with g = dy * gamma' in text


def test_unwritten_and_wrong_kinds_of_answer_are_said_in_words():
    def unwritten(dy, cache):
        raise NotImplementedError
    assert 'not written yet' in str(course.check_batch_norm_backward(unwritten))
    assert 'expected 3 result(s), (dx, dgamma, dbeta)' in str(
        course.check_batch_norm_backward(lambda dy, cache: batch_norm_backward(dy, cache)[0]))


def test_the_numerical_cases_alone_catch_the_mistakes():
    """Without TensorFlow's fixtures, the float64 cases still tell the mistakes apart from the
    right answer (their dy is random: with dy = 1 the training dx is 0 for several of them)."""
    from minixcept.course import normalization
    saved = normalization.TENSORFLOW_CASES
    normalization.TENSORFLOW_CASES = {}
    try:
        assert course.check_batch_norm_backward(batch_norm_backward)
        for wrong in (without_the_mean_term, without_the_variance_term, unbiased_variance_derivative):
            text = str(course.check_batch_norm_backward(wrong))
            assert f'Case {NUMERICAL_CASES[0][1]}' in text and 'finite differences gives' in text, text
    finally:
        normalization.TENSORFLOW_CASES = saved
