"""Bottleneck features: each photo run once through Xception without its top, cached on disk.

The "bottleneck" is the last thing Xception computes before its classifier: the
2048 channels of block 14, averaged over the image (``Xception(include_top=False,
pooling='avg')``). A small dense head trained on those vectors is the cheap half
of transfer learning; the expensive half, the forward pass through 20 million
weights, is done once per photo here and kept.

Why ImageNet features serve cats and dogs: trained on 1.2 million photos of 1,000 classes
(among them more than a hundred dog breeds and several cats), the convolutions learned
detectors that are not specific to those classes - edges and textures early, fur, eyes,
ears and faces late - and block 14's channels say which of them a photo contains. A linear
head on them separates classes it was never trained on. Why extraction needs no labels:
the weights are fixed, so a photo's features depend on the photo, the image size and the
weights alone; labels enter only when the head is trained, and one extraction serves any
head trained on those photos.

This module is the network's part: photos in batches -> ``model.predict`` -> rows of
features, with a progress line. Keeping them - the resumable on-disk cache that survives a
killed process and two processes sharing a folder - is ``minixcept.files.cache``.

Memory stays flat as the photo folder grows: one batch of photos is decoded at a time, and
the features are written into one (N, D) array allocated at the start (8 KiB a photo at
D = 2048), never concatenated (benchmarks/extraction_memory.py measures it).
"""
import functools
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ShapeError
from ..files.cache import Chunk, FeatureCache, Features
from ..files.images import load_batch
from ..layers.base import no_grad
from ..xception import preprocess_input
from .progress import Progress

__all__ = ["bottleneck_features", "extract_features", "Features", "Progress"]


def _warn(message):
    print(message, file=sys.stderr, flush=True)


# -- the network part --------------------------------------------------------------------------

def bottleneck_features(model, pixels, fast=True):
    """Photos (N, H, W, 3) uint8 in [0, 255] -> features (N, D) float32 through ``model``.

    Inference only, under ``no_grad()``, through ``model.predict``: with ``fast``, the model's
    fastest inference path (``minixcept.engines.inference``), else the plain layers. N may be 0.
    """
    if len(pixels) == 0:
        return np.zeros((0, model.output_shape()[-1]), np.float32)
    with no_grad():
        return np.asarray(model.predict(preprocess_input(pixels), batch_size=len(pixels), fast=fast), np.float32)


# -- extraction ----------------------------------------------------------------------------------

def extract_features(model, folder, batch_size=32, cache_file=None, key=None, interpolation='bilinear',
                     label='', show_progress=True, on_batch=None, log=_warn, fast=True):
    """Bottleneck features of every photo in ``folder`` (an ImageFolder), through ``model``.

    model: Xception(include_top=False, pooling='avg') or any model whose input is
    (N, s, s, 3) preprocessed photos; photos are resized to its input size.
    cache_file, key: where to cache and the ``cache_key`` of this extraction (both or neither).
    A complete cache for the key is read back; an interrupted one is resumed; while this
    call computes, another process asking for the same cache waits for it (see
    ``minixcept.files.cache``).
    show_progress: a progress line on standard error (see Progress).
    on_batch(done, total): called after each batch is safely stored.
    Photos that fail to decode are skipped with a warning through ``log`` and listed in
    ``Features.skipped``. fast: False runs the plain layers instead of the inference engine
    (same features to float32 rounding, slower; for comparison). Returns Features.
    """
    if (cache_file is None) != (key is None):
        raise ValueError('extract_features needs both cache_file and key, or neither')
    if batch_size < 1:
        raise ValueError(f'extract_features: batch_size must be at least 1, got {batch_size}')
    compute = functools.partial(_extract, model, folder, batch_size=batch_size, interpolation=interpolation,
                                label=label, show_progress=show_progress, on_batch=on_batch, log=log, fast=fast)
    if cache_file is None:
        return compute(cache=None)
    cache = FeatureCache(cache_file, key, log)
    cached = cache.read(folder)
    if cached is None:
        with cache.locked():
            cached = cache.read(folder)          # finished by another process while we waited?
            if cached is None:
                return compute(cache=cache)
    log(f'{label or "features"}: {len(cached.files):,} photos read from the cache {cache_file}')
    return cached


def _extract(model, folder, cache, *, batch_size, interpolation, label, show_progress, on_batch, log, fast):
    """Run the photos through the model batch by batch, storing each batch in ``cache`` (a
    FeatureCache the caller holds locked, or None). Returns Features."""
    image_size = model.input_shape[0]
    if image_size is None:
        raise ShapeError(f"model {model.name!r} takes photos of any size: build it with input_shape=(s, s, 3) "
                         "to say the size photos are resized to")
    relative = lambda path: Path(path).relative_to(folder.root).as_posix()  # noqa: E731
    status, chunks = 'off', []
    if cache is not None:
        status = 'rebuilt' if cache.file.exists() else 'built'
        chunks = cache.resume()
        if chunks:
            status = 'resumed'
            log(f'{label or "features"}: resuming an interrupted extraction, {chunks[-1].end:,} of '
                f'{len(folder):,} photos already done')

    total = len(folder)
    rows = np.empty((total, model.output_shape()[-1]), np.float32)    # at most one row per photo
    kept, loaded, skipped = 0, [], []

    def keep(chunk):
        nonlocal kept
        rows[kept:kept + len(chunk.loaded)] = chunk.features
        kept += len(chunk.loaded)
        loaded.append(chunk.loaded)
        skipped.extend((str(folder.root / path), reason) for path, reason in chunk.failed)

    for chunk in chunks:
        keep(chunk)
    first = chunks[-1].end if chunks else 0
    del chunks                                   # their rows are in ``rows`` now
    batches_before = -(-first // batch_size)
    batches_done, photos_done = batches_before, first
    progress = (Progress(sys.stderr, batches=batches_before + -(-(total - first) // batch_size), photos=total,
                         interval=0, label=label or 'features', done=first)   # a batch is seconds of work: a line each
                if show_progress else None)
    started = time.monotonic()
    try:
        for begin in range(first, total, batch_size):
            end = min(begin + batch_size, total)
            pixels, positions, failures = load_batch(folder.files[begin:end], image_size, interpolation)
            for path, reason in failures:
                log(f'warning: skipping {path}: {reason}')
            chunk = Chunk(begin, end, bottleneck_features(model, pixels, fast=fast),
                          np.asarray(positions, dtype=np.int64) + begin,
                          [(relative(path), reason) for path, reason in failures])
            if cache is not None:
                cache.save_chunk(chunk)
            keep(chunk)
            batches_done, photos_done = batches_done + 1, end
            if progress is not None:
                progress.update(batches_done, photos_done)
            if on_batch is not None:
                on_batch(end, total)
    finally:
        if progress is not None:
            progress.finish(batches_done, photos_done)

    loaded = np.concatenate(loaded) if loaded else np.zeros(0, np.int64)
    features = Features(
        features=rows[:kept], labels=folder.labels[loaded], files=[folder.files[i] for i in loaded],
        class_names=list(folder.class_names), skipped=skipped, cache=status,
        seconds=time.monotonic() - started, photos_computed=total - first)
    if cache is not None:
        cache.finish(features, image_size, folder.root, total)
    return features
