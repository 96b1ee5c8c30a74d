"""Keras references for loading photos: Keras's own loader decodes, converts and resizes them.

    python tests/reference/generate.py images      # rewrites images_load.npz beside this file

Small synthetic photos are encoded with Pillow in every mode a folder of photos
can hold: RGB, grey (L), grey with alpha (LA), RGBA, palette (P, with and
without a transparent entry), CMYK JPEG. Each is loaded by
``keras.utils.load_img(path, target_size=..., interpolation=...)``, the reference,
and ``images_load.npz`` keeps, per case, the encoded bytes, the target size, the
interpolation and Keras's pixels (uint8, the values ``img_to_array`` gives as float32).

``source_photos()`` is also used by the tests, to compare with a live Keras on
more sizes and filters. This module never imports minixcept.
"""
import io
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / 'images_load.npz'

#: (name, Pillow mode, file format, (height, width)); one photo smaller than the model
#: input (upsampled) and the others larger (downsampled), none square, so that a
#: width/height mix-up shows.
PHOTOS = [
    ('rgb_small', 'RGB', 'PNG', (37, 53)),
    ('rgb', 'RGB', 'PNG', (121, 97)),
    ('grey', 'L', 'PNG', (121, 97)),
    ('grey_alpha', 'LA', 'PNG', (90, 130)),
    ('rgba', 'RGBA', 'PNG', (90, 130)),
    ('palette', 'P', 'PNG', (121, 97)),
    ('palette_transparent', 'P', 'PNG', (60, 83)),
    ('cmyk', 'CMYK', 'JPEG', (121, 97)),
]

#: (photo, target (height, width), interpolation) stored in the fixture.
CASES = ([(name, (71, 71), 'bilinear') for name, *_ in PHOTOS]
         + [('rgb', (64, 80), 'bilinear'), ('rgb', (71, 71), 'nearest'), ('rgb', (71, 71), 'bicubic'),
            ('rgb_small', (71, 71), 'bicubic')])


def _smooth_rgb(height, width, rng):
    """An RGB uint8 picture with gradients, a disc and mild noise: resizing it is not trivial."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / max(width - 1, 1)
    green = 255 * (0.5 + 0.5 * np.sin(y / 5.0 + x / 9.0))
    disc = ((y - height / 2) ** 2 + (x - width / 3) ** 2) < (min(height, width) / 4) ** 2
    blue = np.where(disc, 230.0, 40.0)
    picture = np.stack([red, green, blue], axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def source_photos():
    """{name: (encoded bytes, file extension)} for every photo in PHOTOS, the same on every run."""
    from PIL import Image

    photos = {}
    for index, (name, mode, file_format, (height, width)) in enumerate(PHOTOS):
        rng = np.random.default_rng(100 + index)
        rgb = Image.fromarray(_smooth_rgb(height, width, rng), 'RGB')
        if mode in ('RGB', 'L', 'CMYK'):
            image = rgb.convert(mode)
        elif mode in ('LA', 'RGBA'):
            alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), 'L')
            image = rgb.convert(mode[:-1])
            image.putalpha(alpha)
        else:                                                        # palette: 32 colours
            image = rgb.quantize(colors=32, dither=Image.Dither.NONE)
            if name == 'palette_transparent':
                image.info['transparency'] = 3
        buffer = io.BytesIO()
        image.save(buffer, format=file_format, **({'quality': 92} if file_format == 'JPEG' else {}))
        photos[name] = (buffer.getvalue(), '.jpg' if file_format == 'JPEG' else '.png')
    return photos


def case_key(name, target, interpolation):
    return f'{name}/{target[0]}x{target[1]}/{interpolation}'


def keras_pixels(path, target, interpolation):
    """What Keras's loader makes of the photo at ``path``: (h, w, 3) uint8."""
    import keras
    image = keras.utils.load_img(str(path), target_size=target, interpolation=interpolation)
    pixels = keras.utils.img_to_array(image)                        # float32 holding whole numbers
    assert np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255
    return pixels.astype(np.uint8)


def make(out_dir):
    import tempfile

    import PIL

    photos = source_photos()
    arrays = {'pillow_version': np.array(PIL.__version__)}
    for name, (data, extension) in photos.items():
        arrays[f'{name}/source'] = np.frombuffer(data, dtype=np.uint8)
        arrays[f'{name}/extension'] = np.array(extension)
    with tempfile.TemporaryDirectory() as folder:
        for name, target, interpolation in CASES:
            data, extension = photos[name]
            path = Path(folder) / f'{name}{extension}'
            path.write_bytes(data)
            arrays[case_key(name, target, interpolation)] = keras_pixels(path, target, interpolation)
    np.savez_compressed(Path(out_dir) / FIXTURE.name, **arrays)
