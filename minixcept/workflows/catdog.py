"""The pieces of the cats-vs-dogs recipe that its examples share.

``examples/catdog_bottleneck.py`` trains a head on Xception's bottleneck features;
``catdog_predict.py``, ``catdog_explain.py`` and ``catdog_finetune.py`` load that head again
and run the same base. What all of them must build the same way lives here, once: where the
photos and the runs are by default, the base and the head, the loss, the head's description
file (head.json) and the check that a head meets the base it was trained on. Each example
keeps its own steps, readable top to bottom; it imports these as it imports ``fit``.
"""
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from .. import backend, layers, losses, optimizers
from ..layers import set_seed
from ..errors import WeightsError
from ..files.augment import AugmentSettings
from ..files.atomic import WriteError, write_atomically, write_error
from ..files.cache import weights_checksum
from ..files.hdf5 import read_attribute
from ..files.images import DatasetLayoutError, expected_layout, find_image_folders, load_batch
from ..files import weights as weight_files
from ..files.weights import load_weights
from ..model import Sequential
from ..xception import Xception
from . import cli

REPO = Path(__file__).resolve().parents[2]           # minixcept/workflows/ -> the checkout
DEFAULT_DATA = REPO.parent / 'shared' / 'catdog'    # the shared photos beside the repository
DEFAULT_OUT = REPO / 'runs' / 'catdog'               # the bottleneck example's head and report
RANDOM_WEIGHTS = cli.RANDOM_WEIGHTS   # --weights random: untrained base, to test the plumbing quickly
HIDDEN_UNITS, DROPOUT_RATE = 256, 0.5

#: the fine-tuning example's augmentation: rotation 20 degrees, shifts 0.2, shear 0.2, zoom 0.2, flips
FINETUNE_AUGMENTATION = AugmentSettings()


# -- photos --------------------------------------------------------------------------------------

def load_photos(data_dir, limit=None):
    """{split: ImageFolder} for train, validation and (if present) test, with at most ``limit``
    photos per class."""
    if data_dir is None:
        raise DatasetLayoutError('no --data folder given, and the default one (shared/catdog beside '
                                 'the repository) is not there\n\n' + expected_layout())
    splits = find_image_folders(data_dir)
    if limit is not None:
        splits = {name: folder.limit(limit) for name, folder in splits.items()}
    for name, folder in splits.items():
        counts = ', '.join(f'{np.count_nonzero(folder.labels == label):,} {class_name}'
                           for label, class_name in enumerate(folder.class_names))
        ignored = f'; {len(folder.ignored):,} other files ignored' if folder.ignored else ''
        print(f'{name}: {len(folder):,} photos ({counts}){ignored}')
        for path, reason in folder.skipped:
            print(f'warning: skipping {path}: {reason}', file=sys.stderr)
    return splits


def require_every_class(split_name, folder, labels, failures):
    """Raise RunError when a class of the split has no decoded photo: a head trained without
    one of its classes would report a fine accuracy on the other alone. ``failures`` are the
    (path, reason) pairs of the photos left out; the first reason of that class is quoted."""
    for label, class_name in enumerate(folder.class_names):
        if not np.any(labels == label):
            reasons = sorted({reason for path, reason in failures
                              if Path(path).relative_to(folder.root).parts[0] == class_name})
            raise cli.RunError(f'{split_name}/{class_name}: none of its photos could be decoded'
                               + (f' ({reasons[0]})' if reasons else ''))


def load_pixels(folder, image_size):
    """All photos of a split as uint8 (N, s, s, 3) and their labels (N,); undecodable ones left
    out. Raises RunError when a class is left with no photo at all."""
    started = time.monotonic()
    pixels, loaded, failures = load_batch(folder.files, image_size)
    for path, reason in failures:
        print(f'skipped {path}: {reason}', file=sys.stderr)
    labels = folder.labels[loaded]
    require_every_class(folder.root.name, folder, labels, failures)
    print(f'{folder.root.name}: {len(pixels):,} photos loaded at {image_size} px '
          f'in {time.monotonic() - started:.1f} s', flush=True)
    return pixels, labels


# -- the base and the head -----------------------------------------------------------------------

def get_weights(weights_arg):
    """The notop ImageNet weights file: --weights PATH, or fetched (once) into weights/."""
    if weights_arg == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    if weights_arg is not None:
        if not Path(weights_arg).is_file():
            raise WeightsError(f'{weights_arg}: no such weights file')
        return Path(weights_arg)
    from ..files.fetch import fetch
    return Path(fetch(include_top=False))


def build_base(weights, image_size, seed):
    """Xception(include_top=False, pooling='avg'): photos (N, s, s, 3) -> features (N, 2048)."""
    set_seed(seed)
    base = Xception(include_top=False, pooling='avg', input_shape=(image_size, image_size, 3))
    if weights != RANDOM_WEIGHTS:
        base.load_weights(weights)
    return base


def build_head(feature_dim, class_count, seed=0):
    """Dense(256, relu) -> Dropout(0.5) -> Dense(1 logit, or one per class when more than two)."""
    set_seed(seed)
    outputs = 1 if class_count == 2 else class_count
    return Sequential([
        layers.Dense(HIDDEN_UNITS, activation='relu', name='dense'),
        layers.Dropout(DROPOUT_RATE, seed=seed, name='dropout'),
        layers.Dense(outputs, name='logits'),
    ], input_shape=(feature_dim,), name='head')


def head_loss(class_count):
    """Binary cross-entropy on one logit for two classes, softmax cross-entropy for more."""
    if class_count == 2:
        return losses.BinaryCrossentropy(from_logits=True)
    return losses.SparseCategoricalCrossentropy(from_logits=True)


def make_optimizer(name, learning_rate):
    """'sgd' (momentum 0.9, as the fine-tuning write-up) or 'adam' (Keras's other defaults)."""
    if name == 'sgd':
        return optimizers.SGD(learning_rate=learning_rate, momentum=0.9)
    return optimizers.Adam(learning_rate=learning_rate)


def class_probabilities(head, features):
    """(N, D) features -> (N, K) probabilities of each class (K = 2 for the binary head)."""
    logits = backend.asnumpy(head.predict(features, batch_size=256)).astype(np.float64)
    if logits.shape[1] == 1:
        positive = 1 / (1 + np.exp(-logits[:, 0]))
        return np.stack([1 - positive, positive], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# -- the saved head: head.h5 + head.json ---------------------------------------------------------

def read_description(description_file):
    """head.json as a dict, checked: class names (two or more), the input size, the feature
    size and the base's weights. Raises WeightsError naming the file and what is wrong."""
    try:
        description = json.loads(Path(description_file).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise WeightsError(f'{description_file}: cannot be read ({error})') from error
    except json.JSONDecodeError as error:
        raise WeightsError(f'{description_file}: not valid JSON ({error}); it is written by '
                           'examples/catdog_bottleneck.py: run it again') from error
    checks = {
        'class_names': lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) for n in v),
        'image_size': lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= cli.MIN_IMAGE_SIZE,
        'feature_dim': lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        'base_weights': lambda v: isinstance(v, str),
    }
    if not isinstance(description, dict):
        raise WeightsError(f'{description_file}: holds {type(description).__name__}, not the head\'s description')
    for name, valid in checks.items():
        if not valid(description.get(name)):
            raise WeightsError(f'{description_file}: {name} is missing or invalid '
                               f'({description.get(name)!r}); it is written by examples/catdog_bottleneck.py')
    return description


#: What head.h5 and head.json must agree on: the run that wrote them and what the head was
#: trained for. head.h5 keeps its own copy in the root attribute TIE_ATTRIBUTE.
TIED = ('run', 'class_names', 'image_size', 'feature_dim', 'base_weights')
TIE_ATTRIBUTE = 'minixcept_head'


def save_head_files(head, description, head_file):
    """head.h5 and its description head.json, as one unit: both carry the same run id and the
    same TIED fields (head.h5 in an attribute Keras ignores), so a head.json beside a head of
    another run, or edited by hand, is refused by ``load_head``. Returns the description written.

    Both are written in full under temporary names before either is put in place, so a full
    disk replaces neither: the old pair stays a pair (one rename after the other remains)."""
    head_file = Path(head_file)
    description_file = head_file.with_suffix('.json')
    description = dict(description, run=uuid.uuid4().hex)
    tie = json.dumps({name: description[name] for name in TIED})
    pending = head_file.with_name(f".{description_file.name}.{description['run']}.tmp")
    try:
        try:
            cli.write_json(pending, description)
        except WriteError as error:
            raise write_error(description_file, error) from None
        write_atomically(head_file, lambda tmp: weight_files.save_weights(head, tmp, attributes={TIE_ATTRIBUTE: tie}))
        try:
            pending.replace(description_file)
        except OSError as error:
            raise write_error(description_file, error) from None
    finally:
        if pending.exists():
            pending.unlink()
    return description


def check_tie(head_file, description_file, description):
    """Raise WeightsError naming both files unless head.h5's own copy of the TIED fields equals
    head.json's: they come from one run, for the same classes, image size and base."""
    stored = read_attribute(head_file, TIE_ATTRIBUTE)
    both = f'{head_file} and {description_file}'
    if stored is None:
        raise WeightsError(f'{both} are not known to belong together: {Path(head_file).name} records no run '
                           '(saved by an older version?); train the head again with examples/catdog_bottleneck.py')
    try:
        tie = json.loads(stored)
    except json.JSONDecodeError:
        tie = None
    if not isinstance(tie, dict):
        raise WeightsError(f'{head_file}: its record of the run that wrote it is damaged; train the head again')
    for name in TIED:
        if tie.get(name) != description.get(name):
            raise WeightsError(f'{both} do not belong together: {name} is {tie.get(name)!r} in the first and '
                               f'{description.get(name)!r} in the second; keep the two files of one run side by side')


def load_head(head_file):
    """The trained head and its description (class names, input size) from head.h5 + head.json,
    after checking that the two belong together (``check_tie``)."""
    description_file = Path(head_file).with_suffix('.json')
    if not Path(head_file).is_file() or not description_file.is_file():
        raise WeightsError(f'{head_file}: no trained head here (it needs {description_file.name} beside it); '
                           'run examples/catdog_bottleneck.py first')
    description = read_description(description_file)
    check_tie(head_file, description_file, description)
    head = build_head(description['feature_dim'], len(description['class_names']))
    load_weights(head, head_file)
    return head, description


def check_classes(description, head_file, folder, data_dir):
    """Raise RunError naming both lists unless the photos' classes are the head's, in order:
    a head trained on other classes would train cats as its first class, whatever it is."""
    if list(folder.class_names) != list(description['class_names']):
        raise cli.RunError(f"{head_file} was trained on the classes {description['class_names']}, but the photos in "
                           f"{data_dir} are of {list(folder.class_names)}; train a head on these classes first")


def weights_id_of(weights, seed=0, digest_dir=None):
    """How head.json names a base's weights: 'sha256:...' of the file, or the random start's
    seed. The digest is kept in ``digest_dir`` when given (the feature cache), else not kept."""
    if weights == RANDOM_WEIGHTS:
        return f'random-init-seed-{seed}'
    if digest_dir is not None:
        return 'sha256:' + weights_checksum(weights, digest_dir)
    with tempfile.TemporaryDirectory() as scratch:
        return 'sha256:' + weights_checksum(weights, scratch)


def check_base(description, weights, head_file):
    """Raise WeightsError unless ``weights`` are the base the head was trained on: a head on
    another base's features answers with confident-looking nonsense."""
    used, trained_on = weights_id_of(weights), description['base_weights']
    if used != trained_on:
        raise WeightsError(f'{head_file}: the head was trained on the base weights {trained_on}, but '
                           f'{weights} are {used}; pass the weights it was trained on with --weights')
