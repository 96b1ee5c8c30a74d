"""Keras weight files as lists of tensors: reading three layouts, writing the legacy one.

Xception's ImageNet weights come as Keras HDF5 files. This module reads three
layouts of them with nothing but h5py, zipfile and json (no TensorFlow), and
knows nothing of models: a file becomes ``[(layer_name, [array, ...]), ...]``
and back. Putting those tensors into a model is ``minixcept.files.weights``;
getting the ImageNet file is ``minixcept.files.fetch``.

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

Command line (layers, shapes and checksums of a file)::

    python -m minixcept.files.hdf5 FILE...
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np

from ..errors import WeightsError
from .atomic import write_atomically

__all__ = ["read_weights", "read_entries", "write_legacy", "keras3_models", "keras3_keys",
           "tensor_digest", "file_digest", "WEIGHT_NAMES"]

#: The object header of an HDF5 attribute holds at most this many bytes;
#: Keras splits longer name lists over several attributes.
_HDF5_ATTR_LIMIT = 64512

#: Names of each layer kind's tensors, in Keras order (a missing bias simply
#: shortens the list). Used when writing the legacy layout.
WEIGHT_NAMES = {
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

class Entry:
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


def keras3_keys(class_names):
    """The keys Keras 3 files a list of layers under, from their class names, in order:
    ``['Conv2D', 'BatchNormalization', 'Conv2D'] -> ['conv2d', 'batch_normalization',
    'conv2d_1']`` (numbered per class, the first without a number)."""
    counters, keys = {}, []
    for class_name in class_names:
        base = _snake_case(class_name)
        counters[base] = counters.get(base, -1) + 1
        keys.append(f"{base}_{counters[base]}" if counters[base] else base)
    return keys


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



def file_digest(path, algorithm):
    """Hex digest (``algorithm``: 'md5', 'sha256', ...) of a file's bytes, read in 1 MiB blocks."""
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
    entries, _ = read_entries(path)
    return [(e.name, e.arrays) for e in entries]


def read_entries(path):
    """Read every layer with weights: ``(entries, kind)``, entries a list of Entry
    in the file's order, kind 'legacy', 'keras3' (order known) or 'keras3-bare'
    (order unknown, see read_weights). Raises WeightsError as read_weights does."""
    path = os.fspath(path)
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
    with _open_keras_archive(path) as (f, config):
        return _read_h5(f, path, config)


@contextlib.contextmanager
def _open_keras_archive(path):
    """(open model.weights.h5, config or None) of a .keras archive."""
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
                yield f, config
        else:
            # Compressed: seeking would mean decompressing again, so read it whole.
            with h5py.File(io.BytesIO(archive.read(info)), "r") as f:
                yield f, config


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
            entries.append(Entry(name, arrays, weight_names))
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
    visit(layer_config, key, inner_layer_configs_or_None) for every layer.

    Each layer's key is its class name in snake case, numbered per class in
    the order of the list, as Keras 3 numbers them when saving.
    """
    keys = keras3_keys([lc.get("class_name", "") for lc in layer_configs])
    for lc, key in zip(layer_configs, keys):
        key = prefix + "layers/" + key
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
            entries.append(Entry(name, arrays, key=key))

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
                entries.append(Entry(stored_name or key[len("layers/"):],
                                      arrays, key=key))
            walk(key + "/")

    walk("")
    return entries


def keras3_models(path):
    """Every model used as a layer inside a ``.keras`` archive (the base of a
    transfer-learning model, say), outermost first, each as the list of all its
    layers in order, weightless ones too: ``[[(layer_config, name, [array, ...]),
    ...], ...]``. Raises WeightsError if the archive holds no Keras 3 weights."""
    path = os.fspath(path)
    models = []
    with _open_keras_archive(path) as (f, config):

        def visit(lc, key, inner):
            if inner is None:
                return
            layers = []
            for child, child_key in zip(inner, keras3_keys(c.get("class_name", "") for c in inner)):
                child_key = key + "/layers/" + child_key
                name = _layer_name(child, child_key)
                layers.append((child, name, _read_vars(f, child_key, path, name)[0]))
            models.append(layers)

        _walk_config(_config_layers(config or {}) or [], "", visit)
    return models


# --------------------------------------------------------------------------
# Writing the legacy layout
# --------------------------------------------------------------------------

def read_attribute(path, name):
    """The text attribute ``name`` of an HDF5 file's root (written by ``write_legacy``'s
    ``attributes``), or None when it has none. Raises WeightsError naming the file when
    it cannot be opened."""
    try:
        with h5py.File(path, "r") as f:
            return _text(f.attrs[name]) if name in f.attrs else None
    except OSError as error:
        raise WeightsError(f"{path}: not a readable HDF5 file ({str(error).splitlines()[0]})") from None


def write_legacy(path, records, keras_version="minixcept", attributes=None):
    """Write the legacy layout, atomically (see minixcept.files.atomic).

    records: ``[(layer_name, [weight_name, ...], [array, ...]), ...]`` in model
    order, weightless layers too (empty lists), as Keras lists them in
    ``layer_names``. attributes: ``{name: str}`` more attributes of the file's root,
    which Keras ignores (what ties a saved head to its description). Raises
    WeightsError, writing nothing, if names repeat.
    """
    names = [name for name, _, _ in records]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise WeightsError(
            f"{path}: cannot save, layer names repeat ({', '.join(duplicates)}); "
            "each layer needs its own HDF5 group")

    # Made in memory, then written as plain bytes: a full disk is then one OSError from
    # write_atomically (a WriteError naming the file), never HDF5 failing half-way into a file.
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _write_string_list_attr(f, "layer_names", names)
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = keras_version.encode("utf8")
        for name, value in (attributes or {}).items():
            f.attrs[name] = value
        # Groups in sorted order, as Keras writes them (no name is then
        # created after a group it is a prefix of).
        for name, weight_names, arrays in sorted(records, key=lambda r: r[0]):
            group = f.create_group(name)
            _write_string_list_attr(group, "weight_names", weight_names)
            for weight_name, array in zip(weight_names, arrays):
                group.create_dataset(weight_name, data=array)
    image = buffer.getbuffer()
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(image))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def show(path, print_fn=print):
    """Print a weights file's checksums, tensor digest and layers with their shapes."""
    entries = read_weights(path)
    print_fn(f"{path}")
    print_fn(f"  md5     {file_digest(path, 'md5')}")
    print_fn(f"  sha256  {file_digest(path, 'sha256')}")
    print_fn(f"  tensors {tensor_digest(a for _, a in entries)}  (tensor_digest)")
    numbers = sum(int(np.prod(a.shape)) for _, arrays in entries for a in arrays)
    print_fn(f"  {len(entries)} layers with weights, {numbers:,} numbers")
    for name, arrays in entries:
        print_fn(f"  {name:28s} {', '.join(str(tuple(a.shape)) for a in arrays)}")


def main(argv=None):
    """``FILE...``: show each file; status 1 if any could not be read."""
    parser = argparse.ArgumentParser(
        prog="python -m minixcept.files.hdf5",
        description="List the layers, shapes and checksums of Keras weight files "
                    "(legacy .h5, Keras 3 .weights.h5 or .keras).")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    unreadable = 0
    for path in args.files:
        try:
            show(path)
        except WeightsError as exc:          # say so, and go on to the next file
            print(f"error: {exc}", file=sys.stderr)
            unreadable += 1
    return 1 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
