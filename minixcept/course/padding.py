"""Exercise on TensorFlow's 'same' padding: how many rows go before and after (tour chapter 3).

The learner writes the textbook's function of ``minixcept/padding.py``, which is the model
answer:

    same_padding(size, kernel, stride, padding) -> (before, after)       padding = 'same'

TensorFlow never says how it pads; it only pads. So the reference is what TensorFlow's
'SAME' convolution reads (tests/reference/course_padding.npz, made by make_course.py): for
every size 1..17, kernel 1..5 and stride 1..3, the input 1, 2, ..., size convolved with
one-hot filters, so that output i, tap p holds the input value window i reads at tap p, or
0 where it reads padding. The check pads the same input by the learner's (before, after),
takes the windows that fit ('valid', the textbook's arithmetic), and compares what they
read with what TensorFlow's read. With the right numbers it also asks for no padding row
that no window reads: TensorFlow's total is the least the windows need.

A wrong pair is compared with what the classic mistakes give: the extra row before,
symmetric padding (kernel // 2 on each side), the total without its max(..., 0), the output
size with floor instead of ceil, the stride-1 total kernel - 1 at every stride.
"""
import numbers

import numpy as np

from ..padding import output_length, pad_before_after, window
from . import grader
from .grader import Wrong

MODEL_ANSWER = 'minixcept.padding.pad_before_after'
#: the stored cases, graded in four groups: (description, which (size, kernel, stride) it holds)
CASE_GROUPS = [
    ("TensorFlow, Xception's window: 3x3 at stride 2, sizes 1..17", lambda k, s: k == 3 and s == 2),
    ("TensorFlow, stride 1: kernels 1..5, sizes 1..17", lambda k, s: s == 1),
    ("TensorFlow, stride 2: kernels 1, 2, 4, 5, sizes 1..17", lambda k, s: s == 2 and k != 3),
    ("TensorFlow, stride 3: kernels 1..5, sizes 1..17", lambda k, s: s == 3),
]


# -- what the classic mistakes give -------------------------------------------------------

def _split(total, larger_after=True):
    return (total // 2, total - total // 2) if larger_after else (total - total // 2, total // 2)


def mistaken_paddings(size, kernel, stride):
    """(the mistake, the (before, after) pairs it gives) for one axis."""
    out = -(-size // stride)
    total = (out - 1) * stride + kernel - size
    floor_out = size // stride
    return [
        ("the extra row put before (total - total // 2 before); TensorFlow puts the larger half "
         "after", [_split(max(total, 0), larger_after=False)]),
        ("symmetric padding, kernel // 2 (or (kernel - 1) // 2) rows on each side; that is right "
         "for an odd kernel at stride 1 only: at stride 2 the total can be odd, or smaller than "
         "kernel - 1", [(kernel // 2, kernel // 2), ((kernel - 1) // 2, (kernel - 1) // 2)]),
        ("the total without its max(..., 0); where the windows end before the input does, "
         "(out - 1) * stride + kernel - size is negative and the total is 0", [_split(total)]),
        (f"floor(size / stride) for the output size; 'same' gives ceil(size / stride) outputs "
         f"(here {out}, not {floor_out})", [_split(max((floor_out - 1) * stride + kernel - size, 0))]),
        ("the stride-1 total, kernel - 1, at every stride; the total is "
         "max((out - 1) * stride + kernel - size, 0) with out = ceil(size / stride)", [_split(kernel - 1)]),
    ]


def _named_mistake(pair, size, kernel, stride, hint=True):
    """A sentence naming the mistakes that give ``pair`` here, or a hint when none does."""
    right = pad_before_after(size, kernel, stride, 'same')
    named = [description for description, wrongs in mistaken_paddings(size, kernel, stride)
             if pair in wrongs and pair != right]
    if len(named) == 1:
        return f"\nYour (before, after) is exactly what this mistake gives: {named[0]}."
    if named:
        return ("\nYour (before, after) is exactly what each of these mistakes gives: "
                + "; ".join(f"({i}) {description}" for i, description in enumerate(named, 1)) + ".")
    if not hint:
        return ''
    return ("\nHint: count the rows the windows need: the last of the ceil(size / stride) windows "
            "ends at padded row (out - 1) * stride + kernel - 1; the larger half of an odd total goes after.")


# -- reading the learner's answer ---------------------------------------------------------

def _as_pair(result, where):
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise Wrong(f"{where}: expected a pair (before, after), got {result!r}.")
    pair = []
    for name, value in zip(('before', 'after'), result):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
            raise Wrong(f"{where}: {name} = {value!r} is not a whole number of rows.")
        pair.append(int(value))
    return tuple(pair)


def _read(value):
    return f"input row {int(value) - 1}" if value > 0 else "a padding zero"


def _before_read(want):
    """The rows TensorFlow padded before, read off its first window: tap p reading row r
    means the window starts at row r - p."""
    p = int(np.flatnonzero(want[0])[0])
    return p - (int(want[0, p]) - 1)


def _windows(x, before, after, kernel, stride):
    """What every tap of every window reads on x padded by (before, after): (out, kernel)."""
    x_pad = np.pad(x, (before, after)).reshape(1, -1, 1, 1)        # (N, H, W, C) = (1, Hp, 1, 1)
    out = output_length(x_pad.shape[1], kernel, stride, 'valid')
    taps = [window(x_pad, p, 0, (out, 1), (stride, 1))[0, :, 0, 0] for p in range(kernel)]
    return np.stack(taps, axis=1)


def _check_one(same_padding, size, kernel, stride):
    where = f"size {size}, kernel {kernel}, stride {stride}"
    inputs, outputs = grader.fixture('course_padding', f'n{size}_k{kernel}_s{stride}')
    x, want = inputs['x'].astype(np.float64), outputs['y'].astype(np.float64)   # want: (out, kernel)
    pair = _as_pair(grader.call(same_padding, size, kernel, stride, 'same'), where)
    before, after = pair
    named = _named_mistake(pair, size, kernel, stride)
    if before < 0 or after < 0:
        raise Wrong(f"{where}: your (before, after) = {pair} is negative; a padding is 0 rows "
                    f"or more.{named}")
    if size + before + after < kernel:
        raise Wrong(f"{where}: your (before, after) = {pair} leaves {size + before + after} row(s), "
                    f"fewer than the kernel's {kernel}: no window fits, where TensorFlow gives "
                    f"{len(want)} output(s).{named}")
    got = _windows(x, before, after, kernel, stride)
    if got.shape != want.shape:
        raise Wrong(f"{where}: your (before, after) = {pair} gives {len(got)} output(s) where "
                    f"TensorFlow gives {len(want)} (ceil({size} / {stride})).{named}")
    differ = np.argwhere(got != want)
    if len(differ):
        i, p = (int(v) for v in differ[0])
        raise Wrong(f"{where}: with your (before, after) = {pair}, output {i} of 0..{len(want) - 1}, "
                    f"tap {p}, reads {_read(got[i, p])} where TensorFlow's reads {_read(want[i, p])} "
                    f"(TensorFlow's windows start at input row i * {stride} - {_before_read(want)}: "
                    f"{_before_read(want)} row(s) before).{named}")
    needed = max((len(want) - 1) * stride + kernel - size, 0)     # the rows the last window needs
    if before + after != needed:
        raise Wrong(f"{where}: your (before, after) = {pair} reads the right numbers, but pads "
                    f"{before + after - needed} row(s) after that no window reads: the total is "
                    f"max((out - 1) * stride + kernel - size, 0) = {needed}."
                    f"{_named_mistake(pair, size, kernel, stride, hint=False)}")


def check_same_padding(same_padding):
    """Grade ``same_padding(size, kernel, stride, padding) -> (before, after)`` for padding='same'."""
    cases = []
    for description, holds in CASE_GROUPS:
        def run(holds=holds):
            for stride in (1, 2, 3):
                for kernel in range(1, 6):
                    if holds(kernel, stride):
                        for size in range(1, 18):
                            _check_one(same_padding, size, kernel, stride)
        cases.append((description, run))
    return grader.grade('same padding', cases, MODEL_ANSWER)


# The model answer, for the tests and the tour: the textbook's own function.
model_answers = {check_same_padding: pad_before_after}
