"""What the benchmarks on the cat/dog photos share: their command line and the weights they need."""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / 'weights' / 'xception_weights_tf_dim_ordering_tf_kernels_notop.h5'


def photo_arguments(description, photos, rounds, batch_size, batch_help):
    """A parser with --data (default: the shared cat/dog folder beside the repository), --photos,
    --rounds and --batch-size; the caller adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--data', type=Path, default=REPO.parent / 'shared' / 'catdog')
    parser.add_argument('--photos', type=int, default=photos, help='photos per run, half of each class')
    parser.add_argument('--rounds', type=int, default=rounds)
    parser.add_argument('--batch-size', type=int, default=batch_size, help=batch_help)
    return parser


def require_weights():
    """The ImageNet notop weights' path, or exit saying how to fetch them."""
    if not WEIGHTS.exists():
        sys.exit(f'no weights at {WEIGHTS.relative_to(REPO)}: run python weights/fetch.py first')
    return WEIGHTS
