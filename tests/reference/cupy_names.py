"""Record the names real CuPy exposes, for the CPU stand-in in tests/cupy_standin.py.

    python -m venv /tmp/cupy-names && /tmp/cupy-names/bin/pip install cupy-cuda12x numpy
    /tmp/cupy-names/bin/python tests/reference/cupy_names.py     # writes cupy_names.json here

CuPy imports without a GPU (only allocating memory needs one), so any machine can run
this. The stand-in offers a name only if it is listed here: code that reaches for a NumPy
function CuPy lacks fails on the CPU the way it would fail on the GPU. Listed per
namespace: the public names of ``cupy``, ``cupy.lib.stride_tricks``, ``cupyx``, every
attribute of ``cupy.ndarray`` (dunders included: they decide what Python and NumPy may do
with an array), the methods of a ufunc such as ``cupy.add``, and which of CuPy's names are
NumPy's own objects (dtypes, ``finfo``, constants).
"""
import json
from pathlib import Path

import cupy
import cupy.lib.stride_tricks
import cupyx
import numpy


def public(namespace):
    return sorted(name for name in dir(namespace) if not name.startswith('_'))


def main():
    names = {
        'cupy_version': cupy.__version__,
        'numpy_version': numpy.__version__,
        'cupy': public(cupy),
        'cupy.lib.stride_tricks': [name for name in public(cupy.lib.stride_tricks)
                                   if callable(getattr(cupy.lib.stride_tricks, name))],
        'cupyx': public(cupyx),
        'cupy.ndarray': sorted(set(dir(cupy.ndarray)) - {'__pyx_vtable__'}),
        'cupy.ufunc': public(cupy.add),
        # names whose object is NumPy's own (dtypes, finfo, constants): no device arrays involved
        'cupy.same_object_as_numpy': [name for name in public(cupy)
                                      if getattr(cupy, name) is getattr(numpy, name, None)],
    }
    out = Path(__file__).resolve().parent / 'cupy_names.json'
    out.write_text(json.dumps(names, indent=1) + '\n')
    print(f"{out.name}: CuPy {cupy.__version__}, "
          + ', '.join(f"{key} {len(value)}" for key, value in names.items() if isinstance(value, list)))


if __name__ == '__main__':
    main()
