"""The chapter-5 checks: the fan-out backward and a middle block's parameter count. Each passes
the model answer and fails each wrong answer written here on purpose, naming the mistake."""
import numpy as np
import pytest

from minixcept import course
from minixcept.course import graph
from minixcept.layers.activation import relu_backward
from minixcept.layers.pointwise import pointwise_conv2d_backward, pointwise_conv2d_forward


# -- the fan-out backward: wrong answers a learner writes --------------------------------------

def _shares(dy, cache):
    positive, main_cache, short_cache = cache
    da, dW_main, _ = pointwise_conv2d_backward(dy, main_cache)
    dx_short, dW_short, _ = pointwise_conv2d_backward(dy, short_cache)
    return da, positive, dx_short, dW_main, dW_short


def backward_main_only(dy, cache):
    da, positive, dx_short, dW_main, dW_short = _shares(dy, cache)
    return relu_backward(da, positive), dW_main, dW_short


def backward_shortcut_overwrites(dy, cache):
    da, positive, dx_short, dW_main, dW_short = _shares(dy, cache)
    dx = relu_backward(da, positive)
    dx = dx_short                       # meant +=
    return dx, dW_main, dW_short


def backward_relu_not_applied(dy, cache):
    da, positive, dx_short, dW_main, dW_short = _shares(dy, cache)
    return da + dx_short, dW_main, dW_short


def backward_shortcut_reads_relu(dy, cache):
    """dW_short from the main branch's input relu(x), as if the ReLU had overwritten x."""
    positive, (a, W_main), (x, W_short) = cache
    da, positive, dx_short, dW_main, _ = _shares(dy, cache)
    _, dW_short, _ = pointwise_conv2d_backward(dy, (a, W_short))
    return relu_backward(da, positive) + dx_short, dW_main, dW_short


def backward_two_results(dy, cache):
    dx, dW_main, _ = graph.residual_unit_backward(dy, cache)
    return dx, dW_main


def forward_relu_in_place(x, W_main, W_short):
    positive = x > 0
    np.maximum(x, 0, out=x)                                   # saves memory, destroys x
    y_main, main_cache = pointwise_conv2d_forward(x, W_main)
    y_short, short_cache = pointwise_conv2d_forward(x, W_short)
    return y_main + y_short, (positive, main_cache, short_cache)


def test_the_model_answer_passes():
    verdict = course.check_fan_out_backward(graph.residual_unit_backward)
    assert verdict, str(verdict)
    assert 'correct' in str(verdict) and 'finite differences' in str(verdict)


def test_the_model_answer_passes_with_the_model_forward():
    assert course.check_fan_out_backward(graph.residual_unit_backward, graph.residual_unit_forward)


@pytest.mark.parametrize('wrong, words', [
    (backward_main_only, ['dx differs', 'main branch only', 'never added']),
    (backward_shortcut_overwrites, ['dx differs', 'shortcut only', 'overwrote']),
    (backward_relu_not_applied, ['dx differs', "ReLU's derivative left out"]),
    (backward_shortcut_reads_relu, ['dW_short differs', 'relu(x)', 'pre-ReLU x']),
    (backward_two_results, ['expected 3 result(s)', 'dW_short']),
])
def test_each_wrong_backward_is_named(wrong, words):
    verdict = course.check_fan_out_backward(wrong)
    assert not verdict
    text = str(verdict)
    assert 'Case finite differences' in text
    for word in words:
        assert word in text, text


def test_an_in_place_relu_in_the_forward_is_named():
    verdict = course.check_fan_out_backward(graph.residual_unit_backward, forward_relu_in_place)
    assert not verdict
    assert 'changed its input x in place' in str(verdict) and 'shortcut' in str(verdict)


def test_not_written_yet():
    def stub(dy, cache):
        raise NotImplementedError
    assert 'not written yet' in str(course.check_fan_out_backward(stub))


# -- the middle block's parameters -------------------------------------------------------------

def test_middle_block_parameters_model_answer_matches_keras():
    assert graph.middle_block_parameters(728) == 1_618_344
    verdict = course.check_middle_block_parameters(graph.middle_block_parameters)
    assert verdict, str(verdict)
    assert 'width 1024' in str(verdict)


def test_the_keras_derivations_agree():
    counts = graph.keras_middle_block_counts()
    assert {n for n, _ in counts[728]} == {3 * 728 ** 2 + 39 * 728}
    assert counts[1024][0][0] == 3 * 1024 ** 2 + 39 * 1024


@pytest.mark.parametrize('wrong, words', [
    (lambda w: 3 * (9 * w + w * w), ['width 728', 'batch-norms out']),
    (lambda w: 3 * (9 * w + w * w + 2 * w), ['only gamma and beta', 'moving mean']),
    (lambda w: 3 * (9 * w * w + 4 * w), ['full 3x3 convolution']),
    (lambda w: 3 * (9 * w + w * w + 5 * w), ['a bias in each separable']),
    (lambda w: 9 * w + w * w + 4 * w, ['one separable conv', 'three']),
    (lambda w: 3 * w * w + 39 * w + 1, ['off by +1', 'Hint']),
    (lambda w: 3 * w * w + 39 * w + 0.5, ['not a whole number']),
])
def test_each_wrong_count_is_named(wrong, words):
    verdict = course.check_middle_block_parameters(wrong)
    assert not verdict
    for word in words:
        assert word in str(verdict), str(verdict)
