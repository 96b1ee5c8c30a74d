#!/usr/bin/env python3
"""The cat/dog example's feature extraction on the CPU, before and after, in one run.

    python benchmarks/extraction.py                  # 64 real photos, 3 rounds
    python benchmarks/extraction.py --photos 128 --rounds 5 --data PATH

Runs ``minixcept.workflows.features.extract_features`` (what ``examples/catdog_bottleneck.py`` does
for each split: read each photo, resize it to 299 px, run it through Xception without its
top, average-pool) on the same photos, no cache, twice per round: once through the plain
layers (``fast=False``) and once through the inference engine behind ``Model.predict``
(the default), in alternating order. Prints photos per second for each (median over the
rounds) and their ratio. Needs the ImageNet notop weights (``python weights/fetch.py``) and
the photos (default: the shared cat/dog folder beside the repository, its train split).
"""
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minixcept  # noqa: E402
from minixcept.workflows.features import extract_features  # noqa: E402
from minixcept.files.images import find_image_folders  # noqa: E402
from photos import photo_arguments, require_weights  # noqa: E402


def main(argv=None):
    args = photo_arguments(__doc__.split('\n\n')[0], photos=64, rounds=3, batch_size=32,
                           batch_help='as the example uses').parse_args(argv)
    weights = require_weights()
    folder = find_image_folders(args.data)['train'].limit(args.photos // 2)
    model = minixcept.Xception(include_top=False, input_shape=(299, 299, 3), pooling='avg')
    model.load_weights(weights)
    ways = {'plain layers': False, 'inference engine': True}

    def extract(fast):
        start = time.perf_counter()
        features = extract_features(model, folder, batch_size=args.batch_size, show_progress=False, fast=fast)
        return len(features.files) / (time.perf_counter() - start), features.features

    extract(True)                                                      # warm-up
    rates = {name: [] for name in ways}
    outputs = {}
    for round_ in range(args.rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            rate, outputs[name] = extract(ways[name])
            rates[name].append(rate)
            print(f'round {round_ + 1}: {name:16s} {rate:6.2f} photos/s', flush=True)
    plain, engine = (statistics.median(rates[name]) for name in ways)
    difference = abs(outputs['plain layers'] - outputs['inference engine']).max()
    print(f'\n{len(folder)} photos at 299 px, batch {args.batch_size}, median of {args.rounds} rounds:\n'
          f'  plain layers      {plain:6.2f} photos/s\n'
          f'  inference engine  {engine:6.2f} photos/s\n'
          f'  speed-up          {engine / plain:6.2f}x\n'
          f'  features: max |plain - engine| / max |plain| = '
          f'{difference / abs(outputs["plain layers"]).max():.1e}')


if __name__ == '__main__':
    sys.exit(main())
