"""Classify photos with the head that ``catdog_bottleneck.py`` trained.

    python examples/catdog_predict.py PHOTO... [--head runs/catdog/head.h5] [--weights PATH]
        [--batch-size N] [--backend numpy|cupy]

Each photo goes the same way as in training: loaded and resized as Keras does, through
Xception without its top (ImageNet weights) to 2,048 bottleneck features, then through the
head. One line per photo: its path, the most probable class and that class's probability.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))    # run from a fresh clone without installing
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import minixcept  # noqa: E402
from catdog_bottleneck import (DEFAULT_OUT, RANDOM_WEIGHTS, build_base, build_head,  # noqa: E402
                               class_probabilities, get_weights)
from minixcept.backend import BackendError  # noqa: E402
from minixcept.errors import WeightsError  # noqa: E402
from minixcept.workflows import cli  # noqa: E402
from minixcept.files.cache import weights_checksum  # noqa: E402
from minixcept.workflows.features import bottleneck_features  # noqa: E402
from minixcept.files.images import load_batch  # noqa: E402
from minixcept.files.weights import load_weights  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Classify photos with a trained cats-vs-dogs head.')
    parser.add_argument('photos', nargs='+', type=Path, help='photos to classify')
    parser.add_argument('--head', type=Path, default=DEFAULT_OUT / 'head.h5',
                        help='the head saved by catdog_bottleneck.py (its head.json must be beside it)')
    parser.add_argument('--weights', type=cli.weights_file, default=None,
                        help='Xception notop weights file (default: fetched into weights/ when missing); '
                             "must be the base the head was trained on")
    parser.add_argument('--batch-size', type=cli.positive_int, default=16, help='photos per forward pass')
    parser.add_argument('--backend', choices=('numpy', 'cupy'), default=None,
                        help='where the arrays live (default: $MINIXCEPT_BACKEND, else numpy)')
    return parser.parse_args(argv)


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


def load_head(head_file):
    """The trained head and its description (class names, input size) from head.h5 + head.json."""
    description_file = Path(head_file).with_suffix('.json')
    if not Path(head_file).is_file() or not description_file.is_file():
        raise WeightsError(f'{head_file}: no trained head here (it needs {description_file.name} beside it); '
                           'run examples/catdog_bottleneck.py first')
    description = read_description(description_file)
    head = build_head(description['feature_dim'], len(description['class_names']))
    load_weights(head, head_file)
    return head, description


def weights_id_of(weights, seed=0):
    """How head.json names a base's weights: 'sha256:...' of the file, or the random start's seed."""
    if weights == RANDOM_WEIGHTS:
        return f'random-init-seed-{seed}'
    with tempfile.TemporaryDirectory() as scratch:       # predict writes nothing: the digest is not kept
        return 'sha256:' + weights_checksum(weights, scratch)


def check_base(description, weights, head_file):
    """Raise WeightsError unless ``weights`` are the base the head was trained on: a head on
    another base's features answers with confident-looking nonsense."""
    used, trained_on = weights_id_of(weights), description['base_weights']
    if used != trained_on:
        raise WeightsError(f'{head_file}: the head was trained on the base weights {trained_on}, but '
                           f'{weights} are {used}; pass the weights it was trained on with --weights')


def classify(paths, head, base, class_names, batch_size):
    """For each photo, in order: (path, class name or None, probability or error message),
    yielded batch by batch as each is done."""
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        pixels, loaded, failures = load_batch(batch, base.input_shape[0])
        probabilities = class_probabilities(head, bottleneck_features(base, pixels)) if loaded else []
        by_position = dict(zip(loaded, probabilities))
        reasons = dict(failures)
        for position, path in enumerate(batch):
            if position in by_position:
                best = int(np.argmax(by_position[position]))
                yield path, class_names[best], float(by_position[position][best])
            else:
                yield path, None, reasons[str(path)]


def main(argv=None):
    args = parse_args(argv)
    try:
        cli.use_backend(args.backend)
        head, description = load_head(args.head)
        cli.check_batch_memory(description['image_size'], args.batch_size, len(args.photos),
                               size_name=f"{Path(args.head).with_suffix('.json')}: image_size")
        weights = get_weights(args.weights)
        check_base(description, weights, args.head)
        base = build_base(weights, description['image_size'], seed=0)
    except (WeightsError, BackendError, cli.RunError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    failed = 0
    try:
        for path, class_name, probability in classify(args.photos, head, base, description['class_names'],
                                                      args.batch_size):
            if class_name is None:
                failed += 1
                print(f'{path}: skipped, {probability}', file=sys.stderr, flush=True)
            else:
                print(f'{path}\t{class_name}\t{probability:.4f}', flush=True)
    except KeyboardInterrupt:
        print('\ninterrupted: the photos above are classified', file=sys.stderr)
        return 130
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
