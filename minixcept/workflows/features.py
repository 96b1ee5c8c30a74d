"""Bottleneck features: each photo run once through Xception without its top, cached on disk.

The "bottleneck" is the last thing Xception computes before its classifier: the
2048 channels of block 14, averaged over the image (``Xception(include_top=False,
pooling='avg')``). A small dense head trained on those vectors is the cheap half
of transfer learning; the expensive half, the forward pass through 20 million
weights, is done once per photo here and kept.

Cache layout, one split (``train``, ``validation``...) at a time::

    <cache>/<split>.h5              a complete extraction: features (N, D), labels, files, the
                                    photos skipped and the key. It is written under a temporary
                                    name and renamed into place, so it exists only when whole.
    <cache>/<split>.h5.partial/     an extraction in progress:
        key.txt                     the key it was started for
        rows_000000_000032.npz      one file per finished batch (also written, then renamed)

The key is a hash of everything the features depend on: the photos (path
within the split, size and modification time of each, in order), the image
size, the resizing filter and the network's weights (their sha256). A cache
with another key is rebuilt; an extraction that was interrupted (Ctrl-C, a
killed process) resumes after its last finished batch.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..files.images import load_batch
from ..xception import preprocess_input
from ..layers.base import no_grad

CACHE_FORMAT = 1            # bump when the file layout or what goes into the key changes


def _warn(message):
    print(message, file=sys.stderr, flush=True)


@dataclass
class Features:
    """Bottleneck features of one split, one row per photo that decoded.

    features: (N, D) float32; labels: (N,) int64 class indices; files: the N photos, in order;
    skipped: ``[(path, reason), ...]`` for photos that could not be decoded.
    cache: 'hit' (read back), 'built' (no cache before), 'rebuilt' (a cache with another key
    was replaced), 'resumed' (an interrupted extraction was finished) or 'off' (no cache).
    seconds: time spent extracting in this call; photos_computed: photos run through the
    network in this call (0 on a hit).
    """
    features: np.ndarray
    labels: np.ndarray
    files: list
    class_names: list
    skipped: list = field(default_factory=list)
    cache: str = 'off'
    seconds: float = 0.0
    photos_computed: int = 0


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


# -- what the features depend on ---------------------------------------------------------------

def cache_key(folder, image_size, weights_id, interpolation='bilinear', model='xception-notop-avg'):
    """sha256 (hex) of what a split's features depend on.

    folder: an ImageFolder; weights_id: a string naming the weights exactly (their sha256, see
    ``weights_checksum``). Photos count by their path within the split, size in bytes and
    modification time, so editing, adding or removing one changes the key.
    """
    photos = []
    for path in folder.files:
        stat = os.stat(path)
        photos.append([Path(path).relative_to(folder.root).as_posix(), stat.st_size, stat.st_mtime_ns])
    description = {'format': CACHE_FORMAT, 'model': model, 'weights': weights_id,
                   'image_size': int(image_size), 'interpolation': interpolation,
                   'class_names': list(folder.class_names), 'photos': photos}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def weights_checksum(path, memo_dir):
    """sha256 of a weights file, computed once per version of the file.

    The digest is remembered in ``memo_dir/weights_sha256.json`` under the file's resolved
    path with its size and modification time; a file that changed since is hashed again.
    """
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = Path(memo_dir) / 'weights_sha256.json'
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path), {})
    if entry.get('size') == stat.st_size and entry.get('mtime_ns') == stat.st_mtime_ns:
        return entry['sha256']
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    memo[str(path)] = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns, 'sha256': digest.hexdigest()}
    _write_atomically(memo_file, lambda tmp: Path(tmp).write_text(json.dumps(memo, indent=2) + '\n'))
    return digest.hexdigest()


def _write_atomically(target, write):
    """Call ``write(temporary_path)``, then rename the temporary file over ``target``.

    A reader sees the old file or the whole new one, never a half-written one, whatever
    happens to this process in between.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f'.{target.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- progress ----------------------------------------------------------------------------------

class Progress:
    """A progress line on ``stream`` (default: standard error): photos done / total, photos
    per second, time left.

    On a terminal the line is rewritten in place after every batch; in a log file a new line
    is written every ``every`` batches and at the end. The rate counts only photos computed
    in this run (not those an interrupted run had already done).
    """

    def __init__(self, total, label='', stream=None, every=10, done=0):
        self.total, self.label, self.every = total, label, every
        self.stream = stream if stream is not None else sys.stderr
        self.first_done, self.batches = done, 0
        self.start = time.monotonic()
        self.in_place = hasattr(self.stream, 'isatty') and self.stream.isatty()

    def line(self, done):
        elapsed = time.monotonic() - self.start
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - done) / rate) if rate > 0 else '?'
        prefix = f'{self.label}: ' if self.label else ''
        return f'{prefix}{done:,} / {self.total:,} photos  {rate:.1f} photos/s  ETA {eta}'

    def update(self, done):
        self.batches += 1
        if self.in_place:
            self.stream.write('\r' + self.line(done) + '\033[K')
        elif self.batches % self.every == 0 or done >= self.total:
            self.stream.write(self.line(done) + '\n')
        self.stream.flush()

    def close(self):
        if self.in_place and self.batches:
            self.stream.write('\n')
            self.stream.flush()


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f'{seconds // 3600}h {seconds % 3600 // 60:02d}m'
    return f'{seconds // 60}m {seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


# -- the cache -----------------------------------------------------------------------------------

@dataclass
class _Chunk:
    """The result of one batch: rows begin..end of the split's file list.

    features: (n_loaded, D); loaded: positions in the split (begin <= p < end) of those rows;
    failed: [(path within the split, reason), ...].
    """
    begin: int
    end: int
    features: np.ndarray
    loaded: np.ndarray
    failed: list


class _PartialExtraction:
    """The folder ``<split>.h5.partial/``: the key and one file per finished batch."""

    def __init__(self, cache_file, key):
        self.folder = Path(str(cache_file) + '.partial')
        self.key = key

    def start(self, log):
        """Chunks already done for this key, contiguous from row 0. Anything else is removed."""
        key_file = self.folder / 'key.txt'
        if self.folder.is_dir():
            found = key_file.read_text().strip() if key_file.is_file() else None
            if found != self.key:
                log(f'{self.folder}: an interrupted extraction for other photos, image size or '
                    'weights: discarding it')
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            _write_atomically(key_file, lambda tmp: Path(tmp).write_text(self.key + '\n'))
        chunks, expected_begin = [], 0
        for path in sorted(self.folder.glob('rows_*.npz')):
            chunk = self._read(path) if path.name.startswith(f'rows_{expected_begin:06d}_') else None
            if chunk is None:              # after a gap (another batch size) or unreadable: redo
                path.unlink()
                continue
            chunks.append(chunk)
            expected_begin = chunk.end
        for leftover in self.folder.glob('.*.tmp'):     # a batch being written when the run died
            leftover.unlink()
        return chunks

    @staticmethod
    def _read(path):
        try:
            with np.load(path) as stored:
                return _Chunk(int(stored['begin']), int(stored['end']), stored['features'],
                              stored['loaded'], list(zip(stored['failed_paths'].tolist(),
                                                         stored['failed_reasons'].tolist())))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None

    def save(self, chunk):
        failed_paths = np.array([p for p, _ in chunk.failed], dtype=str)
        failed_reasons = np.array([r for _, r in chunk.failed], dtype=str)

        def write(tmp):
            with open(tmp, 'wb') as f:
                np.savez(f, begin=chunk.begin, end=chunk.end, features=chunk.features, loaded=chunk.loaded,
                         failed_paths=failed_paths, failed_reasons=failed_reasons)

        _write_atomically(self.folder / f'rows_{chunk.begin:06d}_{chunk.end:06d}.npz', write)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def read_cache(cache_file, key, folder, log=_warn):
    """The Features stored in ``cache_file`` if it is complete and made for ``key``, else None
    (saying why through ``log`` when a file was there)."""
    cache_file = Path(cache_file)
    if not cache_file.exists():
        return None
    try:
        with h5py.File(cache_file, 'r') as f:
            if int(f.attrs.get('complete', 0)) != 1 or int(f.attrs.get('format', -1)) != CACHE_FORMAT:
                log(f'{cache_file}: incomplete or from another version of minixcept: rebuilding it')
                return None
            if f.attrs['key'] != key:
                log(f'{cache_file}: made for other photos, image size or weights (key mismatch): '
                    'rebuilding it')
                return None
            root = folder.root
            return Features(
                features=f['features'][()], labels=f['labels'][()],
                files=[root / p for p in f['files'].asstr()[()]],
                class_names=json.loads(f.attrs['class_names']),
                skipped=[(str(root / p), reason) for p, reason in
                         zip(f['skipped_files'].asstr()[()], f['skipped_reasons'].asstr()[()])],
                cache='hit')
    except (OSError, KeyError, ValueError) as error:
        log(f'{cache_file}: unreadable ({error}): rebuilding it')
        return None


def _write_cache(cache_file, key, features, image_size, root):
    """Store ``features`` atomically, photo paths relative to the split's ``root``."""
    relative = lambda paths: [Path(p).relative_to(root).as_posix() for p in paths]  # noqa: E731

    def write(tmp):
        strings = h5py.string_dtype()
        with h5py.File(tmp, 'w') as f:
            f.attrs['format'] = CACHE_FORMAT
            f.attrs['key'] = key
            f.attrs['image_size'] = int(image_size)
            f.attrs['class_names'] = json.dumps(features.class_names)
            f.create_dataset('features', data=features.features)
            f.create_dataset('labels', data=features.labels)
            f.create_dataset('files', data=relative(features.files), dtype=strings)
            f.create_dataset('skipped_files', data=relative(p for p, _ in features.skipped), dtype=strings)
            f.create_dataset('skipped_reasons', data=[r for _, r in features.skipped], dtype=strings)
            f.attrs['complete'] = 1                     # last: a file without it is never trusted

    _write_atomically(cache_file, write)


# -- extraction ----------------------------------------------------------------------------------

def extract_features(model, folder, batch_size=32, cache_file=None, key=None, interpolation='bilinear',
                     label='', show_progress=True, on_batch=None, log=_warn, fast=True):
    """Bottleneck features of every photo in ``folder`` (an ImageFolder), through ``model``.

    model: Xception(include_top=False, pooling='avg') or any model whose input is
    (N, s, s, 3) preprocessed photos; photos are resized to its input size.
    cache_file, key: where to cache and the ``cache_key`` of this extraction (both or neither).
    A complete cache for the key is read back; an interrupted one is resumed.
    show_progress: a progress line on standard error (see Progress).
    on_batch(done, total): called after each batch is safely stored.
    Photos that fail to decode are skipped with a warning through ``log`` and listed in
    ``Features.skipped``. fast: False runs the plain layers instead of the inference engine
    (same features to float32 rounding, slower; for comparison). Returns Features.
    """
    if (cache_file is None) != (key is None):
        raise ValueError('extract_features needs both cache_file and key, or neither')
    image_size = model.input_shape[0]
    relative = lambda path: Path(path).relative_to(folder.root).as_posix()  # noqa: E731
    status, chunks, partial = 'off', [], None
    if cache_file is not None:
        cached = read_cache(cache_file, key, folder, log)
        if cached is not None:
            log(f'{label or "features"}: {len(cached.files):,} photos read from the cache {cache_file}')
            return cached
        status = 'rebuilt' if Path(cache_file).exists() else 'built'
        partial = _PartialExtraction(cache_file, key)
        chunks = partial.start(log)
        if chunks:
            status = 'resumed'
            log(f'{label or "features"}: resuming an interrupted extraction, {chunks[-1].end:,} of '
                f'{len(folder):,} photos already done')

    total = len(folder)
    first = chunks[-1].end if chunks else 0
    progress = Progress(total, label, done=first) if show_progress else None
    started = time.monotonic()
    try:
        for begin in range(first, total, batch_size):
            end = min(begin + batch_size, total)
            pixels, loaded, failures = load_batch(folder.files[begin:end], image_size, interpolation)
            for path, reason in failures:
                log(f'warning: skipping {path}: {reason}')
            chunk = _Chunk(begin, end, bottleneck_features(model, pixels, fast=fast),
                           np.asarray(loaded, dtype=np.int64) + begin,
                           [(relative(path), reason) for path, reason in failures])
            if partial is not None:
                partial.save(chunk)
            chunks.append(chunk)
            if progress is not None:
                progress.update(end)
            if on_batch is not None:
                on_batch(end, total)
    finally:
        if progress is not None:
            progress.close()
    seconds = time.monotonic() - started

    dimension = model.output_shape()[-1]
    loaded = np.concatenate([c.loaded for c in chunks]) if chunks else np.zeros(0, np.int64)
    features = Features(
        features=np.concatenate([c.features for c in chunks]) if chunks else np.zeros((0, dimension), np.float32),
        labels=folder.labels[loaded], files=[folder.files[i] for i in loaded],
        class_names=list(folder.class_names),
        skipped=[(str(folder.root / path), reason) for c in chunks for path, reason in c.failed],
        cache=status, seconds=seconds, photos_computed=total - first)
    if cache_file is not None:
        _write_cache(cache_file, key, features, image_size, folder.root)
        partial.remove()
    return features
