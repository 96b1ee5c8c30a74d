"""The backend switch: NumPy or CuPy arrays, chosen at run time or by MINIXCEPT_BACKEND."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minixcept import backend

REPO = Path(__file__).resolve().parents[1]


def test_use_numpy_puts_new_arrays_in_numpy():
    previous = backend.current()
    try:
        backend.use('numpy')
        assert backend.current() == 'numpy' and backend.xp() is np
        array = backend.to_device([[1, 2], [3, 4]], np.float32)
        assert type(array) is np.ndarray and array.dtype == np.float32
    finally:
        backend.use(previous)


def test_get_array_module_follows_the_arrays(xp):
    on_device = backend.to_device(np.arange(3.0))
    assert backend.get_array_module(on_device) is xp
    assert backend.get_array_module(np.arange(3.0)) is np
    assert backend.get_array_module(np.arange(3.0), on_device) is xp      # any device array decides
    assert backend.get_array_module() is np


def test_asnumpy_brings_arrays_back(xp):
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    back = backend.asnumpy(backend.to_device(host))
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, host)
    assert backend.asnumpy(host) is host                                  # NumPy in, no copy


def test_to_device_casts_only_when_asked(xp):
    as_float64 = backend.to_device(np.ones(3, np.float64))
    as_float32 = backend.to_device(np.ones(3, np.float64), np.float32)
    assert isinstance(as_float64, xp.ndarray) and as_float64.dtype == np.float64
    assert isinstance(as_float32, xp.ndarray) and as_float32.dtype == np.float32


def test_to_device_moves_arrays_back_to_numpy(xp):
    """Weights made on one backend can be set on a layer after switching to NumPy."""
    on_device = backend.to_device(np.arange(4.0))
    previous = backend.current()
    try:
        backend.use('numpy')
        on_host = backend.to_device(on_device, np.float32)
    finally:
        backend.use(previous)
    assert type(on_host) is np.ndarray and on_host.dtype == np.float32
    np.testing.assert_array_equal(on_host, np.arange(4.0))


def test_unknown_backend_is_refused_and_nothing_changes():
    previous = backend.current()
    with pytest.raises(ValueError, match="unknown backend 'torch'.*numpy.*cupy"):
        backend.use('torch')
    assert backend.current() == previous


def test_cupy_without_a_gpu_raises_a_clear_backend_error():
    if backend.gpu_available():
        pytest.skip('a GPU is present, so cupy is usable here')
    previous = backend.current()
    with pytest.raises(backend.BackendError) as raised:
        backend.use('cupy')
    message = str(raised.value)
    assert "backend 'cupy'" in message
    assert 'pip install' in message or 'no usable GPU' in message         # it says what is missing
    assert backend.current() == previous
    assert isinstance(raised.value, RuntimeError)


def backend_chosen_by(value):
    """Import minixcept in a fresh interpreter with MINIXCEPT_BACKEND=value and use the backend
    (a choice that cannot be honoured fails there, not at import)."""
    env = dict(os.environ)
    env.pop('MINIXCEPT_BACKEND', None)
    if value is not None:
        env['MINIXCEPT_BACKEND'] = value
    return subprocess.run([sys.executable, '-c', 'import minixcept.backend as b; b.xp(); print(b.current())'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('value', [None, 'numpy', ' NumPy '], ids=['unset', 'numpy', 'spaced_capitals'])
def test_environment_variable_selects_numpy(value):
    result = backend_chosen_by(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'numpy'


def test_environment_variable_selects_cupy():
    result = backend_chosen_by('cupy')
    if backend.gpu_available():
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == 'cupy'
    else:
        assert result.returncode != 0
        assert 'BackendError' in result.stderr and "backend 'cupy'" in result.stderr


def test_environment_variable_with_an_unknown_name_fails_when_used():
    result = backend_chosen_by('tensorflow')
    assert result.returncode != 0
    assert "unknown backend 'tensorflow'" in result.stderr
