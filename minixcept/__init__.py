"""minixcept: Xception in NumPy and CuPy, every layer with a hand-written backward pass."""
from . import fast, fastgrad, features, images, layers, losses, optimizers, training
from .backend import asnumpy, get_array_module, to_device, use
from .errors import ShapeError, WeightsError
from .images import load_image, preprocess_input
from .layers import no_grad, set_seed
from .model import Model, Sequential
from .xception import Xception

__version__ = '0.1.0'

__all__ = [
    'Model', 'Sequential', 'ShapeError', 'WeightsError', 'Xception', 'asnumpy', 'fast', 'fastgrad', 'features',
    'get_array_module', 'images', 'layers', 'load_image', 'losses', 'no_grad', 'optimizers', 'preprocess_input',
    'set_seed', 'to_device', 'training', 'use',
    '__version__',
]
