"""minixcept: Xception in NumPy and CuPy, every layer with a hand-written backward pass.

The package is three wings and the workflows built on them:

- the textbook, at this top level: ``backend``, ``padding``, ``layers/``, ``model``,
  ``xception``, ``losses``, ``optimizers``, ``gradcheck`` - the mathematics, one layer at a
  time, with NumPy (or CuPy) alone;
- ``engines/`` - the same mathematics rearranged for speed, tested against the textbook;
- ``files/`` - Keras weight files, photos, augmentation, the feature cache;
- ``workflows/`` - training, feature extraction and fine-tuning, on top of the three.

Importing ``minixcept`` loads the textbook only; the other wings load on first use, so
``import minixcept.layers`` needs nothing but NumPy.
"""
import importlib

from . import backend, gradcheck, layers, losses, optimizers
from .backend import asnumpy, get_array_module, to_device, use
from .errors import ShapeError, WeightsError
from .layers import no_grad, set_seed
from .model import Model, Sequential
from .xception import Xception, preprocess_input

__version__ = '0.1.0'

# Names offered here that live in the other wings, imported when first asked for.
_LAZY = {
    'engines': ('minixcept.engines', None),
    'files': ('minixcept.files', None),
    'workflows': ('minixcept.workflows', None),
    'load_image': ('minixcept.files.images', 'load_image'),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'minixcept' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


__all__ = [
    'Model', 'Sequential', 'ShapeError', 'WeightsError', 'Xception', 'asnumpy', 'backend', 'engines', 'files',
    'get_array_module', 'gradcheck', 'layers', 'load_image', 'losses', 'no_grad', 'optimizers', 'preprocess_input',
    'set_seed', 'to_device', 'use', 'workflows',
    '__version__',
]
