"""Augmentation: reproducible draws, exact mirrors and identities, shapes and dtypes kept.

Augmentation works on host photos before they are preprocessed and sent to a
backend, so these tests run on NumPy arrays only: there is no CuPy code path to
parametrise over.
"""
import numpy as np
import pytest

from minixcept.files import augment as A


@pytest.fixture
def photo(rng):
    """A small non-square 'photo': rows and columns of different sizes catch x/y mix-ups."""
    return rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)


def test_same_seed_same_augmentations(photo):
    first = A.augment_batch(np.stack([photo, photo]), np.random.default_rng(7))
    again = A.augment_batch(np.stack([photo, photo]), np.random.default_rng(7))
    other = A.augment_batch(np.stack([photo, photo]), np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first[0], first[1]), "each photo of a batch needs its own draw"


def test_no_settings_is_the_identity(photo, rng):
    matrix = A.random_transform(rng, *photo.shape[:2], A.AugmentSettings.none())
    np.testing.assert_array_equal(matrix, np.eye(3))
    np.testing.assert_array_equal(A.augment(photo, rng, A.AugmentSettings.none()), photo)
    as_float = photo.astype(np.float32) / 255
    np.testing.assert_array_equal(A.apply_transform(as_float, np.eye(3)), as_float)


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_flip_is_an_exact_mirror(photo, dtype):
    image = photo.astype(dtype)
    mirrored = A.apply_transform(image, A.about_centre(A.flip_matrix(True), *image.shape[:2]))
    np.testing.assert_array_equal(mirrored, image[:, ::-1])


def test_random_flip_alone_gives_mirror_or_original(photo):
    flip_only = A.AugmentSettings(rotation_degrees=0, width_shift=0, height_shift=0, shear=0, zoom=0,
                                  horizontal_flip=True)
    rng = np.random.default_rng(3)
    outcomes = []
    for _ in range(20):
        out = A.augment(photo, rng, flip_only)
        if np.array_equal(out, photo):
            outcomes.append('original')
        else:
            np.testing.assert_array_equal(out, photo[:, ::-1])
            outcomes.append('mirror')
    assert set(outcomes) == {'original', 'mirror'}


def test_quarter_turn_is_counter_clockwise(rng):
    square = rng.integers(0, 256, size=(9, 9, 3), dtype=np.uint8)
    turned = A.apply_transform(square, A.about_centre(A.rotation_matrix(90), 9, 9))
    np.testing.assert_array_equal(turned, np.rot90(square))      # rot90 turns counter-clockwise


def test_whole_pixel_shift_moves_content_and_repeats_the_edge(photo):
    shifted = A.apply_transform(photo, A.shift_matrix(2, 1))      # 2 columns right, 1 row down
    np.testing.assert_array_equal(shifted[1:, 2:], photo[:-1, :-2])
    np.testing.assert_array_equal(shifted[0, 2:], photo[0, :-2])     # fill_mode='nearest': edge rows repeat
    np.testing.assert_array_equal(shifted[1:, 0], photo[:-1, 0])


def test_zoom_about_the_centre_keeps_the_centre(rng):
    image = rng.integers(0, 256, size=(21, 21, 3), dtype=np.uint8)
    zoomed = A.apply_transform(image, A.about_centre(A.zoom_matrix(2.0, 2.0), 21, 21))
    np.testing.assert_array_equal(zoomed[10, 10], image[10, 10])
    np.testing.assert_array_equal(zoomed[10, 12], image[10, 11])    # two pixels out reads one pixel out


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_shape_and_dtype_are_kept(photo, rng, dtype):
    batch = np.stack([photo, photo[::-1]]).astype(dtype)
    out = A.augment_batch(batch, rng)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    if dtype == np.uint8:
        assert out.min() >= 0 and out.max() <= 255


def test_draws_stay_within_the_settings(rng):
    settings = A.AugmentSettings()
    height, width = 40, 60
    for _ in range(50):
        matrix = A.random_transform(rng, height, width, settings)
        linear = matrix[:2, :2]
        # |det| = zoom_x * zoom_y (rotation, shear and flip keep areas)
        assert (1 - settings.zoom) ** 2 - 1e-12 <= abs(np.linalg.det(linear)) <= (1 + settings.zoom) ** 2 + 1e-12
        centre = np.array([(width - 1) / 2, (height - 1) / 2, 1.0])
        moved = matrix @ centre - centre                              # the centre moves by the shift only
        assert abs(moved[0]) <= settings.width_shift * width
        assert abs(moved[1]) <= settings.height_shift * height


def test_grid_has_one_row_per_photo_and_the_originals_first(photo, rng):
    grid = A.augmentation_grid(np.stack([photo, photo]), rng, per_photo=3, gap=2)
    height, width = photo.shape[:2]
    assert grid.shape == (2 * height + 2, 4 * width + 3 * 2, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:height, :width], photo)
    np.testing.assert_array_equal(grid[height + 2:, :width], photo)

