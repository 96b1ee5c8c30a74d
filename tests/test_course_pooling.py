"""The max-pool backward check: it passes the textbook's own functions and, for each classic
mistake written here on purpose as a learner would write it, fails with a message that
names the case, the output and the mistake."""
import numpy as np
import pytest

from minixcept import course
from minixcept.layers.pooling import max_pool2d_backward, max_pool2d_forward
from minixcept.padding import window_geometry


def _pad(x, pads, value):
    (top, bottom), (left, right) = pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _view(a, p, q, out_hw, strides):
    (ho, wo), (sh, sw) = out_hw, strides
    return a[:, p:p + sh * (ho - 1) + 1:sh, q:q + sw * (wo - 1) + 1:sw]


# -- backward passes on the textbook's cache (x_shape, argmax, pool_size, strides, padding) --

def backward_overwrites_overlaps(dy, cache):
    """The offset loop with = : a later offset's zeros replace an earlier offset's dy."""
    x_shape, argmax, (kh, kw), strides, padding = cache
    out_hw, pads = window_geometry(x_shape[1:3], (kh, kw), strides, padding)
    (top, bottom), (left, right) = pads
    dx_pad = np.zeros((x_shape[0], x_shape[1] + top + bottom, x_shape[2] + left + right, x_shape[3]))
    for p in range(kh):
        for q in range(kw):
            _view(dx_pad, p, q, out_hw, strides)[...] = dy * (argmax == p * kw + q)
    return dx_pad[:, top:top + x_shape[1], left:left + x_shape[2]]


def backward_window_by_window(dy, cache, add=False):
    """A loop over the windows, dy written into the winner; with = where two windows share it."""
    x_shape, argmax, (kh, kw), (sh, sw), padding = cache
    (ho, wo), ((top, bottom), (left, right)) = window_geometry(x_shape[1:3], (kh, kw), (sh, sw), padding)
    dx_pad = np.zeros((x_shape[0], x_shape[1] + top + bottom, x_shape[2] + left + right, x_shape[3]))
    for n in range(x_shape[0]):
        for i in range(ho):
            for j in range(wo):
                for c in range(x_shape[3]):
                    p, q = divmod(int(argmax[n, i, j, c]), kw)
                    if add:
                        dx_pad[n, i * sh + p, j * sw + q, c] += dy[n, i, j, c]
                    else:
                        dx_pad[n, i * sh + p, j * sw + q, c] = dy[n, i, j, c]
    return dx_pad[:, top:top + x_shape[1], left:left + x_shape[2]]


def backward_window_by_window_added(dy, cache):
    return backward_window_by_window(dy, cache, add=True)


def backward_padding_kept(dy, cache):
    """The padded input's gradient, returned without the crop."""
    x_shape, argmax, (kh, kw), strides, padding = cache
    out_hw, pads = window_geometry(x_shape[1:3], (kh, kw), strides, padding)
    (top, bottom), (left, right) = pads
    dx_pad = np.zeros((x_shape[0], x_shape[1] + top + bottom, x_shape[2] + left + right, x_shape[3]))
    for p in range(kh):
        for q in range(kw):
            _view(dx_pad, p, q, out_hw, strides)[...] += dy * (argmax == p * kw + q)
    return dx_pad


# -- a learner's own pair: the forward keeps x, the backward finds the winners again --------

def forward_keeping_x(x, pool_size, strides, padding, pad_value=-np.inf):
    out_hw, pads = window_geometry(x.shape[1:3], pool_size, strides, padding)
    x_pad = _pad(x, pads, pad_value)
    views = [_view(x_pad, p, q, out_hw, strides) for p in range(pool_size[0]) for q in range(pool_size[1])]
    y = np.max(views, axis=0)
    return y, (x, y, pool_size, strides, padding)


def forward_zero_padded(x, pool_size, strides, padding):
    return forward_keeping_x(x, pool_size, strides, padding, pad_value=0.0)


def backward_from_x(dy, cache, ties='first', pad_value=-np.inf):
    x, y, (kh, kw), strides, padding = cache
    out_hw, pads = window_geometry(x.shape[1:3], (kh, kw), strides, padding)
    x_pad = _pad(x, pads, pad_value)
    if pad_value != -np.inf:                      # the winners found again on the zero-padded input
        y = np.max([_view(x_pad, p, q, out_hw, strides) for p in range(kh) for q in range(kw)], axis=0)
    dx_pad = np.zeros_like(x_pad)
    taken = np.zeros(y.shape, dtype=bool)
    offsets = [(p, q) for p in range(kh) for q in range(kw)]
    for p, q in (offsets[::-1] if ties == 'last' else offsets):
        hit = _view(x_pad, p, q, out_hw, strides) == y
        if ties != 'every':
            hit &= ~taken
            taken |= hit
        _view(dx_pad, p, q, out_hw, strides)[...] += dy * hit
    (top, bottom), (left, right) = pads
    return dx_pad[:, top:top + x.shape[1], left:left + x.shape[2]]


def backward_every_tied_maximum(dy, cache):
    """mask = (window == max): the textbook derivation of 'the gradient goes to the max', ties and all."""
    return backward_from_x(dy, cache, ties='every')


def backward_last_tied_maximum(dy, cache):
    return backward_from_x(dy, cache, ties='last')


def backward_zero_padding(dy, cache):
    return backward_from_x(dy, cache, pad_value=0.0)


def test_the_textbook_passes_alone_and_as_a_pair():
    assert course.check_max_pool_backward(max_pool2d_backward)
    verdict = course.check_max_pool_backward(max_pool2d_backward, max_pool2d_forward)
    assert verdict and 'correct - all 9 cases pass' in str(verdict)


def test_correct_answers_written_another_way_pass():
    assert course.check_max_pool_backward(backward_window_by_window_added)
    assert course.check_max_pool_backward(backward_from_x, forward_keeping_x)


WRONG = [
    (backward_overwrites_overlaps, None, ["odd 7x7", 'dx differs', 'overlapping windows must add (+=)']),
    (backward_window_by_window, None, ['dx differs', 'wins two overlapping windows', 'sum of both (+=)']),
    (backward_padding_kept, None, ['odd 7x7', 'dx has shape', 'crop it off']),
    (backward_every_tied_maximum, forward_keeping_x, ['tied maxima', 'dx differs', 'every tied maximum']),
    (backward_last_tied_maximum, forward_keeping_x, ['tied maxima', 'dx differs', 'last tied maximum']),
    (backward_zero_padding, forward_keeping_x, ['every value negative', 'dx differs', 'zeros instead of -inf']),
    (backward_from_x, forward_zero_padded, ['every value negative', 'y (your forward) differs',
                                            'zeros instead of -inf']),
]


@pytest.mark.parametrize('backward, forward, words', WRONG,
                         ids=[f"{w[0].__name__}-{w[1].__name__ if w[1] else 'textbook_forward'}" for w in WRONG])
def test_each_classic_mistake_fails_with_its_place_named(backward, forward, words):
    verdict = course.check_max_pool_backward(backward, forward)
    assert not verdict
    text = str(verdict)
    for word in words:
        assert word in text, text
    assert 'Model answer: minixcept.layers.pooling' in text


def test_an_unwritten_function_or_a_missing_cache_is_said_in_words():
    def unwritten(dy, cache):
        raise NotImplementedError

    assert 'not written yet' in str(course.check_max_pool_backward(unwritten))
    text = str(course.check_max_pool_backward(max_pool2d_backward, lambda x, *args: x.max()))
    assert 'expected 2 result(s), (y, cache)' in text
