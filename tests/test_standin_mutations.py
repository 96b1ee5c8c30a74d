"""Mutation check of the CuPy stand-in: host/device mistakes made on purpose in the package.

Each case rewrites one package function from its own source with one mistake of a
different kind (``old`` -> ``new``), for this test only, and runs a probe that the suite's
tests also run. It shows three things: on NumPy the mistake is invisible (the result is
unchanged); on the stand-in the unchanged package passes the probe; on the stand-in the
mistake fails it, as it would on a GPU. If the package's source moves on and a mutation no
longer applies, the test says so: rewrite the mutation, do not drop it.
"""
import inspect
import textwrap

import h5py
import numpy as np
import pytest

import cupy_standin
import minixcept
from conftest import array_backend
from minixcept import layers as L
from minixcept import losses
from minixcept.files import weights as weight_files
from minixcept.layers import base, conv, dense, normalization, pooling


def mutate(monkeypatch, owner, name, replacements):
    """Give ``owner.name`` (a function of a module, or a method of a class) the code of its own
    source with each (old, new) replaced. The code object itself changes, so every module that
    imported the function by name runs the mistake too."""
    function = getattr(owner, name)
    source = textwrap.dedent(inspect.getsource(function))
    for old, new in replacements:
        assert source.count(old) == 1, f'{function.__qualname__} no longer contains {old!r}: update the mutation'
        source = source.replace(old, new)
    namespace = dict(function.__globals__)
    exec(compile(source, inspect.getsourcefile(function), 'exec'), namespace)
    monkeypatch.setattr(function, '__code__', namespace[name].__code__)


# -- probes: small runs of the paths the backend-parametrised suite covers; each returns NumPy --

def batch_norm_forward_and_backward(xp, rng):
    layer = L.BatchNormalization()
    layer.build((2, 4, 4, 3))
    layer.set_weights([rng.uniform(0.5, 1.5, 3).astype(np.float32) for _ in range(4)])
    x = xp.asarray(rng.standard_normal((2, 4, 4, 3)).astype(np.float32))
    y = layer.forward(x, training=False)
    return minixcept.asnumpy(layer.backward(y))


def dropout_forward(xp, rng):
    layer = L.Dropout(0.5, seed=3)
    return minixcept.asnumpy(layer.forward(xp.asarray(rng.standard_normal((4, 6)).astype(np.float32)), training=True))


def dense_forward(xp, rng):
    layer = L.Dense(5)
    layer.build((3, 4))
    return minixcept.asnumpy(layer.forward(xp.asarray(rng.standard_normal((3, 4)).astype(np.float32))))


def loss_value(xp, rng):
    logits = xp.asarray(rng.standard_normal((6, 1)).astype(np.float32))
    return np.float32(minixcept.asnumpy(losses.BinaryCrossentropy(from_logits=True).forward(logits, [0, 1, 1, 0, 1, 0])))


def saved_weights(xp, rng, tmp_path):
    model = minixcept.Sequential([L.Conv2D(2, 3), L.BatchNormalization()], input_shape=(5, 5, 3))
    path = tmp_path / f'{minixcept.backend.current()}.h5'
    model.save_weights(path)
    with h5py.File(path, 'r') as f:
        conv = f[f.attrs['layer_names'][0]]                   # names are numbered per process: go by order
        return conv[conv.attrs['weight_names'][0]][()]


def max_pool_gradient(xp, rng):
    layer = L.MaxPooling2D(3, strides=2, padding='same')
    x = xp.asarray(rng.standard_normal((2, 7, 7, 3)).astype(np.float32))
    layer.forward(x, training=True)
    return minixcept.asnumpy(layer.backward(xp.asarray(rng.standard_normal((2, 4, 4, 3)).astype(np.float32))))


def padded_convolution(xp, rng):
    layer = L.Conv2D(4, 3, padding='same')
    return minixcept.asnumpy(layer.forward(xp.asarray(rng.standard_normal((1, 5, 5, 2)).astype(np.float32))))


SCATTER_BACKWARD = '''    n, i, j, c = (axis.reshape(-1) for axis in xp.indices(dy.shape))
    rows = i * strides[0] + argmax.reshape(-1) // kw          # the winner's row in dx_pad
    cols = j * strides[1] + argmax.reshape(-1) % kw
    np.add.at(dx_pad, (n, rows, cols, c), dy.reshape(-1))
'''
LOOP_BACKWARD = '''    for p in range(kh):
        for q in range(kw):
            window(dx_pad, p, q, out_hw, strides)[...] += dy * (argmax == p * kw + q)
'''

# (kind, where, replacements, probe, what the stand-in raises)
MUTATIONS = {
    'implicit conversion (np.asarray of a device array)': (
        (normalization, 'batch_norm_forward'),
        [('inv_std = 1.0 / xp.sqrt(variance + epsilon)',
          'inv_std = xp.asarray(1.0 / np.sqrt(np.asarray(variance) + epsilon))')],
        batch_norm_forward_and_backward, (TypeError, 'Implicit conversion to a NumPy array')),
    'NumPy array mixed into device arithmetic (dropout mask left on the host)': (
        (dense, 'dropout_forward'),
        [('mask = xp.asarray(keep, dtype=x.dtype) / x.dtype.type(1 - rate)',
          'mask = keep.astype(x.dtype) / x.dtype.type(1 - rate)')],
        dropout_forward, (TypeError, 'Unsupported type')),
    'NumPy-only function (vecmat, not in CuPy)': (
        (dense, 'dense_forward'),
        [('y = x @ kernel', 'y = get_array_module(x).vecmat(x, kernel)')],
        dense_forward, (AttributeError, 'not in CuPy')),
    'host-side scalar loop (float() per element)': (
        (losses.BinaryCrossentropy, 'forward'),
        [('return per_example.mean()',
          'return sum(float(v) for v in per_example.reshape(-1)) / per_example.size')],
        loss_value, (cupy_standin.DeviceRuleError, 'host-side scalar loop')),
    'missing asnumpy before saving': (
        (base.Layer, 'get_weights'),
        [('backend.asnumpy(self.params[name])', 'self.params[name]')],
        saved_weights, (TypeError, 'Implicit conversion to a NumPy array')),
    'np.add.at (scatter) for the max-pooling gradient': (
        (pooling, 'max_pool2d_backward'),
        [(LOOP_BACKWARD, SCATTER_BACKWARD)],
        max_pool_gradient, (cupy_standin.DeviceRuleError, 'scatter of floats')),
    'NumPy constructor where xp was meant (a host buffer for device results)': (
        (conv, 'conv2d_forward'),
        [('y = xp.zeros((n * out_hw[0] * out_hw[1], c_out), dtype=x.dtype)',
          'y = np.zeros((n * out_hw[0] * out_hw[1], c_out), dtype=x.dtype)')],
        padded_convolution, (TypeError, 'Unsupported type')),
}

# saving goes through two conversions (Layer.get_weights and the writer's own); the mistake is
# that neither is there
SECOND_SAVING_MUTATION = (weight_files, 'save_weights',
                          [('[backend.asnumpy(w) for w in layer.get_weights()]', 'list(layer.get_weights())')])


def run_probe(probe, backend_name, tmp_path):
    rng = np.random.default_rng(7)
    minixcept.layers.set_seed(0)
    with array_backend(backend_name) as xp:
        return probe(xp, rng, tmp_path) if probe is saved_weights else probe(xp, rng)


@pytest.mark.parametrize('kind', list(MUTATIONS))
def test_mistake_is_invisible_on_numpy_and_fails_on_the_stand_in(kind, monkeypatch, tmp_path):
    (owner, name), replacements, probe, (error, message) = MUTATIONS[kind]
    right = run_probe(probe, 'numpy', tmp_path)
    np.testing.assert_allclose(run_probe(probe, 'standin', tmp_path), right, rtol=1e-6, atol=1e-6)

    mutate(monkeypatch, owner, name, replacements)
    if probe is saved_weights:
        mutate(monkeypatch, *SECOND_SAVING_MUTATION)
    np.testing.assert_allclose(run_probe(probe, 'numpy', tmp_path), right, rtol=1e-5, atol=1e-6)
    with pytest.raises(error, match=message):
        run_probe(probe, 'standin', tmp_path)


def test_at_least_six_kinds():
    assert len(MUTATIONS) >= 6
