"""Photos: decoded, converted and resized pixel for pixel as Keras's loader does; folders of classes.

Loading happens on the host with Pillow before any array reaches a backend, so these
tests run on NumPy only: there is no CuPy code path to parametrise over.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minixcept.files.images import DatasetLayoutError, ImageDecodeError, find_image_folders, load_batch, load_image
from minixcept.xception import preprocess_input

sys.path.insert(0, str(Path(__file__).resolve().parent / 'reference'))
import make_images  # noqa: E402  (the fixture's source photos and cases, no minixcept inside)


@pytest.fixture(scope='module')
def stored():
    with np.load(make_images.FIXTURE) as fixture:
        return dict(fixture)


def write_source(folder, name, stored):
    """The fixture's encoded photo ``name`` as a file in ``folder``."""
    path = Path(folder) / f"{name}{stored[f'{name}/extension']}"
    path.write_bytes(stored[f'{name}/source'].tobytes())
    return path


# -- preprocess_input ------------------------------------------------------------------------

def test_preprocess_input_maps_0_255_to_minus_one_one():
    pixels = np.array([[[0, 127, 255]]], dtype=np.uint8)
    scaled = preprocess_input(pixels)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, (pixels.astype(np.float32) / np.float32(127.5)) - np.float32(1))
    assert scaled.min() == -1 and scaled.max() == 1


def test_preprocess_input_matches_keras(tf, rng):
    import keras
    pixels = rng.integers(0, 256, size=(2, 5, 7, 3)).astype(np.uint8)
    reference = keras.applications.xception.preprocess_input(pixels.astype(np.float32))
    np.testing.assert_array_equal(preprocess_input(pixels), np.asarray(reference))
    np.testing.assert_array_equal(preprocess_input(pixels.astype(np.float32)), np.asarray(reference))


# -- load_image against Keras ------------------------------------------------------------------

@pytest.mark.parametrize('name, target, interpolation', make_images.CASES,
                         ids=[make_images.case_key(*case) for case in make_images.CASES])
def test_load_image_matches_stored_keras_pixels(stored, tmp_path, name, target, interpolation):
    path = write_source(tmp_path, name, stored)
    ours = load_image(path, target, interpolation)
    expected = stored[make_images.case_key(name, target, interpolation)]
    assert ours.dtype == np.uint8 and ours.shape == target + (3,)
    np.testing.assert_array_equal(ours, expected)


def test_load_image_matches_keras_live(tf, tmp_path):
    """Every mode, up- and downsampling, square and not, every filter Keras offers."""
    for name, (data, extension) in make_images.source_photos().items():
        path = tmp_path / f'{name}{extension}'
        path.write_bytes(data)
        for target in [(71, 71), (96, 96), (80, 64)]:
            for interpolation in ['bilinear', 'nearest', 'bicubic', 'lanczos', 'box', 'hamming']:
                np.testing.assert_array_equal(load_image(path, target, interpolation),
                                              make_images.keras_pixels(path, target, interpolation),
                                              err_msg=f'{name} {target} {interpolation}')


def test_load_image_matches_keras_live_on_real_photos(tf, catdog):
    photos = sorted((catdog / 'train' / 'cats').glob('*.jpg'))[:3] + \
        sorted((catdog / 'validation' / 'dogs').glob('*.jpg'))[:3]
    for path in photos:
        for size in (71, 299):
            np.testing.assert_array_equal(load_image(path, (size, size)),
                                          make_images.keras_pixels(path, (size, size), 'bilinear'),
                                          err_msg=f'{path.name} at {size}')


def test_load_image_without_target_keeps_the_size(stored, tmp_path):
    path = write_source(tmp_path, 'grey_alpha', stored)
    pixels = load_image(path)
    assert pixels.shape == (90, 130, 3)
    grey = np.asarray(Image.open(path).convert('L'))
    for channel in range(3):                     # grey is copied into R, G and B; alpha is dropped
        np.testing.assert_array_equal(pixels[..., channel], grey)


def test_unknown_interpolation_is_refused(stored, tmp_path):
    with pytest.raises(ValueError, match='interpolation'):
        load_image(write_source(tmp_path, 'rgb', stored), (71, 71), 'cubic')


# -- broken files ----------------------------------------------------------------------------

@pytest.fixture
def broken_files(stored, tmp_path):
    good = write_source(tmp_path, 'rgb', stored)
    jpeg = tmp_path / 'whole.jpg'
    Image.open(good).save(jpeg, quality=90)
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    text = tmp_path / 'not_a_photo.png'
    text.write_text('a note, not a photo\n')
    return {'good': good, 'truncated': truncated, 'empty': empty, 'text': text,
            'missing': tmp_path / 'missing.jpg'}


@pytest.mark.parametrize('which, reason', [('truncated', 'truncated'), ('empty', 'empty file'),
                                           ('text', 'cannot be decoded'), ('missing', 'cannot be read')])
def test_broken_files_raise_an_error_naming_them(broken_files, which, reason):
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        load_image(broken_files[which], (71, 71))
    assert caught.value.path == str(broken_files[which])
    assert str(broken_files[which]) in str(caught.value)


def test_load_batch_skips_broken_files_and_says_why(broken_files):
    order = ['empty', 'good', 'truncated', 'good']
    pixels, loaded, failures = load_batch([broken_files[k] for k in order], 71)
    assert pixels.shape == (2, 71, 71, 3) and pixels.dtype == np.uint8
    assert loaded == [1, 3]
    assert [path for path, _ in failures] == [str(broken_files['empty']), str(broken_files['truncated'])]
    np.testing.assert_array_equal(pixels[0], load_image(broken_files['good'], (71, 71)))


# -- folders ---------------------------------------------------------------------------------

def make_tree(root, layout):
    """layout: {'train/cats': ['a.jpg', ...], ...}; each file a tiny real PNG (extension aside)."""
    for folder, names in layout.items():
        for name in names:
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (4, 3), (10, 20, 30)).save(root / folder / name, format='PNG')
    return root


def test_find_image_folders_reads_classes_in_sorted_order(tmp_path):
    make_tree(tmp_path, {'train/dogs': ['d2.jpg', 'd1.JPG', 'notes.txt', '.hidden.jpg'],
                         'train/cats': ['c1.png', 'sub/c2.jpeg'],
                         'validation/cats': ['v1.jpg'], 'validation/dogs': ['v2.jpg', 'v3.bmp']})
    splits = find_image_folders(tmp_path)
    assert sorted(splits) == ['train', 'validation']                    # no test/: optional
    train = splits['train']
    assert train.class_names == ['cats', 'dogs']
    assert [p.relative_to(tmp_path).as_posix() for p in train.files] == [
        'train/cats/c1.png', 'train/cats/sub/c2.jpeg', 'train/dogs/d1.JPG', 'train/dogs/d2.jpg']
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1])
    limited = splits['validation'].limit(1)
    assert [p.name for p in limited.files] == ['v1.jpg', 'v2.jpg']
    np.testing.assert_array_equal(limited.labels, [0, 1])


def test_find_image_folders_includes_test_when_present(tmp_path):
    make_tree(tmp_path, {f'{split}/{name}': ['x.png'] for split in ('train', 'validation', 'test')
                         for name in ('ants', 'bees', 'wasps')})
    splits = find_image_folders(tmp_path)
    assert sorted(splits) == ['test', 'train', 'validation']
    np.testing.assert_array_equal(splits['test'].labels, [0, 1, 2])


@pytest.mark.parametrize('layout, problem', [
    (None, 'no such folder'),
    ({'train/cats': ['a.jpg'], 'train/dogs': ['b.jpg']}, 'no validation/ folder'),
    ({'train/cats': ['a.jpg'], 'validation/cats': ['b.jpg']}, 'at least two class folders'),
    ({'train/cats': ['a.jpg'], 'train/dogs': ['notes.txt'], 'validation/cats': ['b.jpg'],
      'validation/dogs': ['c.jpg']}, 'no photos'),
    ({'train/cats': ['a.jpg'], 'train/dogs': ['b.jpg'], 'validation/cats': ['c.jpg'],
      'validation/birds': ['d.jpg']}, 'has classes'),
])
def test_malformed_folders_are_explained_with_the_expected_layout(tmp_path, layout, problem):
    data = tmp_path / 'data'
    if layout is not None:
        make_tree(data, layout)
    with pytest.raises(DatasetLayoutError, match=problem) as caught:
        find_image_folders(data)
    message = str(caught.value)
    assert 'Expected layout' in message
    for line in ('train/', 'validation/', 'test/'):
        assert line in message
