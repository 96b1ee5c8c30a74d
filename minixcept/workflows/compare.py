"""Compare minixcept with Keras layer by layer, on your weights and your photos.

    python -m minixcept.compare WEIGHTS.h5|MODEL.keras PHOTO... [--size N | --size HxW]
                                [--layers NAME_OR_PATTERN ...] [--reference FILE]

For people who port weights, or change a layer, and want to know where minixcept and
Keras part ways. It needs TensorFlow (Keras runs the reference side) and says so if it
is missing.

1. build   Keras's Xception with the file's weights, and minixcept's with the same file:
           - a weights file (legacy Keras HDF5 such as Keras's notop file, or a Keras 3
             .weights.h5): keras.applications.Xception(weights=None) plus load_weights,
             with the top when the file has it;
           - a .keras model saved after transfer learning, an Xception base followed by a
             head of pooling, Dropout and Dense layers (keras.Sequential or functional, the
             base used as a layer or its layers the model's own; or Xception by itself):
             Keras loads it whole; minixcept builds the same base and head from the
             archive's config.json and loads the weights by order;
2. run     the photos (Pillow, bilinear, to the model's size; x / 127.5 - 1) through both,
           in batches, keeping every named layer's output;
3. report  one row per named layer: max |a - b| / max |b| over all photos (a: minixcept,
           b: Keras), the first layer over the tolerance (1e-4, the bar for the whole
           network with real weights) marked, and the head's layers after the base's.

Exit status: 0 if every compared layer is within the tolerance, 1 if one is not, 2 if the
comparison could not run (no TensorFlow, a file that is not Xception, a photo that cannot
be read). ``--reference FILE`` gives Keras another file of the same model (the original a
port was converted from, say), so the table shows where the port first differs.
"""
import argparse
import fnmatch
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import checks
from ..files.fetch import NOTOP_WEIGHTED_LAYERS
from ..files.hdf5 import read_weights
from ..files.images import ImageDecodeError, load_image
from ..files.weights import load_weights
from ..layers import Dense, Dropout, GlobalAveragePooling2D, GlobalMaxPooling2D
from ..layers.base import no_grad
from ..model import Sequential
from ..xception import DEFAULT_SIDE, Xception, preprocess_input

TOLERANCE = 1e-4            # whole network, real weights, every named layer (float32)
BATCH_SIZE = 4              # photos per pass: every layer's output is kept for a whole batch
NEEDS_TENSORFLOW = ("python -m minixcept.compare needs TensorFlow to run Keras's Xception, and it is not installed: "
                    "pip install tensorflow-cpu (or pip install 'minixcept[reference]')")


class CompareError(Exception):
    """The comparison cannot run; the message says why, naming the file, photo or layer."""


# -- 1. build ----------------------------------------------------------------------------------
@dataclass
class Pair:
    """One model on both sides: minixcept's base and head, Keras's base and head layers."""
    base: object                 # minixcept Xception
    head: object                 # minixcept Sequential, or None
    keras_base: object           # keras Model (Xception)
    keras_head: list             # keras layers applied after the base, in order
    input_shape: tuple           # one example, (H, W, 3) with None for a free size


def build_pair(path, reference=None, size=None):
    """Both models for a weights file or a .keras model (``reference``: Keras's file instead)."""
    for name, value in (('path', path), ('reference', reference)):
        if not (isinstance(value, (str, os.PathLike)) or (value is None and name == 'reference')):
            raise TypeError(f"build_pair: {name} must be the path of a weights or .keras file, got {value!r}")
    if not (size is None or isinstance(size, str) or (isinstance(size, int) and not isinstance(size, bool))):
        raise TypeError(f"build_pair: size must be None, a side (299) or 'HxW' ('180x240'), got {size!r}")
    if zipfile.is_zipfile(path):
        return _pair_from_keras_model(path, reference or path, size)
    return _pair_from_weights(path, reference or path, size)


def _pair_from_weights(path, reference, size):
    import keras
    entries = read_weights(path)            # [(layer name, [arrays])] of the layers with weights
    if len(entries) not in (NOTOP_WEIGHTED_LAYERS, NOTOP_WEIGHTED_LAYERS + 1):
        raise CompareError(f"{path}: {len(entries)} layers with weights; Xception has {NOTOP_WEIGHTED_LAYERS} "
                           f"without its top and {NOTOP_WEIGHTED_LAYERS + 1} with it")
    include_top = len(entries) == NOTOP_WEIGHTED_LAYERS + 1
    classes = entries[-1][1][0].shape[-1] if include_top else 1000     # the top's kernel: (2048, classes)
    # Keras, as minixcept: the top needs a fixed size; without it any size will do.
    input_shape = (_side_pair(size) or (DEFAULT_SIDE, DEFAULT_SIDE)) + (3,) if include_top else None
    base = Xception(include_top=include_top, weights=path, input_shape=input_shape, classes=classes)
    keras_base = keras.applications.Xception(include_top=include_top, weights=None, input_shape=input_shape,
                                             classes=classes)
    keras_base.load_weights(os.fspath(reference))
    return Pair(base, None, keras_base, [], base.input_shape)


def _pair_from_keras_model(path, reference, size):
    """A model saved by Keras: the Xception base and the head after it, from config.json."""
    import keras
    base_configs, head_configs, nested = _split_base_and_head(_keras_config(path), path)
    input_shape = _base_input_shape(base_configs)
    if None not in input_shape[:2] and size is not None and _side_pair(size) != input_shape[:2]:
        raise CompareError(f"{path}: the model takes {input_shape[0]} x {input_shape[1]} photos, "
                           f"not --size {size}")
    base = _xception_like(base_configs, input_shape)
    head = Sequential([_head_layer(config, path) for config in head_configs],
                      input_shape=base.output_shape()[1:], name='head') if head_configs else None
    load_weights(base.layers + (head.layers if head else []), path)

    keras_model = keras.saving.load_model(os.fspath(reference), compile=False)
    if not nested:                      # Xception's layers are the model's own: one probe sees them all
        return Pair(base, head, keras_model, [], input_shape)
    keras_bases = [layer for layer in keras_model.layers if isinstance(layer, keras.Model)]
    if len(keras_bases) != 1:
        raise CompareError(f"{reference}: Keras finds {len(keras_bases)} models inside, expected the one Xception base")
    keras_base = keras_bases[0]
    keras_head = _without_inputs(keras_model.layers[keras_model.layers.index(keras_base) + 1:])
    return Pair(base, head, keras_base, keras_head, input_shape)


def _split_base_and_head(model_config, path):
    """(base layer configs, head layer configs, nested) of a saved model, either
    - nested: keras.applications.Xception used as a layer (Keras's transfer-learning guide),
      the layers after it being the head; or
    - flat: Xception's own layers in the model (Xception itself saved, or a head built on
      ``base.output``), the base ending at 'predictions' or else 'block14_sepconv2_act'."""
    layers = model_config.get('config', {}).get('layers', [])
    names = [layer.get('config', {}).get('name') for layer in layers]
    nested = [i for i, layer in enumerate(layers) if _is_xception(layer)]
    if len(nested) == 1:
        return layers[nested[0]]['config']['layers'], _without_inputs(layers[nested[0] + 1:]), True
    if not nested and 'block1_conv1' in names:
        end = names.index('predictions' if 'predictions' in names else 'block14_sepconv2_act') + 1
        return layers[:end], _without_inputs(layers[end:]), False
    raise CompareError(f"{path}: expected one Xception base (keras.applications.Xception, used as a layer or as "
                       f"the model), found {len(nested)} models with Xception's layers inside")


def _without_inputs(layers):
    """Layers, or layer configs, other than input layers."""
    return [layer for layer in layers
            if (layer.get('class_name') if isinstance(layer, dict) else type(layer).__name__) != 'InputLayer']


def _keras_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read('config.json'))
    except (KeyError, ValueError, zipfile.BadZipFile) as error:
        raise CompareError(f"{path}: not a .keras model with a config.json ({error})") from error


def _is_xception(layer_config):
    inner = layer_config.get('config', {}).get('layers')
    return isinstance(inner, list) and any(layer.get('config', {}).get('name') == 'block1_conv1' for layer in inner)


def _base_input_shape(base_configs):
    """(H, W, 3) of the base's InputLayer (Keras 3 writes batch_shape, older ones batch_input_shape)."""
    for layer in base_configs:
        if layer['class_name'] == 'InputLayer':
            config = layer['config']
            return tuple(config.get('batch_shape') or config['batch_input_shape'])[1:]
    raise CompareError("the Xception base has no InputLayer in its config")


def _xception_like(layers, input_shape):
    """minixcept's Xception with the base's top, pooling and middle-flow depth (from its layer configs)."""
    by_name = {layer['config']['name']: layer for layer in layers}
    adds = sum(1 for layer in layers if layer['class_name'] == 'Add')
    last = layers[-1]['class_name']
    pooling = {'GlobalAveragePooling2D': 'avg', 'GlobalMaxPooling2D': 'max'}.get(last)
    include_top = 'predictions' in by_name
    classes = by_name['predictions']['config']['units'] if include_top else 1000
    return Xception(include_top=include_top, input_shape=input_shape, pooling=None if include_top else pooling,
                    classes=classes, middle_blocks=adds - 4)        # 4 adds outside the middle flow


def _head_layer(layer_config, path):
    """The minixcept layer for one head layer's Keras config."""
    kind, config = layer_config['class_name'], layer_config['config']
    name = config['name']
    if kind == 'Dense':
        activation = config.get('activation') or None
        if activation not in (None, 'linear', 'relu', 'sigmoid', 'softmax'):
            raise CompareError(f"{path}: head layer {name!r} (Dense) has activation {activation!r}, which minixcept "
                               "does not have")
        return Dense(config['units'], activation=activation, use_bias=config.get('use_bias', True), name=name)
    if kind == 'Dropout':
        return Dropout(config['rate'], name=name)
    if kind in ('GlobalAveragePooling2D', 'GlobalMaxPooling2D') and not config.get('keepdims', False):
        return (GlobalAveragePooling2D if kind == 'GlobalAveragePooling2D' else GlobalMaxPooling2D)(name=name)
    raise CompareError(f"{path}: head layer {name!r} ({kind}) is not one compare knows: the head may hold "
                       "GlobalAveragePooling2D, GlobalMaxPooling2D, Dropout and Dense layers")


def _side_pair(size):
    """'299' -> (299, 299); '180x240' -> (180, 240); None -> None."""
    if size is None:
        return None
    try:
        sides = tuple(int(side) for side in str(size).lower().split('x'))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2):
        raise CompareError(f"--size takes N or HxW (e.g. 299 or 180x240), got {size!r}")
    return sides * 2 if len(sides) == 1 else sides


# -- 2. run --------------------------------------------------------------------------------------
def load_photos(paths, height, width):
    """The photos as uint8 (N, height, width, 3); CompareError naming the first that fails."""
    _names_list(paths, 'paths', 'load_photos', kinds=(str, os.PathLike))
    checks.integer(height, 'height', 'load_photos', minimum=1)
    checks.integer(width, 'width', 'load_photos', minimum=1)
    try:
        return np.stack([load_image(path, (height, width)) for path in paths])
    except ImageDecodeError as error:
        raise CompareError(str(error)) from error


def minixcept_outputs(pair, x):
    """{layer name: output} of every named layer, base then head (the plain layers)."""
    with no_grad():
        y, outputs = pair.base.forward(x, capture='all')
        if pair.head is not None:
            _, head_outputs = pair.head.forward(y, capture='all')
            outputs.update(head_outputs)
    return outputs


def keras_runner(pair):
    """A function x -> [output of every layer of Keras's base (the input left out), then of its head]."""
    import keras
    probe = keras.Model(pair.keras_base.input, [layer.output for layer in _without_inputs(pair.keras_base.layers)])

    def run(x):
        outputs = [np.asarray(value) for value in probe(x, training=False)]
        y = outputs[-1]
        for layer in pair.keras_head:
            y = np.asarray(layer(y, training=False))
            outputs.append(y)
        return outputs
    return run


def layer_names(pair):
    """minixcept's layer names in order, after checking that both sides list the same kinds of layer."""
    ours = pair.base.layers + (pair.head.layers if pair.head is not None else [])
    theirs = _without_inputs(pair.keras_base.layers) + list(pair.keras_head)
    kinds = [(type(a).__name__, type(b).__name__) for a, b in zip(ours, theirs)]
    if len(ours) != len(theirs) or any(a != b for a, b in kinds):
        first = next((i for i, (a, b) in enumerate(kinds) if a != b), min(len(ours), len(theirs)))
        raise CompareError(f"the two models differ from layer {first + 1} on: minixcept has {len(ours)} layers, "
                           f"Keras {len(theirs)}; there {kinds[first] if first < len(kinds) else 'one side ends'}")
    return [layer.name for layer in ours]


@dataclass
class Row:
    name: str
    shape: tuple
    max_reference: float = 0.0       # max |b| over all photos
    max_difference: float = 0.0      # max |a - b| over all photos

    @property
    def error(self):
        if self.max_reference == 0:
            return 0.0 if self.max_difference == 0 else float('inf')
        return self.max_difference / self.max_reference


def compare(pair, photos, names, batch_size=BATCH_SIZE):
    """[Row] for ``names``: max |a - b| and max |b| accumulated batch by batch (a max of
    maxima), so any number of photos takes the memory of one batch.

    photos: uint8 (N, H, W, 3) pixels, as ``load_photos`` gives them; names: layer names."""
    if not isinstance(pair, Pair):
        raise TypeError(f"compare: pair must be a Pair (build_pair gives one), got {type(pair).__name__}")
    checks.array(photos, 'photos', 'compare', kinds='biuf', rank=4)
    _names_list(names, 'names', 'compare')
    checks.integer(batch_size, 'batch_size', 'compare', minimum=1)
    rows = {}
    order, run_keras = layer_names(pair), keras_runner(pair)
    for start in range(0, len(photos), batch_size):
        x = preprocess_input(photos[start:start + batch_size])
        ours = minixcept_outputs(pair, x)
        theirs = dict(zip(order, run_keras(x)))
        for name in names:
            a, b = np.asarray(ours[name], np.float64), theirs[name].astype(np.float64)
            if a.shape != b.shape:
                raise CompareError(f"layer {name!r}: minixcept's output has shape {a.shape}, Keras's {b.shape}")
            row = rows.setdefault(name, Row(name, (len(photos),) + a.shape[1:]))
            row.max_reference = max(row.max_reference, float(np.abs(b).max()))
            row.max_difference = max(row.max_difference, float(np.abs(a - b).max()))
    return [rows[name] for name in names]


def select_layers(all_names, patterns):
    """The names matching ``patterns`` (names or shell patterns such as 'block14_*'), in model order."""
    _names_list(all_names, 'all_names', 'select_layers')
    if patterns is not None:
        _names_list(patterns, 'patterns', 'select_layers')
    if not patterns:
        return list(all_names)
    import difflib
    for pattern in patterns:
        if not fnmatch.filter(all_names, pattern):
            close = difflib.get_close_matches(pattern, all_names, n=3)
            raise CompareError(f"--layers {pattern!r} matches no layer" +
                               (f"; the closest are {', '.join(map(repr, close))}" if close else ''))
    return [name for name in all_names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


# -- 3. report -----------------------------------------------------------------------------------
def report(rows, tolerance=TOLERANCE, print_fn=print):
    """Print the table; return True when every row is within the tolerance."""
    if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(row, Row) for row in rows):
        raise TypeError(f"report: rows must be a non-empty list of Row (compare gives one), got {rows!r:.60}")
    checks.number(tolerance, 'tolerance', 'report', 0)
    if not callable(print_fn):
        raise TypeError(f"report: print_fn must be a function, got {type(print_fn).__name__}")
    failing = [row for row in rows if not row.error <= tolerance]
    width = max([len('layer')] + [len(row.name) for row in rows])
    shape_width = max([len('output shape')] + [len(str(row.shape)) for row in rows])
    print_fn(f"{'layer':<{width}}  {'output shape':<{shape_width}}  {'max |b|':>9}  {'max|a-b|/max|b|':>15}")
    for row in rows:
        mark = f'  <-- first over {tolerance:.0e}' if failing and row is failing[0] else ''
        print_fn(f'{row.name:<{width}}  {str(row.shape):<{shape_width}}  {row.max_reference:9.3g}  '
                 f'{row.error:15.2e}{mark}')
    worst = max(rows, key=lambda row: row.error)
    print_fn(f'{len(rows)} layers compared (a: minixcept, b: Keras); worst {worst.error:.2e} at {worst.name}')
    if failing:
        print_fn(f'FAIL: {len(failing)} over {tolerance:.0e}, the first at {failing[0].name}')
    else:
        print_fn(f'OK: every layer within {tolerance:.0e}')
    return not failing


def _names_list(values, name, who, kinds=(str,)):
    """A list (or tuple) of strings - not one string, whose letters would be taken one by one."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(value, kinds) for value in values):
        raise TypeError(f"{who}: {name} must be a list of {'paths' if os.PathLike in kinds else 'names'}, "
                        f"got {values!r:.60}")


# -- command line --------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m minixcept.compare',
        description="Run photos through Keras's Xception and minixcept's with the same weights and print, "
                    "layer by layer, max |a - b| / max |b| (a: minixcept, b: Keras). Needs TensorFlow.")
    parser.add_argument('model', help='a Keras weights file for Xception (legacy HDF5 or .weights.h5), or a '
                                      '.keras model with an Xception base and a pooling/Dropout/Dense head')
    parser.add_argument('photos', nargs='+', help='photos to run through both (any size; resized)')
    parser.add_argument('--size', help=f'input size, N or HxW (default: the model\'s own, else {DEFAULT_SIDE})')
    parser.add_argument('--layers', nargs='+', metavar='NAME', help="compare only these layers (names or shell "
                                                                    "patterns, e.g. 'block14_*' dense)")
    parser.add_argument('--reference', metavar='FILE', help='give Keras this file instead (same model), e.g. '
                                                            'the original a port was made from')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                        help=f'largest max |a - b| / max |b| accepted (default {TOLERANCE:g})')
    return parser.parse_args(argv)


def import_tensorflow():
    """TensorFlow on the CPU in exact float32 (a GPU would compute in TF32), or None."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
    try:
        import keras  # noqa: F401
        import tensorflow
    except ImportError:
        return None
    tensorflow.config.experimental.enable_tensor_float_32_execution(False)
    return tensorflow


def main(argv=None, print_fn=print):
    """The command line; returns the exit status (0 all within tolerance, 1 not, 2 could not compare)."""
    args = parse_args(argv)
    if import_tensorflow() is None:
        print(NEEDS_TENSORFLOW, file=sys.stderr)
        return 2
    import keras
    try:
        pair = build_pair(args.model, args.reference, args.size)
        height, width = (_side_pair(args.size) or
                         tuple(side or DEFAULT_SIDE for side in pair.input_shape[:2]))
        photos = load_photos(args.photos, height, width)
        names = select_layers(layer_names(pair), args.layers)
        print_fn(f"{Path(args.model).name}" + (f" (Keras: {Path(args.reference).name})" if args.reference else '') +
                 f": {len(photos)} photo{'s' if len(photos) > 1 else ''} at {height} x {width}, minixcept against "
                 f"Keras {keras.__version__}")
        rows = compare(pair, photos, names)
    except (CompareError, ValueError, OSError) as error:      # WeightsError and ShapeError among them
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0 if report(rows, args.tolerance, print_fn) else 1
