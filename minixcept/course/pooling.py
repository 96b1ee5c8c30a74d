"""Exercise on max pooling: its backward pass, with tied maxima and overlapping windows (tour chapter 2).

The learner writes the backward pass with the textbook's signature, so the textbook's own
function in ``minixcept/layers/pooling.py`` is the model answer:

    max_pool_backward(dy, cache) -> dx
        cache: what the forward pass returned beside y. By default the textbook's
        max_pool2d_forward makes it: (x_shape, argmax, pool_size, strides, padding), argmax
        holding the winning offset p * kw + q of every output value (the first on ties).

Where the winner is chosen is where most max-pool mistakes live (zero padding, ties), and
with the textbook's cache the winner is already chosen. So the check also takes the
learner's own forward, ``max_pool_forward(x, pool_size, strides, padding) -> (y, cache)``
(the textbook's signature), and then grades the pair: y against TensorFlow, and dx from
the learner's backward on the learner's cache. The cache may then hold anything (x, y...).

Cases: TensorFlow's stored results (tests/reference/layers_pooling.npz: Xception's 3x3
stride-2 'same' pool on an odd 7x7 and an even 8x8 input of negative values only, so a zero
pad would win; the same pool on three values only, so maxima tie; a 2x2 'same' pool on an
odd size and a 2x2 'valid' one) and central differences in float64 where no two values
tie (stride 2 on odd and even sizes, 'valid' with a row no window reads, stride 1 where
each input sits in up to nine windows). A wrong result is compared with what the classic
mistakes give: dy handed to every tied maximum, the last tied maximum winning, a share
written with = where overlapping windows must add, and zero padding instead of -inf.
"""
import numpy as np

from ..layers.pooling import max_pool2d_backward, max_pool2d_forward
from ..padding import pad_spatial, window, window_geometry
from . import grader
from .grader import FORWARD_TOLERANCE, GRADIENT_TOLERANCE, NUMERICAL_TOLERANCE

#: the stored TensorFlow cases: name -> (pool_size, strides, padding, description)
TENSORFLOW_CASES = {
    'max_3x3_s2_same_odd': ((3, 3), (2, 2), 'same',
                            "TensorFlow, 3x3 pool at stride 2 'same', odd 7x7 input, every value negative"),
    'max_3x3_s2_same_even': ((3, 3), (2, 2), 'same',
                             "TensorFlow, 3x3 pool at stride 2 'same', even 8x8 input, every value negative"),
    'max_3x3_s2_same_ties': ((3, 3), (2, 2), 'same',
                             "TensorFlow, 3x3 pool at stride 2 'same', 8x8 input of three values (tied maxima)"),
    'max_2x2_same_odd': ((2, 2), (2, 2), 'same',
                         "TensorFlow, 2x2 pool 'same', odd 7x7 input, every value negative"),
    'max_2x2_valid': ((2, 2), (2, 2), 'valid', "TensorFlow, 2x2 pool 'valid', 6x7 input (last column unread)"),
}
#: float64 cases for finite differences, no ties: (input shape, pool, strides, padding, description)
NUMERICAL_CASES = [
    ((1, 7, 7, 2), 3, 2, 'same', "finite differences, 3x3 pool at stride 2 'same', odd 7x7"),
    ((1, 8, 6, 2), 3, 2, 'same', "finite differences, 3x3 pool at stride 2 'same', even 8x6"),
    ((1, 8, 9, 2), 3, 2, 'valid', "finite differences, 3x3 pool at stride 2 'valid', 8x9 (last row unread)"),
    ((1, 5, 6, 2), 3, 1, 'same', "finite differences, 3x3 pool at stride 1 'same' (up to nine windows per input)"),
]
MODEL_ANSWER = 'minixcept.layers.pooling.max_pool2d_backward'


# -- what the classic mistakes give -------------------------------------------------------

def _winners(x, pool_size, strides, padding, pad_value=-np.inf, ties='first'):
    """y and, for every offset k = p * kw + q, where that offset is counted as the window's winner.

    ties: 'first' (TensorFlow's: the first maximum in the window, row-major), 'last' (a >=
    where > belongs), 'every' (every input equal to the maximum).
    """
    kh, kw = pool_size
    out_hw, pads = window_geometry(x.shape[1:3], pool_size, strides, padding)
    x_pad = pad_spatial(x, pads, value=pad_value)
    views = [window(x_pad, p, q, out_hw, strides) for p in range(kh) for q in range(kw)]
    y = np.max(views, axis=0)
    if ties == 'every':
        return y, [view == y for view in views]
    best = np.full(y.shape, -1)
    for k, view in enumerate(views):
        later = (view == y) if ties == 'last' else (view == y) & (best < 0)   # 'last': each tie overwrites
        best = np.where(later, k, best)
    return y, [best == k for k in range(len(views))]


def _dx(dy, x, pool_size, strides, padding, pad_value=-np.inf, ties='first', assign=False):
    """dx with the knobs a learner can get wrong; assign: = in place of += in the offset loop."""
    kh, kw = pool_size
    out_hw, pads = window_geometry(x.shape[1:3], pool_size, strides, padding)
    (top, bottom), (left, right) = pads
    _, won = _winners(x, pool_size, strides, padding, pad_value, ties)
    n, h, w, c = x.shape
    dx_pad = np.zeros((n, h + top + bottom, w + left + right, c))
    for p in range(kh):
        for q in range(kw):
            share = dy * won[p * kw + q]
            if assign:
                window(dx_pad, p, q, out_hw, strides)[...] = share
            else:
                window(dx_pad, p, q, out_hw, strides)[...] += share
    return dx_pad[:, top:top + h, left:left + w]


def _dx_assigned_window_by_window(dy, x, pool_size, strides, padding):
    """A loop over the windows writing dy into the winner with =: where one input wins two
    overlapping windows, the later window's dy replaces the earlier one's."""
    kh, kw = pool_size
    (ho, wo), pads = window_geometry(x.shape[1:3], pool_size, strides, padding)
    (top, bottom), (left, right) = pads
    (sh, sw), (n, h, w, c) = strides, x.shape
    _, won = _winners(x, pool_size, strides, padding)
    winner = np.argmax(np.stack(won), axis=0)                                  # (N, Ho, Wo, C)
    dx_pad = np.zeros((n, h + top + bottom, w + left + right, c))
    images, channels = np.meshgrid(np.arange(n), np.arange(c), indexing='ij')
    for i in range(ho):
        for j in range(wo):
            k = winner[:, i, j, :]
            dx_pad[images, i * sh + k // kw, j * sw + k % kw, channels] = dy[:, i, j, :]
    return dx_pad[:, top:top + h, left:left + w]


def _dx_mistakes(dy, x, pool_size, strides, padding):
    args = (dy, x, pool_size, strides, padding)
    return [
        ("handing dy to every tied maximum (TensorFlow gives it to the first maximum in the "
         "window only, row-major; the others get 0)", _dx(*args, ties='every')),
        ("letting the last tied maximum win (>= where > keeps the first one)", _dx(*args, ties='last')),
        ("writing each offset's share with = where overlapping windows must add (+=)", _dx(*args, assign=True)),
        ("writing dy into each window's winner with = : an input that wins two overlapping "
         "windows must get the sum of both (+=)", _dx_assigned_window_by_window(*args)),
        ("padding with zeros instead of -inf (where every real value of a border window is "
         "negative, the pad wins and the gradient is cropped away with it)", _dx(*args, pad_value=0.0)),
    ]


def _dx_hint(index, shape):
    _, row, col, _ = index
    if row in (0, shape[1] - 1) or col in (0, shape[2] - 1):
        return ("the difference is on the border: pad with -inf (never zero), put 'same''s extra "
                "row/column after, and crop the padding off dx.")
    return ("an inner pixel: only the first maximum of each window (row-major) receives that "
            "window's dy, and an input that wins several overlapping windows receives their sum.")


# -- the check -----------------------------------------------------------------------------

def check_max_pool_backward(max_pool_backward, max_pool_forward=None):
    """Grade ``max_pool_backward(dy, cache) -> dx``.

    cache comes from ``max_pool_forward(x, pool_size, strides, padding) -> (y, cache)``: the
    textbook's ``max_pool2d_forward`` unless the learner's own forward is passed, in which
    case its y is graded too (against TensorFlow, before dx).
    """
    own_forward = max_pool_forward is not None
    forward = max_pool_forward if own_forward else max_pool2d_forward

    def run_pair(x, dy, pool_size, strides, padding, want_y, want_dx, tolerance, reference):
        if own_forward:
            y, cache = grader.parts(grader.call(forward, x, pool_size, strides, padding), ('y', 'cache'))
            if want_y is not None:
                y_zero_padded, _ = _winners(x, pool_size, strides, padding, pad_value=0.0)
                grader.compare('y (your forward)', y, want_y, FORWARD_TOLERANCE, reference=reference,
                               mistakes=[("padding with zeros instead of -inf (a zero pad wins every "
                                          "window whose real values are all negative)", y_zero_padded)],
                               hint=lambda index, shape: "y is the largest value of each window of the "
                                                         "input padded with -inf.")
        else:
            _, cache = max_pool2d_forward(x, pool_size, strides, padding)
        dx = grader.parts(grader.call(max_pool_backward, dy, cache), ('dx',))[0]
        grader.compare('dx', dx, want_dx, tolerance, reference=reference,
                       mistakes=_dx_mistakes(dy, x, pool_size, strides, padding), hint=_dx_hint)

    cases = []
    for name, (pool_size, strides, padding, description) in TENSORFLOW_CASES.items():
        def run(name=name, pool_size=pool_size, strides=strides, padding=padding):
            inputs, outputs = grader.fixture('layers_pooling', name)
            x, dy = inputs['x'].astype(np.float64), inputs['dy'].astype(np.float64)
            run_pair(x, dy, pool_size, strides, padding, outputs['y'], outputs['dx'],
                     GRADIENT_TOLERANCE, 'TensorFlow')
        cases.append((description, run))

    for seed, (shape, pool, stride, padding, description) in enumerate(NUMERICAL_CASES):
        def run(seed=seed, shape=shape, pool=pool, stride=stride, padding=padding):
            pool_size, strides = (pool, pool), (stride, stride)
            (x,) = grader.random_case(seed, shape)
            f = lambda: max_pool2d_forward(x, pool_size, strides, padding)[0]  # noqa: E731
            dy = np.random.default_rng(100 + seed).standard_normal(f().shape)
            want_dx = grader.numerical(f, x, dy)
            run_pair(x, dy, pool_size, strides, padding, None, want_dx, NUMERICAL_TOLERANCE,
                     'finite differences')
        cases.append((description, run))

    answer = ('minixcept.layers.pooling.max_pool2d_forward and max_pool2d_backward' if own_forward
              else MODEL_ANSWER)
    return grader.grade('max-pool backward', cases, answer)


# The model answer, for the tests and the tour: the textbook's own function.
model_answers = {check_max_pool_backward: max_pool2d_backward}
