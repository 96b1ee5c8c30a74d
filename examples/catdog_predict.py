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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))    # run from a fresh clone without installing
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import minixcept  # noqa: E402
from catdog_bottleneck import DEFAULT_OUT, build_base, build_head, class_probabilities, get_weights  # noqa: E402
from minixcept.backend import BackendError  # noqa: E402
from minixcept.errors import WeightsError  # noqa: E402
from minixcept.workflows.features import bottleneck_features  # noqa: E402
from minixcept.files.images import load_batch  # noqa: E402
from minixcept.files.weights import load_weights  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Classify photos with a trained cats-vs-dogs head.')
    parser.add_argument('photos', nargs='+', type=Path, help='photos to classify')
    parser.add_argument('--head', type=Path, default=DEFAULT_OUT / 'head.h5',
                        help='the head saved by catdog_bottleneck.py (its head.json must be beside it)')
    parser.add_argument('--weights', default=None,
                        help='Xception notop weights file (default: fetched into weights/ when missing); '
                             "must be the base the head was trained on")
    parser.add_argument('--batch-size', type=int, default=16, help='photos per forward pass')
    parser.add_argument('--backend', choices=('numpy', 'cupy'), default='numpy')
    return parser.parse_args(argv)


def load_head(head_file):
    """The trained head and its description (class names, input size) from head.h5 + head.json."""
    description_file = Path(head_file).with_suffix('.json')
    if not Path(head_file).is_file() or not description_file.is_file():
        raise WeightsError(f'{head_file}: no trained head here (it needs {description_file.name} beside it); '
                           'run examples/catdog_bottleneck.py first')
    description = json.loads(description_file.read_text())
    head = build_head(description['feature_dim'], len(description['class_names']))
    load_weights(head, head_file)
    return head, description


def classify(paths, head, base, class_names, batch_size):
    """[(path, class name or None, probability or error message)] for each photo, in order."""
    results = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        pixels, loaded, failures = load_batch(batch, base.input_shape[0])
        probabilities = class_probabilities(head, bottleneck_features(base, pixels))
        by_position = dict(zip(loaded, probabilities))
        reasons = dict(failures)
        for position, path in enumerate(batch):
            if position in by_position:
                best = int(np.argmax(by_position[position]))
                results.append((path, class_names[best], float(by_position[position][best])))
            else:
                results.append((path, None, reasons[str(path)]))
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        minixcept.use(args.backend)
        head, description = load_head(args.head)
        base = build_base(get_weights(args.weights), description['image_size'], seed=0)
    except (WeightsError, BackendError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    failed = 0
    for path, class_name, probability in classify(args.photos, head, base, description['class_names'],
                                                  args.batch_size):
        if class_name is None:
            failed += 1
            print(f'{path}: skipped, {probability}', file=sys.stderr)
        else:
            print(f'{path}\t{class_name}\t{probability:.4f}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
