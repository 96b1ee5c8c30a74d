"""Every layer Xception needs, each with an explicit forward and backward pass.

One file per family; in each, pure ``*_forward`` / ``*_backward`` function pairs
do the mathematics and a thin class holds the parameters.
"""
from .activation import Activation, ReLU
from .base import Layer, no_grad, set_seed
from .conv import Conv2D
from .dense import Dense, Dropout
from .depthwise import DepthwiseConv2D
from .merge import Add
from .normalization import BatchNormalization
from .pointwise import PointwiseConv2D
from .pooling import GlobalAveragePooling2D, GlobalMaxPooling2D, MaxPooling2D
from .separable import SeparableConv2D

__all__ = [
    'Activation', 'Add', 'BatchNormalization', 'Conv2D', 'Dense', 'DepthwiseConv2D', 'Dropout',
    'GlobalAveragePooling2D', 'GlobalMaxPooling2D', 'Layer', 'MaxPooling2D', 'PointwiseConv2D',
    'ReLU', 'SeparableConv2D', 'no_grad', 'set_seed',
]
