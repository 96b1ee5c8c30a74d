"""Numerical gradient checking: is a hand-written backward pass right?

Pick a random upstream gradient ``dout`` (never all ones: batch-norm's gradients
vanish under ones and the check would prove nothing) and compare, for every
input and parameter ``a``, the analytic gradient from ``backward(dout)`` with
the central difference of the scalar <f(a), dout>:

    d<f, dout>/da[i]  ~=  (<f(a + eps e_i), dout> - <f(a - eps e_i), dout>) / (2 eps)

in float64, where the difference is accurate to about eps^2. A correct backward
pass gives a relative error around 1e-9; anything above 1e-6 is a bug.

Why float64 and eps = 1e-6: the central difference errs by about eps^2 (the Taylor terms
it drops) plus u / eps (rounding of f, u the unit roundoff, relative to f's size). In
float64, u = 1.1e-16: eps = 1e-6 gives about 1e-12 + 1e-10, far below the 1e-6 bar.
In float32, u = 6e-8: the best eps (about 4e-3) still leaves about 1e-5, so a wrong
gradient off by less than that could not be told from rounding.

    >>> from minixcept import layers, gradcheck
    >>> errors = gradcheck.check_layer(layers.DepthwiseConv2D(3, padding='same'), x)
    >>> errors    # {'input': 3e-10, 'depthwise_kernel': 2e-10, 'bias': 1e-10}
"""
import numpy as np

from . import checks
from .backend import asnumpy, get_array_module


def rel_error(analytic, numeric):
    """max |a - b| / max(max |a|, max |b|): one number, scale-free, 0 when both are 0."""
    analytic = asnumpy(checks.numbers_array(analytic, 'analytic', 'rel_error'))
    numeric = asnumpy(checks.numbers_array(numeric, 'numeric', 'rel_error'))
    checks.shape(numeric, analytic.shape, 'numeric (the shape of analytic)', 'rel_error')
    scale = max(np.abs(analytic).max(initial=0), np.abs(numeric).max(initial=0))
    if scale == 0:
        return 0.0
    return float(np.abs(analytic - numeric).max() / scale)


def numerical_gradient(f, array, dout, eps=1e-6):
    """Central-difference gradient of <f(), dout> with respect to ``array``.

    ``f`` takes no argument and reads ``array``, which is perturbed in place one
    element at a time and restored. Indexing ``array`` itself (not a reshaped copy)
    keeps this right for non-contiguous arrays such as transposed views.
    """
    if not callable(f):
        raise TypeError(f"numerical_gradient: f must be a function of no arguments, got {type(f).__name__}")
    checks.array(array, 'array', 'numerical_gradient')       # floats: an integer array would round each nudge away
    checks.number(eps, 'eps', 'numerical_gradient', 0, low_open=True)
    if checks.is_array(dout):                     # f's output shape; a plain number for a scalar f
        checks.shape(dout, np.shape(f()), "dout (the shape of f's output)", 'numerical_gradient')
    else:
        checks.number(dout, 'dout', 'numerical_gradient')
    grad = np.zeros(array.shape, dtype=np.float64)
    originals = asnumpy(array).copy()     # one copy to the host, not one per element on a GPU
    dout_sum = lambda: float((f() * dout).sum())  # noqa: E731
    for index in np.ndindex(*array.shape):
        original = originals[index].item()
        array[index] = original + eps
        plus = dout_sum()
        array[index] = original - eps
        minus = dout_sum()
        array[index] = original
        grad[index] = (plus - minus) / (2 * eps)
    return grad


def check_gradients(forward, backward, arrays, dout, eps=1e-6):
    """Relative error of each analytic gradient against finite differences.

    forward():        runs the computation, reading the arrays in ``arrays`` (float64)
    backward(dout):   returns {name: analytic gradient} for the same names
    arrays:           {name: the array the gradient is taken with respect to}
    """
    for name, function in (('forward', forward), ('backward', backward)):
        if not callable(function):
            raise TypeError(f"check_gradients: {name} must be a function, got {type(function).__name__}")
    if not isinstance(arrays, dict):
        raise TypeError(f"check_gradients: arrays must be a dict {{name: array}}, got {type(arrays).__name__}")
    forward()
    analytic = backward(dout)
    missing = sorted(set(arrays) - set(analytic))
    if missing:
        raise ValueError(f"check_gradients: backward returned no gradient for {missing}")
    return {name: rel_error(analytic[name], numerical_gradient(forward, array, dout, eps))
            for name, array in arrays.items()}


def check_layer(layer, x, training=False, seed=0, eps=1e-6):
    """Check a layer's input and parameter gradients; returns {'input': err, weight name: err}.

    The layer is built for ``x`` if needed and run in float64; ``dout`` is standard normal.
    Afterwards the layer is exactly as it was: its dtype, weights, moving statistics, grads
    and caches are put back (a check with ``training=True`` would otherwise move a
    batch-norm's moving statistics), so any layer of a working model can be checked.
    """
    from .layers.base import Layer
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer: layer must be a minixcept layer, got {type(layer).__name__}")
    checks.array(x, 'x', f"check_layer, layer {layer.name!r}")
    checks.flag(training, 'training', 'check_layer')
    checks.integer(seed, 'seed', 'check_layer', minimum=0)
    checks.number(eps, 'eps', 'check_layer', 0, low_open=True)
    attributes = dict(layer.__dict__)
    dict_contents = {name: dict(value) for name, value in attributes.items() if isinstance(value, dict)}
    param_values = {name: array.copy() for name, array in layer.params.items()}
    try:
        return _check_layer_in_float64(layer, x, training, seed, eps)
    finally:
        # the same objects back (a model or an engine may hold them), with their old values
        layer.__dict__.clear()
        layer.__dict__.update(attributes)
        for name, contents in dict_contents.items():
            attributes[name].clear()
            attributes[name].update(contents)
        for name, values in param_values.items():
            layer.params[name][...] = values


def _check_layer_in_float64(layer, x, training, seed, eps):
    xp = get_array_module(x)
    x = x.astype(np.float64)
    if not layer.built:
        layer.build(x.shape)
    layer.astype(np.float64)
    rng = np.random.default_rng(seed)
    y = layer.forward(x, training=training)
    dout = xp.asarray(rng.standard_normal(y.shape))

    def backward(d):
        dx = layer.backward(d)
        return {'input': dx, **layer.grads}

    trained = [name for name in layer.weight_names if name not in ('moving_mean', 'moving_variance')]
    arrays = {'input': x, **{name: layer.params[name] for name in trained}}
    return check_gradients(lambda: layer.forward(x, training=training), backward, arrays, dout, eps)
