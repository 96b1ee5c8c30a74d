"""Exercise on Keras's weight file: read one layer's tensors in Keras order (tour chapter 6).

The learner writes

    read_layer_weights(h5_path, layer_name) -> [array, ...]

which opens a legacy Keras HDF5 file (the official ``..._notop.h5``), finds the group of the
layer called ``layer_name`` *in the file* (``conv2d_1``, not the model's ``conv2d``), and
returns its tensors in the order of the group's ``weight_names`` attribute, as NumPy arrays.
The model answer, below, is that reading for one layer; ``minixcept/files/hdf5.py``
(``_read_legacy``) does it for every layer, and ``minixcept/files/weights.py`` puts the
result into the model by order, checking every shape.

What "right" means is decided by Keras, not by this package: the check puts the learner's
arrays into the textbook's layers of Xception one layer at a time, runs the stored photo of
``tests/reference/network_forward.npz`` (299 x 299) through block 1 and block 2, and compares
every layer's output with what Keras computed (mean, standard deviation, max |a| and the
corner [0, :2, :2, :8]), to 1e-4 of that layer's largest value. The first layer that
differs is named, with the weight that differs from what the file stores in that place
and the classic mistake it matches: the tensors in alphabetical order (what walking the
group gives: beta before gamma), moving_mean and moving_variance swapped, depthwise and
pointwise kernels swapped, a kernel transposed to PyTorch's (out, in, kh, kw).
"""
from pathlib import Path

import h5py
import numpy as np

from . import grader
from .grader import Wrong

#: the file the tour loads: the official ImageNet weights without the top
NOTOP_FILE = Path(__file__).resolve().parents[2] / 'weights' / 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'
#: model layers graded (blocks 1 and 2) -> their names in the file (Keras 2 numbered from 1)
FILE_NAMES = {'conv2d': 'conv2d_1', 'batch_normalization': 'batch_normalization_1'}
#: where the graded stretch ends: block 2's add
LAST_NODE = 'add'
#: against Keras's statistics of the whole network's layers (DESIGN: <= 1e-4 at every named layer)
TOLERANCE = 1e-4
MODEL_ANSWER = 'minixcept.course.weights.read_layer_weights'


# -- the model answer ---------------------------------------------------------------------------

def read_layer_weights(h5_path, layer_name):
    """The tensors of the file's layer ``layer_name`` in Keras order: the group's
    ``weight_names`` attribute lists their paths inside the group (``'block1_conv1_bn/gamma:0'``,
    ...) in the order Keras saved them; h5py would list the members alphabetically."""
    with h5py.File(h5_path, 'r') as f:
        group = f[layer_name]
        names = [name.decode('utf8') if isinstance(name, bytes) else str(name)
                 for name in group.attrs['weight_names']]
        return [np.asarray(group[name][()]) for name in names]


# -- what the file stores, and what the mistakes give ---------------------------------------------

def _stored(h5_path, layer_name):
    """(weight names, arrays) of the file's layer in the stored order (for naming mistakes)."""
    with h5py.File(h5_path, 'r') as f:
        group = f[layer_name]
        names = [n.decode('utf8') if isinstance(n, bytes) else str(n) for n in group.attrs['weight_names']]
        return names, [np.asarray(group[name][()]) for name in names]


def _mistakes(names, arrays):
    """(description, why it is wrong, arrays) of each classic mistake on this layer."""
    short = [name.split('/')[-1].split(':')[0] for name in names]
    found = []
    alphabetical = [arrays[i] for i in sorted(range(len(names)), key=lambda i: names[i])]
    if [names[i] for i in sorted(range(len(names)), key=lambda i: names[i])] != names:
        found.append((f"taking the tensors in alphabetical order ({', '.join(sorted(short))})",
                      "walking the HDF5 group lists its members by name; Keras's order is the group's "
                      f"weight_names attribute ({', '.join(short)})", alphabetical))
    if short[2:4] == ['moving_mean', 'moving_variance']:
        found.append(("moving_mean and moving_variance swapped", "Keras's order is gamma, beta, moving_mean, "
                      "moving_variance", arrays[:2] + [arrays[3], arrays[2]] + arrays[4:]))
    if short[:2] == ['depthwise_kernel', 'pointwise_kernel']:
        found.append(("the depthwise and pointwise kernels swapped", "a separable convolution stores the "
                      "depthwise kernel (3, 3, C, 1) first, then the pointwise one (1, 1, C, C_out)",
                      [arrays[1], arrays[0]] + arrays[2:]))
    if arrays and arrays[0].ndim == 4 and short[0] == 'kernel':
        found.append(("a kernel transposed to PyTorch's (out, in, kh, kw) layout", "Keras keeps "
                      "(kh, kw, in, out), as the file stores it", [np.transpose(arrays[0], (3, 2, 0, 1))] + arrays[1:]))
    return found


def _same(got, want):
    return len(got) == len(want) and all(
        np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))


def _arrays(result, layer, file_name):
    """The learner's result as a list of NumPy arrays, or a Wrong saying what came back."""
    expected = len(layer.weight_names)
    if isinstance(result, np.ndarray) or not isinstance(result, (list, tuple)):
        raise Wrong(f"{file_name}: expected a list of {expected} array(s) "
                    f"({', '.join(layer.weight_names)}), got a {type(result).__name__}.")
    arrays = []
    for j, value in enumerate(result):
        try:
            arrays.append(np.asarray(value[()] if isinstance(value, h5py.Dataset) else value))
        except Exception as error:                 # a dataset of a file already closed, say
            raise Wrong(f"{file_name}: array {j} cannot be read ({type(error).__name__}: {error}); "
                        "copy each dataset into memory with dataset[()] before the file closes.") from None
        if arrays[-1].dtype.kind not in 'biuf':
            raise Wrong(f"{file_name}: array {j} holds {arrays[-1].dtype}, not numbers.")
    return arrays


def _check_layer(arrays, layer, file_name, h5_path):
    """Count and shapes against the textbook layer, naming the weight and the mistake."""
    names, stored = _stored(h5_path, file_name)
    mistakes = _mistakes(names, stored)
    expected = [tuple(layer.params[name].shape) for name in layer.weight_names]
    if len(arrays) != len(expected):
        raise Wrong(f"{file_name}: {len(arrays)} array(s) where layer {layer.name!r} has {len(expected)} "
                    f"({', '.join(layer.weight_names)}); the group's weight_names lists them: "
                    f"{', '.join(names)}.")
    for j, (array, shape) in enumerate(zip(arrays, expected)):
        if tuple(array.shape) != shape:
            message = (f"{file_name}: array {j} has shape {tuple(array.shape)} where layer {layer.name}'s "
                       f"{layer.weight_names[j]} has {shape}.")
            for description, why, wrong in mistakes:
                if _same(arrays, wrong):
                    message += f"\nYour arrays are exactly what {description} gives: {why}."
                    break
            raise Wrong(message)
    return names, stored, mistakes


def _diagnose(arrays, names, stored, mistakes):
    """A sentence on which weight differs from the file's, and the mistake it matches."""
    for description, why, wrong in mistakes:
        if _same(arrays, wrong):
            return f"Your arrays are exactly what {description} gives: {why}."
    for j, (array, want) in enumerate(zip(arrays, stored)):
        if not np.array_equal(array, want):
            same_as = [names[k] for k, other in enumerate(stored) if k != j and
                       other.shape == array.shape and np.array_equal(array, other)]
            also = f"; it is the file's {same_as[0]}" if same_as else ''
            return f"Weight {j} differs from the file's {names[j]}{also}."
    return "Your arrays equal the file's; is the layer name the one asked for?"


# -- the check ------------------------------------------------------------------------------------

_MODEL = []


def _model():
    """Xception without the top at 299 x 299, built once (only blocks 1-2 are graded)."""
    if not _MODEL:
        from ..xception import Xception
        _MODEL.append(Xception(include_top=False, input_shape=(299, 299, 3)))
    return _MODEL[0]


_KERAS = []


def _keras_statistics():
    """(image, photo name, {layer: Keras's mean, std, max_abs, corner}), read once."""
    if not _KERAS:
        with np.load(grader.REFERENCE_DIR / 'network_forward.npz') as stored:
            arrays = {key: stored[key] for key in ('names', 'mean', 'std', 'max_abs', 'corner', 'image', 'photo')}
        stats = {str(name): dict(mean=arrays['mean'][i], std=arrays['std'][i], max_abs=arrays['max_abs'][i],
                                 corner=arrays['corner'][i]) for i, name in enumerate(arrays['names'])}
        _KERAS.append((arrays['image'], str(arrays['photo']), stats))
    return _KERAS[0]


def _compare_output(name, y, keras):
    """Wrong unless y's statistics and corner are Keras's, to TOLERANCE of its max |a|."""
    scale = keras['max_abs']
    if not np.isfinite(y).all():
        index = [int(i) for i in np.argwhere(~np.isfinite(y))[0]]
        return (f"layer {name}'s output holds {y[tuple(index)]} at {index} where Keras's is finite "
                "(a batch-norm dividing by the square root of a negative 'variance'?).")
    got = dict(mean=y.mean(dtype=np.float64), std=y.std(dtype=np.float64), max_abs=float(np.abs(y).max()))
    for what in ('mean', 'std', 'max_abs'):
        if abs(got[what] - keras[what]) > TOLERANCE * scale:
            return (f"layer {name}'s output differs from Keras's: {what} {got[what]:.6g} where Keras "
                    f"gives {keras[what]:.6g} (max |a| {scale:.4g}, allowed {TOLERANCE:g} of it).")
    corner = y[0, :2, :2, :8].astype(np.float64)
    error = np.abs(corner - keras['corner']) / scale
    if error.max() > TOLERANCE:
        index = [0] + [int(i) for i in np.argwhere(error > TOLERANCE)[0]]
        return (f"layer {name}'s output differs from Keras's at {index}: {y[tuple(index)]:.6g} where Keras "
                f"gives {keras['corner'][tuple(index[1:])]:.6g}.")
    return None


def check_read_layer_weights(read_layer_weights, h5_path=None):
    """Grade ``read_layer_weights(h5_path, layer_name) -> [arrays in Keras order]`` on the ten
    layers with weights of Xception's blocks 1 and 2, against Keras's activations."""
    h5_path = Path(h5_path) if h5_path is not None else NOTOP_FILE
    if not h5_path.exists():
        raise FileNotFoundError(f"the ImageNet weights are not here: {h5_path} (weights/fetch.py fetches them)")
    model = _model()
    image, photo, keras = _keras_statistics()
    tensors = {'input': image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)}
    cases, state = [], {}

    def run_layer(node):
        layer = node.layer
        file_name = FILE_NAMES.get(layer.name, layer.name)
        arrays = _arrays(grader.call(read_layer_weights, str(h5_path), file_name), layer, file_name)
        names, stored, mistakes = _check_layer(arrays, layer, file_name, h5_path)
        layer.set_weights([a.astype(np.float32) for a in arrays])
        state['loaded'] = (arrays, names, stored, mistakes)

    def run_node(node):
        with np.errstate(invalid='ignore', divide='ignore'):
            y = node.layer.forward(*(tensors[name] for name in node.inputs), training=False)
        tensors[node.layer.name] = y
        message = _compare_output(node.layer.name, y, keras[node.layer.name])
        if message is None:
            return
        if node.layer.weight_names:
            arrays, names, stored, mistakes = state['loaded']
            message += f"\n{_diagnose(arrays, names, stored, mistakes)}"
        raise Wrong(message)

    nodes = model.nodes[:[n.layer.name for n in model.nodes].index(LAST_NODE) + 1]
    # one case per layer with weights: read it, load it, run up to the next layer with weights
    groups, current = [], None
    for node in nodes:
        if node.layer.weight_names or current is None:
            current = [node]
            groups.append(current)
        else:
            current.append(node)
    for group in groups:
        head = group[0].layer
        file_name = FILE_NAMES.get(head.name, head.name)
        description = (f"{file_name} (the model's {head.name!r})" if file_name != head.name else file_name)

        def run(group=group):
            if group[0].layer.weight_names:
                run_layer(group[0])
            for node in group:
                run_node(node)
        cases.append((f"{description}, against Keras's activations of {photo}", run))
    return grader.grade('read layer weights', cases, MODEL_ANSWER)


# The model answer, for the tests and the tour.
model_answers = {check_read_layer_weights: read_layer_weights}
