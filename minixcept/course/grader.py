"""The grader's machinery: run a learner's function on the cases that catch the classic
mistakes, and say in words what is wrong first.

A check is a list of cases. Each case calls the learner's function (``call``), compares
what came back with a reference (``compare``): TensorFlow's stored result from
``tests/reference/`` (``fixture``), or central differences in float64 (``numerical``). The
first case that goes wrong stops the check and becomes the verdict, which names

- the exercise and the case ("stride 2, odd input 7x7");
- the output and the index where it first differs, with both values and the place in words
  ("row 6 of 0..6, the last row");
- a hint: when the learner's result equals what a known mistake gives (a kernel not turned,
  padding on the wrong side...), that mistake by name; otherwise what that place suggests.

A check never raises for a wrong answer: it returns a ``Verdict``, which is true when every
case passed and prints as a sentence. The textbook's own function is the model answer, and
the verdict names it.
"""
import traceback
from pathlib import Path

import numpy as np

from ..gradcheck import numerical_gradient

#: where the TensorFlow fixtures live: tests/reference/ of the repository this package is in
REFERENCE_DIR = Path(__file__).resolve().parents[2] / 'tests' / 'reference'

#: against TensorFlow in float32 (the same bars as the tests): forward values, gradients
FORWARD_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = 5e-5
#: against central differences in float64
NUMERICAL_TOLERANCE = 1e-6


class Wrong(Exception):
    """Raised inside a check: the first thing wrong, as a sentence for the learner."""


class Verdict:
    """The outcome of one check: ``bool(verdict)`` says whether every case passed, and
    ``str(verdict)`` says what passed or what went wrong first, where, and a hint."""

    def __init__(self, exercise, passed, message, cases_passed, model_answer):
        self.exercise = exercise
        self.passed = passed
        self.message = message
        self.cases_passed = cases_passed
        self.model_answer = model_answer

    def __bool__(self):
        return self.passed

    def __str__(self):
        if self.passed:
            head = f"{self.exercise}: correct - all {len(self.cases_passed)} cases pass"
            return f"{head} ({'; '.join(self.cases_passed)})."
        done = f" ({len(self.cases_passed)} case(s) passed before it)" if self.cases_passed else ''
        return (f"{self.exercise}: not yet{done}.\n{self.message}\n"
                f"Model answer: {self.model_answer}")

    __repr__ = __str__


def grade(exercise, cases, model_answer):
    """Run ``cases`` (a list of (description, function of no argument)) in order.

    Each function raises ``Wrong`` for a wrong answer and returns otherwise. Returns the
    ``Verdict``: the first ``Wrong`` with its case named, or every case passed.
    """
    passed = []
    for description, run in cases:
        try:
            run()
        except Wrong as wrong:
            return Verdict(exercise, False, f"Case {description}: {wrong}", passed, model_answer)
        passed.append(description)
    return Verdict(exercise, True, '', passed, model_answer)


# -- calling the learner's function ------------------------------------------------------

def call(function, *args):
    """Call the learner's function; an exception becomes a ``Wrong`` saying which line raised."""
    try:
        return function(*args)
    except NotImplementedError:
        raise Wrong("the function is not written yet (it raises NotImplementedError).") from None
    except Exception as error:
        frames = traceback.extract_tb(error.__traceback__)
        where = f" at line {frames[-1].lineno} ({frames[-1].line.strip()!r})" if len(frames) > 1 else ''
        raise Wrong(f"the function raised {type(error).__name__}: {error}{where}.") from None


def parts(result, names):
    """The learner's result as a tuple of len(names) (one output may come back bare)."""
    if len(names) == 1 and not isinstance(result, tuple):
        result = (result,)
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        got = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) \
            else f"one {type(result).__name__}"
        raise Wrong(f"expected {len(names)} result(s), ({', '.join(names)}), got {got}.")
    return tuple(result)


# -- comparing with the reference --------------------------------------------------------

def place(index, shape, layout='NHWC'):
    """An index in words: 'row 6 of 0..6 (the last row), column 3 of 0..6, channel 1'."""
    words = []
    for axis, (i, size) in enumerate(zip(index, shape)):
        name = {'N': 'image', 'H': 'row', 'W': 'column', 'C': 'channel', 'L': 'position',
                'K': 'unit'}.get(layout[axis] if axis < len(layout) else '?', f'axis {axis}')
        edge = ''
        if name in ('row', 'column', 'position') and size > 1:
            edge = ' (the first)' if i == 0 else ' (the last)' if i == size - 1 else ''
        words.append(f"{name} {i} of 0..{size - 1}{edge}")
    return ', '.join(words)


def compare(name, got, want, tolerance, layout='NHWC', mistakes=(), hint=None, reference='TensorFlow'):
    """Raise ``Wrong`` unless ``got`` equals ``want`` to ``tolerance`` (max |a - b| / max |b|).

    mistakes: (description, the array that mistake gives) pairs; a result that matches one of
        them is named as that mistake.
    hint: a function (index, shape) -> a sentence for a difference no known mistake explains.
    """
    want = np.asarray(want, dtype=np.float64)
    if got is None:
        raise Wrong(f"{name} is None; expected an array of shape {want.shape}.")
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise Wrong(f"{name} is not an array of numbers ({type(got).__name__}: {error}).") from None
    if got.shape != want.shape:
        raise Wrong(f"{name} has shape {got.shape}, expected {want.shape}"
                    f"{_shape_hint(name, got.shape, want.shape)}.")
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    if not np.isfinite(got).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        raise Wrong(f"{name} holds {got[index]} at {list(index)} ({place(index, got.shape, layout)}).")
    error = np.abs(got - want) / scale
    if error.max() <= tolerance:
        return
    index = tuple(int(i) for i in np.argwhere(error > tolerance)[0])
    message = (f"{name} differs at {list(index)} ({place(index, got.shape, layout)}): "
               f"{got[index]:.6g} where {reference} gives {want[index]:.6g} "
               f"(largest relative difference {error.max():.2g}, allowed {tolerance:g}).")
    for description, wrong in mistakes:
        wrong = np.asarray(wrong, dtype=np.float64)
        if wrong.shape == got.shape and np.abs(got - wrong).max() <= tolerance * scale:
            raise Wrong(f"{message}\nYour result is exactly what {description} gives.")
    if hint is not None:
        extra = hint(index, got.shape)
        if extra:
            message += f"\nHint: {extra}"
    raise Wrong(message)


def _shape_hint(name, got, want):
    if len(got) == len(want) == 4 and got[0] == want[0] and got[3] == want[3]:
        if got[1] > want[1] or got[2] > want[2]:
            return " (larger: is the padding still on? crop it off before returning)"
        return " (smaller: is a row or column of padding cropped too many, or the padding missing?)"
    return ''


# -- references --------------------------------------------------------------------------

def fixture(family, case):
    """The inputs and TensorFlow's results of one stored case: ``tests/reference/<family>.npz``,
    keys ``<case>/input/<name>`` and ``<case>/output/<name>`` -> (inputs, outputs) dicts."""
    path = REFERENCE_DIR / f'{family}.npz'
    if not path.exists():
        raise FileNotFoundError(f"the grader's TensorFlow fixtures are not here: {path} is missing "
                                f"(they come with a clone of the minixcept repository)")
    with np.load(path) as stored:
        keys = [key for key in stored.files if key.startswith(f'{case}/')]
        if not keys:
            raise KeyError(f"{path.name} has no case {case!r}")
        inputs = {key.split('/')[-1]: stored[key] for key in keys if key.split('/')[-2] == 'input'}
        outputs = {key.split('/')[-1]: stored[key] for key in keys if key.split('/')[-2] == 'output'}
    return inputs, outputs


def numerical(f, array, dout, eps=1e-6):
    """Central differences of <f(), dout> with respect to ``array`` (float64, perturbed in place)."""
    return numerical_gradient(f, array, dout, eps)


def random_case(seed, *shapes):
    """Standard-normal float64 arrays of the given shapes from one seed."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for shape in shapes]
