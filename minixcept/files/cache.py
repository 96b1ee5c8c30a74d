"""The feature cache: a split's features on disk, resumable, safe against kills and neighbours.

Computing Xception's features of a few thousand photos takes minutes to hours, so they are
kept on disk, one split (``train``, ``validation``...) at a time::

    <cache>/<split>.h5              a complete extraction: features (N, D), labels, files, the
                                    photos skipped and the key, the whole file under a checksum
    <cache>/<split>.h5.partial/     an extraction in progress, one file per finished batch:
        rows_000000_000032.npz      rows 0..32 of the split's photo list, with the key
    <cache>/<split>.h5.lock         the lock file of the split (empty, never removed)

The key (``cache_key``) is a hash of everything the features depend on: the photos (path
within the split, size and modification time, in order), the image size, the resizing
filter and the network's weights (``weights_checksum``). A file made for another key is
never used.

What the cache guarantees, and how:

- **A file is complete or absent.** Every file is written under a temporary name, flushed
  and renamed into place (``minixcept.files.atomic``), so a process killed at any instant -
  Ctrl-C, SIGKILL, out of memory, power cut after the fsync - leaves whole files and stray
  ``.*.tmp`` files, never a half-written file under a real name.
- **Nothing is trusted without being checked.** The complete file is an HDF5 file whose
  first 512 bytes (HDF5's user block, which HDF5 itself skips) hold the sha256 of every
  byte after them: features, labels, file names, skips, key and class names, and the HDF5
  structure that holds them. Reading it checks that checksum over the bytes in memory
  before HDF5 parses anything, so a flipped bit anywhere - in the labels as much as in the
  features - is refused, and a damaged file never reaches the HDF5 library. Then the key
  stored inside must be the expected one, the row counts must agree (features, photos kept
  and photos skipped add up to the split's photos) and every label must name a class. A
  batch file is checked the same way, with the sha256 of its features. A file that fails
  any check counts as not there: it is computed again, never read back.
- **A killed extraction resumes.** The batches already stored (contiguous from row 0) are
  read back and the rest computed, in the same batches as an uninterrupted run, so the
  features come out bit for bit the same.
- **Two processes can share one cache folder.** Whoever writes a split holds an exclusive
  ``fcntl.flock`` on ``<split>.h5.lock`` from the moment it finds no complete file until it
  has renamed the complete file into place. A second process extracting the same split
  waits for the lock (saying so), then finds the complete file and reads it back; it never
  computes the same batches or writes into the same ``.partial`` folder at the same time.
  The kernel drops a flock when its process dies, however it dies, so a killed run leaves
  no stale lock. Reading a complete file needs no lock: it is only ever replaced whole.
  (Where ``fcntl`` does not exist - Windows - there is no lock: one process per cache
  folder there, while the checks above still keep torn files out.)
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .atomic import temporary_name_prefix, write_atomically

try:
    import fcntl
except ImportError:                  # pragma: no cover - Windows
    fcntl = None

__all__ = ["Features", "Chunk", "FeatureCache", "cache_key", "weights_checksum", "read_cache",
           "CACHE_FORMAT"]

CACHE_FORMAT = 3            # bump when the file layout or what goes into the key changes

#: The complete file's first block: this text, the sha256 (hex) of every byte after the block,
#: then zeros. HDF5 skips a user block of this size (a power of two, at least 512).
USER_BLOCK = 512
_SIGNATURE = b'minixcept feature cache; sha256 of the bytes after byte 512: '


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


@dataclass
class Chunk:
    """The result of one batch: rows begin..end of the split's photo list.

    features: (n_loaded, D) float32; loaded: (n_loaded,) int64, the positions in the split
    (begin <= p < end) of those rows; failed: [(path within the split, reason), ...].
    """
    begin: int
    end: int
    features: np.ndarray
    loaded: np.ndarray
    failed: list


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
    write_atomically(memo_file, lambda tmp: Path(tmp).write_text(json.dumps(memo, indent=2) + '\n'))
    return digest.hexdigest()


def _features_digest(features):
    """sha256 of a features array's float32 bytes, stored beside them and checked on reading."""
    return hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32)).hexdigest()   # no copy


class _Damaged(ValueError):
    """A cache file opened but failed a check (wrong key, counts that disagree, checksum)."""


#: What opening a damaged or truncated .npz / HDF5 file raises (zipfile says NotImplementedError
#: when a flipped bit in a member's header asks for a zip feature it lacks).
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, NotImplementedError)


# -- the complete file -------------------------------------------------------------------------

def _sealed(image):
    """The bytes of an HDF5 file written with a USER_BLOCK, its first block now holding the
    signature and the sha256 of everything after it."""
    header = _SIGNATURE + hashlib.sha256(image[USER_BLOCK:]).hexdigest().encode()
    return header.ljust(USER_BLOCK, b'\0') + image[USER_BLOCK:]


def _unsealed(data):
    """The bytes of a cache file, checked against the checksum in its first block; _Damaged if not."""
    header = data[:USER_BLOCK]
    if not header.startswith(_SIGNATURE):
        raise _Damaged('no checksum in its first block (written by another version of minixcept?)')
    stored = header[len(_SIGNATURE):len(_SIGNATURE) + 64]
    if hashlib.sha256(memoryview(data)[USER_BLOCK:]).hexdigest().encode() != stored:
        raise _Damaged('its bytes do not match the checksum in its first block')
    return data


def read_cache(cache_file, key, folder, log=_warn):
    """The Features stored in ``cache_file`` if it is complete, made for ``key`` and passes
    every check (see the module docstring), else None - saying why through ``log`` when a
    file was there."""
    cache_file = Path(cache_file)
    if not cache_file.exists():
        return None
    try:
        data = _unsealed(cache_file.read_bytes())
        with h5py.File(io.BytesIO(data), 'r') as f:
            if int(f.attrs.get('complete', 0)) != 1 or int(f.attrs.get('format', -1)) != CACHE_FORMAT:
                log(f'{cache_file}: incomplete or from another version of minixcept: rebuilding it')
                return None
            if f.attrs['key'] != key:
                log(f'{cache_file}: made for other photos, image size or weights (key mismatch): '
                    'rebuilding it')
                return None
            features, labels = f['features'][()], f['labels'][()]
            files, skipped_files = f['files'].asstr()[()], f['skipped_files'].asstr()[()]
            skipped_reasons = f['skipped_reasons'].asstr()[()]
            if not (len(features) == len(labels) == len(files)
                    and len(skipped_files) == len(skipped_reasons)
                    and len(files) + len(skipped_files) == len(folder.files)):
                raise _Damaged('its row counts disagree')
            if _features_digest(features) != f.attrs['features_sha256']:
                raise _Damaged('its features do not match their checksum')
            class_names = json.loads(f.attrs['class_names'])
            if labels.dtype.kind not in 'iu' or np.any(labels < 0) or np.any(labels >= len(class_names)):
                raise _Damaged(f'its labels are not all classes 0..{len(class_names) - 1}')
            root = folder.root
            return Features(features=features, labels=labels, files=[root / p for p in files],
                            class_names=class_names,
                            skipped=[(str(root / p), reason) for p, reason in zip(skipped_files, skipped_reasons)],
                            cache='hit')
    except _Damaged as error:
        log(f'{cache_file}: unreadable or damaged ({error}): rebuilding it')
        return None
    except _UNREADABLE as error:
        log(f'{cache_file}: unreadable ({error}): rebuilding it')
        return None


def _write_cache(cache_file, key, features, image_size, root):
    """Store ``features`` atomically, photo paths relative to the split's ``root``.

    The HDF5 file is made in memory and sealed with its checksum (``_sealed``); only then is
    it written, by plain file writes: a full disk is an OSError from one ``write``, never a
    failure inside the HDF5 library with the file half open."""
    relative = lambda paths: [Path(p).relative_to(root).as_posix() for p in paths]  # noqa: E731
    strings = h5py.string_dtype()
    buffer = io.BytesIO()
    with h5py.File(buffer, 'w', userblock_size=USER_BLOCK) as f:
        f.attrs['format'] = CACHE_FORMAT
        f.attrs['key'] = key
        f.attrs['image_size'] = int(image_size)
        f.attrs['class_names'] = json.dumps(features.class_names)
        f.attrs['features_sha256'] = _features_digest(features.features)
        f.create_dataset('features', data=features.features)
        f.create_dataset('labels', data=features.labels)
        f.create_dataset('files', data=relative(features.files), dtype=strings)
        f.create_dataset('skipped_files', data=relative(p for p, _ in features.skipped), dtype=strings)
        f.create_dataset('skipped_reasons', data=[r for _, r in features.skipped], dtype=strings)
        f.attrs['complete'] = 1                     # last: a file without it is never trusted
    image = _sealed(buffer.getvalue())
    write_atomically(cache_file, lambda tmp: Path(tmp).write_bytes(image))


# -- one split's cache: lock, batches, completion ----------------------------------------------

class FeatureCache:
    """The cache of one split: ``<split>.h5``, its ``.partial/`` folder and its lock file.

        cache = FeatureCache(cache_file, key)
        features = cache.read(folder)              # complete and checked, else None
        with cache.locked():                       # one writer at a time
            chunks = cache.resume()                # batches a killed run stored, checked
            cache.save_chunk(chunk)                # after each new batch
            cache.finish(features, image_size, root, photo_count)
    """

    def __init__(self, cache_file, key, log=_warn):
        self.file = Path(cache_file)
        self.key = key
        self.log = log
        self.partial = Path(str(self.file) + '.partial')
        self.lock_file = Path(str(self.file) + '.lock')

    def read(self, folder):
        """The complete features for this key, checked (see ``read_cache``), or None."""
        return read_cache(self.file, self.key, folder, self.log)

    @contextlib.contextmanager
    def locked(self):
        """Hold the split's exclusive lock; if another process holds it, say so and wait."""
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, 'a') as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.log(f'{self.file}: another process is extracting these features; '
                             'waiting for it to finish')
                    fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def resume(self):
        """The batches already stored for this key, contiguous from row 0, each checked.

        Call under ``locked()``. Removes what cannot be used: batches of another key, after a
        gap (another batch size) or failing a check, and the temporary files of a killed run.
        """
        for leftover in self.file.parent.glob(temporary_name_prefix(self.file) + '*.tmp'):
            leftover.unlink()                    # the complete file being written when it died
        if not self.partial.is_dir():
            self.partial.mkdir(parents=True)
            return []
        for leftover in self.partial.glob('.*.tmp'):
            leftover.unlink()                    # a batch being written when it died
        chunks, expected_begin, problems = [], 0, []
        for path in sorted(self.partial.glob('rows_*.npz')):
            try:
                if not path.name.startswith(f'rows_{expected_begin:06d}_'):
                    raise _Damaged('does not follow the batches before it')
                chunk = self._read_chunk(path)
            except (_Damaged, *_UNREADABLE) as error:
                problems.append(f'{path.name} ({error})')
                path.unlink()
                continue
            chunks.append(chunk)
            expected_begin = chunk.end
        if problems:
            self.log(f'{self.partial}: computing again {len(problems)} stored batch(es) that cannot be '
                     f'used: {", ".join(problems[:3])}{", ..." if len(problems) > 3 else ""}')
        return chunks

    def _read_chunk(self, path):
        """A stored batch, or _Damaged / an open error if any check fails."""
        with np.load(path) as stored:
            if str(stored['key']) != self.key:
                raise _Damaged('made for other photos, image size or weights')
            chunk = Chunk(int(stored['begin']), int(stored['end']), stored['features'],
                          stored['loaded'], list(zip(stored['failed_paths'].tolist(),
                                                     stored['failed_reasons'].tolist())))
            digest = str(stored['features_sha256'])
        if path.name != _chunk_name(chunk.begin, chunk.end):
            raise _Damaged(f'holds rows {chunk.begin}..{chunk.end}')
        if (chunk.features.ndim != 2 or len(chunk.features) != len(chunk.loaded)
                or len(chunk.loaded) + len(chunk.failed) != chunk.end - chunk.begin
                or np.any(chunk.loaded < chunk.begin) or np.any(chunk.loaded >= chunk.end)):
            raise _Damaged('its row counts disagree')
        if _features_digest(chunk.features) != digest:
            raise _Damaged('its features do not match their checksum')
        return chunk

    def save_chunk(self, chunk):
        """Store one finished batch (atomically, with the key and a checksum inside)."""
        failed_paths = np.array([p for p, _ in chunk.failed], dtype=str)
        failed_reasons = np.array([r for _, r in chunk.failed], dtype=str)

        def write(tmp):
            with open(tmp, 'wb') as f:
                np.savez(f, key=self.key, begin=chunk.begin, end=chunk.end, features=chunk.features,
                         loaded=chunk.loaded, failed_paths=failed_paths, failed_reasons=failed_reasons,
                         features_sha256=_features_digest(chunk.features))

        write_atomically(self.partial / _chunk_name(chunk.begin, chunk.end), write)

    def finish(self, features, image_size, root, photo_count):
        """Write the complete file (atomically), then drop the batches it replaces.

        photo_count: how many photos the split lists. Raises ValueError, writing nothing,
        unless every one of them is accounted for, as a row or as a skip: a file marked
        complete is never short of photos.
        """
        accounted = len(features.files) + len(features.skipped)
        if accounted != photo_count or len(features.features) != len(features.files):
            raise ValueError(f'{self.file}: not marking the cache complete: it accounts for {accounted:,} '
                             f'of {photo_count:,} photos')
        _write_cache(self.file, self.key, features, image_size, root)
        shutil.rmtree(self.partial, ignore_errors=True)


def _chunk_name(begin, end):
    return f'rows_{begin:06d}_{end:06d}.npz'
