#!/usr/bin/env python3
"""Peak memory of the example's feature extraction as the photo folder grows.

    python benchmarks/extraction_memory.py                          # 250 and 2,000 photos, 299 px
    python benchmarks/extraction_memory.py --image-size 150 --photos 250 2000 --batch-size 32

For each photo count, a fresh child process builds Xception without its top (pooling 'avg',
the ImageNet notop weights when ``weights/`` has them, else random ones), then runs
``extract_features`` on that many photos of the cat/dog train split (half of each class)
into a new feature cache, in batches of the same size - what ``examples/catdog_bottleneck.py``
does for a split. The child reports:

- **extraction peak**: its peak resident memory during the extraction minus its resident
  memory just before (freed heap handed back with ``malloc_trim``, the kernel's peak mark
  reset through ``/proc/self/clear_refs``): what the extraction itself needs - one batch of
  photos, the inference engine's buffers, the features;
- **traced peak**: the peak of the memory Python and NumPy allocated during the extraction,
  as ``tracemalloc`` counts it (every array; not Pillow's or BLAS's own buffers). Unlike
  resident memory it does not depend on how the C allocator reuses freed blocks between
  threads, which moves the resident peak by up to ~30 MiB from run to run;
- **process peak**: ``ru_maxrss``, the child's peak over its whole life (weights included);
- the features themselves (N x 2048 float32, 8 KiB a photo), the part that must grow.

Each count runs ``--repeats`` times, the counts alternating; the table gives the median and
the range of the resident figures.

Memory that stays flat as the folder grows means: photos decoded one batch at a time, the
features written into one array, nothing else kept per photo. Linux only (``/proc``).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import statistics
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forward import WEIGHTS, _status_kib, release_free_memory  # noqa: E402  (benchmarks/forward.py)

import minixcept  # noqa: E402
from minixcept.files.cache import cache_key  # noqa: E402
from minixcept.files.images import find_image_folders  # noqa: E402
from minixcept.workflows.features import extract_features  # noqa: E402

MIB = 1024 * 1024


def child(photos, image_size, batch_size, data):
    """In a fresh process: extract ``photos`` photos' features; print the measurements as JSON."""
    folder = find_image_folders(data)['train'].limit(photos // 2)
    minixcept.set_seed(0)
    model = minixcept.Xception(include_top=False, pooling='avg', input_shape=(image_size, image_size, 3))
    weights = 'imagenet notop' if WEIGHTS.exists() else 'random'
    if WEIGHTS.exists():
        model.load_weights(WEIGHTS)
    release_free_memory()
    Path('/proc/self/clear_refs').write_text('5')          # peak RSS := current RSS
    baseline_kib = _status_kib('VmRSS')
    tracemalloc.start()
    with tempfile.TemporaryDirectory(prefix='extraction-memory-') as cache:
        started = time.perf_counter()
        features = extract_features(model, folder, batch_size=batch_size, cache_file=Path(cache) / 'train.h5',
                                    key=cache_key(folder, image_size, weights), label=f'{len(folder)} photos')
        seconds = time.perf_counter() - started
    traced_peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({
        'photos': len(features.files), 'weights': weights, 'seconds': seconds,
        'baseline_mib': baseline_kib / 1024,
        'extraction_peak_mib': (_status_kib('VmHWM') - baseline_kib) / 1024,
        'traced_peak_mib': traced_peak / MIB,
        'process_peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,   # KiB on Linux
        'features_mib': features.features.nbytes / MIB}))


def measure(photos, args):
    command = [sys.executable, __file__, '--child', str(photos), '--image-size', str(args.image_size),
               '--batch-size', str(args.batch_size), '--data', str(args.data)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)     # progress goes to stderr
    if done.returncode != 0:
        sys.exit(f'the child for {photos} photos failed (status {done.returncode})')
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--photos', type=int, nargs='+', default=[250, 2000], help='photo counts, even')
    parser.add_argument('--image-size', type=int, default=299)
    parser.add_argument('--batch-size', type=int, default=32, help='the same for every count, as the example')
    parser.add_argument('--data', type=Path, default=REPO.parent / 'shared' / 'catdog',
                        help='folder with train/<class>/ photos')
    parser.add_argument('--repeats', type=int, default=3, help='runs per photo count')
    parser.add_argument('--child', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.image_size, args.batch_size, args.data)
    if not Path('/proc/self/clear_refs').exists():
        sys.exit('needs Linux: /proc/self/clear_refs resets the peak memory mark')

    runs = {photos: [] for photos in args.photos}
    for _ in range(args.repeats):
        for photos in args.photos:
            runs[photos].append(measure(photos, args))
    print(f'\nExtraction at {args.image_size} px, batch {args.batch_size}, weights {runs[photos][0]["weights"]}, '
          f'one child process per run, {args.repeats} runs per count (median, range):\n')
    print('| photos | extraction peak (RSS) | traced peak (tracemalloc) | process peak (ru_maxrss) '
          '| of which features | photos/s |')
    print('|---:|---:|---:|---:|---:|---:|')
    medians = {}
    for photos, rows in runs.items():
        cell = lambda name: _median_and_range([row[name] for row in rows])  # noqa: E731
        medians[photos] = {name: statistics.median(row[name] for row in rows)
                           for name in ('extraction_peak_mib', 'traced_peak_mib', 'features_mib')}
        rate = statistics.median(row['photos'] / row['seconds'] for row in rows)
        print(f'| {rows[0]["photos"]:,} | {cell("extraction_peak_mib")} | {cell("traced_peak_mib")} '
              f'| {cell("process_peak_mib")} | {rows[0]["features_mib"]:,.1f} MiB | {rate:.1f} |')
    first, last = medians[args.photos[0]], medians[args.photos[-1]]
    print(f'\nFrom {args.photos[0]:,} to {args.photos[-1]:,} photos (medians): resident peak '
          f'{last["extraction_peak_mib"] - first["extraction_peak_mib"]:+,.1f} MiB, traced peak '
          f'{last["traced_peak_mib"] - first["traced_peak_mib"]:+,.1f} MiB, '
          f'features alone {last["features_mib"] - first["features_mib"]:+,.1f} MiB.')


def _median_and_range(values):
    if len(values) == 1:
        return f'{values[0]:,.0f} MiB'
    return f'{statistics.median(values):,.0f} MiB ({min(values):,.0f}-{max(values):,.0f})'


if __name__ == '__main__':
    sys.exit(main())
