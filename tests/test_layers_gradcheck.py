"""Every layer's backward pass, proven without TensorFlow.

1. Central differences in float64 (minixcept.gradcheck) for the input and every
   trained weight, along a random upstream gradient: relative error < 1e-6.
2. The vectorised convolutions and max pooling against the naive loops of
   tests/oracles.py, forward and backward.

Inputs are tiny so that each finite-difference check takes milliseconds.
"""
import numpy as np
import pytest

import oracles
from conftest import relative_error
from minixcept import asnumpy, gradcheck
from minixcept import layers as L
from minixcept.layers.conv import conv2d_backward, conv2d_forward
from minixcept.layers.dense import dropout_backward, dropout_forward
from minixcept.layers.depthwise import depthwise_conv2d_backward, depthwise_conv2d_forward
from minixcept.layers.pooling import max_pool2d_backward, max_pool2d_forward

GRADCHECK_TOLERANCE = 1e-6
ORACLE_TOLERANCE = 1e-12        # the same sums in float64, only added in another order


def draw(rng, shape, values='normal'):
    """Test inputs.

    'normal':     standard normal.
    'off_zero':   |x| >= 0.1, so a step of 1e-6 never crosses ReLU's kink.
    'distinct':   a shuffled grid with gaps of 0.1, so no step of 1e-6 changes which value
                  is a window's maximum (a max is not differentiable at a tie).
    'negative':   'distinct', all below zero: a zero pad would win every border window.
    'ties':       three values only, so windows often hold several equal maxima (for the
                  oracle comparisons; central differences are meaningless at a tie).
    """
    size = int(np.prod(shape))
    if values == 'ties':
        return rng.integers(-2, 1, size=shape) + 0.5
    if values == 'off_zero':
        normal = rng.standard_normal(shape)
        return np.sign(normal) * (0.1 + np.abs(normal))
    if values in ('distinct', 'negative'):
        grid = 0.1 * rng.permutation(size).reshape(shape)
        return grid - 0.1 * size - 0.5 if values == 'negative' else grid - 0.05 * size
    return rng.standard_normal(shape)


def randomize_weights(layer, rng):
    """Random weights of the right shapes; gamma and moving_variance positive."""
    weights = []
    for name, current in zip(layer.weight_names, layer.get_weights()):
        if name in ('gamma', 'moving_variance'):
            weights.append(rng.uniform(0.5, 1.5, current.shape))
        else:
            weights.append(0.5 * rng.standard_normal(current.shape))
    layer.set_weights(weights)


# (id, layer factory, input shape (Keras layout), training, input values)
LAYERS = [
    ('conv2d_3x3_valid', lambda: L.Conv2D(3, 3), (2, 5, 6, 2), False, 'normal'),
    ('conv2d_3x3_s2_valid', lambda: L.Conv2D(3, 3, strides=2), (1, 6, 7, 2), False, 'normal'),
    ('conv2d_3x3_same', lambda: L.Conv2D(3, 3, padding='same'), (1, 4, 5, 2), False, 'normal'),
    ('conv2d_3x3_s2_same_odd', lambda: L.Conv2D(3, 3, strides=2, padding='same'), (1, 5, 5, 2), False, 'normal'),
    ('conv2d_3x3_s2_same_even', lambda: L.Conv2D(3, 3, strides=2, padding='same'), (1, 6, 6, 2), False, 'normal'),
    ('conv2d_2x2_s2_same_odd', lambda: L.Conv2D(3, 2, strides=2, padding='same'), (1, 5, 5, 2), False, 'normal'),
    ('conv2d_1x1_s2_same_odd', lambda: L.Conv2D(3, 1, strides=2, padding='same', use_bias=False),
     (2, 5, 5, 2), False, 'normal'),
    ('conv2d_1x1_s2_same_even', lambda: L.Conv2D(3, 1, strides=2, padding='same', use_bias=False),
     (2, 6, 6, 2), False, 'normal'),
    ('depthwise_3x3_valid', lambda: L.DepthwiseConv2D(3), (2, 5, 5, 2), False, 'normal'),
    ('depthwise_3x3_same', lambda: L.DepthwiseConv2D(3, padding='same', use_bias=False),
     (2, 4, 4, 2), False, 'normal'),
    ('depthwise_3x3_s2_same_odd', lambda: L.DepthwiseConv2D(3, strides=2, padding='same'),
     (2, 5, 5, 2), False, 'normal'),
    ('depthwise_3x3_s2_same_even', lambda: L.DepthwiseConv2D(3, strides=2, padding='same'),
     (2, 6, 6, 2), False, 'normal'),
    ('depthwise_1x1', lambda: L.DepthwiseConv2D(1), (2, 3, 3, 2), False, 'normal'),
    ('pointwise', lambda: L.PointwiseConv2D(3), (2, 3, 3, 2), False, 'normal'),
    ('pointwise_bias', lambda: L.PointwiseConv2D(3, use_bias=True), (2, 3, 3, 2), False, 'normal'),
    ('separable_3x3_same', lambda: L.SeparableConv2D(3, 3, padding='same', use_bias=False),
     (2, 4, 4, 2), False, 'normal'),
    ('separable_3x3_valid_bias', lambda: L.SeparableConv2D(3, 3), (2, 5, 5, 2), False, 'normal'),
    ('separable_3x3_s2_same_even', lambda: L.SeparableConv2D(3, 3, strides=2, padding='same'),
     (1, 6, 6, 2), False, 'normal'),
    ('batchnorm_inference', lambda: L.BatchNormalization(), (2, 3, 3, 2), False, 'normal'),
    ('batchnorm_training', lambda: L.BatchNormalization(), (2, 3, 3, 2), True, 'normal'),
    ('batchnorm_training_2d', lambda: L.BatchNormalization(), (6, 3), True, 'normal'),
    ('relu', lambda: L.ReLU(), (2, 3, 3, 2), False, 'off_zero'),
    ('activation_sigmoid', lambda: L.Activation('sigmoid'), (3, 4), False, 'normal'),
    ('activation_softmax', lambda: L.Activation('softmax'), (3, 4), False, 'normal'),
    ('maxpool_3x3_s2_same_odd', lambda: L.MaxPooling2D(3, strides=2, padding='same'), (2, 5, 5, 2), False, 'negative'),
    ('maxpool_3x3_s2_same_even', lambda: L.MaxPooling2D(3, strides=2, padding='same'), (2, 6, 6, 2), False, 'negative'),
    ('maxpool_2x2_same_odd', lambda: L.MaxPooling2D(2, padding='same'), (2, 5, 5, 2), False, 'negative'),
    ('maxpool_2x2_valid', lambda: L.MaxPooling2D(2), (2, 4, 5, 2), False, 'distinct'),
    ('global_average_pooling', lambda: L.GlobalAveragePooling2D(), (2, 3, 4, 2), False, 'normal'),
    ('global_max_pooling', lambda: L.GlobalMaxPooling2D(), (2, 3, 4, 2), False, 'distinct'),
    ('dense', lambda: L.Dense(3), (4, 5), False, 'normal'),
    ('dense_no_bias', lambda: L.Dense(3, use_bias=False), (4, 5), False, 'normal'),
    ('dense_relu', lambda: L.Dense(3, activation='relu'), (4, 5), False, 'normal'),
    ('dense_sigmoid', lambda: L.Dense(3, activation='sigmoid'), (4, 5), False, 'normal'),
    ('dense_softmax', lambda: L.Dense(3, activation='softmax'), (4, 5), False, 'normal'),
    ('dropout_inference', lambda: L.Dropout(0.5), (4, 5), False, 'normal'),
]


@pytest.mark.parametrize('make_layer, shape, training, values',
                         [case[1:] for case in LAYERS], ids=[case[0] for case in LAYERS])
def test_layer_gradients_match_central_differences(make_layer, shape, training, values, xp):
    rng = np.random.default_rng(7)
    layer = make_layer()
    layer.build(shape)
    randomize_weights(layer, rng)
    x = xp.asarray(draw(rng, shape, values))
    errors = gradcheck.check_layer(layer, x, training=training, seed=11)
    trained = {'input'} | {name for name in layer.weight_names if name not in ('moving_mean', 'moving_variance')}
    assert set(errors) == trained, f"checked {sorted(errors)}, expected {sorted(trained)}"
    assert max(errors.values()) < GRADCHECK_TOLERANCE, errors


def test_add_gradients_match_central_differences(xp):
    """Both inputs receive dy: the residual's fan-out."""
    rng = np.random.default_rng(3)
    a, b = (xp.asarray(rng.standard_normal((2, 3, 3, 2))) for _ in range(2))
    dout = xp.asarray(rng.standard_normal(a.shape))
    add = L.Add()
    errors = gradcheck.check_gradients(lambda: add.forward(a, b),
                                       lambda d: dict(zip('ab', add.backward(d))), {'a': a, 'b': b}, dout)
    assert max(errors.values()) < GRADCHECK_TOLERANCE, errors


def test_training_dropout_gradient_matches_central_differences(xp):
    """With the mask held fixed (the same seed for every forward), dropout is linear in x."""
    rng = np.random.default_rng(5)
    x = xp.asarray(rng.standard_normal((4, 6)))
    dout = xp.asarray(rng.standard_normal(x.shape))
    forward = lambda: dropout_forward(x, 0.4, np.random.default_rng(21))[0]  # noqa: E731
    _, mask = dropout_forward(x, 0.4, np.random.default_rng(21))
    errors = gradcheck.check_gradients(forward, lambda d: {'x': dropout_backward(d, mask)}, {'x': x}, dout)
    assert errors['x'] < GRADCHECK_TOLERANCE, errors
    dropped = int((asnumpy(mask) == 0).sum())
    assert 0 < dropped < mask.size, 'the mask should both keep and drop values'


def test_gradcheck_catches_a_wrong_gradient(xp):
    """The checker itself: a backward pass that is off by 1% must fail the tolerance."""
    rng = np.random.default_rng(2)
    x = xp.asarray(rng.standard_normal((3, 4)))
    dout = xp.asarray(rng.standard_normal(x.shape))
    errors = gradcheck.check_gradients(lambda: x ** 3, lambda d: {'x': 1.01 * 3 * x ** 2 * d}, {'x': x}, dout)
    assert errors['x'] > 1e-3


def test_gradcheck_perturbs_non_contiguous_arrays(xp):
    """A transposed view must be perturbed in place too, not through a reshaped copy."""
    rng = np.random.default_rng(6)
    x = xp.asarray(rng.standard_normal((3, 4))).T                 # (4, 3), not C-contiguous
    dout = xp.asarray(rng.standard_normal(x.shape))
    errors = gradcheck.check_gradients(lambda: x ** 3, lambda d: {'x': 3 * x ** 2 * d}, {'x': x}, dout)
    assert errors['x'] < GRADCHECK_TOLERANCE, errors


# -- the naive loops as oracles ----------------------------------------------------------

# (kernel size, strides, padding, input shape)
WINDOWS = [
    (3, 1, 'valid', (2, 5, 6, 2)),
    (3, 2, 'valid', (1, 6, 7, 2)),
    (3, 1, 'same', (1, 4, 5, 2)),
    (3, 2, 'same', (2, 5, 5, 2)),       # odd: pads (1, 1)
    (3, 2, 'same', (2, 6, 6, 2)),       # even: pads (0, 1)
    (2, 2, 'same', (1, 5, 6, 2)),       # (0, 1) on rows, (0, 0) on columns
    (1, 2, 'same', (1, 5, 6, 2)),
]
WINDOW_IDS = [f'k{k}_s{s}_{padding}_{shape[1]}x{shape[2]}' for k, s, padding, shape in WINDOWS]


@pytest.mark.parametrize('kernel_size, stride, padding, shape', WINDOWS, ids=WINDOW_IDS)
def test_conv2d_matches_naive_loops(kernel_size, stride, padding, shape, xp):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    kernel = rng.standard_normal((kernel_size, kernel_size, shape[3], 3))
    bias = rng.standard_normal(3)
    y, cache = conv2d_forward(xp.asarray(x), xp.asarray(kernel), xp.asarray(bias), (stride, stride), padding)
    y_naive = oracles.conv2d_forward(x, kernel, bias, (stride, stride), padding)
    assert relative_error(y, y_naive) < ORACLE_TOLERANCE
    dy = rng.standard_normal(y_naive.shape)
    for ours, naive in zip(conv2d_backward(xp.asarray(dy), cache),
                           oracles.conv2d_backward(dy, x, kernel, (stride, stride), padding)):
        assert relative_error(ours, naive) < ORACLE_TOLERANCE


@pytest.mark.parametrize('kernel_size, stride, padding, shape', WINDOWS, ids=WINDOW_IDS)
def test_depthwise_conv2d_matches_naive_loops(kernel_size, stride, padding, shape, xp):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    depthwise_kernel = rng.standard_normal((kernel_size, kernel_size, shape[3], 1))
    bias = rng.standard_normal(shape[3])
    y, cache = depthwise_conv2d_forward(xp.asarray(x), xp.asarray(depthwise_kernel), xp.asarray(bias),
                                        (stride, stride), padding)
    y_naive = oracles.depthwise_conv2d_forward(x, depthwise_kernel, bias, (stride, stride), padding)
    assert relative_error(y, y_naive) < ORACLE_TOLERANCE
    dy = rng.standard_normal(y_naive.shape)
    for ours, naive in zip(depthwise_conv2d_backward(xp.asarray(dy), cache),
                           oracles.depthwise_conv2d_backward(dy, x, depthwise_kernel, (stride, stride), padding)):
        assert relative_error(ours, naive) < ORACLE_TOLERANCE


# (pool size, strides, padding, input shape, input values)
POOLS = [
    (3, 2, 'same', (2, 5, 5, 2), 'negative'),
    (3, 2, 'same', (2, 6, 6, 2), 'negative'),
    (2, 2, 'same', (1, 5, 5, 2), 'negative'),
    (2, 2, 'valid', (2, 4, 5, 2), 'normal'),
    (3, 1, 'valid', (1, 5, 5, 2), 'normal'),
    (3, 2, 'same', (2, 6, 6, 2), 'ties'),      # small integers: ties go to the first in the window
    (2, 1, 'same', (1, 4, 4, 2), 'ties'),      # overlapping windows share a winner: its gradients add
]


@pytest.mark.parametrize('pool_size, stride, padding, shape, values', POOLS,
                         ids=[f'k{k}_s{s}_{p}_{shape[1]}x{shape[2]}_{v}' for k, s, p, shape, v in POOLS])
def test_max_pool2d_matches_naive_loops(pool_size, stride, padding, shape, values, xp):
    rng = np.random.default_rng(4)
    x = draw(rng, shape, values)
    pool, strides = (pool_size, pool_size), (stride, stride)
    y, cache = max_pool2d_forward(xp.asarray(x), pool, strides, padding)
    y_naive = oracles.max_pool2d_forward(x, pool, strides, padding)
    assert relative_error(y, y_naive) == 0          # a max copies a value: no rounding at all
    dy = rng.standard_normal(y_naive.shape)
    dx_naive = oracles.max_pool2d_backward(dy, x, pool, strides, padding)
    assert relative_error(max_pool2d_backward(xp.asarray(dy), cache), dx_naive) < ORACLE_TOLERANCE
