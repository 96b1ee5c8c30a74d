"""SGD with momentum and Adam, with Keras 3's update rules and defaults.

An optimizer updates every parameter of every trainable layer for which the last
backward pass left a gradient in ``layer.grads``, in place: the step is written into
the parameter's own array (``w -= step``, on NumPy or CuPy alike), so whoever holds
that array sees the new values, and the layer's ``weights_version`` moves on, so
whoever computed something from the old ones (an engine's folded kernels) knows. Its
per-parameter state (velocity, moments) is keyed by the layer and the weight name.

Each rule is elementwise: a number of a parameter moves by its own gradient and its own
moments, never by its neighbours'. So ``_update(param, grad, *state)`` gives the same
numbers whether it runs on the whole arrays or on matching slices of them, one after
another or at once: a runner may cut a large parameter into slices and update them in
its threads (``apply_gradients``'s ``run``).
"""
from . import checks
from .backend import get_array_module


class Optimizer:
    def __init__(self, learning_rate):
        self.learning_rate = checks.number(learning_rate, 'learning_rate', type(self).__name__, 0, low_open=True)
        self.iterations = 0
        self._slots = {}

    def _slot(self, layer, name, kind, like):
        key = (id(layer), name, kind)
        if key not in self._slots:
            self._slots[key] = get_array_module(like).zeros_like(like)
        return self._slots[key]

    def apply_gradients(self, layers, run=None):
        """One step over the gradients in each trainable layer's ``grads``; each gradient has
        its parameter's shape (checked first, so a mismatch changes nothing).

        run: how one parameter's update is carried out, ``run(update, arrays)`` with arrays
        (param, grad, *state), all of one shape; by default ``update(*arrays)`` on the whole
        arrays. The training engine passes its own (``GradientEngine.run_elementwise``),
        which updates slices of a large parameter in its threads."""
        who = type(self).__name__
        layers = list(layers) if isinstance(layers, (list, tuple)) or hasattr(layers, '__next__') else layers
        if not isinstance(layers, list) or not all(hasattr(one, 'grads') and hasattr(one, 'params') for one in layers):
            raise TypeError(f"{who}: apply_gradients takes a list of layers (model.layers), "
                            f"got {type(layers).__name__}")
        for layer in layers:
            for name, grad in (layer.grads.items() if layer.trainable else ()):
                where = f"{who}, layer {layer.name!r}"
                checks.array(grad, f"the gradient of {name!r}", where)
                checks.shape(grad, layer.params[name].shape, f"the gradient of {name!r}", where)
        self.iterations += 1
        run = run or _on_whole_arrays
        for layer in layers:
            if not layer.trainable or not layer.grads:
                continue
            for name, grad in layer.grads.items():
                param = layer.params[name]
                run(self._update, (param, grad) + self._state(layer, name, param))
            layer.weights_changed()

    step = apply_gradients

    def _state(self, layer, name, param):
        """The arrays the rule keeps for this parameter between steps (a tuple, maybe empty)."""
        return ()


def _on_whole_arrays(update, arrays):
    update(*arrays)


class SGD(Optimizer):
    """Keras's SGD(learning_rate=0.01, momentum=0.0, nesterov=False).

    v = momentum * v - lr * g;   w = w + v   (nesterov: w = w + momentum * v - lr * g)

    Without momentum v is not kept: w = w - lr * g.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        super().__init__(learning_rate)
        self.momentum = checks.number(momentum, 'momentum', 'SGD', 0, 1, high_open=True)
        self.nesterov = checks.flag(nesterov, 'nesterov', 'SGD')

    def _state(self, layer, name, param):
        return () if self.momentum == 0 else (self._slot(layer, name, 'velocity', param),)

    def _update(self, param, grad, velocity=None):
        if velocity is None:
            param -= self.learning_rate * grad
            return
        velocity *= self.momentum
        velocity -= self.learning_rate * grad
        if self.nesterov:
            param -= self.learning_rate * grad - self.momentum * velocity
        else:
            param += velocity


class Adam(Optimizer):
    """Keras's Adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7).

    m = m + (g - m)(1 - b1);  v = v + (g^2 - v)(1 - b2)
    w = w - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate)
        self.beta_1 = checks.number(beta_1, 'beta_1', 'Adam', 0, 1, high_open=True)      # 1 would divide by 1 - 1
        self.beta_2 = checks.number(beta_2, 'beta_2', 'Adam', 0, 1, high_open=True)
        self.epsilon = checks.number(epsilon, 'epsilon', 'Adam', 0, low_open=True)

    def _state(self, layer, name, param):
        return self._slot(layer, name, 'm', param), self._slot(layer, name, 'v', param)

    def _update(self, param, grad, m, v):
        xp = get_array_module(param)
        m += (grad - m) * (1 - self.beta_1)
        v += (grad * grad - v) * (1 - self.beta_2)
        t = self.iterations
        step_size = self.learning_rate * (1 - self.beta_2 ** t) ** 0.5 / (1 - self.beta_1 ** t)
        param -= step_size * m / (xp.sqrt(v) + self.epsilon)
