"""The cats-vs-dogs bottleneck recipe: feature cache, training loop, curves, and the example end to end.

Runs on a few real photos at 71 px. Tests about plumbing (the cache, skipping bad files,
layout errors) use a randomly initialised Xception; the end-to-end run uses the real
ImageNet weights. Arrays that reach a backend (the feature extraction, the head's
training) are tested on every backend through the ``xp`` fixture.
"""
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import minixcept
from conftest import relative_error
from minixcept import layers, losses, optimizers
from minixcept.files.cache import cache_key, read_cache, weights_checksum
from minixcept.workflows.features import extract_features
from minixcept.workflows.progress import Progress, duration
from minixcept.files.images import image_folder
from minixcept.workflows.plot import TRAIN_COLOUR, VALIDATION_COLOUR, plot_history
from minixcept.workflows import catdog as recipe
from minixcept.workflows.fit import evaluate, fit

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / 'examples'
SIZE = 71                    # Xception's smallest input: the network is cheapest here
PER_CLASS = 8


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bottleneck_example():
    return load_example('catdog_bottleneck')


@pytest.fixture(scope='module')
def small_catdog(catdog, tmp_path_factory):
    """The first PER_CLASS photos of each class of train/ and validation/, copied."""
    root = tmp_path_factory.mktemp('catdog')
    for split in ('train', 'validation'):
        for name in ('cats', 'dogs'):
            (root / split / name).mkdir(parents=True)
            for photo in sorted((catdog / split / name).glob('*.jpg'))[:PER_CLASS]:
                shutil.copy2(photo, root / split / name / photo.name)
    return root


def random_base():
    """An untrained Xception without top on the current backend, the same on every call."""
    minixcept.set_seed(0)
    return minixcept.Xception(include_top=False, pooling='avg', input_shape=(SIZE, SIZE, 3))


def without_seconds(history):
    return [{name: value for name, value in epoch.items() if name != 'seconds'} for epoch in history]


def run_example(module, argv, capsys):
    """main(argv) of an example: (exit code, stdout, stderr)."""
    code = module.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the example, end to end -----------------------------------------------------------------

def test_recipe_end_to_end_with_real_weights_then_from_the_cache(bottleneck_example, small_catdog, notop_weights,
                                                                  tmp_path, capsys):
    out = tmp_path / 'out'
    argv = ['--data', small_catdog, '--image-size', SIZE, '--batch-size', 8, '--epochs', 4,
            '--weights', notop_weights, '--out', out, '--seed', 3]
    code, stdout, stderr = run_example(bottleneck_example, argv, capsys)
    assert code == 0, stderr
    report = json.loads((out / 'report.json').read_text())
    assert (report['n_train'], report['n_val'], report['n_test']) == (2 * PER_CLASS, 2 * PER_CLASS, 0)
    assert report['test_accuracy'] is None and report['skipped'] == []
    assert report['class_names'] == ['cats', 'dogs']
    assert report['cache'] == {'train': 'built', 'validation': 'built'} and report['cache_hits'] == 0
    assert report['photos_computed'] == 4 * PER_CLASS and report['feature_seconds'] > 0
    assert report['images_per_second'] == pytest.approx(4 * PER_CLASS / report['feature_seconds'], rel=1e-2)
    assert report['epochs'] == len(report['history']) == 4 and report['backend'] == 'numpy'
    assert report['image_size'] == SIZE and report['train_seconds'] >= 0
    best = report['history'][report['best_epoch'] - 1]
    assert best['val_loss'] == min(epoch['val_loss'] for epoch in report['history'])
    assert report['val_loss'] == pytest.approx(best['val_loss'], rel=1e-5)   # the best epoch's weights
    assert report['val_accuracy'] == pytest.approx(best['val_accuracy'])
    assert 'train  batch 1/' in stderr and 'photos/s' in stderr and ' left' in stderr
    assert Image.open(out / 'curves.png').size[0] > 0
    assert json.loads((out / 'head.json').read_text())['class_names'] == ['cats', 'dogs']

    # The second run reads every split back from the cache and trains to the same head.
    code, stdout, stderr = run_example(bottleneck_example, argv, capsys)
    assert code == 0, stderr
    again = json.loads((out / 'report.json').read_text())
    assert again['cache'] == {'train': 'hit', 'validation': 'hit'} and again['cache_hits'] == 2
    assert again['photos_computed'] == 0 and again['images_per_second'] is None
    assert 'read from the cache' in stderr
    assert without_seconds(again['history']) == without_seconds(report['history'])

    # The saved head, reloaded by catdog_predict, classifies as the trained one did.
    predict = load_example('catdog_predict')
    photos = sorted((small_catdog / 'validation' / 'dogs').glob('*.jpg'))[:2] + \
        sorted((small_catdog / 'validation' / 'cats').glob('*.jpg'))[:1]
    code, stdout, stderr = run_example(predict, ['--head', out / 'head.h5', '--weights', notop_weights,
                                                 *photos], capsys)
    assert code == 0, stderr
    lines = [line.split('\t') for line in stdout.strip().splitlines()]
    assert [Path(path) for path, _, _ in lines] == photos
    with h5py.File(out / 'cache' / 'validation.h5', 'r') as cache:
        rows = [list(cache['files'].asstr()[()]).index(p.relative_to(small_catdog / 'validation').as_posix())
                for p in photos]
        features = cache['features'][()][rows]
    head, _ = predict.load_head(out / 'head.h5')
    probabilities = recipe.class_probabilities(head, features)
    for (path, class_name, probability), row in zip(lines, probabilities):
        assert class_name == ['cats', 'dogs'][int(np.argmax(row))]
        assert float(probability) == pytest.approx(row.max(), abs=1e-4)


def test_cli_from_a_fresh_clone_explains_a_missing_data_folder(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    done = subprocess.run([sys.executable, str(EXAMPLES / 'catdog_bottleneck.py'), '--data',
                           str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'out')],
                          cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert 'no such folder' in done.stderr and 'Expected layout' in done.stderr
    assert 'Traceback' not in done.stderr


def test_malformed_data_folder_gets_the_layout_message(bottleneck_example, tmp_path, capsys):
    for folder in ('train/cats', 'train/dogs', 'validation/cats'):
        (tmp_path / 'data' / folder).mkdir(parents=True)
    code, _, stderr = run_example(bottleneck_example, ['--data', tmp_path / 'data', '--weights', 'random',
                                                       '--out', tmp_path / 'out'], capsys)
    assert code == 2
    assert 'Expected layout' in stderr and 'train/' in stderr and 'validation/' in stderr
    assert not (tmp_path / 'out').exists()


def photo_zoo(source_photos, root):
    """A data folder holding, besides good photos, every kind of file a real folder may hold."""
    cats, dogs = root / 'train' / 'cats', root / 'train' / 'dogs'
    for folder in (cats, dogs, root / 'validation' / 'cats', root / 'validation' / 'dogs'):
        folder.mkdir(parents=True)
    for index, photo in enumerate(source_photos[:2]):
        for folder in (dogs, root / 'validation' / 'cats', root / 'validation' / 'dogs'):
            shutil.copy(photo, folder / f'{index}.jpg')
    shutil.copy(source_photos[2], cats / 'good.jpg')
    picture = Image.open(source_photos[3])
    picture.convert('L').save(cats / 'grey.jpg')
    rgba = picture.convert('RGBA')
    rgba.putalpha(128)
    rgba.save(cats / 'rgba.png')
    picture.quantize(colors=64).save(cats / 'palette.png')
    picture.convert('CMYK').save(cats / 'cmyk.jpg')
    whole = source_photos[4].read_bytes()
    (cats / 'corrupt.jpg').write_bytes(whole[: len(whole) // 3])
    (cats / 'empty.jpg').write_bytes(b'')
    (cats / 'notes.txt').write_text('photos by the Asirra project\n')
    return root


def test_bad_photos_are_skipped_counted_and_listed(bottleneck_example, catdog, tmp_path, capsys):
    source_photos = sorted((catdog / 'train' / 'cats').glob('*.jpg'))[:5]
    data = photo_zoo(source_photos, tmp_path / 'data')
    code, _, stderr = run_example(bottleneck_example, ['--data', data, '--weights', 'random', '--image-size', SIZE,
                                                       '--epochs', 1, '--out', tmp_path / 'out'], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    bad = [str(data / 'train' / 'cats' / name) for name in ('corrupt.jpg', 'empty.jpg')]
    assert report['skipped'] == bad
    assert report['n_train'] == 5 + 2 and report['n_val'] == 4          # good, grey, RGBA, palette, CMYK + 2 dogs
    for path in bad:
        assert f'warning: skipping {path}' in stderr
    assert 'notes.txt' not in stderr + json.dumps(report)


def test_more_than_two_classes_and_a_test_split(bottleneck_example, catdog, tmp_path, capsys):
    photos = sorted((catdog / 'train' / 'dogs').glob('*.jpg'))[:6]
    data = tmp_path / 'data'
    for split in ('train', 'validation', 'test'):
        for label, name in enumerate(('ants', 'bees', 'wasps')):
            (data / split / name).mkdir(parents=True)
            for photo in photos[2 * label: 2 * label + 2]:
                shutil.copy(photo, data / split / name / photo.name)
    out = tmp_path / 'out'
    code, _, stderr = run_example(bottleneck_example, ['--data', data, '--weights', 'random', '--image-size', SIZE,
                                                       '--epochs', 2, '--out', out], capsys)
    assert code == 0, stderr
    report = json.loads((out / 'report.json').read_text())
    assert report['class_names'] == ['ants', 'bees', 'wasps']
    assert (report['n_train'], report['n_val'], report['n_test']) == (6, 6, 6)
    assert report['test_accuracy'] is not None and 0 <= report['test_accuracy'] <= 1
    assert set(report['cache']) == {'train', 'validation', 'test'}
    head, description = load_example('catdog_predict').load_head(out / 'head.h5')
    assert head.layers[-1].units == 3 and description['class_names'] == report['class_names']
    with h5py.File(out / 'cache' / 'test.h5', 'r') as cache:
        probabilities = recipe.class_probabilities(head, cache['features'][()])
    assert probabilities.shape == (6, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)


# -- the feature cache -------------------------------------------------------------------------

def interrupt_after(batches):
    """An on_batch callback that stops the run like a Ctrl-C once ``batches`` batches are stored."""
    calls = []

    def on_batch(done, total):
        calls.append(done)
        if len(calls) == batches:
            raise KeyboardInterrupt
    return on_batch


def test_an_interrupted_extraction_resumes_to_the_same_features(xp, small_catdog, tmp_path):
    base = random_base()
    folder = image_folder(small_catdog / 'train')
    key = cache_key(folder, SIZE, 'random-init-seed-0')
    quiet = dict(batch_size=4, show_progress=False, log=lambda message: None)
    uninterrupted = extract_features(base, folder, cache_file=tmp_path / 'whole' / 'train.h5', key=key, **quiet)
    assert uninterrupted.cache == 'built' and uninterrupted.features.shape == (2 * PER_CLASS, 2048)

    cache_file = tmp_path / 'cache' / 'train.h5'
    with pytest.raises(KeyboardInterrupt):
        extract_features(base, folder, cache_file=cache_file, key=key, on_batch=interrupt_after(2), **quiet)
    assert not cache_file.exists(), 'an unfinished extraction must never look like a finished cache'
    partial = Path(str(cache_file) + '.partial')
    assert sorted(p.name for p in partial.glob('rows_*.npz')) == ['rows_000000_000004.npz',
                                                                  'rows_000004_000008.npz']
    (partial / '.rows_000008_000012.npz.x1y2.tmp').write_bytes(b'half a batch')   # killed while writing

    messages = []
    resumed = extract_features(base, folder, cache_file=cache_file, key=key, **dict(quiet, log=messages.append))
    assert resumed.cache == 'resumed' and resumed.photos_computed == 8
    assert any('8 of 16 photos already done' in m for m in messages)
    np.testing.assert_array_equal(resumed.features, uninterrupted.features)
    np.testing.assert_array_equal(resumed.labels, uninterrupted.labels)
    assert resumed.files == uninterrupted.files == folder.files
    assert cache_file.exists() and not partial.exists()

    hit = extract_features(base, folder, cache_file=cache_file, key=key, **quiet)
    assert hit.cache == 'hit' and hit.photos_computed == 0
    np.testing.assert_array_equal(hit.features, uninterrupted.features)
    assert hit.files == folder.files and hit.class_names == ['cats', 'dogs']


def test_extraction_through_the_plain_layers_gives_the_same_features(small_catdog):
    """fast=False (what benchmarks/extraction.py compares against) runs the plain layers: the
    same photos, the same features to float32 rounding."""
    base = random_base()
    folder = image_folder(small_catdog / 'validation').limit(3)
    quiet = dict(batch_size=4, show_progress=False, log=lambda message: None)
    engine = extract_features(base, folder, **quiet)
    plain = extract_features(base, folder, fast=False, **quiet)
    assert plain.files == engine.files and len(plain.files) == 6
    assert relative_error(engine.features, plain.features) <= 1e-5


def test_a_changed_photo_or_size_changes_the_key_and_the_cache_is_rebuilt(small_catdog, tmp_path):
    base = random_base()
    folder = image_folder(small_catdog / 'validation').limit(2)
    key = cache_key(folder, SIZE, 'random-init-seed-0')
    assert cache_key(folder, SIZE + 1, 'random-init-seed-0') != key
    assert cache_key(folder, SIZE, 'sha256:0123') != key
    cache_file = tmp_path / 'validation.h5'
    quiet = dict(batch_size=4, show_progress=False)
    extract_features(base, folder, cache_file=cache_file, key=key, log=lambda m: None, **quiet)

    photo = folder.files[1]
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))      # "edited" a second later
    try:
        new_key = cache_key(folder, SIZE, 'random-init-seed-0')
        assert new_key != key
        messages = []
        rebuilt = extract_features(base, folder, cache_file=cache_file, key=new_key, log=messages.append, **quiet)
    finally:
        os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert rebuilt.cache == 'rebuilt' and rebuilt.photos_computed == 4
    assert any('key mismatch' in m and 'rebuilding' in m for m in messages)
    with h5py.File(cache_file, 'r') as f:
        assert f.attrs['key'] == new_key


def test_a_damaged_cache_file_is_never_read_back(small_catdog, tmp_path):
    base = random_base()
    folder = image_folder(small_catdog / 'validation').limit(1)
    key = cache_key(folder, SIZE, 'random-init-seed-0')
    cache_file = tmp_path / 'validation.h5'
    quiet = dict(batch_size=4, show_progress=False, log=lambda m: None)
    built = extract_features(base, folder, cache_file=cache_file, key=key, **quiet)

    with h5py.File(cache_file, 'a') as f:           # as if the last attribute had not been written
        del f.attrs['complete']
    assert read_cache(cache_file, key, folder, log=lambda m: None) is None
    whole = extract_features(base, folder, cache_file=cache_file, key=key, **quiet)
    assert whole.cache == 'rebuilt'

    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 2])  # cut short
    messages = []
    assert read_cache(cache_file, key, folder, log=messages.append) is None
    assert 'unreadable' in messages[0]
    again = extract_features(base, folder, cache_file=cache_file, key=key, **quiet)
    assert again.cache == 'rebuilt'
    np.testing.assert_array_equal(again.features, built.features)


def test_the_weights_checksum_is_computed_once_per_version_of_the_file(tmp_path):
    import hashlib
    weights = tmp_path / 'weights.h5'
    weights.write_bytes(b'not really weights')
    assert weights_checksum(weights, tmp_path / 'memo') == hashlib.sha256(b'not really weights').hexdigest()
    memo_file = tmp_path / 'memo' / 'weights_sha256.json'
    memo = json.loads(memo_file.read_text())
    memo[str(weights.resolve())]['sha256'] = 'remembered'
    memo_file.write_text(json.dumps(memo))
    assert weights_checksum(weights, tmp_path / 'memo') == 'remembered'       # not hashed again
    weights.write_bytes(b'other weights, other size')
    assert weights_checksum(weights, tmp_path / 'memo') == hashlib.sha256(b'other weights, other size').hexdigest()


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_updating_line_on_a_terminal_and_a_line_per_write_in_a_log():
    log = io.StringIO()
    progress = Progress(log, batches=10, photos=100, interval=0, label='train', done=20)
    for batch in range(3, 11):
        progress.update(batch, 10 * batch)
    progress.finish(10, 100)
    lines = log.getvalue().splitlines()
    assert len(lines) == 9                                   # batches 3 to 10, and the last
    assert lines[0].startswith('train  batch 3/10  ') and lines[-1].endswith('photos/s  0:00 left')

    terminal = FakeTerminal()
    progress = Progress(terminal, batches=10, photos=100, interval=0, label='train')
    for batch in (4, 10):
        progress.update(batch, 10 * batch)
    progress.finish(10, 100)
    text = terminal.getvalue()
    assert text.count('\r') == 3 and text.count('\n') == 1 and 'batch 4/10' in text


def test_time_left_is_written_one_way():
    assert [duration(s) for s in (0, 59.6, 61, 3600 + 62, float('inf'), float('nan'))] == \
        ['0:00', '1:00', '1:01', '1:01:02', '?', '?']


# -- training the head -------------------------------------------------------------------------

def small_head(outputs, seed=0):
    minixcept.set_seed(seed)
    return minixcept.Sequential([layers.Dense(32, activation='relu', name='hidden'),
                                 layers.Dropout(0.5, seed=seed, name='dropout'),
                                 layers.Dense(outputs, name='logits')], input_shape=(20,))


def blobs(rng, classes, per_class):
    centres = rng.normal(0, 3, (classes, 20))
    x = np.concatenate([centres[k] + rng.normal(0, 1, (per_class, 20)) for k in range(classes)])
    return x.astype(np.float32), np.repeat(np.arange(classes), per_class)


@pytest.mark.parametrize('classes', [2, 3])
def test_fit_learns_separable_classes(xp, rng, classes):
    x, y = blobs(rng, classes, 60)
    loss = losses.BinaryCrossentropy(from_logits=True) if classes == 2 else \
        losses.SparseCategoricalCrossentropy(from_logits=True)
    head = small_head(1 if classes == 2 else classes)
    history = fit(head, x[::2], y[::2], loss, optimizers.Adam(1e-2), epochs=10, batch_size=16,
                  validation_data=(x[1::2], y[1::2]), log=None)
    assert history.metric('val_loss')[-1] < history.metric('val_loss')[0]
    assert evaluate(head, x[1::2], y[1::2], loss)['accuracy'] >= 0.95


def test_fit_keeps_the_epoch_with_the_lowest_validation_loss(xp, rng):
    x = rng.normal(0, 1, (40, 20)).astype(np.float32)
    y = rng.integers(0, 2, 40)                  # labels of pure noise: the head can only overfit
    loss = losses.BinaryCrossentropy(from_logits=True)
    head = small_head(1)
    lines = []
    history = fit(head, x[:20], y[:20], loss, optimizers.Adam(3e-2), epochs=12, batch_size=5,
                  validation_data=(x[20:], y[20:]), seed=1, log=lines.append)
    val_losses = history.metric('val_loss')
    assert history.best_epoch == int(np.argmin(val_losses)) + 1 < 12
    assert evaluate(head, x[20:], y[20:], loss)['loss'] == pytest.approx(min(val_losses), rel=1e-5)
    assert len(lines) == 12 and lines[history.best_epoch - 1].endswith('*')

    again = fit(small_head(1), x[:20], y[:20], loss, optimizers.Adam(3e-2), epochs=12, batch_size=5,
                validation_data=(x[20:], y[20:]), seed=1, log=None)
    assert again.metric('val_loss') == pytest.approx(val_losses, rel=1e-6)    # a seed gives the same run


def test_plot_history_draws_both_curves_in_both_panels(tmp_path):
    epochs = [{'epoch': e, 'loss': 1 / e, 'accuracy': 1 - 0.4 / e, 'val_loss': 0.9 / e + 0.02 * e,
               'val_accuracy': 1 - 0.3 / e} for e in range(1, 9)]
    path = plot_history(epochs, tmp_path / 'curves.png', title='test')
    pixels = np.asarray(Image.open(path).convert('RGB'))
    half = pixels.shape[1] // 2
    for panel in (pixels[:, :half], pixels[:, half:]):
        for colour in (TRAIN_COLOUR, VALIDATION_COLOUR):
            assert np.all(panel == colour, axis=-1).sum() > 50, f'no {colour} curve in a panel'
