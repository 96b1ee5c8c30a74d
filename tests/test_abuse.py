"""Careless and unlucky use: every wrong turn ends in a clear error or a stated skip, and
nothing on disk is damaged or silently wrong.

The runs are tiny: a few generated photos at 71 px through a randomly initialised Xception
(the examples' ``--weights random``). The examples run in-process through their ``main(argv)``;
only what must happen at import time (the backend chosen by the environment) runs in a
subprocess. After each refused run the test checks what is on disk: nothing created, nothing
overwritten.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minixcept
from minixcept import gradcheck, layers
from minixcept.files.paths import OutputPathError, check_output_paths
from minixcept.workflows import cli
from minixcept.workflows.fit import evaluate, fit
from test_catdog import load_example, run_example

REPO = Path(__file__).resolve().parents[1]
SIZE = 71
ARGUMENT_ERROR = 2          # argparse's exit status for a refused argument


# -- helpers -------------------------------------------------------------------------------------

def save_photo(path, seed, size=(48, 40)):
    """A random RGB photo (a JPEG or PNG by the extension)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_data(root, per_class=2, classes=('cats', 'dogs'), splits=('train', 'validation')):
    """root/split/class/N.jpg, random photos; returns root."""
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                save_photo(root / split / name / f'{index}.jpg', seed=100 * s + 10 * c + index)
    return root


def corrupt(path):
    """Replace a photo by its first third (a truncated download)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


def tree(root):
    """{relative path: sha256} of every file under root: what a run must not have touched."""
    root = Path(root)
    if not root.exists():
        return None
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def strict_json(path):
    """The JSON in ``path``, refusing the bare NaN / Infinity that are not JSON."""
    def refuse(word):
        raise ValueError(f'{path}: {word} is not JSON')
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.fixture
def read_only(tmp_path):
    """read_only(folder): make a folder unwritable even for root (chattr +i), or skip saying why."""
    locked = []

    def lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):            # root ignores permission bits: try the immutable flag
            done = subprocess.run(['chattr', '+i', str(folder)], capture_output=True) \
                if shutil.which('chattr') else None
            if done is None or done.returncode != 0:
                folder.chmod(0o755)
                pytest.skip('cannot make a folder read-only here (running as root without chattr +i)')
        locked.append(folder)
        return folder
    yield lock
    for folder in locked:
        if shutil.which('chattr'):
            subprocess.run(['chattr', '-i', str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.fixture(scope='module')
def bottleneck():
    return load_example('catdog_bottleneck')


@pytest.fixture(scope='module')
def predict():
    return load_example('catdog_predict')


@pytest.fixture(scope='module')
def finetune():
    return load_example('catdog_finetune')


def quick(data, out, *more):
    """Arguments of a quick bottleneck run: random base, 71 px, one epoch."""
    return ['--data', data, '--weights', 'random', '--image-size', SIZE, '--epochs', 1, '--batch-size', 4,
            '--out', out, *more]


@pytest.fixture(scope='module')
def trained(bottleneck, tmp_path_factory):
    """A data folder and a head trained on it by catdog_bottleneck.py (random base): (data, out)."""
    root = tmp_path_factory.mktemp('trained')
    data = make_data(root / 'data', per_class=3)
    code = bottleneck.main([str(a) for a in quick(data, root / 'out', '--epochs', 2)])
    assert code == 0
    return data, root / 'out'


# -- arguments: refused by argparse before any work -------------------------------------------------

REFUSED = [
    ('catdog_bottleneck', '--batch-size', '-1'),     # looped zero times, wrote complete empty caches
    ('catdog_bottleneck', '--batch-size', '0'),
    ('catdog_bottleneck', '--batch-size', '2.5'),
    ('catdog_bottleneck', '--limit', '-1'),          # sliced [:-1]: dropped each class's last photo
    ('catdog_bottleneck', '--limit', '0'),
    ('catdog_bottleneck', '--epochs', '0'),          # IndexError in History.best
    ('catdog_bottleneck', '--epochs', '-3'),
    ('catdog_bottleneck', '--image-size', '70'),
    ('catdog_bottleneck', '--image-size', 'big'),
    ('catdog_bottleneck', '--seed', '-1'),
    ('catdog_bottleneck', '--weights', 'MISSING'),
    ('catdog_bottleneck', '--weights', 'FOLDER'),
    ('catdog_finetune', '--batch-size', '0'),
    ('catdog_finetune', '--epochs', '0'),
    ('catdog_finetune', '--limit', '-1'),
    ('catdog_finetune', '--learning-rate', '0'),
    ('catdog_finetune', '--learning-rate', '-0.001'),
    ('catdog_finetune', '--learning-rate', 'nan'),
    ('catdog_finetune', '--learning-rate', 'inf'),
    ('catdog_finetune', '--image-size', '12'),
    ('catdog_predict', '--batch-size', '-1'),
    ('catdog_predict', '--batch-size', '0'),
    ('catdog_predict', '--weights', 'MISSING'),
    ('catdog_explain', '--samples', '0'),
    ('catdog_explain', '--noise', '-0.1'),
    ('catdog_explain', '--panel', '-5'),
    ('catdog_explain', '--weights', 'MISSING'),
    ('separable_cost', '--kernel', '0'),
    ('separable_cost', '--batch', '-2'),
    ('separable_cost', '--network-size', '32'),
]


@pytest.mark.parametrize('example, option, value', REFUSED, ids=[' '.join(case) for case in REFUSED])
def test_a_bad_argument_is_refused_before_any_work(example, option, value, tmp_path, capsys):
    value = {'MISSING': str(tmp_path / 'nowhere.h5'), 'FOLDER': str(tmp_path)}.get(value, value)
    data = tmp_path / 'data'                       # never looked at: the arguments come first
    out = tmp_path / 'out'
    photo = [str(tmp_path / 'photo.jpg')]
    argv = ({'catdog_predict': photo, 'catdog_explain': photo + ['--out', str(out)], 'separable_cost': []}
            .get(example, ['--data', str(data), '--out', str(out)]) + [option, value])
    with pytest.raises(SystemExit) as stop:
        load_example(example).main(argv)
    assert stop.value.code == ARGUMENT_ERROR
    stderr = capsys.readouterr().err
    assert f'argument {option}' in stderr and 'Traceback' not in stderr
    assert not out.exists()


def help_entries(text):
    """{first option string: its whole --help entry, on one line} for each option --help lists."""
    options = re.split(r'^(?:options|optional arguments):$', text, maxsplit=1, flags=re.M)[1]
    entries, current = {}, None
    for line in options.splitlines():
        start = re.match(r'  (-[^\s,]+)', line)
        if start:
            current = start.group(1)
            entries[current] = line
        elif current and line.strip():
            entries[current] += ' ' + line
    return entries


def squashed(text):
    """``text`` without whitespace: --help wraps its lines anywhere, even inside a long path."""
    return ''.join(text.split())


def test_finetune_help_shows_every_options_default(finetune, capsys):
    with pytest.raises(SystemExit) as stop:
        finetune.parse_args(['--help'])
    assert stop.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    options = [action for action in finetune.build_parser()._actions if action.dest != 'help']
    assert len(options) >= 17
    for action in options:
        entry = squashed(entries[action.option_strings[0]])
        if action.default is None:       # worked out at run time: the help says what in words, not 'None'
            assert '(default:' in entry and '(default:None)' not in entry, (
                f'{action.option_strings[0]}: its --help does not say its default in words')
        else:
            shown = squashed(f'(default: {action.default})')
            assert shown in entry, f'{action.option_strings[0]}: its --help does not show {shown}'


def test_finetune_defaults_are_those_the_readme_figures_were_measured_with(finetune):
    args = finetune.parse_args([])
    assert (args.train_from, args.augment, args.bn_statistics, args.fast, args.optimizer) == (
        'block14', True, 'moving', True, 'sgd')
    assert args.learning_rate == 1e-4
    readme = ' '.join((REPO / 'README.md').read_text().split())
    assert ('`examples/catdog_finetune.py` with its defaults (block 14 and the head trained on augmented photos, '
            f'SGD 1e-4 with momentum 0.9, batch {args.batch_size}, {args.epochs} epochs,' in readme)


@pytest.mark.parametrize('text, refused', [('1', False), ('0', True), ('-5', True), ('3.0', True), ('', True)])
def test_positive_int_type(text, refused):
    if refused:
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_int(text)
    else:
        assert cli.positive_int(text) == 1


def test_a_huge_image_size_is_refused_naming_the_size_and_the_batch_before_allocating(bottleneck, tmp_path,
                                                                                      capsys):
    data = make_data(tmp_path / 'data')
    code, _, stderr = run_example(bottleneck, quick(data, tmp_path / 'out', '--image-size', 200_000,
                                                    '--batch-size', 8), capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert '--image-size 200000 with --batch-size 8' in stderr and 'a batch of 4 photos' in stderr
    assert not (tmp_path / 'out').exists()


def test_the_memory_check_passes_what_fits_and_refuses_what_does_not():
    assert cli.batch_memory(299, 32) < 2**30                      # the default run: under a GiB
    cli.check_batch_memory(299, 32, available=2**31)
    with pytest.raises(cli.RunError, match='--image-size 299 with --batch-size 32 .* a batch of 32 photos'):
        cli.check_batch_memory(299, 32, available=2**20)
    cli.check_batch_memory(299, 10_000, photo_count=8, available=2**30)     # a batch is never more than the photos


# -- output paths: checked up front, before extraction ----------------------------------------------

def test_a_read_only_out_folder_is_refused_before_extraction(bottleneck, read_only, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    out = read_only(tmp_path / 'locked')
    code, stdout, stderr = run_example(bottleneck, quick(data, out), capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert f'{out}: the --out folder cannot be written' in stderr
    assert 'photos' not in stdout                   # refused before the photos were even listed
    assert tree(out) == {}


def test_an_out_folder_under_a_read_only_folder_is_refused(bottleneck, read_only, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    locked = read_only(tmp_path / 'locked')
    code, _, stderr = run_example(bottleneck, quick(data, locked / 'run' / 'out'), capsys)
    assert code == 1 and f'cannot be written (in {locked})' in stderr
    assert tree(locked) == {}


@pytest.mark.parametrize('which', ['--out', '--cache', '--report'])
def test_an_output_path_that_is_the_wrong_kind_is_refused(which, bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    existing = tmp_path / 'existing'
    if which == '--report':
        existing.mkdir()                             # a report path that is a folder
    else:
        existing.write_text('precious\n')            # a folder path that is a file
    before = tree(existing)
    argv = quick(data, existing) if which == '--out' else quick(data, tmp_path / 'out', which, existing)
    code, _, stderr = run_example(bottleneck, argv, capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert str(existing) in stderr and ('is a file' in stderr or 'is a folder' in stderr)
    assert tree(existing) == before and not (tmp_path / 'out').exists()


def test_an_out_folder_below_a_file_is_refused(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(OutputPathError, match=f'{tmp_path / "file"} is a file'):
        check_output_paths(folders={'--out folder': tmp_path / 'file' / 'a' / 'b'})


def test_the_output_check_creates_nothing(tmp_path):
    check_output_paths(folders={'out': tmp_path / 'a' / 'b'}, files={'report': tmp_path / 'c' / 'r.json'})
    assert list(tmp_path.iterdir()) == []


def test_explain_refuses_an_out_that_is_a_file_and_a_head_of_another_base(trained, notop_weights, tmp_path,
                                                                         capsys):
    data, out = trained
    explain = load_example('catdog_explain')
    photo = data / 'validation' / 'cats' / '0.jpg'
    target = tmp_path / 'taken'
    target.write_text('precious\n')
    code, _, stderr = run_example(explain, ['--head', out / 'head.h5', '--weights', 'random', '--out', target,
                                            photo], capsys)
    assert code == 1 and 'is a file, not a folder' in stderr and target.read_text() == 'precious\n'
    code, _, stderr = run_example(explain, ['--head', out / 'head.h5', '--weights', notop_weights,
                                            '--out', tmp_path / 'pictures', photo], capsys)
    assert code == 1 and 'the head was trained on the base weights random-init-seed-0' in stderr
    assert not (tmp_path / 'pictures').exists()


def test_finetune_refuses_an_out_that_is_a_file(finetune, trained, tmp_path, capsys):
    data, out = trained
    target = tmp_path / 'taken'
    target.write_text('precious\n')
    code, _, stderr = run_example(finetune, ['--data', data, '--head', out / 'head.h5', '--weights', 'random',
                                             '--out', target, '--epochs', 1], capsys)
    assert code == 1 and 'is a file, not a folder' in stderr
    assert target.read_text() == 'precious\n'


@pytest.mark.parametrize('kind', ['file', 'read-only'])
def test_fetch_refuses_a_dest_it_cannot_write_before_downloading(kind, read_only, tmp_path, capsys):
    from minixcept.files.fetch import main as fetch_main
    dest = tmp_path / 'dest'
    if kind == 'file':
        dest.write_text('precious\n')
    else:
        read_only(dest)
    code = fetch_main(['--dest', str(dest), '--quiet'])
    stderr = capsys.readouterr().err
    assert code == 1 and str(dest) in stderr and 'Traceback' not in stderr
    assert 'Downloading' not in stderr
    if kind == 'file':
        assert dest.read_text() == 'precious\n'
    else:
        assert tree(dest) == {}


def test_fetch_through_weights_fetch_py_refuses_a_file_as_dest(tmp_path):
    dest = tmp_path / 'dest'
    dest.write_text('precious\n')
    done = subprocess.run([sys.executable, str(REPO / 'weights' / 'fetch.py'), '--dest', str(dest)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert f'{dest}: the weights folder is a file' in done.stderr
    assert dest.read_text() == 'precious\n'


# -- the trained head and its description -----------------------------------------------------------

def copy_head(out, tmp_path):
    """head.h5 + head.json copied to tmp_path/head, to be damaged there."""
    target = tmp_path / 'head'
    target.mkdir()
    for name in ('head.h5', 'head.json'):
        shutil.copy(out / name, target / name)
    return target / 'head.h5'


DAMAGED_DESCRIPTIONS = {
    'not JSON': lambda text: text[: len(text) // 2],
    'empty': lambda text: '',
    'a list': lambda text: '[1, 2]',
    'no class names': lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != 'class_names'}),
    'one class': lambda text: json.dumps(dict(json.loads(text), class_names=['cats'])),
    'image size a string': lambda text: json.dumps(dict(json.loads(text), image_size='299')),
    'image size too small': lambda text: json.dumps(dict(json.loads(text), image_size=8)),
    'feature size negative': lambda text: json.dumps(dict(json.loads(text), feature_dim=-1)),
}


@pytest.mark.parametrize('damage', DAMAGED_DESCRIPTIONS, ids=list(DAMAGED_DESCRIPTIONS))
def test_a_damaged_head_json_is_a_clear_error(damage, predict, trained, tmp_path, capsys):
    data, out = trained
    head_file = copy_head(out, tmp_path)
    description = head_file.with_suffix('.json')
    description.write_text(DAMAGED_DESCRIPTIONS[damage](description.read_text()))
    code, stdout, stderr = run_example(predict, ['--head', head_file, '--weights', 'random',
                                                 data / 'validation' / 'cats' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and 'Traceback' not in stderr
    assert f'{description}:' in stderr


def test_predict_refuses_a_head_trained_on_another_base(predict, trained, notop_weights, capsys):
    data, out = trained                 # trained on the random base; the ImageNet weights are another
    code, stdout, stderr = run_example(predict, ['--head', out / 'head.h5', '--weights', notop_weights,
                                                 data / 'validation' / 'cats' / '0.jpg'], capsys)
    assert code == 1 and stdout == ''
    assert 'the head was trained on the base weights random-init-seed-0' in stderr
    assert 'sha256:' in stderr and '--weights' in stderr


def resaved_head(out, tmp_path, **changes):
    """The head trained in ``out`` saved again as a whole pair (head.h5 + head.json of one run)
    into tmp_path/resaved, with ``changes`` to its description."""
    from minixcept.workflows.catdog import load_head, save_head_files
    head, description = load_head(out / 'head.h5')
    target = tmp_path / 'resaved' / 'head.h5'
    target.parent.mkdir()
    save_head_files(head, dict(description, **changes), target)
    return target


def test_predict_refuses_a_base_whose_checksum_differs_from_head_json(predict, trained, tmp_path, capsys):
    data, out = trained
    head_file = resaved_head(out, tmp_path, base_weights='sha256:' + '0' * 64)
    code, stdout, stderr = run_example(predict, ['--head', head_file, '--weights', 'random',
                                                 data / 'validation' / 'cats' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and 'trained on the base weights sha256:000' in stderr


def test_predict_prints_each_batch_as_it_goes_and_survives_a_batch_of_bad_photos(predict, trained, tmp_path,
                                                                               capsys):
    data, out = trained
    bad = [tmp_path / 'bad0.jpg', tmp_path / 'bad1.jpg']
    bad[0].write_bytes(b'')
    bad[1].write_text('not a photo')
    good = sorted((data / 'validation' / 'dogs').glob('*.jpg'))[:2]
    code, stdout, stderr = run_example(predict, ['--head', out / 'head.h5', '--weights', 'random',
                                                 '--batch-size', 2, *bad, *good], capsys)
    assert code == 1                                   # some photos failed
    assert [Path(line.split('\t')[0]) for line in stdout.splitlines()] == good
    for path in bad:
        assert f'{path}: skipped' in stderr
    assert ' at 0x' not in stderr


def test_predict_loses_no_result_already_printed_when_a_later_batch_fails(predict, trained, monkeypatch, capsys):
    data, out = trained
    photos = sorted((data / 'validation' / 'cats').glob('*.jpg'))
    calls = []
    real = predict.bottleneck_features

    def fail_on_second_batch(base, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise MemoryError('the second batch')
        return real(base, pixels)
    monkeypatch.setattr(predict, 'bottleneck_features', fail_on_second_batch)
    with pytest.raises(MemoryError):
        predict.main([str(a) for a in ['--head', out / 'head.h5', '--weights', 'random', '--batch-size', 2, *photos]])
    printed = capsys.readouterr().out.splitlines()
    assert [Path(line.split('\t')[0]) for line in printed] == photos[:2]


# -- photos that fail ---------------------------------------------------------------------------------

def test_a_class_whose_every_photo_fails_stops_with_an_error_naming_it(bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    for photo in (data / 'train' / 'cats').glob('*.jpg'):
        corrupt(photo)
    out = tmp_path / 'out'
    code, _, stderr = run_example(bottleneck, quick(data, out), capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert 'error: train/cats: none of its photos could be decoded (cannot be decoded' in stderr
    assert not (out / 'head.h5').exists() and not (out / 'report.json').exists()


def test_finetune_stops_when_a_validation_class_has_no_decodable_photo(finetune, trained, tmp_path, capsys):
    _, out = trained
    data = make_data(tmp_path / 'data')
    for photo in (data / 'validation' / 'dogs').glob('*.jpg'):
        corrupt(photo)
    code, _, stderr = run_example(finetune, ['--data', data, '--head', out / 'head.h5', '--weights', 'random',
                                             '--out', tmp_path / 'ft', '--epochs', 1, '--no-augment'], capsys)
    assert code == 1 and 'Traceback' not in stderr          # was a ZeroDivisionError in evaluate
    assert 'validation/dogs: none of its photos could be decoded' in stderr
    assert not (tmp_path / 'ft').exists()


def test_skip_reasons_name_no_memory_address(tmp_path):
    from minixcept.files.images import load_batch
    (tmp_path / 'text.jpg').write_text('not a photo at all')
    _, loaded, failures = load_batch([tmp_path / 'text.jpg'], SIZE)
    assert loaded == [] and len(failures) == 1
    assert failures[0][1] == 'cannot be decoded (UnidentifiedImageError: not in a format Pillow can read)'


def test_a_decompression_bomb_is_skipped_before_it_is_decoded(tmp_path, monkeypatch):
    from minixcept.files.images import load_batch
    save_photo(tmp_path / 'bomb.png', seed=0, size=(48, 40))
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)       # 48 x 40 = 1920 pixels is a bomb now
    _, loaded, failures = load_batch([tmp_path / 'bomb.png'], SIZE)
    assert loaded == [] and '48 x 40 pixels, more than the 1,000 Pillow decodes safely' in failures[0][1]


# -- training that diverges ----------------------------------------------------------------------------

@pytest.mark.filterwarnings('ignore::RuntimeWarning')     # the overflows that make the NaN
def test_finetuning_that_diverges_keeps_the_start_writes_valid_json_and_exits_non_zero(finetune, trained,
                                                                                      tmp_path, capsys):
    data, out = trained
    ft = tmp_path / 'ft'
    ft.mkdir()
    (ft / 'xception_finetuned.h5').write_bytes(b'a better start, saved earlier')
    code, _, stderr = run_example(finetune, ['--data', data, '--head', out / 'head.h5', '--weights', 'random',
                                             '--out', ft, '--epochs', 2, '--batch-size', 3, '--no-augment',
                                             '--learning-rate', 1e6], capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert 'fine-tuning stopped, the' in stderr and 'nothing saved' in stderr
    report = strict_json(ft / 'report.json')                   # bare NaN before
    assert report['stopped'] and report['best_epoch'] is None
    assert report['val_loss'] == pytest.approx(report['val_loss_before'])   # the start's weights are back
    assert (ft / 'xception_finetuned.h5').read_bytes() == b'a better start, saved earlier'
    assert not (ft / 'head_finetuned.h5').exists()


class Exploding:
    """A loss that is fine for ``finite_calls`` forward passes, then NaN (a model that diverged)."""

    def __init__(self, finite_calls):
        from minixcept import losses
        self.inner, self.calls, self.finite_calls = losses.BinaryCrossentropy(from_logits=True), 0, finite_calls
        self.from_logits = True

    def forward(self, outputs, labels):
        self.calls += 1
        value = self.inner.forward(outputs, labels)
        return value if self.calls <= self.finite_calls else value * np.nan

    def backward(self):
        return self.inner.backward()


def small_head(seed=0):
    minixcept.set_seed(seed)
    return minixcept.Sequential([layers.Dense(4, activation='relu'), layers.Dense(1)], input_shape=(3,))


def test_fit_stops_on_a_nan_loss_and_keeps_the_best_finite_epoch(rng):
    from minixcept import optimizers
    x, y = rng.standard_normal((8, 3)), (rng.random(8) > 0.5).astype(np.int64)
    head = small_head()
    # 2 batches + 1 validation pass per epoch: epochs 1 and 2 finite, epoch 3's first batch NaN
    history = fit(head, x, y, Exploding(finite_calls=6), optimizers.SGD(0.1), epochs=5, batch_size=4,
                  validation_data=(x, y), log=None)
    assert history.stopped == 'the training loss became nan in epoch 3'
    assert len(history.epochs) == 2 and history.best_epoch in (1, 2)
    assert all(np.isfinite(w).all() for w in head.get_weights())


def test_fit_without_a_finite_epoch_gives_back_the_starting_weights(rng):
    from minixcept import optimizers
    x, y = rng.standard_normal((8, 3)), (rng.random(8) > 0.5).astype(np.int64)
    head = small_head()
    start = [w.copy() for w in head.get_weights()]
    history = fit(head, x, y, Exploding(finite_calls=1), optimizers.SGD(0.1), epochs=3, batch_size=4, log=None)
    assert history.stopped and history.best_epoch is None and history.best is None
    for now, before in zip(head.get_weights(), start):
        np.testing.assert_array_equal(now, before)


@pytest.mark.parametrize('epochs, batch_size, n', [(0, 4, 8), (-1, 4, 8), (2, 0, 8), (2, -4, 8), (2, 4, 0)])
def test_fit_refuses_nothing_to_do(epochs, batch_size, n, rng):
    from minixcept import losses, optimizers
    head = small_head()
    start = [w.copy() for w in head.get_weights()]
    with pytest.raises(ValueError, match='fit: '):
        fit(head, rng.standard_normal((n, 3)), np.zeros(n, np.int64), losses.BinaryCrossentropy(from_logits=True),
            optimizers.SGD(0.1), epochs=epochs, batch_size=batch_size, log=None)
    for now, before in zip(head.get_weights(), start):
        np.testing.assert_array_equal(now, before)


def test_evaluate_on_no_examples_is_a_clear_error():
    from minixcept import losses
    with pytest.raises(ValueError, match='no examples'):             # was a ZeroDivisionError
        evaluate(small_head(), np.zeros((0, 3)), np.zeros(0, np.int64), losses.BinaryCrossentropy(from_logits=True))


def test_json_reports_hold_null_for_numbers_that_are_not_finite(tmp_path):
    path = cli.write_json(tmp_path / 'r.json', {'loss': float('nan'), 'history': [{'val': float('inf')}, 1.5],
                                                'pair': (float('-inf'), 2)})
    assert strict_json(path) == {'loss': None, 'history': [{'val': None}, 1.5], 'pair': [None, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ['r.json']         # no temporary file left


# -- the backend chosen by the environment ----------------------------------------------------------

def run_python(args, backend_choice, cwd):
    env = dict(os.environ, MINIXCEPT_BACKEND=backend_choice, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize('choice', ['cupy', 'tpu'])
def test_a_bad_backend_in_the_environment_does_not_break_import_help_or_an_explicit_backend(choice, tmp_path):
    if choice == 'cupy' and minixcept.backend.gpu_available():
        pytest.skip('CuPy and a GPU are here: MINIXCEPT_BACKEND=cupy is a good choice on this machine')
    imported = run_python(['-c', 'import minixcept, minixcept.workflows.fit; print("imported")'], choice, tmp_path)
    assert imported.returncode == 0 and imported.stdout.strip() == 'imported', imported.stderr
    example = REPO / 'examples' / 'catdog_bottleneck.py'
    helped = run_python([example, '--help'], choice, tmp_path)
    assert helped.returncode == 0 and '--batch-size' in helped.stdout
    data = make_data(tmp_path / 'data', per_class=1)
    chosen = run_python([example, *quick(data, tmp_path / 'out'), '--backend', 'numpy'], choice, tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert strict_json(tmp_path / 'out' / 'report.json')['backend'] == 'numpy'
    refused = run_python([example, *quick(data, tmp_path / 'out2')], choice, tmp_path)
    assert refused.returncode == 1 and 'Traceback' not in refused.stderr
    assert f'error: MINIXCEPT_BACKEND={choice}:' in refused.stderr
    assert not (tmp_path / 'out2').exists()


# -- misuse of the model and of gradcheck -------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_model():
    minixcept.set_seed(0)
    return minixcept.Sequential([layers.Conv2D(4, 3, name='conv'), layers.BatchNormalization(name='bn'),
                                 layers.GlobalAveragePooling2D(name='pool')], input_shape=(8, 8, 3), name='tiny')


@pytest.mark.parametrize('dtype', [np.uint8, np.int64, np.bool_])
def test_forward_on_integer_pixels_says_to_call_preprocess_input(tiny_model, dtype):
    with pytest.raises(TypeError, match=f"model 'tiny' expects floating-point input, got {np.dtype(dtype)}.*"
                                        'preprocess_input'):
        tiny_model.forward(np.zeros((2, 8, 8, 3), dtype))


def test_forward_on_preprocessed_pixels_works(tiny_model):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert tiny_model.forward(minixcept.preprocess_input(pixels)).shape == (2, 4)


@pytest.mark.parametrize('dy_shape', [(2, 5), (3, 4), (2,), (2, 4, 1)])
def test_backward_with_a_wrongly_shaped_dy_names_the_expected_shape(tiny_model, dy_shape):
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    tiny_model.forward(x, training=True)
    before = [w.copy() for w in tiny_model.get_weights()]
    with pytest.raises(minixcept.ShapeError, match=r"backward expects dy of the last forward's output shape "
                                                   rf"\(2, 4\), got \({dy_shape[0]},"):
        tiny_model.backward(np.ones(dy_shape, np.float32))
    for now, then in zip(tiny_model.get_weights(), before):
        np.testing.assert_array_equal(now, then)


def test_backward_before_any_forward_is_a_clear_error():
    minixcept.set_seed(0)
    model = minixcept.Sequential([layers.Dense(2)], input_shape=(3,), name='fresh')
    with pytest.raises(RuntimeError, match="model 'fresh': backward needs a forward pass first"):
        model.backward(np.ones((1, 2), np.float32))


def layer_state(layer):
    """Everything check_layer could change: attribute identities, dtype, params, grads, cache."""
    return {'attributes': {name: id(value) for name, value in vars(layer).items()},
            'dtype': layer.dtype, 'params': {name: (id(a), a.dtype, a.copy()) for name, a in layer.params.items()},
            'grads': dict(layer.grads), 'cache': layer._cache}


def assert_same_state(layer, state):
    now = layer_state(layer)
    assert now['attributes'] == state['attributes'] and now['dtype'] == state['dtype']
    assert now['grads'].keys() == state['grads'].keys()
    assert all(now['grads'][k] is state['grads'][k] for k in state['grads']) and now['cache'] is state['cache']
    for name, (identity, dtype, values) in state['params'].items():
        assert now['params'][name][:2] == (identity, dtype), name
        np.testing.assert_array_equal(now['params'][name][2], values)


@pytest.mark.parametrize('training', [False, True])
def test_gradcheck_leaves_a_batch_norm_exactly_as_it_found_it(training, rng):
    bn = layers.BatchNormalization(name='bn')
    x = rng.standard_normal((4, 3, 3, 5)).astype(np.float32) * 3 + 2
    bn.forward(x, training=True)                    # moving statistics moved once, a cache kept
    bn.backward(rng.standard_normal((4, 3, 3, 5)).astype(np.float32))
    state = layer_state(bn)
    errors = gradcheck.check_layer(bn, x, training=training)
    assert max(errors.values()) < 1e-6
    assert_same_state(bn, state)


def test_gradcheck_leaves_an_unbuilt_layer_unbuilt(rng):
    dense = layers.Dense(3, name='dense')
    errors = gradcheck.check_layer(dense, rng.standard_normal((2, 4)))
    assert max(errors.values()) < 1e-6
    assert not dense.built and dense.params == {} and dense.dtype == np.float32


def test_gradcheck_on_a_layer_of_a_model_leaves_its_predictions_unchanged(tiny_model, rng):
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    before = tiny_model.forward(x)
    bn = tiny_model.get_layer('bn')
    gradcheck.check_layer(bn, rng.standard_normal((2, 6, 6, 4)), training=True)
    after = tiny_model.forward(x)
    assert after.dtype == np.float32
    np.testing.assert_array_equal(after, before)


# -- what a photo folder may hold: every entry a photo, a skip or an ignore, each with a reason ----------

def decide(folder):
    """scan_photos of a folder as ({name: reason} skipped, {name: reason} ignored, [photo names])."""
    from minixcept.files.images import scan_photos
    photos, skipped, ignored = scan_photos(folder)
    name = lambda path: Path(path).relative_to(folder).as_posix()  # noqa: E731
    return ({name(p): r for p, r in skipped}, {name(p): r for p, r in ignored}, [name(p) for p in photos])


@pytest.fixture
def class_folder(tmp_path):
    folder = tmp_path / 'cats'
    folder.mkdir()
    save_photo(folder / 'good.jpg', seed=1)
    return folder


ODDITIES = {
    # name: (make it in the folder, verdict, reason or None)
    'hidden file': (lambda f: (f / '.DS_Store').write_bytes(b'\0\1'), 'ignored', 'hidden'),
    'hidden folder': (lambda f: (f / '.thumbnails').mkdir() or save_photo(f / '.thumbnails' / 'a.jpg', 2),
                      'ignored', 'hidden'),
    'other extension': (lambda f: (f / 'notes.txt').write_text('hi'), 'ignored', 'not a photo'),
    'partial download': (lambda f: (f / 'x.jpg.part').write_bytes(b'\xff\xd8'), 'ignored', 'not a photo'),
    'empty photo': (lambda f: (f / 'empty.jpg').write_bytes(b''), 'skipped', 'empty file (0 bytes)'),
    'broken link': (lambda f: os.symlink(f / 'gone.jpg', f / 'link.jpg'), 'skipped', 'a broken link'),
    'link to a folder': (lambda f: os.symlink(f, f / 'loop'), 'ignored', 'a link to a folder'),
    'fifo named as a photo': (lambda f: os.mkfifo(f / 'pipe.jpg'), 'skipped', 'not a regular file'),
    'link to a photo': (lambda f: os.symlink(f / 'good.jpg', f / 'alias.jpg'), 'photo', None),
    'subfolder': (lambda f: (f / 'more').mkdir() or save_photo(f / 'more' / 'b.png', 3), 'photo', None),
    'capital extension': (lambda f: save_photo(f / 'SHOUT.JPG', 4), 'photo', None),
    'spaces and accents': (lambda f: save_photo(f / 'chat noir é.jpg', 5), 'photo', None),
}


@pytest.mark.parametrize('oddity', ODDITIES, ids=list(ODDITIES))
def test_the_photo_lister_decides_for_every_entry_with_a_reason(oddity, class_folder):
    make, verdict, reason = ODDITIES[oddity]
    make(class_folder)
    before = tree(class_folder) if oddity != 'fifo named as a photo' else None
    skipped, ignored, photos = decide(class_folder)
    new = {'skipped': skipped, 'ignored': ignored,
           'photo': {p: None for p in photos if p != 'good.jpg'}}[verdict]
    assert len(new) == 1, (skipped, ignored, photos)
    (found_reason,) = new.values()
    assert found_reason is None if reason is None else reason in found_reason
    assert 'good.jpg' in photos
    if before is not None:
        assert tree(class_folder) == before                       # looked at, not touched


def test_an_unreadable_photo_is_skipped_at_listing(class_folder, monkeypatch):
    from minixcept.files import images
    real_access = os.access
    monkeypatch.setattr(images.os, 'access',                      # root reads anything: say it cannot
                        lambda path, mode: not str(path).endswith('good.jpg') and real_access(path, mode))
    skipped, _, photos = decide(class_folder)
    assert photos == [] and skipped == {'good.jpg': 'cannot be read (no permission)'}


def test_a_run_over_a_folder_of_oddities_skips_them_all_and_hangs_on_none(bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    cats = data / 'train' / 'cats'
    for name in ('hidden file', 'broken link', 'link to a folder', 'fifo named as a photo', 'empty photo',
                 'other extension', 'subfolder'):
        ODDITIES[name][0](cats)
    (cats / 'text.jpg').write_text('not a photo')                # decodes to a skip, not a listing skip
    (data / 'train' / 'README.txt').write_text('a file beside the class folders')
    out = tmp_path / 'out'
    code, stdout, stderr = run_example(bottleneck, quick(data, out), capsys)
    assert code == 0, stderr
    report = strict_json(out / 'report.json')
    assert sorted(Path(p).name for p in report['skipped']) == ['empty.jpg', 'link.jpg', 'pipe.jpg', 'text.jpg']
    assert all(' at 0x' not in reason for reason in report['skipped_reasons'].values())
    assert report['n_train'] == 5                                  # 2 cats + the subfolder's + 2 dogs
    assert report['class_names'] == ['cats', 'dogs'] and 'other files ignored' in stdout


@pytest.mark.parametrize('make, verdict', [
    (lambda p: Image.new('I;16', (30, 20), 4000).save(p), 'photo'),                        # 16-bit grey PNG
    (lambda p: Image.new('RGB', (1, 1), (255, 0, 0)).save(p), 'photo'),                    # one pixel
    (lambda p: Image.new('RGB', (900, 2), (0, 0, 255)).save(p), 'photo'),                  # a thin strip
    (lambda p: Image.new('P', (20, 20)).save(p, save_all=True, append_images=[Image.new('P', (20, 20), 3)]),
     'photo'),                                                                             # animated
    (lambda p: p.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 40), 'skip'),                  # a PNG header only
], ids=['16-bit', '1x1', '900x2', 'animated', 'header-only'])
def test_unusual_but_real_images_decode_and_broken_ones_are_skipped(make, verdict, tmp_path):
    from minixcept.files.images import load_batch
    path = tmp_path / 'photo.png'
    make(path)
    pixels, loaded, failures = load_batch([path], SIZE)
    if verdict == 'photo':
        assert loaded == [0] and pixels.shape == (1, SIZE, SIZE, 3) and pixels.dtype == np.uint8
    else:
        assert loaded == [] and failures[0][1].startswith('cannot be decoded') and ' at 0x' not in failures[0][1]


def test_a_class_left_empty_by_skips_is_a_layout_error(bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    for photo in (data / 'validation' / 'dogs').glob('*.jpg'):
        photo.write_bytes(b'')
    code, _, stderr = run_example(bottleneck, quick(data, tmp_path / 'out'), capsys)
    assert code == 2 and 'validation' in stderr and 'dogs' in stderr and 'Traceback' not in stderr
    assert f"skipped {data / 'validation' / 'dogs' / '0.jpg'}: empty file (0 bytes)" in stderr
    assert not (tmp_path / 'out').exists()


def test_a_data_folder_that_is_a_file_is_a_layout_error(bottleneck, tmp_path, capsys):
    (tmp_path / 'data').write_text('not a folder')
    code, _, stderr = run_example(bottleneck, quick(tmp_path / 'data', tmp_path / 'out'), capsys)
    assert code == 2 and 'no such folder' in stderr and (tmp_path / 'data').read_text() == 'not a folder'


def test_limit_refuses_less_than_one_photo(tmp_path):
    from minixcept.files.images import image_folder
    make_data(tmp_path / 'data')
    folder = image_folder(tmp_path / 'data' / 'train')
    for bad in (0, -1):
        with pytest.raises(ValueError, match='per_class must be at least 1'):
            folder.limit(bad)
    assert len(folder.limit(99)) == len(folder) == 4


# -- the feature cache: complete only when every photo is accounted for -------------------------------

def test_extraction_refuses_a_batch_size_below_one_and_writes_nothing(tmp_path):
    from minixcept.files.cache import cache_key
    from minixcept.files.images import image_folder
    from minixcept.workflows.features import extract_features
    folder = image_folder(make_data(tmp_path / 'data') / 'train')
    minixcept.set_seed(0)
    base = minixcept.Xception(include_top=False, pooling='avg', input_shape=(SIZE, SIZE, 3))
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match='batch_size must be at least 1'):
            extract_features(base, folder, batch_size=batch_size, cache_file=tmp_path / 'cache' / 'train.h5',
                             key=cache_key(folder, SIZE, 'random'), show_progress=False)
    assert not (tmp_path / 'cache' / 'train.h5').exists()


def test_a_cache_short_of_photos_is_never_marked_complete(tmp_path):
    from minixcept.files.cache import FeatureCache, Features
    cache = FeatureCache(tmp_path / 'train.h5', key='k', log=lambda message: None)
    empty = Features(features=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64), files=[],
                     class_names=['cats', 'dogs'])
    with pytest.raises(ValueError, match='not marking the cache complete: it accounts for 0 of 8 photos'):
        cache.finish(empty, SIZE, tmp_path, photo_count=8)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_complete_cache_left_by_an_old_run_is_rebuilt(bottleneck, tmp_path, capsys):
    """What ``--batch-size -1`` used to leave: complete, empty caches under the real key."""
    import h5py
    data = make_data(tmp_path / 'data')
    out = tmp_path / 'out'
    assert run_example(bottleneck, quick(data, out), capsys)[0] == 0
    for split in ('train', 'validation'):
        with h5py.File(out / 'cache' / f'{split}.h5', 'r+') as f:      # keep the key, drop every row
            for name in ('features', 'labels', 'files'):
                shape = f[name].shape
                dtype = f[name].dtype
                del f[name]
                f.create_dataset(name, shape=(0,) + shape[1:], dtype=dtype)
    code, _, stderr = run_example(bottleneck, quick(data, out), capsys)
    assert code == 0, stderr
    report = strict_json(out / 'report.json')
    assert report['n_train'] == 4 and report['cache'] == {'train': 'rebuilt', 'validation': 'rebuilt'}


# -- interrupted runs ---------------------------------------------------------------------------------

def interrupt_on_call(number, real):
    """A stand-in for ``real`` that raises KeyboardInterrupt on its ``number``-th call (Ctrl-C)."""
    calls = []

    def stand_in(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return stand_in


def test_ctrl_c_in_extraction_then_a_resume_that_counts_only_the_photos_it_computed(bottleneck, tmp_path,
                                                                                    monkeypatch, capsys):
    from minixcept.workflows import features
    data = make_data(tmp_path / 'data', per_class=3)              # 6 train photos: batches of 4 and 2
    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        patch.setattr(features, 'bottleneck_features', interrupt_on_call(2, features.bottleneck_features))
        code, _, stderr = run_example(bottleneck, quick(data, out), capsys)
    assert code == 130 and 'run again to resume' in stderr and 'Traceback' not in stderr
    assert not (out / 'report.json').exists() and not (out / 'head.h5').exists()
    code, stdout, stderr = run_example(bottleneck, quick(data, out), capsys)
    assert code == 0, stderr
    assert 'train: features of 2 photos computed' in stdout       # said 6 before: the batch done was not redone
    assert strict_json(out / 'report.json')['photos_computed'] == 2 + 6


def test_ctrl_c_in_training_keeps_the_previous_head_and_report(bottleneck, tmp_path, monkeypatch, capsys):
    data = make_data(tmp_path / 'data')
    out = tmp_path / 'out'
    assert run_example(bottleneck, quick(data, out), capsys)[0] == 0
    before = tree(out)
    monkeypatch.setattr(bottleneck, 'fit', interrupt_on_call(1, bottleneck.fit))
    code, _, stderr = run_example(bottleneck, quick(data, out, '--epochs', 2), capsys)
    assert code == 130 and 'Traceback' not in stderr
    assert tree(out) == before


def test_a_head_file_being_written_when_the_run_dies_leaves_the_old_one(bottleneck, tmp_path, monkeypatch, capsys):
    from minixcept.files import weights
    data = make_data(tmp_path / 'data')
    out = tmp_path / 'out'
    assert run_example(bottleneck, quick(data, out), capsys)[0] == 0
    before = tree(out)

    def dies_half_way(model, path, **attributes):
        Path(path).write_bytes(b'half an HDF5 file')
        raise KeyboardInterrupt
    monkeypatch.setattr(weights, 'save_weights', dies_half_way)
    code, _, _ = run_example(bottleneck, quick(data, out, '--epochs', 2), capsys)
    assert code == 130
    assert tree(out) == before and not [p for p in out.iterdir() if p.name.endswith('.tmp')]


def test_ctrl_c_in_predict_keeps_what_was_printed(predict, trained, monkeypatch, capsys):
    data, out = trained
    photos = sorted((data / 'validation' / 'cats').glob('*.jpg'))
    monkeypatch.setattr(predict, 'bottleneck_features', interrupt_on_call(2, predict.bottleneck_features))
    code, stdout, stderr = run_example(predict, ['--head', out / 'head.h5', '--weights', 'random',
                                                 '--batch-size', 2, *photos], capsys)
    assert code == 130 and 'interrupted' in stderr
    assert [Path(line.split('\t')[0]) for line in stdout.splitlines()] == photos[:2]


def test_ctrl_c_in_finetuning_saves_nothing(finetune, trained, tmp_path, monkeypatch, capsys):
    data, out = trained
    monkeypatch.setattr(finetune, 'fit', interrupt_on_call(1, finetune.fit))
    code, _, stderr = run_example(finetune, ['--data', data, '--head', out / 'head.h5', '--weights', 'random',
                                             '--out', tmp_path / 'ft', '--epochs', 1, '--no-augment'], capsys)
    assert code == 130 and 'nothing was saved' in stderr
    assert not (tmp_path / 'ft').exists() or tree(tmp_path / 'ft') == {}


def test_a_run_after_one_killed_mid_extraction_finishes_and_leaves_no_debris(bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    cache = tmp_path / 'out' / 'cache'
    cache.mkdir(parents=True)
    (cache / 'train.h5.lock').write_text('')                        # a dead process's lock file
    (cache / '.train.h5.abc123.tmp').write_bytes(b'half a cache')   # its complete file, half written
    (cache / 'train.h5.partial').mkdir()
    (cache / 'train.h5.partial' / '.rows_000000_000004.npz.x.tmp').write_bytes(b'half a batch')
    code, _, stderr = run_example(bottleneck, quick(data, tmp_path / 'out'), capsys)
    assert code == 0, stderr
    assert not list(cache.rglob('*.tmp')) and not (cache / 'train.h5.partial').exists()
    assert strict_json(tmp_path / 'out' / 'report.json')['n_train'] == 4


# -- more misuse of the examples -------------------------------------------------------------------------

@pytest.mark.parametrize('photo', ['missing', 'folder'])
def test_predict_skips_a_photo_that_is_missing_or_a_folder_and_classifies_the_rest(photo, predict, trained,
                                                                                   tmp_path, capsys):
    data, out = trained
    bad = tmp_path / 'nowhere.jpg' if photo == 'missing' else data / 'validation'
    good = data / 'validation' / 'dogs' / '0.jpg'
    code, stdout, stderr = run_example(predict, ['--head', out / 'head.h5', '--weights', 'random', bad, good],
                                       capsys)
    assert code == 1 and f'{bad}: skipped, cannot be read' in stderr and 'Traceback' not in stderr
    assert stdout.startswith(f'{good}\t')


def test_predict_with_a_head_that_is_not_hdf5_is_a_clear_error(predict, trained, tmp_path, capsys):
    data, out = trained
    head_file = copy_head(out, tmp_path)
    head_file.write_bytes(b'not HDF5')
    code, stdout, stderr = run_example(predict, ['--head', head_file, '--weights', 'random',
                                                 data / 'validation' / 'dogs' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and str(head_file) in stderr and 'Traceback' not in stderr


def test_predict_with_head_json_disagreeing_with_head_h5_is_a_clear_error(predict, trained, tmp_path, capsys):
    data, out = trained
    head_file = copy_head(out, tmp_path)
    description = head_file.with_suffix('.json')
    description.write_text(json.dumps(dict(json.loads(description.read_text()), class_names=['a', 'b', 'c'])))
    code, stdout, stderr = run_example(predict, ['--head', head_file, '--weights', 'random',
                                                 data / 'validation' / 'dogs' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and str(head_file) in stderr and 'Traceback' not in stderr


def test_predict_without_a_head_says_to_train_one(predict, tmp_path, capsys):
    code, _, stderr = run_example(predict, ['--head', tmp_path / 'head.h5', '--weights', 'random',
                                            tmp_path / 'a.jpg'], capsys)
    assert code == 1 and 'run examples/catdog_bottleneck.py first' in stderr


def test_finetune_from_a_block_that_does_not_exist_lists_the_blocks(finetune, trained, tmp_path, capsys):
    data, out = trained
    code, _, stderr = run_example(finetune, ['--data', data, '--head', out / 'head.h5', '--weights', 'random',
                                             '--out', tmp_path / 'ft', '--train-from', 'block99'], capsys)
    assert code == 1 and "no block 'block99'" in stderr and 'block14' in stderr
    assert not (tmp_path / 'ft').exists()


def test_a_batch_larger_than_the_data_and_a_limit_larger_than_a_class_just_work(bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    out = tmp_path / 'out'
    code, _, stderr = run_example(bottleneck, quick(data, out, '--batch-size', 1000, '--limit', 1000,
                                                    '--seed', 2**40), capsys)
    assert code == 0, stderr
    report = strict_json(out / 'report.json')
    assert report['n_train'] == report['n_val'] == 4 and report['limit_per_class'] == 1000


def test_a_report_in_a_folder_that_does_not_exist_yet_is_made(bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    report = tmp_path / 'reports' / 'nested' / 'run.json'
    code, _, stderr = run_example(bottleneck, quick(data, tmp_path / 'out', '--report', report), capsys)
    assert code == 0, stderr
    assert strict_json(report)['n_train'] == 4


def test_finetune_refuses_a_huge_image_size_before_loading_photos(finetune, trained, tmp_path, capsys):
    data, out = trained
    code, stdout, stderr = run_example(finetune, ['--data', data, '--head', out / 'head.h5', '--weights', 'random',
                                                  '--out', tmp_path / 'ft', '--image-size', 300_000], capsys)
    assert code == 1 and '--image-size 300000 with --batch-size 16' in stderr and 'Traceback' not in stderr
    assert 'loaded' not in stdout and not (tmp_path / 'ft').exists()


def test_predict_refuses_a_head_json_whose_image_size_would_not_fit(predict, trained, tmp_path, capsys):
    data, out = trained
    head_file = resaved_head(out, tmp_path, image_size=300_000)
    description = head_file.with_suffix('.json')
    code, stdout, stderr = run_example(predict, ['--head', head_file, '--weights', 'random',
                                                 data / 'validation' / 'dogs' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and f'{description}: image_size 300000 with --batch-size 16' in stderr


def test_bottleneck_training_that_turns_nan_keeps_the_best_epoch_reports_null_and_exits_non_zero(
        bottleneck, tmp_path, monkeypatch, capsys):
    data = make_data(tmp_path / 'data')
    out = tmp_path / 'out'
    # one training batch and one validation pass per epoch: the 4th call, epoch 2's validation, is NaN
    monkeypatch.setattr(bottleneck, 'head_loss', lambda class_count: Exploding(finite_calls=3))
    code, _, stderr = run_example(bottleneck, quick(data, out, '--epochs', 3), capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert 'training stopped, the validation loss became nan after epoch 2' in stderr
    assert 'the head saved is that of epoch 1' in stderr
    report = strict_json(out / 'report.json')
    assert report['best_epoch'] == 1 and report['epochs'] == 2
    assert report['history'][1]['val_loss'] is None and report['stopped'].startswith('the validation loss')
    assert (out / 'head.h5').exists() and strict_json(out / 'head.json')['class_names'] == ['cats', 'dogs']


@pytest.mark.parametrize('fast', [True, False])
def test_predict_on_no_input_is_a_clear_error(tiny_model, fast):
    with pytest.raises(ValueError, match=r"model 'tiny': predict needs at least one input, got \(0, 8, 8, 3\)"):
        tiny_model.predict(np.zeros((0, 8, 8, 3), np.float32), fast=fast)     # was np.concatenate's error


# -- concurrent runs ------------------------------------------------------------------------------------

def test_two_runs_at_once_on_the_same_out_and_cache_both_finish_and_leave_whole_files(tmp_path):
    data = make_data(tmp_path / 'data', per_class=3)
    out = tmp_path / 'out'
    example = REPO / 'examples' / 'catdog_bottleneck.py'
    env = {key: value for key, value in os.environ.items() if key != 'MINIXCEPT_BACKEND'}
    env['PYTHONPATH'] = str(REPO)
    runs = [subprocess.Popen([sys.executable, str(example), *map(str, quick(data, out, '--batch-size', 2))],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    computed = 0
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        computed += sum(int(n) for n in re.findall(r'features of (\d+) photos computed', stdout))
    assert computed == 12                                  # each photo once: a split is extracted by one run
    report = strict_json(out / 'report.json')
    assert report['n_train'] == report['n_val'] == 6
    head, description = load_example('catdog_predict').load_head(out / 'head.h5')
    assert description['class_names'] == ['cats', 'dogs']
    assert not list(out.rglob('*.tmp')) and not list(out.rglob('*.partial'))


# -- a full disk, or any error while writing ----------------------------------------------------------

def refuse_writes_to(monkeypatch, name):
    """Make every plain file write whose file name holds ``name`` (the temporary files of
    ``write_atomically`` are named after their target) write half its bytes, then fail as a
    full disk does."""
    import errno

    def failing(write):
        def write_or_fail(path, data, *args, **kwargs):
            if name in Path(path).name:
                write(path, data[:len(data) // 2], *args, **kwargs)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(path, data, *args, **kwargs)
        return write_or_fail
    monkeypatch.setattr(Path, 'write_bytes', failing(Path.write_bytes))
    monkeypatch.setattr(Path, 'write_text', failing(Path.write_text))


def temporaries(root):
    return [p for p in Path(root).rglob('*.tmp')]


@pytest.mark.parametrize('target', ['head.h5', 'head.json', 'report.json', 'curves.png', 'train.h5'])
def test_a_write_that_fails_is_one_line_naming_the_file_exit_1_and_the_old_files_stay(
        target, bottleneck, tmp_path, monkeypatch, capsys):
    data = make_data(tmp_path / 'data')
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    assert run_example(bottleneck, quick(data, out, '--cache', cache), capsys)[0] == 0
    before = tree(out)
    if target == 'train.h5':
        (cache / 'train.h5').unlink()                   # computed again, then written
    if target == 'curves.png':
        from PIL import Image as PillowImage
        real_save = PillowImage.Image.save

        def save_or_fail(image, path, *args, **kwargs):
            if 'curves.png' in Path(path).name:
                raise OSError(28, os.strerror(28))
            return real_save(image, path, *args, **kwargs)
        monkeypatch.setattr(PillowImage.Image, 'save', save_or_fail)
    else:
        refuse_writes_to(monkeypatch, target)
    code, _, stderr = run_example(bottleneck, quick(data, out, '--cache', cache, '--epochs', 2), capsys)
    written = (cache if target == 'train.h5' else out) / target
    assert code == 1 and 'Traceback' not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert errors == [f'error: cannot write {written}: No space left on device (ENOSPC)'], stderr
    assert temporaries(out) == [] and temporaries(cache) == []
    if target in ('head.h5', 'head.json', 'train.h5'):   # nothing of this run replaced a file: the old
        assert tree(out) == before                       # head.h5 and head.json are still one pair
    else:                                                # what was written before it is whole
        assert set(tree(out)) == set(before)
        assert {name for name in before if tree(out)[name] != before[name]} <= {'head.h5', 'head.json', 'curves.png'}
    if target == 'train.h5':
        assert not (cache / 'train.h5').exists()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kilobytes): a tmpfs of that size mounted in tmp_path (root only), or skip saying why."""
    mounted = []

    def mount(kilobytes):
        point = tmp_path / f'disk{len(mounted)}'
        point.mkdir()
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={kilobytes}k', 'tmpfs', str(point)],
                              capture_output=True, text=True) if shutil.which('mount') else None
        if done is None or done.returncode != 0:
            pytest.skip('cannot mount a small tmpfs here (needs root and mount permission): '
                        + (done.stderr.strip() if done else 'no mount command'))
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(['umount', str(point)], capture_output=True)


def test_a_cache_on_a_full_disk_is_one_line_and_exit_1_never_a_crash(small_disk, tmp_path):
    """Writing the cache on a full disk once ended in seven h5py tracebacks and a segmentation
    fault. A subprocess, so that a crash would show as its exit status."""
    data = make_data(tmp_path / 'data')
    disk = small_disk(48)                       # one stored batch fits, the complete file after it does not
    done = subprocess.run([sys.executable, str(REPO / 'examples' / 'catdog_bottleneck.py'),
                           *map(str, quick(data, tmp_path / 'out', '--cache', disk))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in done.stderr, done.stderr
    assert errors[0].startswith(f'error: cannot write {disk}/') and 'No space left on device (ENOSPC)' in errors[0]
    assert temporaries(disk) == [] and not (disk / 'train.h5').exists()


def test_a_head_on_a_full_disk_leaves_the_old_head_whole(bottleneck, small_disk, tmp_path, capsys):
    data = make_data(tmp_path / 'data')
    out = small_disk(3 * 1024)                  # one head (2.1 MB) fits, a second beside it does not
    cache = tmp_path / 'cache'
    assert run_example(bottleneck, quick(data, out, '--cache', cache), capsys)[0] == 0
    before = tree(out)
    code, _, stderr = run_example(bottleneck, quick(data, out, '--cache', cache, '--epochs', 2), capsys)
    assert code == 1 and 'Traceback' not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert errors == [f'error: cannot write {out / "head.h5"}: No space left on device (ENOSPC)'], stderr
    assert tree(out) == before and temporaries(out) == []



# -- files that belong together: the head and its description, the data, a run's paths ---------------

@pytest.fixture(scope='module')
def other_runs(bottleneck, trained, tmp_path_factory):
    """Two more heads on the same kind of photos: one at 80 px, one on three classes."""
    root = tmp_path_factory.mktemp('other_runs')
    at_80 = root / 'out80'
    assert bottleneck.main([str(a) for a in quick(trained[0], at_80, '--image-size', 80)]) == 0
    birds = make_data(root / 'birds', classes=('birds', 'cats', 'dogs'))
    three = root / 'out3'
    assert bottleneck.main([str(a) for a in quick(birds, three)]) == 0
    return {'80 px': at_80, 'three classes': three, 'birds data': birds}


def test_a_head_json_of_another_run_beside_head_h5_is_refused_naming_both(predict, trained, other_runs, tmp_path,
                                                                         capsys):
    data, out = trained
    head_file = copy_head(out, tmp_path)
    description = head_file.with_suffix('.json')
    shutil.copy(other_runs['80 px'] / 'head.json', description)     # a 71 px head, an 80 px description
    code, stdout, stderr = run_example(predict, ['--head', head_file, '--weights', 'random',
                                                 data / 'validation' / 'dogs' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and 'Traceback' not in stderr
    assert f'{head_file} and {description} do not belong together: run is' in stderr


@pytest.mark.parametrize('example', ['catdog_predict', 'catdog_explain'])
def test_class_names_reversed_in_head_json_are_refused_naming_both_files(example, trained, tmp_path, capsys):
    data, out = trained
    head_file = copy_head(out, tmp_path)
    description = head_file.with_suffix('.json')
    description.write_text(json.dumps(dict(json.loads(description.read_text()), class_names=['dogs', 'cats'])))
    code, stdout, stderr = run_example(load_example(example), ['--head', head_file, '--weights', 'random',
                                                               '--out', tmp_path / 'pictures',
                                                               data / 'validation' / 'dogs' / '0.jpg']
                                       if example == 'catdog_explain' else
                                       ['--head', head_file, '--weights', 'random',
                                        data / 'validation' / 'dogs' / '0.jpg'], capsys)
    assert code == 1 and stdout == '' and 'Traceback' not in stderr
    assert (f"{head_file} and {description} do not belong together: class_names is ['cats', 'dogs'] in the "
            "first and ['dogs', 'cats'] in the second") in stderr
    assert not (tmp_path / 'pictures').exists()


@pytest.mark.parametrize('case', ['three-class head, two-class photos', 'two-class head, three-class photos'])
def test_finetune_refuses_a_head_of_other_classes_naming_both_lists(case, finetune, trained, other_runs, tmp_path,
                                                                   capsys):
    if case.startswith('three'):
        head, data = other_runs['three classes'] / 'head.h5', trained[0]
        trained_on, photos_of = ['birds', 'cats', 'dogs'], ['cats', 'dogs']
    else:
        head, data = trained[1] / 'head.h5', other_runs['birds data']
        trained_on, photos_of = ['cats', 'dogs'], ['birds', 'cats', 'dogs']
    code, stdout, stderr = run_example(finetune, ['--data', data, '--head', head, '--weights', 'random',
                                                  '--out', tmp_path / 'ft', '--epochs', 1, '--no-augment'], capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert f'error: {head} was trained on the classes {trained_on}, but the photos in {data} are of {photos_of}' \
        in stderr
    assert not (tmp_path / 'ft').exists()


def bottleneck_clash(tmp_path, data, out):
    """Each way a bottleneck run's paths can clash: (its arguments, the start of the error line)."""
    cache = out / 'cache'
    return {
        'report over the head': (['--report', out / 'head.h5'], f'{out / "head.h5"}: the head and the --report file'),
        'report over the description': (['--report', out / 'head.json'],
                                        f'{out / "head.json"}: the head description and the --report file'),
        'report into the cache': (['--report', cache / 'train.h5'],
                                  f'{cache / "train.h5"}: the --report file lies inside the --cache folder'),
        'report over a photo': (['--report', data / 'train' / 'cats' / '0.jpg'],
                                f'{data / "train" / "cats" / "0.jpg"}: the --report file lies inside the --data'),
        'out inside the photos': (['--out', data / 'train' / 'runs'],
                                  f'{data / "train" / "runs" / "report.json"}: the --report file lies inside'),
        'cache inside the photos': (['--cache', data / 'cache'],
                                    f'{data / "cache"}: the --cache folder lies inside the --data folder'),
        'out is the cache': (['--cache', out], f'{out / "report.json"}: the --report file lies inside the --cache'),
    }


CLASHES = list(bottleneck_clash(Path('t'), Path('d'), Path('o')))


@pytest.mark.parametrize('clash', CLASHES)
def test_a_bottleneck_run_whose_paths_clash_is_refused_before_any_work(clash, bottleneck, tmp_path, capsys):
    data = make_data(tmp_path / 'data', per_class=1)
    out = tmp_path / 'out'
    assert run_example(bottleneck, quick(data, out), capsys)[0] == 0
    before, photos = tree(out), tree(data)
    extra, expected = bottleneck_clash(tmp_path, data, out)[clash]
    code, stdout, stderr = run_example(bottleneck, quick(data, out, *extra), capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert f'error: {expected}' in stderr, stderr
    assert 'photos' not in stdout                      # refused before the photos were even listed
    assert tree(out) == before and tree(data) == photos


def test_finetune_refuses_a_report_over_its_own_head(finetune, trained, tmp_path, capsys):
    data, out = trained
    head_file = copy_head(out, tmp_path)
    before = tree(head_file.parent)
    code, _, stderr = run_example(finetune, ['--data', data, '--head', head_file, '--weights', 'random',
                                             '--out', tmp_path / 'ft', '--report', head_file, '--epochs', 1], capsys)
    assert code == 1 and 'Traceback' not in stderr
    assert f'error: {head_file}: the --report file would overwrite the --head file the run reads' in stderr
    assert tree(head_file.parent) == before and not (tmp_path / 'ft').exists()


def test_explain_refuses_a_picture_over_its_photo_or_two_pictures_of_one_name(trained, tmp_path, capsys):
    data, out = trained
    explain = load_example('catdog_explain')
    pictures = tmp_path / 'pictures'
    pictures.mkdir()
    photo = save_photo(pictures / 'cat.png', seed=1)
    before = tree(pictures)
    code, _, stderr = run_example(explain, ['--head', out / 'head.h5', '--weights', 'random', '--out', pictures,
                                            photo], capsys)
    assert code == 1 and f'error: {photo}: the picture of {photo} would overwrite the photo {photo}' in stderr
    assert tree(pictures) == before
    twins = [data / 'validation' / 'cats' / '0.jpg', data / 'validation' / 'dogs' / '0.jpg']
    code, _, stderr = run_example(explain, ['--head', out / 'head.h5', '--weights', 'random', '--out',
                                            tmp_path / 'twins', *twins], capsys)
    assert code == 1 and f'the picture of {twins[1]} and the picture of {twins[0]}' in stderr
    assert not (tmp_path / 'twins').exists()


def test_the_path_relations_check_passes_a_run_whose_paths_are_apart(tmp_path):
    from minixcept.files.paths import check_path_relations
    check_path_relations(outputs={'report': tmp_path / 'out' / 'report.json', 'head': tmp_path / 'out' / 'head.h5'},
                         exclusive={'cache': tmp_path / 'out' / 'cache'}, photo_folders={'data': tmp_path / 'data'},
                         inputs={'weights': tmp_path / 'weights.h5'})
    assert list(tmp_path.iterdir()) == []
