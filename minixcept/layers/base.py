"""What every layer shares: parameters in Keras order, gradients, the cache switch.

A layer here is deliberately thin. The mathematics lives in pure
``*_forward`` / ``*_backward`` function pairs beside each class; the class only
keeps the parameters, calls the pair, remembers the cache between forward and
backward, and files the parameter gradients under Keras's weight names in
``layer.grads``.
"""
import contextlib
import itertools
import re
from collections import defaultdict

import numpy as np

from .. import backend, checks
from ..errors import ShapeError

_grad_enabled = True
_name_counters = defaultdict(itertools.count)


@contextlib.contextmanager
def no_grad():
    """Run forward passes without keeping caches for backward (saves memory)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def grad_enabled():
    return _grad_enabled


def _default_name(cls):
    """Keras-style automatic names: conv2d, conv2d_1, conv2d_2, ..."""
    base = re.sub(r'(?<!^)(?=[A-Z][a-z])', '_', cls.__name__).lower()
    base = base.replace('2_d', '2d')
    count = next(_name_counters[base])
    return base if count == 0 else f'{base}_{count}'


class Layer:
    """Base class. Subclasses set ``weight_names`` and implement
    ``build``, ``_forward`` and ``_backward``.

    ``weights_version`` counts the changes to the weights (``set_weights``, an optimizer step,
    moving statistics that moved): whoever keeps something computed from them, such as an
    engine's folded kernels, compares it to know when to compute it again. Code that writes
    into ``params`` directly calls ``weights_changed()``.
    """

    weight_names = ()
    non_trainable_weight_names = ()     # weights training never changes by gradient (batch-norm's moving statistics)

    def __init__(self, name=None, trainable=True, dtype='float32'):
        self.name = name or _default_name(type(self))
        self.trainable = trainable
        self.dtype = np.dtype(dtype)
        self.params = {}            # Keras weight name -> array
        self.grads = {}             # filled by backward, same keys as params
        self.built = False
        self.input_shape = None
        self.weights_version = 0
        self._cache = None

    # -- parameters ----------------------------------------------------------
    def build(self, input_shape):
        self.input_shape = tuple(input_shape)
        self.built = True

    def _new_param(self, name, array):
        # a copy of our own: optimizers update parameters in place, never the caller's array
        value = backend.to_device(array, self.dtype)
        self.params[name] = value.copy() if value is array else value
        self.weights_changed()

    def weights_changed(self):
        """Say that the weights changed (see ``weights_version``)."""
        self.weights_version += 1

    def get_weights(self):
        """Weights as NumPy arrays of the caller's own (copies), in Keras order."""
        arrays = [(self.params[name], backend.asnumpy(self.params[name])) for name in self.weight_names]
        return [host.copy() if host is param else host for param, host in arrays]

    def set_weights(self, weights):
        """Set weights from a list in Keras order, checking every shape and type first: a
        mismatch names the layer and the weight, and leaves the layer as it was."""
        if not self.built:
            raise RuntimeError(f"layer {self.name!r} is not built yet: call build(input_shape) first")
        if isinstance(weights, (str, bytes, dict)) or checks.is_array(weights):
            raise TypeError(f"layer {self.name!r}: set_weights takes a list of arrays {list(self.weight_names)}, "
                            f"got a {type(weights).__name__}")
        weights = list(weights)
        if len(weights) != len(self.weight_names):
            raise ShapeError(
                f"layer {self.name!r} expects {len(self.weight_names)} weights "
                f"{list(self.weight_names)}, got {len(weights)}")
        who = f"layer {self.name!r}"
        arrays = [checks.numbers_array(value, f"weight {name!r}", who)
                  for name, value in zip(self.weight_names, weights)]
        for name, value in zip(self.weight_names, arrays):
            checks.shape(value, self.params[name].shape, f"weight {name!r}", who)
        for name, value in zip(self.weight_names, arrays):
            self._new_param(name, value)

    def named(self, *gradients):
        """Gradients in Keras order -> {weight name: gradient}; a trailing bias gradient is
        dropped when the layer has no bias (its weight_names then end before it)."""
        return dict(zip(self.weight_names, gradients))

    def count_params(self, trainable=None):
        """Number of weights: all (None), those an optimizer trains (True) or the others (False).
        A frozen layer (``trainable = False``) has no trainable weights, as in Keras."""
        def trained(name):
            return self.trainable and name not in self.non_trainable_weight_names
        return int(sum(int(np.prod(p.shape)) for name, p in self.params.items()
                       if trainable is None or trained(name) == trainable))

    def astype(self, dtype):
        """Cast parameters to ``dtype`` (float64 for gradient checks)."""
        self.dtype = np.dtype(dtype)
        for name, value in self.params.items():
            self.params[name] = value.astype(self.dtype)
        self.weights_changed()
        return self

    # -- computation ---------------------------------------------------------
    def forward(self, x, training=False):
        self.check_input(x)
        checks.flag(training, 'training', f"layer {self.name!r}")
        if not self.built:
            self.build(x.shape)
        y, cache = self._forward(x, training)
        self._cache = (cache, tuple(y.shape)) if _grad_enabled else None   # wrapped: a cache may itself be None
        return y

    def check_input(self, x, name='x'):
        """The door: ``x`` is an array of floats, and a built layer with weights gets the
        channels (the last axis) it was built for - its kernels have that many rows."""
        who = f"layer {self.name!r}"
        checks.array(x, name, who)
        if self.built and self.params and self.input_shape and x.ndim >= 1 and x.shape[-1] != self.input_shape[-1]:
            raise ShapeError(f"{who} was built for inputs with {self.input_shape[-1]} channels (last axis), "
                             f"got {name} of shape {tuple(x.shape)}")

    def forward_step(self, x, training=False):
        """The pure pair's forward, the cache handed back instead of kept: (y, cache).
        For runners that keep caches of their own (one per share of a batch, in an engine)."""
        self.check_input(x)
        if not self.built:
            self.build(x.shape)
        return self._forward(x, training)

    def backward_step(self, dy, cache):
        """The pure pair's backward on a cache from ``forward_step``: (dx, {weight name: gradient}).
        Leaves ``grads`` alone: the runner files them."""
        return self._backward(dy, cache)

    def backward(self, dy):
        """Gradient with respect to the input; fills ``self.grads``. ``dy`` has the shape of
        the last forward's output."""
        if self._cache is None:
            raise RuntimeError(
                f"layer {self.name!r}: backward needs a forward pass run with gradients "
                f"enabled (not inside minixcept.no_grad())")
        cache, output_shape = self._cache
        checks.array(dy, 'dy', f"layer {self.name!r}")
        checks.shape(dy, output_shape, "dy (the last forward's output shape)", f"layer {self.name!r}")
        dx, grads = self._backward(dy, cache)
        self.grads = grads
        return dx

    __call__ = forward

    # -- description (summary) -----------------------------------------------
    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def multiply_adds(self, input_shape):
        """Multiply-adds for one example of this input shape (0 for cheap layers)."""
        return 0

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


def glorot_uniform(shape, rng):
    """Keras's default kernel initializer: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out))."""
    receptive_field = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


_init_rng = np.random.default_rng(0)


def set_seed(seed):
    """Seed the generator that initialises new weights and draws dropout masks."""
    global _init_rng
    _init_rng = np.random.default_rng(seed)


def init_rng():
    return _init_rng


def check_rank(layer, x, rank):
    if x.ndim != rank:
        raise ShapeError(f"layer {layer.name!r} expects a {rank}-D input, got shape {tuple(x.shape)}")
