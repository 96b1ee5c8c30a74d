"""The course's grader: it passes the textbook's own functions and, for each classic mistake
written here on purpose, fails with a message that names the place of the mistake."""
import numpy as np
import pytest

from minixcept import course
from minixcept.layers.depthwise import depthwise_conv2d_backward, depthwise_conv2d_forward
from minixcept.padding import window_geometry


def _padded(x, pads):
    (top, bottom), (left, right) = pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


# -- depthwise: wrong answers a learner writes ----------------------------------------------

def forward_kernel_turned(x, kernel, bias, strides, padding):
    return depthwise_conv2d_forward(x, kernel[::-1, ::-1], bias, strides, padding)


def forward_symmetric_padding(x, kernel, bias, strides, padding):
    """'same' as (k - 1) // 2 rows on both sides, then the extra one before: fine at stride 1, odd k."""
    _, ((top, bottom), (left, right)) = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    return depthwise_conv2d_forward(_padded(x, ((bottom, top), (right, left))), kernel, bias, strides, 'valid')


def backward_by_scatter(dy, cache, turn=False, crop=None, overwrite=False):
    """The scatter of the forward sum, with knobs for the mistakes."""
    x, kernel, strides, padding = cache
    (ho, wo), pads = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    (top, bottom), (left, right) = crop or pads
    used = kernel[::-1, ::-1] if turn else kernel
    x_pad = _padded(x, pads)
    dx_pad = np.zeros_like(x_pad)
    dkernel = np.zeros_like(kernel)
    (sh, sw) = strides
    for p in range(kernel.shape[0]):
        for q in range(kernel.shape[1]):
            rows, cols = slice(p, p + sh * (ho - 1) + 1, sh), slice(q, q + sw * (wo - 1) + 1, sw)
            if overwrite:
                dx_pad[:, rows, cols] = dy * used[p, q, :, 0]
            else:
                dx_pad[:, rows, cols] += dy * used[p, q, :, 0]
            dkernel[p, q, :, 0] = (x_pad[:, rows, cols] * dy).sum(axis=(0, 1, 2))
    h, w = x.shape[1:3]
    return dx_pad[:, top:top + h, left:left + w], dkernel, dy.sum(axis=(0, 1, 2))


def backward_kernel_not_turned(dy, cache):
    """The 180-degree route, with the kernel used as it is."""
    from minixcept.course.depthwise import _dx_with
    dx, dkernel, dbias = depthwise_conv2d_backward(dy, cache)
    return _dx_with(dy, cache, turn=False), dkernel, dbias


def backward_symmetric_crop(dy, cache):
    x, kernel, strides, padding = cache
    _, ((top, bottom), (left, right)) = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    return backward_by_scatter(dy, cache, crop=((bottom, top), (right, left)))


def backward_crop_off_by_one(dy, cache):
    x, kernel, strides, padding = cache
    _, ((top, bottom), (left, right)) = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    if bottom < 1 or right < 1:                      # only where there is a row after to slide into
        return depthwise_conv2d_backward(dy, cache)
    return backward_by_scatter(dy, cache, crop=((top + 1, bottom - 1), (left + 1, right - 1)))


def backward_overwrites_overlaps(dy, cache):
    return backward_by_scatter(dy, cache, overwrite=True)


def backward_dbias_mean(dy, cache):
    dx, dkernel, _ = depthwise_conv2d_backward(dy, cache)
    return dx, dkernel, dy.mean(axis=(0, 1, 2))


def backward_padding_kept(dy, cache):
    """The gradient of the padded input, returned without the crop."""
    x, kernel, strides, padding = cache
    _, pads = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    dx, dkernel, dbias = depthwise_conv2d_backward(dy, cache)
    return _padded(dx, pads), dkernel, dbias


def test_the_textbook_passes_its_own_checks():
    assert course.check_depthwise_forward(depthwise_conv2d_forward)
    assert course.check_depthwise_backward(depthwise_conv2d_backward)
    assert 'correct' in str(course.check_depthwise_backward(depthwise_conv2d_backward))


def test_a_correct_scatter_written_another_way_passes():
    assert course.check_depthwise_backward(backward_by_scatter)


WRONG = [
    (course.check_depthwise_forward, forward_kernel_turned, ['y differs', 'turned 180 degrees']),
    (course.check_depthwise_forward, forward_symmetric_padding, ['stride 2, even 8x8', 'extra row/column before']),
    (course.check_depthwise_backward, backward_kernel_not_turned, ['dx differs', 'not turned by 180 degrees']),
    (course.check_depthwise_backward, backward_symmetric_crop,
     ['stride 2, even 8x8', 'dx differs', 'extra padding row/column were before']),
    (course.check_depthwise_backward, backward_crop_off_by_one, ['dx differs', 'off by one']),
    (course.check_depthwise_backward, backward_overwrites_overlaps, ['dx differs', 'must add (+=)']),
    (course.check_depthwise_backward, backward_dbias_mean, ['dbias differs', 'sum of dy']),
    (course.check_depthwise_backward, backward_padding_kept, ["3x3 'same'", 'dx has shape', 'crop it off']),
]


@pytest.mark.parametrize('check, wrong, words', WRONG, ids=[w[1].__name__ for w in WRONG])
def test_each_classic_mistake_fails_with_its_place_named(check, wrong, words):
    verdict = check(wrong)
    assert not verdict
    text = str(verdict)
    for word in words:
        assert word in text, text
    assert 'Model answer: minixcept.layers' in text


def test_an_unwritten_or_crashing_function_is_said_in_words():
    def unwritten(*args):
        raise NotImplementedError

    def crashes(dy, cache):
        return dy @ cache[1]

    assert 'not written yet' in str(course.check_depthwise_backward(unwritten))
    text = str(course.check_depthwise_backward(crashes))
    assert 'raised ValueError' in text and 'line' in text
    assert 'expected 3 result(s)' in str(course.check_depthwise_backward(lambda dy, cache: dy))
