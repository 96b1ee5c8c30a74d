"""The bottleneck head's training speed: seconds per epoch through ``fit`` on the engine (the
default) and on the plain layers, beside the bare matrix products of its first layer.

The head is the cat/dog recipe's: Dense(256, relu) -> Dropout(0.5) -> Dense(1) on 2,048
features, batch 32, Adam, on random features of the training split's size (2,000 photos):
its speed does not depend on what the features say. One process, the paths interleaved
round by round; the report names the CPU, the BLAS kernel, its threads and the load.

    .venv/bin/python benchmarks/head_training.py [--photos 2000] [--epochs 3] [--rounds 3]
"""
import argparse
import io
import os
import platform
import statistics
import subprocess
import time

import numpy as np

from minixcept import optimizers
from minixcept.workflows.catdog import build_head, head_loss
from minixcept.workflows.fit import fit


def machine():
    """CPU model, BLAS libraries (kernel and threads, from threadpoolctl) and load average."""
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(':', 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith('Model name')), platform.processor())
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or 'unknown'
    from threadpoolctl import threadpool_info
    blas = [f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')} kernel, "
            f"{lib.get('num_threads')} threads)" for lib in threadpool_info() if lib.get('user_api') == 'blas']
    return {'cpu': model, 'cores': os.cpu_count(), 'blas': '; '.join(blas) or 'none found',
            'load average': ' '.join(f'{v:.2f}' for v in os.getloadavg())}


def epoch_seconds(features, labels, epochs, fast):
    """Seconds per epoch of fit (the validation pass left out), best of the epochs."""
    head = build_head(features.shape[1], 2, seed=0)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        fit(head, features, labels, head_loss(2), optimizers.Adam(learning_rate=1e-4), epochs=1, batch_size=32,
            seed=0, log=None, verbose=0, fast=fast, progress_stream=io.StringIO())
        times.append(time.perf_counter() - started)
    return min(times)


def bare_products_seconds(features, batch_size=32, units=256):
    """An epoch of the first layer's three matrix products alone: forward x @ W, the weight
    gradient x.T @ dy and the input gradient dy @ W.T, batch by batch."""
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((features.shape[1], units)).astype(np.float32)
    dy = rng.standard_normal((batch_size, units)).astype(np.float32)
    started = time.perf_counter()
    for start in range(0, len(features) - batch_size + 1, batch_size):
        x = features[start:start + batch_size]
        x @ kernel
        x.T @ dy
        dy @ kernel.T
    return time.perf_counter() - started


def epoch_breakdown(features, labels, fast, epochs=3, batch_size=32):
    """Where an epoch goes, batch by batch, on one path: seconds per epoch (best of ``epochs``)
    in taking the batch, the forward pass, the loss, the backward pass and the optimizer step
    (Adam; on the engine through its threads, as ``fit`` runs it)."""
    from minixcept.engines.training import GradientEngine
    from minixcept.workflows.fit import runner_for
    head, loss = build_head(features.shape[1], 2, seed=0), head_loss(2)
    optimizer, runner = optimizers.Adam(learning_rate=1e-4), runner_for(head, fast)
    run = runner.run_elementwise if isinstance(runner, GradientEngine) else None
    order, best = np.random.default_rng(0), None
    for _ in range(epochs):
        spent = np.zeros(5)
        for indices in np.array_split(order.permutation(len(features)), max(1, len(features) // batch_size)):
            marks = [time.perf_counter()]
            x, y = features[indices], labels[indices]
            marks.append(time.perf_counter())
            outputs = runner.forward(x, training=True)
            marks.append(time.perf_counter())
            float(loss.forward(outputs, y))
            dlogits = loss.backward()
            marks.append(time.perf_counter())
            runner.backward(dlogits)
            marks.append(time.perf_counter())
            optimizer.apply_gradients(runner.layers, run=run)
            marks.append(time.perf_counter())
            spent += np.diff(marks)
        best = spent if best is None or spent.sum() < best.sum() else best
    return dict(zip(('batch', 'forward', 'loss', 'backward', 'optimizer'), best))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--photos', type=int, default=2000, help='feature vectors per epoch')
    parser.add_argument('--epochs', type=int, default=3, help='epochs timed per path and round (best kept)')
    parser.add_argument('--rounds', type=int, default=3, help='rounds, the paths interleaved')
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    features = np.abs(rng.standard_normal((args.photos, 2048))).astype(np.float32)
    labels = (rng.random(args.photos) > 0.5).astype(np.int64)
    for key, value in machine().items():
        print(f'{key}: {value}')
    results = {'engine (fit default)': [], 'plain layers (fast=False)': [], 'bare matmuls, first layer': []}
    for _ in range(args.rounds):
        results['engine (fit default)'].append(epoch_seconds(features, labels, args.epochs, True))
        results['plain layers (fast=False)'].append(epoch_seconds(features, labels, args.epochs, False))
        results['bare matmuls, first layer'].append(min(bare_products_seconds(features) for _ in range(args.epochs)))
    print(f'head 2048 -> 256 -> 1, batch 32, {args.photos:,} photos an epoch; seconds per epoch '
          f'(median of {args.rounds} rounds, each the best of {args.epochs}):')
    for name, values in results.items():
        print(f'  {name:28s} {statistics.median(values):.4f}   ({" ".join(f"{v:.4f}" for v in values)})')
    bare = statistics.median(results['bare matmuls, first layer'])
    for name in ('engine (fit default)', 'plain layers (fast=False)'):
        print(f'  {name} / bare matmuls: {statistics.median(results[name]) / bare:.2f}')
    print('where an epoch goes (seconds, the best of the epochs; the product figures are the bare ones above):')
    for fast, name in ((True, 'engine'), (False, 'plain layers')):
        parts = epoch_breakdown(features, labels, fast, args.epochs)
        print(f'  {name:13s} ' + '  '.join(f'{key} {value:.4f}' for key, value in parts.items())
              + f'  sum {sum(parts.values()):.4f}')
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == '__main__':
    main()
