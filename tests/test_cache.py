"""The feature cache's guarantees: whole files only, every file checked before it is used, a
killed extraction resumes to the same bits, two processes share one cache folder.

The end-to-end tests run examples/catdog_bottleneck.py in subprocesses on a few real photos
at 71 px with a random base (``--weights random``); a small driver slows each batch down so
that a kill or a second process reliably lands while batches are being written.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import minixcept
from minixcept.files.atomic import write_atomically
from minixcept.files.cache import FeatureCache, cache_key, read_cache
from minixcept.files.images import image_folder
from minixcept.workflows.features import extract_features
from test_catdog import interrupt_after

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / 'examples' / 'catdog_bottleneck.py'
SIZE, PER_CLASS, BATCH = 71, 4, 2          # 8 photos a split, 4 batches of 2
SECONDS_PER_BATCH = 0.5                    # the driver's slow-down: a split takes >= 2 s

#: Runs the example with its network call slowed down: python -c DRIVER SECONDS EXAMPLE ARGS...
DRIVER = '''
import runpy, sys, time
import minixcept.workflows.features as features
seconds, network = float(sys.argv[1]), features.bottleneck_features

def slowed(*args, **kwargs):
    time.sleep(seconds)
    return network(*args, **kwargs)

features.bottleneck_features = slowed
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def example_argv(catdog, out, cache):
    return ['--data', catdog, '--limit', PER_CLASS, '--image-size', SIZE, '--batch-size', BATCH,
            '--weights', 'random', '--epochs', 1, '--out', out, '--cache', cache]


def start_example(catdog, out, cache, seconds_per_batch=0.0):
    """The example in a subprocess (its network slowed down by ``seconds_per_batch``)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    argv = [str(a) for a in example_argv(catdog, out, cache)]
    return subprocess.Popen([sys.executable, '-c', DRIVER, str(seconds_per_batch), str(EXAMPLE), *argv],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=180):
    """Wait for the example: (stdout, stderr) after checking it succeeded."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout, stderr


def cached(cache, split):
    """(features, files) of a complete cache file, read with h5py alone."""
    with h5py.File(cache / f'{split}.h5', 'r') as f:
        assert f.attrs['complete'] == 1
        return f['features'][()], list(f['files'].asstr()[()])


def report_of(out):
    return json.loads((out / 'report.json').read_text())


@pytest.fixture(scope='module')
def uninterrupted(catdog, tmp_path_factory):
    """The example run once from start to end: its cache folder, the reference features."""
    root = tmp_path_factory.mktemp('uninterrupted')
    finish(start_example(catdog, root / 'out', root / 'cache'))
    assert report_of(root / 'out')['cache'] == {'train': 'built', 'validation': 'built'}
    return root / 'cache'


def same_cache(cache, reference):
    for split in ('train', 'validation'):
        (features, files), (expected, expected_files) = cached(cache, split), cached(reference, split)
        assert files == expected_files
        np.testing.assert_array_equal(features, expected)     # bit for bit


# -- a killed run ------------------------------------------------------------------------------

def test_sigkill_while_writing_batches_then_a_rerun_gives_the_same_bits(catdog, uninterrupted, tmp_path):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    partial = cache / 'train.h5.partial'
    process = start_example(catdog, out, cache, SECONDS_PER_BATCH)
    deadline = time.monotonic() + 120
    while not list(partial.glob('rows_*.npz')):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, 'no batch was stored in two minutes'
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    stored = sorted(p.name for p in partial.glob('rows_*.npz'))
    assert 1 <= len(stored) < 4 and not (cache / 'train.h5').exists(), stored

    _, stderr = finish(start_example(catdog, out, cache))
    report = report_of(out)
    assert report['cache'] == {'train': 'resumed', 'validation': 'built'}
    assert f'{2 * len(stored)} of 8 photos already done' in stderr
    assert report['photos_computed'] == 16 - 2 * len(stored)
    same_cache(cache, uninterrupted)
    assert not partial.exists() and not list(cache.glob('.*.tmp'))


# -- two processes, one cache folder -----------------------------------------------------------

def test_two_processes_extracting_into_one_cache_both_finish_and_compute_each_split_once(
        catdog, uninterrupted, tmp_path):
    # Slowed down so that each holds a split's lock >= 4 s: started together, they overlap
    # even when one starts a few seconds late on a loaded machine.
    cache = tmp_path / 'cache'
    first = start_example(catdog, tmp_path / 'first', cache, 2 * SECONDS_PER_BATCH)
    second = start_example(catdog, tmp_path / 'second', cache, 2 * SECONDS_PER_BATCH)
    (_, first_err), (_, second_err) = finish(first), finish(second)
    reports = [report_of(tmp_path / 'first'), report_of(tmp_path / 'second')]

    # Whoever took a split's lock first built it; the other waited, then read it back whole.
    assert 'waiting for it to finish' in first_err + second_err
    for split in ('train', 'validation'):
        assert sorted(report['cache'][split] for report in reports) == ['built', 'hit']
    assert sum(report['photos_computed'] for report in reports) == 16
    same_cache(cache, uninterrupted)


def test_a_second_writer_waits_for_the_lock(tmp_path):
    messages = []
    holder = FeatureCache(tmp_path / 'train.h5', 'key', log=messages.append)
    other = FeatureCache(tmp_path / 'train.h5', 'key', log=messages.append)
    entered = threading.Event()

    def second_writer():
        with other.locked():
            entered.set()

    with holder.locked():
        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.3)
        assert not entered.is_set(), 'two writers held the lock at once'
    thread.join(10)
    assert entered.is_set()
    assert messages == [f'{tmp_path / "train.h5"}: another process is extracting these features; '
                        'waiting for it to finish']


# -- damaged files are computed again, never read back ------------------------------------------

@pytest.fixture(scope='module')
def random_base():
    minixcept.set_seed(0)
    return minixcept.Xception(include_top=False, pooling='avg', input_shape=(SIZE, SIZE, 3))


@pytest.fixture(scope='module')
def photos(catdog):
    return image_folder(catdog / 'validation').limit(PER_CLASS)


QUIET = dict(batch_size=BATCH, show_progress=False)


def rewrite_chunk(path, **changes):
    """Write a stored batch again with some of its arrays replaced (a valid .npz)."""
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays.update(changes)
    with open(path, 'wb') as f:
        np.savez(f, **arrays)


def test_stored_batches_that_fail_a_check_are_computed_again(random_base, photos, tmp_path):
    key = cache_key(photos, SIZE, 'random-init-seed-0')
    reference = extract_features(random_base, photos, log=lambda m: None, **QUIET)
    cache_file = tmp_path / 'validation.h5'
    with pytest.raises(KeyboardInterrupt):
        extract_features(random_base, photos, cache_file=cache_file, key=key, on_batch=interrupt_after(3),
                         log=lambda m: None, **QUIET)
    partial = Path(str(cache_file) + '.partial')
    chunks = sorted(partial.glob('rows_*.npz'))
    assert [p.name for p in chunks] == ['rows_000000_000002.npz', 'rows_000002_000004.npz',
                                        'rows_000004_000006.npz']

    # Three ways a batch file can lie. Each must be recomputed, and so must every batch after it.
    for damage in ('altered', 'other key', 'truncated'):
        if damage == 'altered':          # valid .npz, one number changed, stored checksum kept
            with np.load(chunks[1]) as stored:
                features = stored['features'].copy()
            features[0, 0] += 1
            rewrite_chunk(chunks[1], features=features)
        elif damage == 'other key':
            rewrite_chunk(chunks[1], key='another key')
        else:                            # cut short under its real name
            data = chunks[1].read_bytes()
            chunks[1].write_bytes(data[:len(data) // 2])
        messages = []
        with FeatureCache(cache_file, key, log=messages.append).locked() as cache:
            kept = cache.resume()
        assert [(c.begin, c.end) for c in kept] == [(0, 2)], damage
        assert len(messages) == 1 and 'rows_000002_000004.npz' in messages[0], messages
        assert [p.name for p in partial.glob('rows_*.npz')] == ['rows_000000_000002.npz']
        with pytest.raises(KeyboardInterrupt):         # store batches 2..6 again for the next case
            extract_features(random_base, photos, cache_file=cache_file, key=key, on_batch=interrupt_after(2),
                             log=lambda m: None, **QUIET)

    resumed = extract_features(random_base, photos, cache_file=cache_file, key=key, log=lambda m: None, **QUIET)
    assert resumed.cache == 'resumed' and resumed.photos_computed == 2
    np.testing.assert_array_equal(resumed.features, reference.features)


def test_a_complete_file_whose_features_or_labels_were_altered_is_rebuilt(random_base, photos, tmp_path):
    key = cache_key(photos, SIZE, 'random-init-seed-0')
    cache_file = tmp_path / 'validation.h5'
    built = extract_features(random_base, photos, cache_file=cache_file, key=key, log=lambda m: None, **QUIET)
    clean = cache_file.read_bytes()
    messages = []
    for change in ('a feature', 'a label', 'rows dropped'):
        cache_file.write_bytes(clean)
        with h5py.File(cache_file, 'a') as f:           # a valid HDF5 file, its checksum block kept
            if change == 'a feature':
                f['features'][3, 7] += 1.0
            elif change == 'a label':
                f['labels'][2] = 1 - f['labels'][2]
            else:
                del f['labels']
                f['labels'] = np.zeros(3, np.int64)
        assert read_cache(cache_file, key, photos, log=messages.append) is None, change
        assert 'do not match the checksum' in messages[-1] and 'rebuilding' in messages[-1], messages[-1]
    again = extract_features(random_base, photos, cache_file=cache_file, key=key, log=lambda m: None, **QUIET)
    assert again.cache == 'rebuilt'
    np.testing.assert_array_equal(again.features, built.features)
    np.testing.assert_array_equal(again.labels, built.labels)


class Folder:
    """What read_cache needs of an ImageFolder: the split's root and its photos."""
    def __init__(self, root, count):
        self.root, self.files = root, [root / 'cats' / f'{i}.jpg' for i in range(count)]


def test_every_byte_of_a_cache_file_flipped_is_harmless_or_refused(tmp_path):
    """One byte at a time, at every offset of a small complete file (about 8 KB): each read
    either gives back exactly what was written or refuses the file (None, saying why);
    nothing damaged is ever read back, and nothing raises."""
    from minixcept.files.cache import Features, _write_cache
    folder = Folder(tmp_path, 6)
    written = Features(features=np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32),
                       labels=np.array([0, 1, 1, 0, 1]), files=folder.files[:5], class_names=['cats', 'dogs'],
                       skipped=[(str(folder.files[5]), 'not decodable')])
    cache_file = tmp_path / 'train.h5'
    _write_cache(cache_file, 'the key', written, SIZE, tmp_path)
    clean = cache_file.read_bytes()
    refused, harmless = 0, 0
    descriptor = os.open(cache_file, os.O_WRONLY)
    for offset in range(len(clean)):
        os.pwrite(descriptor, bytes([clean[offset] ^ 0xFF]), offset)
        messages = []
        read = read_cache(cache_file, 'the key', folder, log=messages.append)
        os.pwrite(descriptor, clean[offset:offset + 1], offset)
        if read is None:
            assert len(messages) == 1 and 'rebuilding' in messages[0], (offset, messages)
            refused += 1
            continue
        harmless += 1
        np.testing.assert_array_equal(read.features, written.features, err_msg=f'offset {offset}')
        np.testing.assert_array_equal(read.labels, written.labels, err_msg=f'offset {offset}')
        assert read.files == written.files and read.skipped == written.skipped, offset
        assert read.class_names == written.class_names, offset
    os.close(descriptor)
    assert refused + harmless == len(clean) and refused > len(clean) * 0.9, (refused, harmless)
    assert read_cache(cache_file, 'the key', folder).labels.tolist() == [0, 1, 1, 0, 1]


def test_every_byte_of_a_stored_batch_flipped_is_harmless_or_refused(tmp_path):
    """The same for a batch file of a running extraction (.npz: a CRC-32 per array, the
    features' sha256 inside): each flip reads back the same batch or is refused."""
    from minixcept.files.cache import Chunk, _UNREADABLE, _Damaged
    cache = FeatureCache(tmp_path / 'train.h5', 'the key', log=lambda message: None)
    cache.partial.mkdir(parents=True)
    written = Chunk(0, 3, np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32), np.array([0, 2]),
                    [('cats/1.jpg', 'not decodable')])
    cache.save_chunk(written)
    path, = cache.partial.glob('rows_*.npz')
    clean = path.read_bytes()
    refused = 0
    descriptor = os.open(path, os.O_WRONLY)
    for offset in range(len(clean)):
        os.pwrite(descriptor, bytes([clean[offset] ^ 0xFF]), offset)
        try:
            read = cache._read_chunk(path)
        except (_Damaged, *_UNREADABLE):
            refused += 1
        else:
            assert (read.begin, read.end, read.failed) == (0, 3, written.failed), offset
            np.testing.assert_array_equal(read.features, written.features, err_msg=f'offset {offset}')
            np.testing.assert_array_equal(read.loaded, written.loaded, err_msg=f'offset {offset}')
        os.pwrite(descriptor, clean[offset:offset + 1], offset)
    os.close(descriptor)
    assert refused > len(clean) // 2, refused


# -- the atomic write under all of it ---------------------------------------------------------

def test_write_atomically_leaves_the_old_file_or_the_whole_new_one(tmp_path):
    target = tmp_path / 'sub' / 'notes.txt'
    write_atomically(target, lambda path: Path(path).write_text('first'))
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == 'first' and target.stat().st_mode & 0o777 == 0o666 & ~umask

    def fails_half_way(path):
        Path(path).write_text('half of the sec')
        raise OSError('disk full')

    with pytest.raises(OSError, match='disk full'):
        write_atomically(target, fails_half_way)
    assert target.read_text() == 'first'
    assert os.listdir(target.parent) == ['notes.txt']       # the temporary file was removed
