"""The 'same'-padding check: it passes the textbook's pad_before_after and, for each classic
mistake written here on purpose as a learner would write it, fails with a message that names
the case (size, kernel, stride), what the windows read, and the mistake. Its TensorFlow
fixture is compared with a live TensorFlow run when TensorFlow is installed."""
import math

import numpy as np
import pytest

from minixcept import course
from minixcept.course.padding import mistaken_paddings
from minixcept.padding import pad_before_after
from reference import make_course


# -- 'same' padding as learners write it wrong ----------------------------------------------

def extra_row_before(size, kernel, stride, padding='same'):
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total - total // 2, total // 2             # the larger half first, as many ports do


def symmetric(size, kernel, stride, padding='same'):
    return kernel // 2, kernel // 2                   # stride 1's 'same' for an odd kernel


def without_the_max(size, kernel, stride, padding='same'):
    out = math.ceil(size / stride)
    total = (out - 1) * stride + kernel - size
    return total // 2, total - total // 2


def floor_output(size, kernel, stride, padding='same'):
    out = size // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def stride_one_total(size, kernel, stride, padding='same'):
    total = kernel - 1
    return total // 2, total - total // 2


def padding_to_a_multiple(size, kernel, stride, padding='same'):
    """Right pads, then more after, until the padded size is a multiple of the stride."""
    before, after = pad_before_after(size, kernel, stride, 'same')
    while (size + before + after) % stride:
        after += 1
    return before, after


def one_number(size, kernel, stride, padding='same'):
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)     # the total only


def test_the_textbook_passes():
    verdict = course.check_same_padding(pad_before_after)
    assert verdict and 'correct - all 4 cases pass' in str(verdict)
    assert course.padding.model_answers[course.check_same_padding] is pad_before_after


@pytest.mark.parametrize('wrong, words', [
    (extra_row_before, ['size 2, kernel 3, stride 2', '(1, 0)', 'output 0', 'reads a padding zero',
                        'extra row put before']),
    (symmetric, ['size 2, kernel 3, stride 2', '(1, 1)', 'symmetric padding']),
    (without_the_max, ['stride 2', 'size 2, kernel 1', '(-1, 0)', 'negative', 'without its max(..., 0)']),
    (floor_output, ['size 1, kernel 3, stride 2', 'no window fits', 'floor(size / stride)']),
    (stride_one_total, ['size 2, kernel 3, stride 2', 'the stride-1 total, kernel - 1']),
    (padding_to_a_multiple, ['size 1, kernel 3, stride 2', '(1, 2)', 'right numbers', 'no window reads']),
])
def test_each_mistake_fails_and_is_named(wrong, words):
    verdict = course.check_same_padding(wrong)
    assert not verdict
    for word in words:
        assert word in str(verdict), (word, str(verdict))


def test_a_mistake_on_larger_sizes_only_names_the_case_and_the_output():
    def off_from_eleven(size, kernel, stride, padding='same'):
        before, after = pad_before_after(size, kernel, stride, 'same')
        return (before + 1, after) if size >= 11 else (before, after)

    text = str(course.check_same_padding(off_from_eleven))
    assert 'size 11, kernel 3, stride 2' in text and 'output 0 of 0..5, tap 1' in text
    assert 'Hint' in text


def test_a_wrong_kind_of_answer_is_said_in_words():
    assert 'expected a pair (before, after), got 2' in str(course.check_same_padding(one_number))
    assert 'not a whole number' in str(course.check_same_padding(lambda n, k, s, p: (0.5, 0.5)))

    def unwritten(size, kernel, stride, padding):
        raise NotImplementedError
    assert 'not written yet' in str(course.check_same_padding(unwritten))


def test_every_named_mistake_is_wrong_somewhere_in_the_stored_cases():
    for position in range(len(mistaken_paddings(1, 1, 1))):
        wrong_somewhere = any(
            pad_before_after(size, kernel, stride, 'same') not in mistaken_paddings(size, kernel, stride)[position][1]
            for size, kernel, stride in make_course.padding_cases())
        assert wrong_somewhere, mistaken_paddings(1, 1, 1)[position][0]


def test_the_fixture_reveals_tensorflows_padding():
    """Read the padding off the stored outputs alone (no minixcept): 8 at 3x3 stride 2 pads
    (0, 1), 7 pads (1, 1), the case of block3_pool at 299 px (74 rows)."""
    stored = np.load(make_course.HERE / 'course_padding.npz')
    assert stored['n8_k3_s2/output/y'].tolist() == [[1, 2, 3], [3, 4, 5], [5, 6, 7], [7, 8, 0]]
    assert stored['n7_k3_s2/output/y'].tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]]
    assert len(stored.files) == 2 * len(make_course.padding_cases())


def test_the_stored_fixture_is_what_tensorflow_gives_now(tf):
    stored = np.load(make_course.HERE / 'course_padding.npz')
    for size, kernel, stride in make_course.padding_cases():
        name = make_course.case_name(size, kernel, stride)
        np.testing.assert_array_equal(stored[f'{name}/input/x'], make_course.revealing_input(size))
        np.testing.assert_array_equal(stored[f'{name}/output/y'], make_course.run_same(size, kernel, stride),
                                      err_msg=name)
