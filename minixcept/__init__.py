"""minixcept: Xception in NumPy and CuPy, every layer with a hand-written backward pass."""
from . import layers, losses, optimizers
from .backend import asnumpy, get_array_module, to_device, use
from .errors import ShapeError, WeightsError
from .images import preprocess_input
from .layers import no_grad, set_seed
from .model import Model, Sequential
from .xception import Xception

__version__ = '0.1.0'

__all__ = [
    'Model', 'Sequential', 'ShapeError', 'WeightsError', 'Xception', 'asnumpy', 'get_array_module',
    'layers', 'losses', 'no_grad', 'optimizers', 'preprocess_input', 'set_seed', 'to_device', 'use',
    '__version__',
]
