"""Activations: ReLU (Xception's only one), and softmax / sigmoid for output layers.

ReLU never works in place: in Xception's blocks 3-13 the residual branch reads the
*pre*-ReLU tensor, so overwriting it would silently change the shortcut.

ReLU's gradient is dx = dy * (x > 0): 1 where the input was positive, 0 elsewhere, and
0 at exactly x = 0, where the derivative does not exist and TensorFlow takes 0 too. That
kink is why float32 comparisons through many ReLUs can disagree: a value within rounding
of zero may land on either side in two correct implementations, switching a whole path on
or off; whole-network gradients are therefore compared in float64.
"""
from ..backend import get_array_module
from .base import Layer


def relu_forward(x):
    """y = max(x, 0). Cache: the mask x > 0 (the derivative, 1 or 0; 0 at x = 0 as in TensorFlow)."""
    positive = x > 0
    return x * positive, positive


def relu_backward(dy, positive):
    return dy * positive


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), computed without overflow. Cache: y."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
    return y, y


def sigmoid_backward(dy, y):
    return dy * y * (1 - y)


def softmax_forward(x):
    """Softmax over the last axis. Cache: y."""
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y


def softmax_backward(dy, y):
    """dx = y * (dy - sum(dy * y)): the Jacobian-vector product of softmax."""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def linear_forward(x):
    return x, None


def linear_backward(dy, _):
    return dy


ACTIVATIONS = {
    None: (linear_forward, linear_backward),
    'linear': (linear_forward, linear_backward),
    'relu': (relu_forward, relu_backward),
    'sigmoid': (sigmoid_forward, sigmoid_backward),
    'softmax': (softmax_forward, softmax_backward),
}


def activation_pair(name):
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}: choose one of {sorted(map(str, ACTIVATIONS))}") from None


class Activation(Layer):
    """Keras's Activation('relu' | 'sigmoid' | 'softmax' | 'linear'), as Xception's *_act layers."""

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = activation
        self._forward_fn, self._backward_fn = activation_pair(activation)

    def _forward(self, x, training):
        return self._forward_fn(x)

    def _backward(self, dy, cache):
        return self._backward_fn(dy, cache), {}


class ReLU(Activation):
    """y = max(x, 0)."""

    def __init__(self, **kwargs):
        super().__init__('relu', **kwargs)
