"""Xception (Chollet, 2017), layer for layer as keras.applications.Xception builds it.

Entry flow:   two 3x3 convolutions (block 1), then three blocks (2-4) of two separable
              convolutions and a stride-2 max pool, each with a 1x1 stride-2 convolution
              on the shortcut.
Middle flow:  eight identical blocks (5-12) of three ReLU -> separable conv -> batch-norm
              steps at 728 channels, with an identity shortcut.
Exit flow:    one more downsampling block (13), then two separable convolutions with
              ReLU after them (block 14), global average pooling and the classifier.

Layer names and order are Keras 3's, so weights load by order and activations
can be compared with Keras name by name.

Two details of the graph matter for correctness (and have broken ports):
- block 2 has no leading ReLU; blocks 3-13 apply ReLU to the block input on the main
  branch only, and the shortcut reads the *pre*-ReLU tensor;
- a block input feeds two branches, so its gradient is the sum of both (the Model adds).
"""
import numbers
import os

import numpy as np

from . import checks
from .backend import get_array_module
from .errors import ShapeError
from .layers import (Activation, Add, BatchNormalization, Conv2D, Dense, GlobalAveragePooling2D,
                     GlobalMaxPooling2D, MaxPooling2D, SeparableConv2D)
from .model import Model, imagenet_weights

MIN_SIDE = 71          # the smallest input the four stride-2 stages reduce to at least 3x3
DEFAULT_SIDE = 299     # the ImageNet training size


def preprocess_input(images):
    """Scale RGB pixel values from [0, 255] to [-1, 1]: x / 127.5 - 1 (Keras's 'tf' mode, no mean subtraction).

    Accepts uint8 or float arrays of any shape ending in 3 channels, NumPy (or lists) or CuPy;
    returns float32 on the same side.
    """
    if not checks.is_array(images):
        images = checks.numbers_array(images, 'images', 'preprocess_input')
    checks.array(images, 'images', 'preprocess_input', kinds='biuf')
    xp = get_array_module(images)
    return xp.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def xception_input_shape(input_shape, include_top, weights):
    """The input shape Xception is built for, decided as keras.applications.Xception decides it.

    None, as Keras's own default: (299, 299, 3) with the top, (None, None, 3) - any size -
    without it.
    Given: (height, width, 3) with each side >= 71 or None; the top needs both sides fixed,
    and with the ImageNet weights exactly 299 x 299 (its Dense layer was trained on that).
    Raises ShapeError naming the shape otherwise.
    """
    if input_shape is None:
        return (DEFAULT_SIDE, DEFAULT_SIDE, 3) if include_top else (None, None, 3)
    if not isinstance(input_shape, (tuple, list)):
        raise TypeError(f"Xception: input_shape must be a tuple (height, width, 3), got {input_shape!r}")
    for size in input_shape:
        if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral)):
            raise TypeError(f"Xception: input_shape must hold whole numbers (or None for a free side), "
                            f"got input_shape={tuple(input_shape)!r}")
    input_shape = tuple(None if size is None else int(size) for size in input_shape)
    if (len(input_shape) != 3 or input_shape[2] != 3
            or any(side is not None and side < MIN_SIDE for side in input_shape[:2])):
        raise ShapeError(f"Xception takes inputs of shape (height, width, 3) with both sides "
                         f">= {MIN_SIDE} (or None for any), got input_shape={input_shape}")
    if include_top and None in input_shape:
        raise ShapeError(f"Xception with include_top=True needs a fixed input size, got input_shape={input_shape}")
    if include_top and weights == 'imagenet' and input_shape != (DEFAULT_SIDE, DEFAULT_SIDE, 3):
        raise ShapeError(f"Xception with include_top=True and the ImageNet weights takes input_shape="
                         f"{(DEFAULT_SIDE, DEFAULT_SIDE, 3)}, got input_shape={input_shape}")
    return input_shape


class Xception(Model):
    """Xception(include_top=True, weights=None, input_shape=(299, 299, 3), pooling=None,
    classes=1000, middle_blocks=8, middle_width=728).

    weights: None (random initialisation), 'imagenet' (fetched as the weights/ script
    does), or the path of a Keras HDF5 / .keras file.
    input_shape: (height, width, 3), each side >= 71 or None for any size. Left out, it is
    299 x 299, the ImageNet size, so that shapes and multiply-adds are known at once;
    input_shape=None decides as Keras's default does: (299, 299, 3) with the top and
    (None, None, 3) without it. The top needs fixed sides, 299 x 299 with the ImageNet
    weights. A side left free is checked when the model is called.
    pooling (without the top): None (the 4-D block14 output), 'avg' or 'max'.
    middle_blocks: depth of the middle flow (8 in the paper).
    middle_width: channels of the middle flow (728 in the paper; block 4 widens to it and
    block 13 starts from it).

    What a middle block costs: three steps of ReLU (no parameters), a 3x3 separable
    convolution of width w without bias (depthwise 3*3*w, pointwise w*w) and a batch-norm
    (gamma, beta, moving mean, moving variance: 4*w), so 3 * (9w + w^2 + 4w) = 3w^2 + 39w
    parameters: 1,618,344 at w = 728, as Keras counts it (16 blocks minus 8, over 8). Each
    extra block adds that much, and 3 * (9w + w^2) * H * W multiply-adds in its convolutions
    (H x W = 19 x 19 at 299 px: about 0.58 G); a wider middle flow also widens blocks 4 and 13.
    Whether a deeper or wider Xception would match a larger network on ImageNet is not
    something this code can say. The published figures: Xception 79.0% top-1 / 94.5% top-5
    with 22.9 M parameters, Inception V3 78.2% / 94.1% (Chollet, 2017); InceptionResNetV2
    80.3% / 95.3% with 55.9 M (the Keras applications table). A variant with other
    middle_blocks or middle_width is a different network: the ImageNet weights do not load
    into it (load_weights raises WeightsError at the first layer whose shapes differ), and it
    would have to be trained from scratch on ImageNet (tour chapter 5).
    """

    def __init__(self, include_top=True, weights=None, input_shape=(DEFAULT_SIDE, DEFAULT_SIDE, 3), pooling=None,
                 classes=1000, middle_blocks=8, middle_width=728, name='xception'):
        checks.flag(include_top, 'include_top', 'Xception')
        if not (weights is None or isinstance(weights, (str, os.PathLike))):
            raise TypeError(f"Xception: weights must be None, 'imagenet' or the path of a weights file, got {weights!r}")
        input_shape = xception_input_shape(input_shape, include_top, weights)
        checks.choice(pooling, 'pooling', 'Xception', (None, 'avg', 'max'))
        checks.integer(classes, 'classes', 'Xception', minimum=1)
        checks.integer(middle_blocks, 'middle_blocks', 'Xception', minimum=1)
        checks.integer(middle_width, 'middle_width', 'Xception', minimum=1)
        if not isinstance(name, str):
            raise TypeError(f"Xception: name must be a string, got {name!r}")
        if weights == 'imagenet' and include_top and classes != 1000:
            raise ValueError(f"the ImageNet weights with the top classify into 1000 classes, got classes={classes}")
        super().__init__(input_shape, name=name)
        self.include_top = include_top
        self.pooling = pooling
        self.classes = classes
        self.middle_blocks = middle_blocks
        self.middle_width = middle_width
        self._residual_count = 0
        self._add_count = 0

        x = self._entry_flow()
        x = self._middle_flow(x)
        x = self._exit_flow(x)
        if include_top:
            x = self.add(GlobalAveragePooling2D(name='avg_pool'), x)
            self.add(Dense(classes, activation='softmax', name='predictions'), x)
        elif pooling == 'avg':
            self.add(GlobalAveragePooling2D(name='global_average_pooling2d'), x)
        elif pooling == 'max':
            self.add(GlobalMaxPooling2D(name='global_max_pooling2d'), x)

        if weights == 'imagenet':
            self.load_weights(imagenet_weights(include_top))
        elif weights is not None:
            self.load_weights(weights)

    def check_input_shape(self, shape, start_after=None):
        """Model's check, and on a model built for any size also the smallest side, 71."""
        super().check_input_shape(shape, start_after)
        if start_after is None and min(shape[1:3]) < MIN_SIDE:
            raise ShapeError(f"model {self.name!r} expects input of shape (N, {', '.join(map(str, self.input_shape))}) "
                             f"with height and width >= {MIN_SIDE}, got {tuple(shape)}")

    # -- pieces named as Keras names them ---------------------------------------
    def _conv_bn_relu(self, x, filters, name, strides=1):
        x = self.add(Conv2D(filters, 3, strides=strides, use_bias=False, name=name), x)
        x = self.add(BatchNormalization(name=f'{name}_bn'), x)
        return self.add(Activation('relu', name=f'{name}_act'), x)

    def _sepconv_bn(self, x, filters, name):
        x = self.add(SeparableConv2D(filters, 3, padding='same', use_bias=False, name=name), x)
        return self.add(BatchNormalization(name=f'{name}_bn'), x)

    def _relu(self, x, name):
        return self.add(Activation('relu', name=name), x)

    def _numbered(self, base, count):
        return base if count == 0 else f'{base}_{count}'

    def _downsampling_block(self, x, block, filters, leading_relu=True):
        """ReLU? -> sepconv -> BN -> ReLU -> sepconv -> BN -> 3x3/2 max pool, plus a 1x1/2 conv shortcut.

        ``filters`` = (first sepconv, second sepconv). Layers are added in Keras's order:
        the main branch up to its last batch-norm, then the shortcut conv, the pool, the
        shortcut's batch-norm, and the add.
        """
        block_input = x
        if leading_relu:
            x = self._relu(x, f'{block}_sepconv1_act')
        x = self._sepconv_bn(x, filters[0], f'{block}_sepconv1')
        x = self._relu(x, f'{block}_sepconv2_act')
        x = self._sepconv_bn(x, filters[1], f'{block}_sepconv2')
        index = self._residual_count
        self._residual_count += 1
        shortcut = self.add(Conv2D(filters[1], 1, strides=2, padding='same', use_bias=False,
                                   name=self._numbered('conv2d', index)), block_input)
        x = self.add(MaxPooling2D(3, strides=2, padding='same', name=f'{block}_pool'), x)
        shortcut = self.add(BatchNormalization(name=self._numbered('batch_normalization', index)), shortcut)
        return self._add_residual(x, shortcut)

    def _add_residual(self, x, shortcut):
        name = self._numbered('add', self._add_count)
        self._add_count += 1
        return self.add(Add(name=name), x, shortcut)

    # -- the three flows -----------------------------------------------------------
    def _entry_flow(self):
        x = self._conv_bn_relu('input', 32, 'block1_conv1', strides=2)    # 'valid' padding
        x = self._conv_bn_relu(x, 64, 'block1_conv2')
        x = self._downsampling_block(x, 'block2', (128, 128), leading_relu=False)
        x = self._downsampling_block(x, 'block3', (256, 256))
        return self._downsampling_block(x, 'block4', (self.middle_width,) * 2)

    def _middle_flow(self, x):
        for index in range(self.middle_blocks):
            block = f'block{index + 5}'
            block_input = x
            for step in (1, 2, 3):
                x = self._relu(x, f'{block}_sepconv{step}_act')
                x = self._sepconv_bn(x, self.middle_width, f'{block}_sepconv{step}')
            x = self._add_residual(x, block_input)
        return x

    def _exit_flow(self, x):
        first = self.middle_blocks + 5          # block13 and block14 in the paper's network
        x = self._downsampling_block(x, f'block{first}', (self.middle_width, 1024))
        x = self._sepconv_bn(x, 1536, f'block{first + 1}_sepconv1')
        x = self._relu(x, f'block{first + 1}_sepconv1_act')
        x = self._sepconv_bn(x, 2048, f'block{first + 1}_sepconv2')
        return self._relu(x, f'block{first + 1}_sepconv2_act')
