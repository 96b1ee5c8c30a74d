"""A model is a list of layers run in order, each reading tensors by name.

That is all a graph like Xception's needs: a node names its layer and the
tensors it reads (``'input'`` or an earlier layer's name), and its output is
stored under its own name. The backward pass walks the nodes in reverse; where a
tensor was read by two nodes (a residual block's input), the two gradients that
come back to it are added.

Why added: the loss depends on such a tensor along two paths, so a small change of it
changes the loss along both, and the multivariable chain rule sums the two partial
derivatives. Every reader of a tensor comes after it in the list, so by the time the
reverse walk reaches the layer that made the tensor, every share is in. Keeping only one
share gives no error and a gradient of the right shape - the wrong one.
"""
import difflib
from dataclasses import dataclass

import numpy as np

from . import backend, checks
from .errors import ShapeError
from .layers.base import no_grad


@dataclass
class Node:
    layer: object
    inputs: tuple          # names of the tensors this layer reads


class Model:
    """Layers wired by name. Subclasses add nodes with ``self.add(layer, *inputs)``."""

    def __init__(self, input_shape, name='model'):
        self.name = name
        self.input_shape = tuple(input_shape)        # one example: (H, W, C) or (features,); None: any size
        self.nodes = []
        self._shapes = {'input': (None,) + self.input_shape}

    def add(self, layer, *inputs):
        """Append ``layer`` reading ``inputs`` (default: the previous node's output); build it.

        Returns the layer's name, which later nodes use as their input.
        """
        inputs = inputs or ((self.nodes[-1].layer.name if self.nodes else 'input'),)
        if layer.name in self._shapes:
            raise ValueError(f"model {self.name!r} already has a layer named {layer.name!r}")
        shape = self._shapes[inputs[0]]
        if not layer.built:
            layer.build(shape)
        self._shapes[layer.name] = layer.compute_output_shape(shape)
        self.nodes.append(Node(layer, tuple(inputs)))
        return layer.name

    # -- the layers ------------------------------------------------------------
    @property
    def layers(self):
        return [node.layer for node in self.nodes]

    def get_layer(self, name):
        """The layer called ``name``; a KeyError lists the closest names when there is none."""
        return self.nodes[self._position(name)].layer

    def count_params(self, trainable=None):
        """Number of weights: all of them, or with ``trainable=True`` / ``False`` those an
        optimizer trains / the rest (batch-norm's moving statistics, every weight of a frozen
        layer), as Keras's summary splits them."""
        return sum(layer.count_params(trainable) for layer in self.layers)

    def output_shape(self, name=None):
        return self._shapes[name or self.nodes[-1].layer.name]

    # -- computation -----------------------------------------------------------
    def check_input(self, x, start_after=None):
        """Raise ShapeError unless ``x`` has the shape the model (or the stretch after
        ``start_after``) takes: a batch axis, then the input shape, None matching any size;
        TypeError unless it is an array of floating-point numbers."""
        if not checks.is_array(x):
            raise TypeError(f"model {self.name!r}: x must be a NumPy or CuPy array, got {type(x).__name__}")
        self.check_input_shape(tuple(x.shape), start_after)
        # Keras would cast integers to float32; pixels in [0, 255] are then the wrong input
        # anyway, and a silent cast hides the missing preprocess_input, so say so instead.
        if x.dtype.kind != 'f':
            raise TypeError(f"model {self.name!r} expects floating-point input, got {x.dtype}: photos go "
                            "through minixcept.preprocess_input first (it scales [0, 255] to [-1, 1] as float32)")

    def check_input_shape(self, shape, start_after=None):
        expected = self.input_shape if start_after is None else self._shapes[start_after][1:]
        if len(shape) != len(expected) + 1 or any(
                size is not None and size != got for size, got in zip(expected, shape[1:])):
            what = 'input' if start_after is None else f'input after layer {start_after!r}'
            raise ShapeError(f"model {self.name!r} expects {what} of shape {_batch_shape(expected)}, "
                             f"got {tuple(shape)}")

    def forward(self, x, training=False, capture=None, start_after=None, stop_after=None):
        """Run every layer. With ``capture`` (a list of layer names, or 'all'), also return
        ``{name: output}`` for those layers.

        ``start_after`` and ``stop_after`` name layers and run only a stretch of the graph:
        with ``start_after``, ``x`` is that layer's output (computed earlier, e.g. a cached
        frozen prefix) and only the layers after it run; with ``stop_after``, the output of
        that layer is returned and the layers after it do not run. A stretch may start only
        where a single tensor crosses, e.g. between two Xception blocks.

        Tensors no later layer reads are dropped as soon as possible to save memory.
        """
        who = f"model {self.name!r}"
        checks.flag(training, 'training', who)
        checks.optional_name(start_after, 'start_after', who)
        checks.optional_name(stop_after, 'stop_after', who)
        if not (capture is None or capture == 'all' or (isinstance(capture, (list, tuple, set))
                                                        and all(isinstance(name, str) for name in capture))):
            raise TypeError(f"{who}: capture must be a list of layer names or 'all', got {capture!r}")
        first, last = self.stretch(start_after, stop_after)
        self.check_input(x, start_after)
        names = self._names()[first:last + 1]
        wanted = set(names if capture == 'all' else (capture or ()))
        unknown = wanted - set(names)
        if unknown:
            raise KeyError(f"model {self.name!r} runs no layers named {sorted(unknown)}")
        last_use = self.last_use(first, last)
        tensors, captured = {start_after or 'input': x}, {}
        for position in range(first, last + 1):
            node = self.nodes[position]
            out = node.layer.forward(*(tensors[name] for name in node.inputs), training=training)
            tensors[node.layer.name] = out
            if node.layer.name in wanted:
                captured[node.layer.name] = out
            for name in node.inputs:
                if last_use[name] == position:
                    del tensors[name]
        y = tensors[names[-1]]
        self._last_run = (first, last, start_after or 'input', tuple(y.shape))
        return (y, captured) if capture is not None else y

    __call__ = forward

    def backward(self, dy, stop_at=None):
        """Backpropagate ``dy`` through the layers the last forward ran; returns the gradient
        of that forward's input (or, after ``start_after``, of that layer's output).

        Each layer's ``grads`` are filled. ``stop_at`` names a layer (useful when the layers
        before it are frozen): the walk stops as soon as the gradient of that layer's (first)
        input is complete and returns it. Where that tensor fans out, that is after every
        layer of the stretch that reads it has run its backward: the gradients add up.
        """
        if not hasattr(self, '_last_run'):
            raise RuntimeError(f"model {self.name!r}: backward needs a forward pass first")
        first, last, start, output_shape = self._last_run
        checks.array(dy, 'dy', f"model {self.name!r}")
        checks.optional_name(stop_at, 'stop_at', f"model {self.name!r}")
        if tuple(dy.shape) != output_shape:
            raise ShapeError(f"model {self.name!r}: backward expects dy of the last forward's output shape "
                             f"{output_shape}, got {tuple(dy.shape)}")
        stop_position, stop_tensor = self.backward_stop(stop_at, first, last)
        pending = {self.nodes[last].layer.name: dy}
        for position in range(last, stop_position - 1, -1):
            node = self.nodes[position]
            grad = pending.pop(node.layer.name)
            input_grads = node.layer.backward(grad)
            if len(node.inputs) == 1:
                input_grads = (input_grads,)
            for name, g in zip(node.inputs, input_grads):
                pending[name] = pending[name] + g if name in pending else g   # fan-out: gradients add
        return pending[stop_tensor or start]

    # -- doors to the other wings ---------------------------------------------
    # The textbook imports nothing from the engine room or the file code when it loads, so
    # it reads and runs with NumPy alone. These methods are its only doors to them: each
    # imports what it needs when it is called.

    def predict(self, x, batch_size=32, fast=True):
        """Inference in batches, keeping no caches; returns a NumPy array.

        fast: run the inference engine (``minixcept.engines``: batch-norm folded into the
        convolutions, ReLU fused, work in cache-sized tiles, one thread per core), which
        agrees with the layers to float32 rounding and is faster on the CPU (how much:
        benchmarks/RESULTS.md). ``fast=False`` runs the plain layers one by
        one, as ``forward`` does. The engine is kept for the model from call to call (with the
        memory it reuses) and folds the weights again whenever they change. On CuPy arrays it
        runs the same folded, fused steps as whole-batch device operations on the calling
        thread (threads, tiles and BLAS pinning are for NumPy; tests/test_gpu_path.py).

        x: an array (N, ...) as ``forward`` takes it (a list of same-shaped examples is
        stacked into one), under the same rule: floats, so photos go through
        ``preprocess_input`` first. batch_size: a whole number >= 1.
        """
        who = f"model {self.name!r}: predict"
        checks.integer(batch_size, 'batch_size', who, minimum=1)
        checks.flag(fast, 'fast', who)
        if isinstance(x, (list, tuple)):
            x = _stacked(x, who)
        self.check_input(x)
        if len(x) == 0:
            raise ValueError(f"{who} needs at least one input, got {tuple(x.shape)}")
        if fast:
            from .engines.inference import engine_for
            run = engine_for(self)
        else:
            run = lambda batch: self.forward(batch, training=False)  # noqa: E731
        outputs = []
        with no_grad():
            for start in range(0, len(x), batch_size):
                batch = backend.to_device(x[start:start + batch_size], np.float32)
                outputs.append(backend.asnumpy(run(batch)))
        return np.concatenate(outputs)

    def load_weights(self, path):
        """Load a Keras HDF5 (legacy or Keras 3) or .keras file, by layer order (minixcept.files)."""
        from .files.weights import load_weights
        load_weights(self, path)

    def save_weights(self, path):
        """Write the weights as a legacy Keras HDF5 file (minixcept.files)."""
        from .files.weights import save_weights
        save_weights(self, path)

    # -- weights ---------------------------------------------------------------
    def get_weights(self):
        """Every layer's weights in Keras order, one list (as keras.Model.get_weights)."""
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        """Set every layer's weights from one list in Keras order (what ``get_weights`` gives).

        Everything is checked before anything is set, so a mismatch leaves the model as it
        was: the number of arrays (ShapeError), each array's shape (ShapeError naming the
        layer and the weight) and its type (TypeError unless it holds real numbers, which are
        cast to the layer's dtype as Keras casts them).
        """
        if isinstance(weights, (str, bytes, dict)) or checks.is_array(weights):
            raise TypeError(f"model {self.name!r}: set_weights takes a list of arrays (what get_weights gives), "
                            f"got a {type(weights).__name__}")
        weights = list(weights)
        slots = [(layer, name) for layer in self.layers for name in layer.weight_names]
        if len(weights) != len(slots):
            carrying = sum(1 for layer in self.layers if layer.weight_names)
            raise ShapeError(f"model {self.name!r} has {len(slots)} weights in {carrying} layers, "
                             f"got a list of {len(weights)}")
        by_layer = {}
        for index, ((layer, name), value) in enumerate(zip(slots, weights)):
            where = f"weight {index} ({layer.name!r} {name!r})"
            value = checks.numbers_array(value, where, f"model {self.name!r}")   # bool, ints and floats cast
            expected = tuple(layer.params[name].shape)
            if tuple(value.shape) != expected:
                raise ShapeError(f"model {self.name!r}: {where} expects shape {expected}, got {tuple(value.shape)}")
            by_layer.setdefault(layer.name, []).append(value)
        for layer in self.layers:
            if layer.weight_names:
                layer.set_weights(by_layer[layer.name])

    # -- description -----------------------------------------------------------
    def _names(self):
        return [node.layer.name for node in self.nodes]

    def _position(self, name):
        for position, node in enumerate(self.nodes):
            if node.layer.name == name:
                return position
        raise KeyError(f"model {self.name!r} has no layer named {name!r}{self._closest(name)}")

    def _closest(self, name):
        """'; the closest are ...': the layer names nearest a mistyped one, or ''."""
        close = difflib.get_close_matches(str(name), self._names(), n=3)
        return f"; the closest are {', '.join(map(repr, close))}" if close else ''

    def stretch(self, start_after=None, stop_after=None):
        """Positions (first, last) of the nodes that run after layer ``start_after`` up to layer
        ``stop_after`` (``forward``'s arguments); checks that only ``start_after`` crosses in."""
        first = 0 if start_after is None else self._position(start_after) + 1
        last = len(self.nodes) - 1 if stop_after is None else self._position(stop_after)
        if first > last:
            raise ValueError(f"model {self.name!r}: no layers between start_after={start_after!r} "
                             f"and stop_after={stop_after!r}")
        inside = {start_after or 'input'} | {node.layer.name for node in self.nodes[first:last + 1]}
        for node in self.nodes[first:last + 1]:
            outside = [name for name in node.inputs if name not in inside]
            if outside:
                raise ValueError(f"model {self.name!r} cannot start after {start_after!r}: layer "
                                 f"{node.layer.name!r} also reads {outside[0]!r}, computed before it")
        return first, last

    def readers(self, first=0, last=None):
        """{tensor name: [positions of the nodes in first..last that read it]}, for every tensor
        those nodes read or write (a tensor nobody in the stretch reads has an empty list)."""
        last = len(self.nodes) - 1 if last is None else last
        readers = {}
        for position in range(first, last + 1):
            node = self.nodes[position]
            for name in node.inputs:
                readers.setdefault(name, []).append(position)
            readers.setdefault(node.layer.name, [])
        return readers

    def last_use(self, first=0, last=None):
        """{tensor name: the position of the last node in first..last that reads it}; tensors
        nobody reads, and the output of node ``last``, get len(self.nodes): they are kept."""
        last = len(self.nodes) - 1 if last is None else last
        uses = {name: positions[-1] if positions else len(self.nodes)
                for name, positions in self.readers(first, last).items()}
        uses[self.nodes[last].layer.name] = len(self.nodes)
        return uses

    def backward_stop(self, stop_at, first=0, last=None):
        """Where a backward walk over nodes first..last that stops at layer ``stop_at`` ends:
        (position, tensor), the tensor being ``stop_at``'s (first) input and the position that
        of its earliest reader in the stretch, after whose backward its gradient is complete.
        Without ``stop_at``: (first, None), the whole stretch."""
        last = len(self.nodes) - 1 if last is None else last
        if stop_at is None:
            return first, None
        position = self._position(stop_at)
        if not first <= position <= last:
            raise ValueError(f"model {self.name!r}: layer {stop_at!r} is not among the layers the "
                             f"last forward pass ran")
        tensor = self.nodes[position].inputs[0]
        return self.readers(first, last)[tensor][0], tensor

    def shapes_at(self, input_size=None):
        """{tensor name: shape with a batch axis} for inputs of ``input_size``, or as built
        (None where the model takes any size) when it is None.

        input_size: the free sizes of the input - one number for all of them (224) or one
        each ((180, 240)) - or the whole input shape ((180, 240, 3)).
        """
        if input_size is None:
            return dict(self._shapes)
        shape = self._input_shape_at(input_size)
        self.check_input_shape((None,) + shape)
        shapes = {'input': (None,) + shape}
        for node in self.nodes:
            shapes[node.layer.name] = node.layer.compute_output_shape(shapes[node.inputs[0]])
        return shapes

    def _input_shape_at(self, input_size):
        free = [axis for axis, size in enumerate(self.input_shape) if size is None]
        sizes = (input_size,) * len(free) if np.isscalar(input_size) else tuple(input_size)
        if len(sizes) == len(self.input_shape):
            return tuple(int(s) for s in sizes)
        if len(sizes) != len(free):
            raise ShapeError(f"model {self.name!r} takes inputs of shape {_batch_shape(self.input_shape)}: "
                             f"input_size={input_size!r} gives neither its {len(free)} free sizes nor the whole shape")
        shape = list(self.input_shape)
        for axis, size in zip(free, sizes):
            shape[axis] = int(size)
        return tuple(shape)

    def multiply_adds(self, input_size=None):
        """Multiply-adds for one example (at ``input_size`` if the model takes any size; see shapes_at)."""
        shapes = self.shapes_at(input_size)
        if None in shapes['input'][1:]:
            raise ShapeError(f"model {self.name!r} takes inputs of shape {_batch_shape(self.input_shape)}: "
                             f"its multiply-adds depend on the size, pass input_size=")
        return sum(node.layer.multiply_adds(shapes[node.inputs[0]]) for node in self.nodes)

    def summary(self, print_fn=print, input_size=None):
        """Print each layer's name, type, output shape, parameters and multiply-adds, with the
        totals and the trainable / non-trainable split (as Keras's summary).

        Where the model takes any input size, the shapes show None for the free sizes and the
        multiply-adds are left out, unless ``input_size`` gives a size (see shapes_at).
        """
        shapes = self.shapes_at(input_size)
        sized = None not in shapes['input'][1:]
        rows = [('Layer (type)', 'Output shape', 'Params') + (('Mult-adds',) if sized else ())]
        for node in self.nodes:
            layer = node.layer
            row = (f'{layer.name} ({type(layer).__name__})', _batch_shape(shapes[layer.name][1:], 'None'),
                   f'{layer.count_params():,}')
            if sized:
                row += (f'{layer.multiply_adds(shapes[node.inputs[0]]):,}',)
            rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        line = lambda row: '  '.join(  # noqa: E731
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        rule = '-' * len(line(rows[0]))
        print_fn(f'Model: {self.name}')
        print_fn(rule)
        print_fn(line(rows[0]))
        print_fn(rule)
        for row in rows[1:]:
            print_fn(line(row))
        print_fn(rule)
        print_fn(f'Total params: {self.count_params():,}')
        print_fn(f'Trainable params: {self.count_params(trainable=True):,}')
        print_fn(f'Non-trainable params: {self.count_params(trainable=False):,}')
        if sized:
            at = '' if input_size is None else f" for input shape {shapes['input'][1:]}"
            print_fn(f'Total mult-adds per example{at}: {self.multiply_adds(input_size):,}')
        else:
            print_fn('Mult-adds depend on the input size: summary(input_size=...) gives them')


def _stacked(examples, who):
    """A list of same-shaped arrays or numbers as one array; ShapeError naming the first odd one."""
    if not examples:
        raise ValueError(f"{who} needs at least one input, got an empty {type(examples).__name__}")
    shapes = [tuple(np.shape(example)) for example in examples]
    odd = next((i for i, s in enumerate(shapes) if s != shapes[0]), None)
    if odd is not None:
        raise ShapeError(f"{who}: x is a list of arrays of different shapes: item 0 is {shapes[0]}, "
                         f"item {odd} is {shapes[odd]}; stack examples of one shape")
    return checks.numbers_array(examples, 'x', who)


def _batch_shape(shape, batch='N'):
    """'(N, 299, 299, 3)' or '(N, None, None, 3)': a shape with its batch axis, as messages print it."""
    return f"({', '.join(map(str, (batch,) + tuple(shape)))})"


def imagenet_weights(include_top):
    """The path of Keras's ImageNet Xception weights, fetched when missing: the door that
    ``Xception(weights='imagenet')`` takes to minixcept.files."""
    from .files.fetch import fetch
    return fetch(include_top=include_top)


class Sequential(Model):
    """Layers applied one after another, e.g. a classification head:

        head = Sequential([Dense(256, activation='relu'), Dropout(0.5), Dense(1)], input_shape=(2048,))
    """

    def __init__(self, layers, input_shape, name='sequential'):
        super().__init__(input_shape, name=name)
        for layer in layers:
            self.add(layer)
