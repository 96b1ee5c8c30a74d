"""Classify photos with the head that ``catdog_bottleneck.py`` trained.

    python examples/catdog_predict.py PHOTO... [--head runs/catdog/head.h5] [--weights PATH]
        [--batch-size N] [--backend numpy|cupy]

Each photo goes the same way as in training: loaded and resized as Keras does, through
Xception without its top (ImageNet weights) to 2,048 bottleneck features, then through the
head. One line per photo: its path, the most probable class and that class's probability.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from minixcept.backend import BackendError
from minixcept.errors import WeightsError
from minixcept.workflows import cli
from minixcept.workflows.catdog import (DEFAULT_OUT, build_base, check_base, class_probabilities,
                                        get_weights, load_head)
from minixcept.workflows.features import bottleneck_features
from minixcept.files.images import load_batch


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
