"""The CPU stand-in for CuPy (cupy_standin.py) refuses what CuPy refuses and allows what it allows.

The refusals are checked on the stand-in and, when a GPU is present, on real CuPy too: the
same test proves the stand-in's model of CuPy on the machine that has the real thing.
"""
import numpy as np
import pytest

import cupy_standin
from minixcept import backend


@pytest.fixture(params=['standin', 'cupy'])
def device(request):
    """A CuPy module: the stand-in always, the real one when a GPU is present."""
    if request.param == 'cupy':
        if not backend.gpu_available():
            pytest.skip('no GPU: cupy is not installed or sees no CUDA device')
        import cupy
        return cupy
    return cupy_standin.module


def test_names_come_from_a_recorded_cupy():
    names = cupy_standin.NAMES
    assert names['cupy_version'].split('.')[0].isdigit()
    assert 'ndarray' in names['cupy'] and 'asnumpy' in names['cupy'] and 'scatter_add' in names['cupyx']
    assert 'as_strided' in names['cupy.lib.stride_tricks'] and '__array__' in names['cupy.ndarray']


def test_the_array_type_defines_only_what_cupy_arrays_have():
    defined = {name for klass in cupy_standin.ndarray.__mro__[:-1] for name in vars(klass)}
    defined -= {'__slots__', '__module__', '__doc__', '__dict__', '__weakref__', '_host', '_element',
                '_scalar', '__qualname__', '__firstlineno__', '__static_attributes__',
                '__getattr__'}          # the stand-in's way to offer CuPy's other methods, checked below
    assert defined <= set(cupy_standin.NAMES['cupy.ndarray']), sorted(defined - set(cupy_standin.NAMES['cupy.ndarray']))
    array = cupy_standin.module.zeros((2, 3))
    for missing in ('itemset', 'ctypes', '__array_interface__', '__index__', 'ptp_not_a_name'):
        assert not hasattr(array, missing)
    for name in cupy_standin.NAMES['cupy.ndarray']:
        if not name.startswith('_') and hasattr(np.ndarray, name) and name not in ('data', 'device', 'flat'):
            assert hasattr(array, name), name                 # CuPy's methods are there


def test_numpy_names_cupy_lacks_do_not_exist():
    cupy_names = set(cupy_standin.NAMES['cupy'])
    lacking = [name for name in dir(np) if not name.startswith('_') and name not in cupy_names]
    assert lacking                                                # NumPy has more than CuPy
    for name in lacking:
        with pytest.raises(AttributeError, match='not in CuPy'):
            getattr(cupy_standin.module, name)
    with pytest.raises(AttributeError):
        cupy_standin.module_cupyx.scatter_addition


def test_no_implicit_conversion_to_numpy(device):
    a = device.arange(6, dtype=np.float32).reshape(2, 3)
    for convert in (np.asarray, np.array, np.float32, lambda v: np.array([v, v])):
        with pytest.raises(TypeError):
            convert(a)
    with pytest.raises(TypeError):
        float(a)
    with pytest.raises(TypeError):
        int(a[0])
    with pytest.raises(TypeError):
        np.lib.stride_tricks.as_strided(a, (2,), (4,))          # not dispatched: NumPy converts
    back = device.asnumpy(a)
    assert type(back) is np.ndarray and type(a.get()) is np.ndarray
    np.testing.assert_array_equal(back, np.arange(6).reshape(2, 3))
    assert float(a.sum()) == 15.0 and int(a[1, 2]) == 5 and a.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_h5py_will_not_store_a_device_array(device, tmp_path):
    h5py = pytest.importorskip('h5py')
    with h5py.File(tmp_path / 'w.h5', 'w') as f:
        with pytest.raises(TypeError):
            f.create_dataset('kernel', data=device.zeros((2, 2)))
        f.create_dataset('kernel_host', data=device.asnumpy(device.zeros((2, 2))))


def test_numpy_arrays_do_not_mix_into_device_arithmetic(device):
    a, host = device.ones((2, 3), np.float32), np.ones((2, 3), np.float32)
    mixes = [lambda: a + host, lambda: host + a, lambda: a * host, lambda: host - a, lambda: a @ host.T,
             lambda: device.where(a > 0, host, a), lambda: device.where(a > 0, a, host),
             lambda: device.concatenate([a, host]), lambda: np.concatenate([a, host]),
             lambda: device.maximum(a, host), lambda: np.maximum(host, a), lambda: device.matmul(a, host.T),
             lambda: device.exp(host)]
    for mix in mixes:
        with pytest.raises(TypeError):
            mix()
    with pytest.raises(TypeError):
        a += host
    with pytest.raises(ValueError, match='non-scalar numpy.ndarray cannot be used for fill'):
        a[:, :2] = host[:, :2]
    with pytest.raises(TypeError):
        host[a.astype(np.int64)]                                 # a device index into a host array


def test_scalars_and_index_arrays_are_fine(device):
    a = device.arange(6, dtype=np.float32).reshape(2, 3)
    b = a * np.float32(2) + 1.5 - np.float32(0.5) * a           # NumPy 2 promotion, as in CuPy 14
    assert isinstance(b, device.ndarray) and b.dtype == np.float32
    picked = a[np.array([1, 0])]                                 # NumPy index arrays are copied over
    np.testing.assert_array_equal(device.asnumpy(picked), [[3, 4, 5], [0, 1, 2]])
    a[np.array([0])] = np.full((1, 3), 7, np.float32)          # ... as are values through them
    a[:, 0] = np.float32(9)
    np.testing.assert_array_equal(device.asnumpy(a), [[9, 7, 7], [9, 4, 5]])
    assert isinstance(np.exp(a), device.ndarray)                # NumPy ufuncs dispatch to CuPy's
    assert isinstance(np.concatenate([a, a]), device.ndarray)   # as do NumPy functions it has


def test_cupy_differences_that_code_relies_on(device):
    a = device.arange(6, dtype=np.float32).reshape(2, 3)
    for value in (a.sum(), a.max(), device.mean(a), a[1, 2], a.argmax()):
        assert isinstance(value, device.ndarray) and value.ndim == 0   # no NumPy or Python scalars
    with pytest.raises((ValueError, TypeError)):
        device.asarray(np.array([object()], dtype=object))       # no object dtype


def test_stand_in_rules_beyond_cupy_only_bind_package_code():
    """A host-side scalar loop and a float scatter are refused (DeviceRuleError) when package
    code does them; a test may still read one element."""
    standin = cupy_standin.module
    a = standin.arange(4, dtype=np.float32)
    assert float(a[2]) == 2.0 and a[3].item() == 3.0
    package_code = {'__name__': 'minixcept.pretend'}
    for statement in ('float(a[1])', 'a[1].item()', 'bool(a[1] > 0)', 'int(a[0] + a[1])'):
        with pytest.raises(cupy_standin.DeviceRuleError, match='host-side scalar loop'):
            exec(statement, dict(package_code, a=a))
    exec('float(a.sum()); float((a * a).max())', dict(package_code, a=a))   # reductions come back once
    with pytest.raises(cupy_standin.DeviceRuleError, match='scatter of floats'):
        np.add.at(a, np.array([0, 0]), 1.0)
    counts = standin.zeros(3, np.int64)
    cupy_standin.module_cupyx.scatter_add(counts, standin.asarray([0, 0, 2]), 1)
    assert counts.tolist() == [2, 0, 1]


def test_backend_hook_installs_and_removes_the_stand_in():
    previous_name = backend.current()
    previous = backend.install_cupy(cupy_standin.module)
    try:
        backend.use('cupy')
        assert backend.xp() is cupy_standin.module
        on_device = backend.to_device(np.arange(3.0), np.float32)
        assert isinstance(on_device, cupy_standin.ndarray)
        assert backend.get_array_module(on_device) is cupy_standin.module
        assert type(backend.asnumpy(on_device)) is np.ndarray
    finally:
        backend.install_cupy(previous)
        backend.use(previous_name)
    assert backend.get_array_module(on_device) is np              # no longer a device array
