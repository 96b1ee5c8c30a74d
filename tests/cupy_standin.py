"""A strict CPU stand-in for CuPy, so that minixcept's GPU path runs in every test run.

CI has no GPU, so every test on real CuPy skips there. The stand-in takes CuPy's place
(``backend.install_cupy(cupy_standin.module)``, the one hook the package offers) and runs the
same tests on the CPU. It computes with NumPy underneath, but it refuses what CuPy refuses,
so a host/device mistake fails here the way it would fail on a GPU:

- ``ndarray`` wraps a NumPy array and never lets it out implicitly: ``numpy.asarray(a)``,
  ``numpy.array(a)``, h5py and ``numpy.savez`` raise TypeError (CuPy's ``__array__``); the
  way back is ``cupy.asnumpy(a)`` or ``a.get()``. ``float(a)`` / ``int(a)`` work on 0-d
  arrays only (CuPy hands them to NumPy, which refuses larger arrays and deprecates size 1).
- Arithmetic, ufuncs and module functions take device arrays, Python scalars and NumPy
  scalars; a NumPy array among them raises TypeError ("Unsupported type"), whichever side
  it is on, as in CuPy. Like CuPy, indices may be NumPy arrays (they are copied over), a
  NumPy array may be assigned through an integer-array index but not through slices
  (CuPy's ``fill``: "non-scalar numpy.ndarray cannot be used for fill").
- Only names that CuPy has exist: the module, ``cupy.lib.stride_tricks``, ``cupyx`` and the
  array's attributes are limited to the lists in ``reference/cupy_names.json`` (recorded
  from the real package by ``reference/cupy_names.py``, with its version). A NumPy
  function called on device arrays dispatches to the stand-in's function of the same name
  (``__array_function__``, as CuPy does) or raises when CuPy has none.
- Where CuPy behaves unlike NumPy, the stand-in follows CuPy: reductions and integer
  indexing give 0-d arrays, never NumPy or Python scalars; there is no object or string
  dtype; ``ufunc.reduce`` exists only for add and multiply.

Two rules go beyond CuPy, because CuPy lets the mistake through and the project forbids it
on the GPU path (``DeviceRuleError``):

- no host-side scalar loop: package code may not turn a single element picked out of a
  device array (``float(a[i])``, ``a[i].item()``, ``if a[i] > 0``) into a Python value -
  on a GPU that is one synchronising copy per element. Bring the array back once.
- no scatter of floats: ``numpy.add.at`` on a device array is ``cupyx.scatter_add`` in CuPy
  (since version 12), built on atomic adds whose order changes from run to run; the package
  keeps its gradients deterministic on both backends. Integer scatters are allowed.
"""
import functools
import json
import sys
import types
import warnings
from pathlib import Path

import numpy

NAMES = json.loads((Path(__file__).resolve().parent / 'reference' / 'cupy_names.json').read_text())
CUPY_VERSION = NAMES['cupy_version']
_MODULE_NAMES = frozenset(NAMES['cupy'])
_ARRAY_NAMES = frozenset(NAMES['cupy.ndarray'])
_UFUNC_NAMES = frozenset(NAMES['cupy.ufunc'])
_SAME_AS_NUMPY = frozenset(NAMES['cupy.same_object_as_numpy'])
_PYTHON_SCALARS = (bool, int, float, complex)
_COMPARISONS = frozenset({'greater', 'greater_equal', 'less', 'less_equal', 'equal', 'not_equal'})


class DeviceRuleError(RuntimeError):
    """A host/device mistake that CuPy allows but the project forbids on the GPU path."""


def _called_from_package(depth):
    """True when the frame ``depth`` levels above the caller belongs to minixcept."""
    return sys._getframe(depth + 1).f_globals.get('__name__', '').startswith('minixcept')


# ------------------------------------------------------------------ moving values in and out

def _check_dtype(dtype):
    if dtype.kind in 'OUSV':                # CuPy has numbers and booleans only
        raise ValueError(f'Unsupported dtype {dtype}')


def _wrap(result, element=False):
    """NumPy results as device arrays: arrays and NumPy scalars alike (CuPy has no scalars)."""
    if isinstance(result, numpy.ndarray):
        _check_dtype(result.dtype)
        array = ndarray.__new__(ndarray)
        array._host, array._element = result, element and result.ndim == 0
        return array
    if isinstance(result, numpy.generic):
        return _wrap(numpy.asarray(result), element)
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap(item, element) for item in result)
    return result


def _operand(value):
    """A ufunc or function argument as NumPy sees it; NumPy arrays refused as in CuPy."""
    if isinstance(value, ndarray):
        return value._host
    if isinstance(value, numpy.ndarray):
        raise TypeError(f'Unsupported type {type(value)}')
    if isinstance(value, (tuple, list)):
        return type(value)(_operand(item) for item in value)
    return value


def _scalar_operand(value):
    """A ufunc operand: a device array, a Python scalar or a NumPy scalar (CuPy's CScalar)."""
    if isinstance(value, ndarray):
        return value._host
    if isinstance(value, (numpy.generic,) + _PYTHON_SCALARS):
        return value
    raise TypeError(f'Unsupported type {type(value)}')


def _host_data(value):
    """What ``cupy.array`` accepts: host data of any kind (copied over) or device arrays."""
    if isinstance(value, ndarray):
        return value._host
    if isinstance(value, (tuple, list)):
        return type(value)(_host_data(item) for item in value)
    return value


def _any_element(values):
    return any(isinstance(v, ndarray) and v._element for v in values)


def _index(key):
    """An index for the wrapped array: device arrays and (as CuPy allows) NumPy arrays."""
    parts = key if isinstance(key, tuple) else (key,)
    converted = tuple(p._host if isinstance(p, ndarray) else p for p in parts)
    advanced = any(isinstance(p, (numpy.ndarray, list)) for p in converted)
    return (converted if isinstance(key, tuple) else converted[0]), advanced


# ------------------------------------------------------------------ the array

def _binary(name, reflected=False):
    def operator(self, other):
        function = getattr(module, name)
        return function(other, self) if reflected else function(self, other)
    operator.__name__ = f"__{'r' if reflected else ''}{name}__"
    return operator


def _inplace(name):
    def operator(self, other):
        getattr(module, name)(self, other, out=self)
        return self
    return operator


def _unary(name):
    return lambda self: getattr(module, name)(self)


class ndarray:
    """A device array: a NumPy array that never converts to NumPy implicitly (see module doc)."""
    __slots__ = ('_host', '_element')     # the NumPy data; True for one element picked out
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order='C'):
        if memptr is not None or strides is not None:
            raise NotImplementedError('the stand-in does not model device memory pointers')
        self._host = numpy.empty(shape, dtype, order=order)
        _check_dtype(self._host.dtype)
        self._element = False

    # the way back to the host, and the refusal of every other way
    def get(self, stream=None, order='C', out=None, blocking=True):
        if out is not None:
            out[...] = self._host
            return out
        return numpy.array(self._host, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f'Only numpy.ndarray can be set to cupy.ndarray. Given {type(arr)}')
        self._host[...] = arr

    def __array__(self, dtype=None, copy=None):
        raise TypeError('Implicit conversion to a NumPy array is not allowed. '
                        'Please use `.get()` to construct a NumPy array explicitly.')

    def _scalar(self, convert):
        if self._host.ndim:
            raise TypeError(f'only 0-d device arrays convert to Python scalars, not shape {self.shape} '
                            '(CuPy passes them to NumPy, which refuses larger arrays and deprecates size 1)')
        if self._element and _called_from_package(2):
            raise DeviceRuleError(
                'host-side scalar loop: package code turned one element of a device array into a Python '
                'value (one GPU synchronisation per element); compute on the device and bring the result '
                'back once with asnumpy')
        return convert(self._host)

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __complex__(self):
        return self._scalar(complex)

    def __bool__(self):
        if self._host.size == 0:
            warnings.warn('The truth value of an empty array is ambiguous.', DeprecationWarning)
            return False
        if self._host.size > 1:
            raise ValueError('The truth value of an array with more than one element is ambiguous.')
        if self._element and _called_from_package(1):
            raise DeviceRuleError('host-side scalar loop: package code branched on one element of a device '
                                  'array (one GPU synchronisation per element)')
        return bool(self._host.reshape(()))

    def item(self):
        if self._element and _called_from_package(1):
            raise DeviceRuleError('host-side scalar loop: package code called .item() on one element of '
                                  'a device array (one GPU synchronisation per element)')
        return self._host.item()

    def tolist(self):
        return self._host.tolist()

    def __repr__(self):
        return repr(self._host).replace('array', 'standin_array', 1)

    def __str__(self):
        return str(self._host)

    def __format__(self, spec):
        return format(self._host, spec)

    def __reduce__(self):
        return (_wrap, (self._host.copy(),))

    def __copy__(self):
        return _wrap(self._host.copy())

    def __deepcopy__(self, memo):
        return _wrap(self._host.copy())

    # shape and size: Python values, as in CuPy
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    ndim = property(lambda self: self._host.ndim)
    size = property(lambda self: self._host.size)
    nbytes = property(lambda self: self._host.nbytes)
    itemsize = property(lambda self: self._host.itemsize)
    strides = property(lambda self: self._host.strides)
    flags = property(lambda self: self._host.flags)
    T = property(lambda self: _wrap(self._host.T))
    mT = property(lambda self: _wrap(self._host.mT))
    real = property(lambda self: _wrap(self._host.real))
    imag = property(lambda self: _wrap(self._host.imag))

    def __len__(self):
        return len(self._host)

    def __iter__(self):
        if self._host.ndim == 0:
            raise TypeError('iteration over a 0-d array')
        return (self[i] for i in range(len(self._host)))

    def __getitem__(self, key):
        host_key, _ = _index(key)
        result = self._host[host_key]
        if isinstance(result, numpy.generic):          # CuPy gives a 0-d view, not a scalar
            parts = host_key if isinstance(host_key, tuple) else (host_key,)
            result = self._host[parts + (Ellipsis,)]
        return _wrap(result, element=self._element or (result.ndim == 0 and self._host.ndim > 0))

    def __setitem__(self, key, value):
        host_key, advanced = _index(key)
        if isinstance(value, ndarray):
            value = value._host
        elif not advanced and numpy.ndim(value) != 0:
            # CuPy copies device arrays only; anything else goes through fill()
            raise ValueError(f'non-scalar {type(value).__module__}.{type(value).__name__} cannot be used for fill')
        self._host[host_key] = value

    def fill(self, value):
        if isinstance(value, ndarray):
            if value.ndim:
                raise ValueError('non-scalar cupy.ndarray cannot be used for fill')
            value = value._host
        elif numpy.ndim(value):
            raise ValueError('non-scalar numpy.ndarray cannot be used for fill')
        self._host.fill(value)

    def astype(self, dtype, order='K', casting=None, subok=None, copy=True):
        _check_dtype(numpy.dtype(dtype))
        return _wrap(self._host.astype(dtype, order=order, copy=copy))

    def scatter_add(self, slices, value):
        module_cupyx.scatter_add(self, slices, value)

    # NumPy calling in: ufuncs and functions dispatch to the stand-in's own, as in CuPy
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        counterpart = getattr(module, ufunc.__name__, None)
        if not isinstance(counterpart, ufunc_type):
            return NotImplemented
        if 'out' in kwargs:
            if len(kwargs['out']) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs['out'] = kwargs['out'][0]
        if ufunc.__name__ in _COMPARISONS:      # CuPy's workaround for numpy/numpy#12142
            inputs = tuple(x.item() if isinstance(x, numpy.ndarray) and x.ndim == 0 else x for x in inputs)
        function = counterpart if method == '__call__' else getattr(counterpart, method)
        return function(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        try:
            counterpart = functools.reduce(getattr, func.__module__.split('.')[1:], module)
            counterpart = getattr(counterpart, func.__name__)
        except AttributeError:
            return NotImplemented
        if counterpart is func or not all(issubclass(t, (ndarray, numpy.ndarray)) for t in types):
            return NotImplemented
        return counterpart(*args, **kwargs)

    def __getattr__(self, name):
        """The rest of CuPy's array methods (sum, reshape, transpose...), computed by NumPy."""
        if name not in _ARRAY_NAMES or name.startswith('_'):
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}' (not in CuPy {CUPY_VERSION})")
        if name in ('data', 'device', 'cstruct', 'mdspan', 'toDlpack', 'reduced_view', 'flat'):
            raise AttributeError(f"the CuPy stand-in does not emulate ndarray.{name}")
        method = getattr(self._host, name)
        element = self._element

        def call(*args, **kwargs):
            return _wrap(method(*_operand(args), **{k: _operand(v) for k, v in kwargs.items()}), element)
        return call

    def __dir__(self):
        return sorted(_ARRAY_NAMES)

    __neg__, __pos__, __abs__, __invert__ = (_unary(n) for n in ('negative', 'positive', 'absolute', 'invert'))
    __eq__, __ne__ = _binary('equal'), _binary('not_equal')
    __lt__, __le__, __gt__, __ge__ = (_binary(n) for n in ('less', 'less_equal', 'greater', 'greater_equal'))
    __hash__ = None


for _symbol, _name in [('add', 'add'), ('sub', 'subtract'), ('mul', 'multiply'), ('truediv', 'true_divide'),
                       ('floordiv', 'floor_divide'), ('mod', 'remainder'), ('pow', 'power'),
                       ('matmul', 'matmul'), ('and', 'bitwise_and'), ('or', 'bitwise_or'),
                       ('xor', 'bitwise_xor'), ('lshift', 'left_shift'), ('rshift', 'right_shift')]:
    setattr(ndarray, f'__{_symbol}__', _binary(_name))
    setattr(ndarray, f'__r{_symbol}__', _binary(_name, reflected=True))
    if _symbol != 'matmul':
        setattr(ndarray, f'__i{_symbol}__', _inplace(_name))
ndarray.__divmod__ = lambda self, other: module.divmod(self, other)
ndarray.__rdivmod__ = lambda self, other: module.divmod(other, self)


# ------------------------------------------------------------------ ufuncs and functions

class ufunc_type:
    """A CuPy ufunc: device arrays and scalars in, device arrays out."""

    def __init__(self, numpy_ufunc):
        self._ufunc = numpy_ufunc
        self.name, self.nin, self.nout, self.nargs = (numpy_ufunc.__name__, numpy_ufunc.nin,
                                                      numpy_ufunc.nout, numpy_ufunc.nargs)
        self.types = numpy_ufunc.types
        self.__name__ = self.name

    def __repr__(self):
        return f'<ufunc {self.name!r} (CuPy stand-in)>'

    def __call__(self, *inputs, out=None, **kwargs):
        operands = [_scalar_operand(x) for x in inputs]
        if out is not None:
            out = out[0] if isinstance(out, tuple) and len(out) == 1 else out
            if not isinstance(out, ndarray):
                raise TypeError(f'Output must be a cupy.ndarray, not {type(out)}')
            self._ufunc(*operands, out=out._host, **kwargs)
            return out
        if 'where' in kwargs:
            kwargs['where'] = _scalar_operand(kwargs['where'])
        return _wrap(self._ufunc(*operands, **kwargs), _any_element(inputs))

    def reduce(self, array, axis=0, dtype=None, out=None, keepdims=False):
        if self.name not in ('add', 'multiply'):
            raise NotImplementedError(f'`cupy_{self.name}.reduce` is not supported yet')
        method = array.sum if self.name == 'add' else array.prod
        return method(axis=axis, dtype=dtype, out=out, keepdims=keepdims)

    def accumulate(self, array, axis=0, dtype=None, out=None):
        if self.name not in ('add', 'multiply'):
            raise NotImplementedError(f'`cupy_{self.name}.accumulate` is not supported yet')
        method = array.cumsum if self.name == 'add' else array.cumprod
        return method(axis=axis, dtype=dtype, out=out)

    def reduceat(self, array, indices, axis=0, dtype=None, out=None):
        if self.name != 'add':
            raise NotImplementedError(f'`cupy_{self.name}.reduceat` is not supported yet')
        return _wrap(self._ufunc.reduceat(_scalar_operand(array), _operand(indices), axis, dtype))

    def outer(self, a, b, **kwargs):
        return _wrap(self._ufunc.outer(_scalar_operand(a), _scalar_operand(b), **kwargs))

    def at(self, a, indices, b=None):
        if self.name != 'add':
            raise NotImplementedError(f'`cupy_{self.name}.at` is not supported by the stand-in')
        module_cupyx.scatter_add(a, indices, b)


def _device_function(name, numpy_function):
    """A CuPy function computed by NumPy: device arrays only (a NumPy array raises TypeError)."""
    def function(*args, **kwargs):
        result = numpy_function(*_operand(args), **{k: _operand(v) for k, v in kwargs.items()})
        return _wrap(result, _any_element(args))
    function.__name__ = function.__qualname__ = name
    function.__doc__ = f'cupy.{name} (CPU stand-in computed by numpy.{name})'
    return function


def _from_host(numpy_function):
    """``cupy.array`` / ``asarray``: host data is copied over; a device array stays itself."""
    def function(obj, dtype=None, *args, **kwargs):
        if isinstance(obj, ndarray) and (dtype is None or numpy.dtype(dtype) == obj.dtype) \
                and numpy_function is not numpy.array:
            return obj
        result = numpy_function(_host_data(obj), dtype, *args, **kwargs)
        if result is obj or (isinstance(obj, numpy.ndarray) and numpy.may_share_memory(result, obj)):
            result = result.copy()                  # the device has its own memory
        return _wrap(result)
    function.__name__ = numpy_function.__name__
    return function


def asnumpy(a, stream=None, order='C', out=None, blocking=True):
    """The explicit way back to the host."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    result = numpy.asarray(a, order=order)
    if out is not None:
        out[...] = result
        return out
    return result


def get_array_module(*args):
    return module if any(isinstance(a, ndarray) for a in args) else numpy


class _Namespace(types.ModuleType):
    """A module object that offers only names CuPy has, built on first use."""

    def __init__(self, name, allowed, numpy_namespace, special):
        super().__init__(name, f'CPU stand-in for {name} (CuPy {CUPY_VERSION} names only)')
        self._allowed, self._numpy, self._special = frozenset(allowed), numpy_namespace, special

    def __getattr__(self, name):
        if name.startswith('__') or name not in self._allowed:
            raise AttributeError(f"module '{self.__name__}' has no attribute '{name}' (not in CuPy {CUPY_VERSION})")
        if name in self._special:
            value = self._special[name]
        elif self.__name__ == 'cupy' and name in _SAME_AS_NUMPY:
            value = getattr(numpy, name)
        elif isinstance(getattr(self._numpy, name, None), numpy.ufunc):
            value = ufunc_type(getattr(self._numpy, name))
        elif callable(getattr(self._numpy, name, None)):
            value = _device_function(name, getattr(self._numpy, name))
        else:
            raise AttributeError(f"the CuPy stand-in does not emulate {self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __dir__(self):
        return sorted(self._allowed)


def _scatter_add(a, slices, value):
    """cupyx.scatter_add: atomic adds on a GPU. Floats are refused (see the module doc)."""
    if not isinstance(a, ndarray):
        raise TypeError(f'scatter_add needs a cupy.ndarray, not {type(a)}')
    if a.dtype.kind in 'fc':
        raise DeviceRuleError(
            'scatter of floats (numpy.add.at / cupyx.scatter_add): atomic adds on a GPU sum in an order '
            'that changes from run to run; minixcept keeps gradients deterministic (add strided slices '
            'in a loop over the window offsets)')
    host_key, _ = _index(slices)
    numpy.add.at(a._host, host_key, value._host if isinstance(value, ndarray) else value)


class _Cuda:
    """The little of ``cupy.cuda`` that code asks before it computes: one device, nothing to wait for."""

    class runtime:
        @staticmethod
        def getDeviceCount():
            return 1

    class Device:
        def __init__(self, device=0):
            self.id = device

        def synchronize(self):
            pass


module = _Namespace('cupy', _MODULE_NAMES, numpy, {
    'ndarray': ndarray, 'ufunc': ufunc_type, 'asnumpy': asnumpy, 'get_array_module': get_array_module,
    'array': _from_host(numpy.array), 'asarray': _from_host(numpy.asarray),
    'asanyarray': _from_host(numpy.asarray), 'cuda': _Cuda,
})
module_cupyx = _Namespace('cupyx', NAMES['cupyx'], types.SimpleNamespace(), {'scatter_add': _scatter_add})
_stride_tricks = _Namespace('cupy.lib.stride_tricks', NAMES['cupy.lib.stride_tricks'],
                            numpy.lib.stride_tricks, {})
module._special['lib'] = types.SimpleNamespace(stride_tricks=_stride_tricks)
