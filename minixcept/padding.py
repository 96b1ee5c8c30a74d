"""TensorFlow's 'valid' and 'same' padding arithmetic, in one place.

Every windowed layer (convolutions, max pooling) asks this module how big its
output is and how many rows and columns to pad on each side.

'valid': no padding; out = floor((in - k) / s) + 1.
'same':  out = ceil(in / s); the total padding is max((out - 1) * s + k - in, 0),
         with total // 2 before and the rest *after*. At stride 2 the total can be
         odd, so TensorFlow pads one more row at the bottom and one more column on
         the right than at the top and left (e.g. block3_pool at 299 px pads (0, 1)).

Why it matters which side gets the extra row: output i reads the window starting at input
row i * s - before. The ImageNet weights were learned with TensorFlow's windows; pad the
extra row before instead and every window of that layer starts one pixel higher (and one
to the left). The output has the same shape, nothing fails, and every number from there on
differs from Keras's. tests/test_padding.py has TensorFlow itself fix the convention.
'valid' keeps only the windows that fit, so the last rows of the input may be read by no
window (their gradient is zero).
"""
import numbers


def as_pair(value, what='value'):
    """2 -> (2, 2); (2, 3) -> (2, 3): whole numbers of 1 or more."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{what} must be a whole number or a pair of them, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"{what} must be a whole number or a pair of them, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be 1 or more, got {value!r}")
    return tuple(int(v) for v in pair)


def check_padding(padding):
    if not isinstance(padding, str):
        raise TypeError(f"padding must be 'valid' or 'same', got {padding!r}")
    padding = padding.lower()
    if padding not in ('valid', 'same'):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    return padding


def output_length(size, kernel, stride, padding):
    """Length of the output along one spatial axis (None for an axis of any size)."""
    if size is None:
        return None
    if padding == 'same':
        return -(-size // stride)          # ceil(size / stride)
    return (size - kernel) // stride + 1


def pad_before_after(size, kernel, stride, padding):
    """(before, after) padding along one axis, TensorFlow's way."""
    if padding == 'valid':
        return (0, 0)
    out = output_length(size, kernel, stride, padding)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)


def window_geometry(input_hw, kernel_size, strides, padding):
    """Everything a windowed layer needs about its spatial arithmetic.

    Returns ``(out_h, out_w), ((top, bottom), (left, right))``.
    Raises ValueError if a 'valid' window does not fit in the input. A side of None (a
    model built for any input size) gives an output side and padding of None.
    """
    (h, w), (kh, kw), (sh, sw) = input_hw, kernel_size, strides
    out_h = output_length(h, kh, sh, padding)
    out_w = output_length(w, kw, sw, padding)
    if any(out is not None and out < 1 for out in (out_h, out_w)):
        raise ValueError(
            f"a {kh}x{kw} window with strides {strides} and padding {padding!r} "
            f"does not fit an input of {h}x{w}")
    pads = tuple(None if size is None else pad_before_after(size, k, stride, padding)
                 for size, k, stride in ((h, kh, sh), (w, kw, sw)))
    return (out_h, out_w), pads


def pad_spatial(x, pads, value=0.0):
    """Pad the H and W axes of an NHWC array; no copy when nothing to pad."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return x
    from .backend import get_array_module
    xp = get_array_module(x)
    n, h, w, c = x.shape
    padded = xp.full((n, h + top + bottom, w + left + right, c), value, dtype=x.dtype)
    padded[:, top:top + h, left:left + w, :] = x
    return padded


def crop_spatial(x_padded, pads):
    """Undo ``pad_spatial``: the inverse used to turn a padded gradient into dx."""
    (top, bottom), (left, right) = pads
    h = x_padded.shape[1] - top - bottom
    w = x_padded.shape[2] - left - right
    return x_padded[:, top:top + h, left:left + w, :]


def window(x_padded, i, j, out_hw, strides):
    """The view of ``x_padded`` that kernel offset (i, j) sees at every output pixel.

    x_padded: (N, Hp, Wp, C) -> (N, out_h, out_w, C), a strided view, no copy.
    """
    (out_h, out_w), (sh, sw) = out_hw, strides
    return x_padded[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
