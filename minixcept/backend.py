"""Choosing between NumPy (CPU) and CuPy (GPU) arrays.

This is the only module in minixcept that imports cupy. Every layer asks
``get_array_module(x)`` for the module that matches its input, so the same code
runs on either kind of array. The backend chosen here only decides where *new*
arrays go: weights set with ``set_weights`` and inputs passed through
``to_device``.

Pick the backend with the environment variable ``MINIXCEPT_BACKEND=numpy|cupy``
or at run time with ``minixcept.use('cupy')``. A choice in the environment that cannot
be honoured (no CuPy, no GPU, an unknown name) does not stop ``import minixcept``: it is
raised as a BackendError when the backend is first used, unless ``use`` chose another.

``install_cupy(module)`` is the one hook for tests: it makes another module stand in for
cupy (the test suite's strict CPU stand-in), so the GPU path runs where no GPU is.
"""
import os

import numpy

_BACKENDS = ('numpy', 'cupy')
_cupy = None          # the cupy module once imported and checked
_current = 'numpy'
_env_error = None     # why MINIXCEPT_BACKEND could not be used, until use() chooses again


class BackendError(RuntimeError):
    """The requested backend cannot be used on this machine."""


def _load_cupy():
    """Import cupy and make sure a GPU is really there."""
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy
    except ImportError as error:
        raise BackendError(
            "backend 'cupy' needs the cupy package (pip install 'minixcept[gpu]'): "
            f"{error}") from error
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # cupy raises its own CUDA runtime errors
        raise BackendError(f"backend 'cupy' found no usable GPU: {error}") from error
    if count < 1:
        raise BackendError("backend 'cupy' found no usable GPU: 0 CUDA devices")
    _cupy = cupy
    return cupy


def install_cupy(module):
    """Use ``module`` as cupy from now on, without looking for a GPU; ``None`` goes back to
    importing the real cupy when asked. Returns the module used until now, to put back."""
    global _cupy
    previous, _cupy = _cupy, module
    return previous


def gpu_available():
    """True when cupy imports and sees at least one CUDA device."""
    try:
        _load_cupy()
    except BackendError:
        return False
    return True


def use(name):
    """Make ``name`` ('numpy' or 'cupy') the backend for new arrays."""
    global _current, _env_error
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {_BACKENDS}")
    if name == 'cupy':
        _load_cupy()
    _current, _env_error = name, None


def current():
    """The name of the backend in use: 'numpy' or 'cupy'."""
    return _current


def xp():
    """The array module of the current backend."""
    if _env_error is not None:
        raise _env_error
    return _load_cupy() if _current == 'cupy' else numpy


def get_array_module(*arrays):
    """cupy if any argument is a cupy array, else numpy."""
    if _cupy is not None:
        for array in arrays:
            if isinstance(array, _cupy.ndarray):
                return _cupy
    return numpy


def asnumpy(x):
    """A NumPy copy of ``x`` (no copy when it already is a NumPy array)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return numpy.asarray(x)


def to_device(x, dtype=None):
    """``x`` as an array of the current backend, optionally cast to ``dtype``.

    Works across backends: under 'numpy' a CuPy array is copied back to the host
    (numpy.asarray refuses CuPy arrays, which never convert implicitly).
    """
    module = xp()
    array = module.asarray(asnumpy(x) if module is numpy else x)
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return array


_env_choice = os.environ.get('MINIXCEPT_BACKEND', '').strip().lower()
if _env_choice:
    try:
        use(_env_choice)
    except (BackendError, ValueError) as error:
        _env_error = BackendError(f'MINIXCEPT_BACKEND={_env_choice}: {error}; '
                                  "unset it, or choose with minixcept.use('numpy')")
