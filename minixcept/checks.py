"""Door checks: what a public function is given is checked once, before the formula runs.

A wrong argument should stop at the door with a message that says which argument, of
which layer or function, and what was expected - not three frames deep in NumPy as an
einsum or broadcast error. Each check below raises one of three typed errors:

- ``TypeError``: not the kind of thing expected (a list where an array goes, a string
  where a number goes, integer pixels where floats go);
- ``ValueError``: the right kind but out of range (``classes=0``, ``beta_1=1.0``, a label 2
  for binary cross-entropy);
- ``ShapeError`` (a ValueError): an array of the wrong shape.

Every message starts with ``who`` (``"layer 'block1_conv1'"``, ``"SGD"``, ``"Xception"``),
then names the argument. The layer files call these from their doors (``Layer.forward``,
``backward``, ``set_weights``, the constructors) so the formulas below them stay as they are.
"""
import math
import numbers

import numpy as np

from .errors import ShapeError


def is_array(value):
    """A NumPy or CuPy array (anything with a shape, a dtype and a number of axes; not a NumPy scalar)."""
    return all(hasattr(value, name) for name in ('shape', 'dtype', 'ndim')) and not isinstance(value, np.generic)


def array(value, name, who, kinds='f', rank=None):
    """``value`` itself, after checking it is an array of floats (kinds 'f') or of real numbers
    ('biuf'), with ``rank`` axes if given."""
    if not is_array(value):
        raise TypeError(f"{who}: {name} must be a NumPy or CuPy array, got {type(value).__name__}")
    if value.dtype.kind not in kinds:
        wanted = 'floating-point numbers' if kinds == 'f' else 'real numbers'
        raise TypeError(f"{who}: {name} must hold {wanted}, got dtype {value.dtype}")
    if rank is not None and value.ndim != rank:
        raise ShapeError(f"{who}: {name} must be {rank}-D, got shape {tuple(value.shape)}")
    return value


def numbers_array(value, name, who):
    """``value`` as an array of real numbers (a list of numbers becomes one); TypeError for
    strings, objects, ragged nested lists."""
    if is_array(value):
        return array(value, name, who, kinds='biuf')
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{who}: {name} must be an array of numbers, got a {type(value).__name__}")
    try:
        converted = np.asarray(value)
    except (ValueError, TypeError):
        raise TypeError(f"{who}: {name} must be an array of numbers, got a ragged or mixed "
                        f"{type(value).__name__}") from None
    if converted.dtype.kind not in 'biuf':
        raise TypeError(f"{who}: {name} must be an array of numbers, got {type(value).__name__} "
                        f"of dtype {converted.dtype}")
    return converted


def shape(value, expected, name, who):
    """ShapeError unless ``value.shape`` equals ``expected``."""
    if tuple(value.shape) != tuple(expected):
        raise ShapeError(f"{who}: {name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def integer(value, name, who, minimum=None):
    """``value`` as an int: a whole number (not a bool, not a float), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be a whole number, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {name} must be at least {minimum}, got {value}")
    return int(value)


def number(value, name, who, low=None, high=None, low_open=False, high_open=False):
    """``value`` as a float: a finite real number (not a bool, not a string) in the given
    interval; ``low_open`` / ``high_open`` leave that end out."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        interval = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}")
        raise ValueError(f"{who}: {name} must be a finite number in {interval}, got {value}")
    return value


def flag(value, name, who):
    """``value`` as a bool: True or False (NumPy's bools too), nothing else."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{who}: {name} must be True or False, got {value!r}")
    return bool(value)


def choice(value, name, who, options):
    """``value`` if it is one of ``options``, else ValueError listing them."""
    if not any(value is option or (type(value) is type(option) and value == option) for option in options):
        raise ValueError(f"{who}: {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def optional_name(value, name, who):
    """``value`` if it is None or a string (a layer's name)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{who}: {name} must be a layer name (a string) or None, got {type(value).__name__}")
    return value
