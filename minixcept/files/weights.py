"""A model's weights to and from a Keras file: loaded by order with every shape checked.

Weights are loaded **by order**, as Keras loads legacy files: the k-th layer
that has weights in the file goes to the k-th layer that has weights in the
model. Names cannot be used because they differ between Keras versions (the
official file says ``conv2d_1`` and ``input_1`` where Keras 3 and minixcept say
``conv2d`` and ``input_layer``). Every tensor's shape is checked before anything
is set, so a model never ends up half-loaded.

The file layouts themselves (legacy Keras 2 HDF5, Keras 3 ``.weights.h5`` and
``.keras``) are read and written by ``minixcept.files.hdf5``; Xception's
ImageNet file is found or built by ``minixcept.files.fetch``.
"""

import os

import numpy as np

from .. import backend
from ..errors import WeightsError
from .fetch import OFFICIAL_FILES
from .hdf5 import WEIGHT_NAMES, keras3_keys, read_entries, read_weights, write_legacy

__all__ = ["load_weights", "save_weights", "read_weights"]


def _shapes(arrays):
    return [tuple(a.shape) for a in arrays]


# --------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------

def load_weights(model, path):
    """Load a Keras weights file into ``model``, checking every tensor first.

    ``model`` is anything with a ``.layers`` list whose layers have ``.name``,
    ``.get_weights()`` and ``.set_weights(arrays)`` (a minixcept model, or a
    list of layers). The file's layers with weights are matched to the model's
    layers with weights by order, as Keras loads legacy files; bare Keras 3
    ``.weights.h5`` files are matched the way Keras 3 matches them, by the
    per-class keys (``conv2d_1``...) worked out from the model's layers.

    Everything is read and checked before anything is set, so on any error
    the model keeps the weights it had. A WeightsError names the file and the
    first layer that does not fit: a missing, unreadable or foreign file, a
    different number of layers (another architecture, or top weights missing),
    a different number of tensors, or a tensor of the wrong shape.

    The layer counts must agree exactly, as in Keras: a file with the
    1000-class top does not load into a model built with include_top=False
    (use the notop file), and a notop file does not load into a model with
    the top.
    """
    path = os.fspath(path)
    layers = [layer for layer in _layers_of(model) if len(layer.get_weights())]
    before = [[w.copy() for w in layer.get_weights()] for layer in layers]
    entries, kind = read_entries(path)
    if kind == "keras3-bare":
        entries = _arrange_by_model(entries, model, layers, path)
    new_weights = _check_fit(entries, layers, before, path, model)

    done = 0
    try:
        for layer, arrays in zip(layers, new_weights):
            layer.set_weights(arrays)
            done += 1
    except Exception as exc:
        # Checked above, so this is unexpected (out of memory, say): undo.
        failed = layers[done]
        for layer, old in zip(layers[:done], before[:done]):
            layer.set_weights(old)
        try:
            failed.set_weights(before[done])      # in case it got half-way
        except Exception:
            pass
        raise WeightsError(
            f"{path}: setting the weights of layer {failed.name!r} failed "
            f"({exc}); the model's previous weights were put back") from exc


def _layers_of(model_or_layers):
    layers = getattr(model_or_layers, "layers", model_or_layers)
    return list(layers)


def _arrange_by_model(entries, model, layers, path):
    """Order a bare Keras 3 file's layers as the model's.

    If the file records real layer names and they are exactly the model's,
    use them. Otherwise number the model's layers per class the way Keras 3
    does (conv2d, conv2d_1, ..., batch_normalization, ...) and look those keys
    up, which is how Keras 3 itself loads such a file.
    """
    by_name = {e.name: e for e in entries}
    if len(by_name) == len(entries) == len(layers) and all(
            layer.name in by_name for layer in layers):
        return [by_name[layer.name] for layer in layers]

    by_key = {e.key: e for e in entries}
    weighted = {id(layer) for layer in layers}
    every_layer = _layers_of(model)
    ordered, used = [], set()
    for layer, key in zip(every_layer, keras3_keys(type(layer).__name__ for layer in every_layer)):
        key = "layers/" + key
        if id(layer) not in weighted:
            continue
        if key not in by_key:
            expected = _shapes(layer.get_weights())
            raise WeightsError(
                f"{path}: nothing in the file for layer {layer.name!r}: "
                f"a Keras 3 file would keep it under '{key}', which is absent "
                f"or empty (expected shapes {expected}). The file was saved "
                "from another model.")
        ordered.append(by_key[key])
        used.add(key)
    for entry in entries:
        if entry.key not in used:
            raise WeightsError(
                f"{path}: file layer {entry.name!r} ('{entry.key}', shapes "
                f"{_shapes(entry.arrays)}) has no layer in the model. The file "
                "was saved from another model.")
    return ordered


def _check_fit(entries, layers, current, path, model):
    """Match file layers to model layers by order; return the arrays to set,
    cast to the model's dtypes, or raise at the first layer that does not fit."""
    total = len(layers)
    result = []
    for i in range(max(len(entries), total)):
        if i >= len(entries):
            layer = layers[i]
            message = (
                f"{path}: the file has weights for {len(entries)} layers but the "
                f"model needs {total}: nothing in the file for layer "
                f"{layer.name!r} (expected shapes {_shapes(current[i])}).")
            if getattr(model, "include_top", False) and i == total - 1:
                message += (
                    " The top (classifier) weights are missing: this looks like "
                    "a notop file, and the model was built with include_top=True. "
                    "Build it with include_top=False, or load the file with the "
                    "top (" + OFFICIAL_FILES[True][0] + ").")
            else:
                message += " The file was saved from another architecture."
            raise WeightsError(message)
        entry = entries[i]
        if i >= total:
            message = (
                f"{path}: the file has weights for {len(entries)} layers but the "
                f"model has only {total}: file layer {entry.name!r} (shapes "
                f"{_shapes(entry.arrays)}) has no layer in the model.")
            if i == len(entries) - 1 and not getattr(model, "include_top", True):
                message += (
                    " The file has a classifier top that this model "
                    "(include_top=False) lacks; as in Keras, it is not dropped "
                    "silently. Load the notop file (" + OFFICIAL_FILES[False][0] +
                    ") or build the model with include_top=True.")
            else:
                message += " The file was saved from another architecture."
            raise WeightsError(message)
        layer, have = layers[i], current[i]
        where = (f"{path}: layer {layer.name!r} (file layer {entry.name!r}, "
                 f"layer {i + 1} of {total} with weights)")
        if len(entry.arrays) != len(have):
            raise WeightsError(
                f"{where} does not fit: the model expects {len(have)} tensors "
                f"with shapes {_shapes(have)}, the file has {len(entry.arrays)} "
                f"with shapes {_shapes(entry.arrays)}.")
        arrays = []
        for j, (found, expected) in enumerate(zip(entry.arrays, have)):
            label = f"tensor {j}"
            if entry.weight_names:
                label += f" ({entry.weight_names[j]})"
            if tuple(found.shape) != tuple(expected.shape):
                raise WeightsError(
                    f"{where} does not fit: {label} expected shape "
                    f"{tuple(expected.shape)}, found {tuple(found.shape)}.")
            try:
                arrays.append(np.asarray(found, dtype=np.dtype(expected.dtype)))
            except (TypeError, ValueError) as exc:
                raise WeightsError(
                    f"{where} does not fit: {label} of type {found.dtype} cannot "
                    f"become {expected.dtype} ({exc}).") from exc
        result.append(arrays)
    return result


# --------------------------------------------------------------------------
# Saving: the legacy layout, every layer listed
# --------------------------------------------------------------------------

def save_weights(model_or_layers, path, attributes=None):
    """Write a model's weights in the legacy Keras layout, atomically.

    ``model_or_layers``: anything with a ``.layers`` list (or a list of
    layers) whose layers have ``.name`` and ``.get_weights()``. Every layer is
    listed in ``layer_names``, weightless ones too, like Keras does; tensors
    are named ``<layer>/<weight>:0`` (``kernel``, ``gamma``... from the layer's
    ``weight_names`` attribute if it has one, else from its class).

    The file is written next to ``path`` under a temporary name and then
    renamed over it, so ``path`` is never left half-written. Both
    ``load_weights`` and Keras's own legacy loader read the result.
    ``attributes``: ``{name: str}`` written beside ``layer_names`` (``write_legacy``).
    """
    path = os.fspath(path)
    records = []
    for layer in _layers_of(model_or_layers):
        arrays = [backend.asnumpy(w) for w in layer.get_weights()]   # host arrays for h5py, whatever the layer holds
        names = _weight_names_for(layer, len(arrays))
        records.append((layer.name, [f"{layer.name}/{n}:0" for n in names], arrays))
    write_legacy(path, records, attributes=attributes)


def _weight_names_for(layer, count):
    own = getattr(layer, "weight_names", None)
    if isinstance(own, (list, tuple)) and len(own) == count:
        return [str(n).split("/")[-1].removesuffix(":0") for n in own]
    known = WEIGHT_NAMES.get(type(layer).__name__)
    if known is not None and count <= len(known):
        return known[:count]
    return [f"weight_{i}" for i in range(count)]
