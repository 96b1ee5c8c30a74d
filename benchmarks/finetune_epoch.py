#!/usr/bin/env python3
"""One fine-tuning epoch of the cat/dog example on the CPU, plain layers against the engines.

    python benchmarks/finetune_epoch.py                  # 16 real photos, 2 rounds
    python benchmarks/finetune_epoch.py --photos 32 --rounds 3 --head runs/catdog/head.h5

What ``examples/catdog_finetune.py`` does each epoch with its defaults: block 14 and the head
trained with SGD (1e-4, momentum 0.9), every photo augmented afresh and run through the
frozen part (blocks 1-13, no gradient), batch-norm on its moving statistics. Two networks
from the same weights train side by side, one epoch each per round, in alternating order:
``FineTuneModel(fast=False)`` (the plain layers throughout) and ``fast=True`` (the frozen part
on the inference engine, block 14 on the training engine). Prints photos per second for each
(median over the rounds) and their ratio. Needs the ImageNet notop weights
(``python weights/fetch.py``) and the photos (default: the shared cat/dog folder beside the
repository, its train split). The head is the one ``--head`` names, else a freshly
initialised one of the same shape: the timing does not depend on what it learnt.
"""
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import numpy as np  # noqa: E402

from minixcept.workflows.catdog import FINETUNE_AUGMENTATION as AUGMENTATION  # noqa: E402
from minixcept.workflows.catdog import (build_base, build_head, head_loss, load_head,  # noqa: E402
                                        load_photos, load_pixels, make_optimizer)
from minixcept.workflows.finetune import FineTuneModel, FrozenFeatureFeed  # noqa: E402
from minixcept.workflows.fit import fit  # noqa: E402
from photos import photo_arguments, require_weights  # noqa: E402


def main(argv=None):
    parser = photo_arguments(__doc__.split('\n\n')[0], photos=16, rounds=2, batch_size=8,
                             batch_help='photos per training step (the example uses 16)')
    parser.add_argument('--image-size', type=int, default=299)
    parser.add_argument('--head', type=Path, default=None, help='a head catdog_bottleneck.py saved (optional)')
    args = parser.parse_args(argv)
    weights = require_weights()
    head = load_head(args.head)[0] if args.head else build_head(2048, 2, seed=0)
    base = build_base(weights, args.image_size, seed=0)
    pixels, labels = load_pixels(load_photos(args.data, args.photos // 2)['train'], args.image_size)
    loss = head_loss(2)
    ways = {'plain layers': False, 'engines': True}
    networks = {name: FineTuneModel(copy.deepcopy(base), copy.deepcopy(head), 'block14', fast=fast)
                for name, fast in ways.items()}
    optimizers = {name: make_optimizer('sgd', 1e-4) for name in ways}

    def epoch(name, round_):
        network = networks[name]
        feed = FrozenFeatureFeed(network, pixels, rng=np.random.default_rng(round_), settings=AUGMENTATION)
        start = time.perf_counter()
        history = fit(network, feed, labels, loss, optimizers[name], epochs=1, batch_size=args.batch_size,
                      seed=round_, stop_at=network.first_trainable, log=None, verbose=0)
        return len(pixels) / (time.perf_counter() - start), history.epochs[0]['loss']

    rates = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            rate, epoch_loss = epoch(name, round_)
            rates[name].append(rate)
            print(f'round {round_ + 1}: {name:12s} {rate:6.2f} photos/s  (training loss {epoch_loss:.4f})', flush=True)
    plain, engines = (statistics.median(rates[name]) for name in ways)
    print(f'\n{len(pixels)} photos at {args.image_size} px, batch {args.batch_size}, block 14 + head, augmented, '
          f'median of {args.rounds} rounds:\n'
          f'  plain layers  {plain:6.2f} photos/s  ({len(pixels) / plain:6.1f} s an epoch)\n'
          f'  engines       {engines:6.2f} photos/s  ({len(pixels) / engines:6.1f} s an epoch)\n'
          f'  speed-up      {engines / plain:6.2f}x')


if __name__ == '__main__':
    sys.exit(main())
