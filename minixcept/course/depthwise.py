"""Exercises on the depthwise convolution: its forward sum and its gradients (tour chapters 1-2).

The learner writes functions with the textbook's signatures, so the textbook's own pair in
``minixcept/layers/depthwise.py`` is the model answer:

    depthwise_forward(x, depthwise_kernel, bias, strides, padding) -> y   (or (y, cache))
    depthwise_backward(dy, cache) -> (dx, ddepthwise_kernel, dbias)
        cache = (x, depthwise_kernel, strides, padding), as the textbook's forward makes it

Each is checked on TensorFlow's stored results (tests/reference/layers_depthwise.npz: 'valid',
'same', stride 2 on an odd 7x7 and an even 8x8 input) and on central differences in float64
(stride 2 on odd and even sizes, a 'valid' stride-2 input whose last row no window reads, a
random upstream gradient). A wrong result is compared with what the classic mistakes give.
"""
import numpy as np

from ..layers.depthwise import depthwise_conv2d_backward, depthwise_conv2d_forward
from ..padding import window_geometry
from . import grader
from .grader import GRADIENT_TOLERANCE, FORWARD_TOLERANCE, NUMERICAL_TOLERANCE, Wrong

#: the stored TensorFlow cases: name -> (strides, padding, description)
TENSORFLOW_CASES = {
    '3x3_valid': ((1, 1), 'valid', "TensorFlow, 3x3 'valid', 6x7 input"),
    '3x3_same': ((1, 1), 'same', "TensorFlow, 3x3 'same', 5x5 input"),
    '3x3_s2_same_odd': ((2, 2), 'same', "TensorFlow, 3x3 'same' at stride 2, odd 7x7 input"),
    '3x3_s2_same_even': ((2, 2), 'same', "TensorFlow, 3x3 'same' at stride 2, even 8x8 input"),
}
#: float64 cases for finite differences: (input shape, kernel, strides, padding, description)
NUMERICAL_CASES = [
    ((2, 7, 7, 2), 3, (2, 2), 'same', "finite differences, stride 2 'same', odd 7x7"),
    ((1, 8, 6, 2), 3, (2, 2), 'same', "finite differences, stride 2 'same', even 8x6"),
    ((1, 8, 9, 2), 3, (2, 2), 'valid', "finite differences, stride 2 'valid', 8x9 (last row unread)"),
    ((1, 6, 5, 3), 2, (1, 1), 'same', "finite differences, 2x2 'same' (the extra column after)"),
]


# -- what the classic mistakes give -------------------------------------------------------

def _pads_swapped(pads):
    """The extra row and column before instead of after: symmetric thinking, TensorFlow's opposite."""
    (top, bottom), (left, right) = pads
    return (bottom, top), (right, left)


def _forward_with_pads(x, kernel, bias, strides, pads):
    """The forward sum on an input padded by hand with ``pads``: 'valid' on the padded array."""
    (top, bottom), (left, right) = pads
    x_pad = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return depthwise_conv2d_forward(x_pad, kernel, bias, strides, 'valid')[0]


def _forward_mistakes(x, kernel, bias, strides, padding):
    _, pads = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    mistakes = [("a kernel turned 180 degrees (a convolution where TensorFlow correlates)",
                 depthwise_conv2d_forward(x, kernel[::-1, ::-1], bias, strides, padding)[0])]
    if bias is not None:
        mistakes.append(("leaving the bias out", depthwise_conv2d_forward(x, kernel, None, strides, padding)[0]))
    if _pads_swapped(pads) != pads:
        mistakes.append(("padding the extra row/column before (top/left) instead of after",
                         _forward_with_pads(x, kernel, bias, strides, _pads_swapped(pads))))
    return mistakes


def _dx_with(dy, cache, pads=None, turn=True, crop_shift=0):
    """dx by the 180-degree route, with the knobs a learner can get wrong: the pads the crop
    undoes, whether the kernel is turned, and a crop moved by ``crop_shift`` rows and columns."""
    x, kernel, strides, padding = cache
    (_, _), true_pads = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    (top, bottom), (left, right) = pads or true_pads
    kh, kw = kernel.shape[:2]
    n, h, w, c = x.shape
    (sh, sw), (ho, wo) = strides, dy.shape[1:3]
    dilated = np.zeros((n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c))
    dilated[:, ::sh, ::sw] = dy                                   # s - 1 zeros between entries
    hp, wp = h + sum(true_pads[0]), w + sum(true_pads[1])         # the padded input's size
    dy_pad = np.pad(dilated, ((0, 0), (kh - 1, hp - dilated.shape[1]), (kw - 1, wp - dilated.shape[2]), (0, 0)))
    turned = kernel[::-1, ::-1] if turn else kernel
    dx_pad = depthwise_conv2d_forward(dy_pad, turned, None, (1, 1), 'valid')[0]   # (N, Hp, Wp, C)
    top, left = top + crop_shift, left + crop_shift
    out = np.zeros_like(x, dtype=np.float64)
    rows, cols = dx_pad[:, top:top + h, left:left + w].shape[1:3]
    out[:, :rows, :cols] = dx_pad[:, top:top + h, left:left + w]
    return out


def _backward_mistakes(dy, cache):
    x, kernel, strides, padding = cache
    _, pads = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    mistakes = [("a kernel not turned by 180 degrees in the input gradient", _dx_with(dy, cache, turn=False))]
    if _pads_swapped(pads) != pads:
        mistakes.append(("cropping as if the extra padding row/column were before (symmetric-style "
                         "padding at stride 2)", _dx_with(dy, cache, pads=_pads_swapped(pads))))
    mistakes.append(("a crop one row and column too far (off by one)", _dx_with(dy, cache, crop_shift=1)))
    mistakes.append(("writing each offset's share with = where overlapping windows must add (+=)",
                     _dx_overwritten(dy, cache)))
    return mistakes


def _dx_overwritten(dy, cache):
    """The scatter of the forward sum with = in place of +=: the last offset to reach a pixel wins."""
    x, kernel, strides, padding = cache
    (ho, wo), ((top, bottom), (left, right)) = window_geometry(x.shape[1:3], kernel.shape[:2], strides, padding)
    (sh, sw), (h, w) = strides, x.shape[1:3]
    dx_pad = np.zeros((x.shape[0], h + top + bottom, w + left + right, x.shape[3]))
    for p in range(kernel.shape[0]):
        for q in range(kernel.shape[1]):
            dx_pad[:, p:p + sh * (ho - 1) + 1:sh, q:q + sw * (wo - 1) + 1:sw] = dy * kernel[p, q, :, 0]
    return dx_pad[:, top:top + h, left:left + w]


def _dx_hint(index, shape):
    _, row, col, _ = index
    if row in (0, shape[1] - 1) or col in (0, shape[2] - 1):
        return ("the difference is on the border: look at the padding - how many rows your dy is "
                "padded by before and after, and which rows the crop keeps (at stride 2, 'same' "
                "puts the extra row after).")
    return ("an inner pixel: check that every kernel offset (p, q) adds its share (+=, not =) and "
            "that the kernel is turned for the input gradient.")


# -- the checks ----------------------------------------------------------------------------

def check_depthwise_forward(depthwise_forward):
    """Grade ``depthwise_forward(x, depthwise_kernel, bias, strides, padding) -> y``."""
    cases = []
    for name, (strides, padding, description) in TENSORFLOW_CASES.items():
        def run(name=name, strides=strides, padding=padding):
            inputs, outputs = grader.fixture('layers_depthwise', name)
            x, kernel = inputs['x'].astype(np.float64), inputs['w0'].astype(np.float64)
            bias = inputs['w1'].astype(np.float64) if 'w1' in inputs else None
            result = grader.call(depthwise_forward, x, kernel, bias, strides, padding)
            y = result[0] if isinstance(result, tuple) else result     # (y, cache) or y alone
            grader.compare('y', y, outputs['y'], FORWARD_TOLERANCE,
                           mistakes=_forward_mistakes(x, kernel, bias, strides, padding),
                           hint=lambda index, shape: "check the window each output reads: rows i*s + p "
                                                     "of the padded input, p = 0..kh-1.")
        cases.append((description, run))
    return grader.grade('depthwise forward', cases,
                        'minixcept.layers.depthwise.depthwise_conv2d_forward')


def check_depthwise_backward(depthwise_backward):
    """Grade ``depthwise_backward(dy, cache) -> (dx, ddepthwise_kernel, dbias)``,
    cache = (x, depthwise_kernel, strides, padding)."""
    names = ('dx', 'ddepthwise_kernel', 'dbias')

    def compare_all(result, expected, dy, cache, tolerance, reference):
        dx, dkernel, dbias = grader.parts(result, names)
        grader.compare('dx', dx, expected[0], tolerance, mistakes=_backward_mistakes(dy, cache),
                       hint=_dx_hint, reference=reference)
        grader.compare('ddepthwise_kernel', dkernel, expected[1], tolerance, layout='HWCK',
                       hint=lambda index, shape: "each tap (p, q) is the sum over images, rows and "
                                                 "columns of the window it saw times dy.",
                       reference=reference)
        grader.compare('dbias', dbias, expected[2], tolerance, layout='C',
                       hint=lambda index, shape: "dbias[c] is the sum of dy over every image, row "
                                                 "and column of channel c.",
                       reference=reference)

    cases = []
    for name, (strides, padding, description) in TENSORFLOW_CASES.items():
        def run(name=name, strides=strides, padding=padding):
            inputs, outputs = grader.fixture('layers_depthwise', name)
            x, kernel, dy = (inputs[key].astype(np.float64) for key in ('x', 'w0', 'dy'))
            cache = (x, kernel, strides, padding)
            dbias = dy.sum(axis=(0, 1, 2)) if 'dw1' not in outputs else outputs['dw1']
            result = grader.call(depthwise_backward, dy, cache)
            compare_all(result, (outputs['dx'], outputs['dw0'], dbias), dy, cache,
                        GRADIENT_TOLERANCE, 'TensorFlow')
        cases.append((description, run))

    for seed, (shape, k, strides, padding, description) in enumerate(NUMERICAL_CASES):
        def run(seed=seed, shape=shape, k=k, strides=strides, padding=padding):
            x, kernel, bias = grader.random_case(seed, shape, (k, k, shape[3], 1), (shape[3],))
            forward = lambda: depthwise_conv2d_forward(x, kernel, bias, strides, padding)[0]  # noqa: E731
            dy = np.random.default_rng(100 + seed).standard_normal(forward().shape)
            expected = [grader.numerical(forward, array, dy) for array in (x, kernel, bias)]
            cache = (x, kernel, strides, padding)
            compare_all(grader.call(depthwise_backward, dy, cache), expected, dy, cache,
                        NUMERICAL_TOLERANCE, 'finite differences')
        cases.append((description, run))
    return grader.grade('depthwise backward', cases,
                        'minixcept.layers.depthwise.depthwise_conv2d_backward')


# The model answers, for the tests and the tour: the textbook's own pair.
model_answers = {check_depthwise_forward: depthwise_conv2d_forward,
                 check_depthwise_backward: depthwise_conv2d_backward}
