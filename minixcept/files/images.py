"""Turning photos into Xception's input: Pillow loading and resizing, folders of labelled photos.

A photo goes through the same steps as in Keras's ``keras.utils.load_img``:
read the bytes, let Pillow decode them, convert to RGB when the photo is in any
other mode (grey, grey + alpha, RGBA, palette, CMYK...), resize to the model's
size with Pillow's own resampling filter, then the textbook's ``minixcept.xception.preprocess_input`` scales
[0, 255] to [-1, 1].

A labelled dataset is a folder per split, holding a folder per class, as
Keras's ``image_dataset_from_directory`` expects::

    data/train/cats/*.jpg        data/train/dogs/*.jpg
    data/validation/cats/*.jpg   data/validation/dogs/*.jpg
    data/test/cats/*.jpg         data/test/dogs/*.jpg        (test/ is optional)
"""
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


#: Files with these extensions are photos; anything else in a class folder (notes, .DS_Store,
#: spreadsheets) is ignored. Keras's list (.bmp .gif .jpeg .jpg .png) and three more Pillow reads.
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')

try:
    _Resampling = Image.Resampling                  # Pillow >= 9.1
except AttributeError:                              # pragma: no cover - older Pillow
    _Resampling = Image

#: Keras's interpolation names and the Pillow filters behind them.
INTERPOLATIONS = {
    'nearest': _Resampling.NEAREST,
    'bilinear': _Resampling.BILINEAR,
    'bicubic': _Resampling.BICUBIC,
    'hamming': _Resampling.HAMMING,
    'box': _Resampling.BOX,
    'lanczos': _Resampling.LANCZOS,
}

SPLITS = ('train', 'validation', 'test')


# -- one photo -----------------------------------------------------------------------------------

class ImageDecodeError(ValueError):
    """A file could not be read as a photo (empty, truncated, not an image).

    ``path`` is the file, ``reason`` what went wrong; the message says both.
    """

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def load_image(path, target_size=None, interpolation='bilinear'):
    """Read a photo as an RGB uint8 array of shape (height, width, 3).

    Pixel for pixel equal to ``keras.utils.img_to_array(keras.utils.load_img(path,
    target_size=target_size, interpolation=interpolation))`` (which holds the same values as
    float32), because it takes the same steps:

    1. read the whole file and let Pillow decode it;
    2. if the mode is not 'RGB', ``convert('RGB')``: grey is repeated over the three channels,
       alpha is dropped (not blended over a background), a palette is looked up, CMYK goes
       through Pillow's own conversion;
    3. if ``target_size = (height, width)`` differs from the photo's size, resize to it with
       the Pillow filter named by ``interpolation`` (aspect ratio not kept: the photo is
       stretched, no crop). Note Keras's ``load_img`` defaults to 'nearest'; here the
       default is 'bilinear', what Keras's ``image_dataset_from_directory`` uses.

    EXIF orientation is not applied, as in Keras. Raises ImageDecodeError naming the file
    when it cannot be read, is empty or cannot be decoded, or when its header declares more
    pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: refused before
    any pixel is decoded).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}: choose one of {sorted(INTERPOLATIONS)}")
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as error:
        raise ImageDecodeError(path, f'cannot be read ({error.strerror or error})') from error
    if not data:
        raise ImageDecodeError(path, 'empty file')
    try:
        with warnings.catch_warnings():                 # a bomb is refused below, with its size
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))        # reads the header only
        width, height = image.size
    except Exception as error:   # Pillow's decoders raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(path, f'cannot be decoded ({_describe(error)})') from error
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageDecodeError(path, f'{width} x {height} pixels, more than the {Image.MAX_IMAGE_PIXELS:,} '
                                     'Pillow decodes safely (a decompression bomb?)')
    try:
        if image.mode != 'RGB':
            image = image.convert('RGB')
        if target_size is not None:
            width_height = (int(target_size[1]), int(target_size[0]))       # Pillow sizes are (w, h)
            if image.size != width_height:
                image = image.resize(width_height, INTERPOLATIONS[interpolation])
        pixels = np.asarray(image, dtype=np.uint8)                          # decoding happens here at the latest
    except Exception as error:
        raise ImageDecodeError(path, f'cannot be decoded ({_describe(error)})') from error
    return pixels


def _describe(error):
    """'Type: message' for a decoding error, without the memory address of an in-memory file
    (``<_io.BytesIO object at 0x...>``): it differs on every run and says nothing to a reader."""
    if isinstance(error, UnidentifiedImageError):
        return 'UnidentifiedImageError: not in a format Pillow can read'
    return f"{type(error).__name__}: {re.sub(r'<[^<>]* at 0x[0-9a-fA-F]+>', 'the file', str(error))}"


def load_batch(paths, image_size, interpolation='bilinear'):
    """Load photos resized to (image_size, image_size), skipping those that fail to decode.

    Returns ``(pixels, loaded, failures)``: pixels (n_loaded, image_size, image_size, 3) uint8,
    ``loaded`` the positions in ``paths`` of its rows, ``failures`` a list of
    ``(path, reason)`` for the others.
    """
    rows, loaded, failures = [], [], []
    for position, path in enumerate(paths):
        try:
            rows.append(load_image(path, (image_size, image_size), interpolation))
            loaded.append(position)
        except ImageDecodeError as error:
            failures.append((error.path, error.reason))
    pixels = np.stack(rows) if rows else np.zeros((0, image_size, image_size, 3), np.uint8)
    return pixels, loaded, failures


# -- folders of labelled photos ------------------------------------------------------------------

class DatasetLayoutError(ValueError):
    """A data folder is missing or not laid out as split/class/photo. The message shows the layout."""


def expected_layout(data_dir='DATA', class_names=('cats', 'dogs')):
    """The folder layout that ``find_image_folders`` expects, drawn as text."""
    lines = [f'    {data_dir}/']
    for split in SPLITS:
        note = '          (optional)' if split == 'test' else ''
        lines.append(f'        {split}/{note}')
        for name in class_names:
            lines.append(f'            {name}/    *.jpg, *.png, ... (one folder per class)')
    return ('Expected layout (the same class folders in every split; sorted class names give the '
            'labels 0, 1, ...):\n' + '\n'.join(lines))


@dataclass
class ImageFolder:
    """The photos of one split, labelled by the folder of their class.

    files: paths of the photos, class by class, sorted within each class.
    labels: (N,) int64, the index of each photo's class in ``class_names``.
    skipped: ``[(path, reason)]`` for files named as photos that cannot be one (empty, a broken
    link, not a regular file, unreadable); ignored: ``[(path, reason)]`` for entries that are
    not photos (hidden, another extension, a link to a folder). See ``photo_or_skip``.
    """
    root: Path
    class_names: list
    files: list = field(default_factory=list)
    labels: np.ndarray = None
    skipped: list = field(default_factory=list)
    ignored: list = field(default_factory=list)

    def __len__(self):
        return len(self.files)

    def limit(self, per_class):
        """The first ``per_class`` (>= 1) photos of each class (for quick runs)."""
        if int(per_class) < 1:
            raise ValueError(f'limit: per_class must be at least 1, got {per_class}')
        keep = np.concatenate([np.flatnonzero(self.labels == label)[:per_class]
                               for label in range(len(self.class_names))])
        return ImageFolder(self.root, self.class_names, [self.files[i] for i in keep], self.labels[keep],
                           self.skipped, self.ignored)


# What photo_or_skip decides for a directory entry.
PHOTO, FOLDER, SKIP, IGNORE = 'photo', 'folder', 'skip', 'ignore'


def photo_or_skip(entry):
    """``(verdict, reason)`` for one ``os.DirEntry`` of a class folder; reason is None for a
    photo or a folder.

    verdict: PHOTO (listed; decoding may still fail later, with a reason of its own), FOLDER
    (a real subfolder: its photos belong to the class, as in Keras), SKIP (named as a photo
    but cannot be one: reported) or IGNORE (not a photo: hidden, another extension, a link to
    a folder, which is not followed because it could loop). Decided from the name and the
    file system alone, without opening the file: a FIFO named .jpg would block a reader.
    """
    if entry.name.startswith('.'):
        return IGNORE, 'hidden'
    if entry.is_dir(follow_symlinks=False):
        return FOLDER, None
    if entry.is_symlink() and entry.is_dir():
        return IGNORE, 'a link to a folder (not followed: it could loop)'
    if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
        return IGNORE, f"not a photo (extensions: {' '.join(IMAGE_EXTENSIONS)})"
    if entry.is_symlink() and not os.path.exists(entry.path):
        return SKIP, 'a broken link'
    if not entry.is_file():
        return SKIP, 'not a regular file'
    if entry.stat().st_size == 0:
        return SKIP, 'empty file (0 bytes)'
    if not os.access(entry.path, os.R_OK):
        return SKIP, 'cannot be read (no permission)'
    return PHOTO, None


def scan_photos(folder):
    """Decide photo-or-skip for every entry under ``folder`` (subfolders too).

    Returns ``(photos, skipped, ignored)``: the photo paths sorted, and ``(path, reason)``
    lists for the rest (see ``photo_or_skip``). A subfolder that cannot be listed is skipped.
    """
    photos, skipped, ignored = [], [], []

    def visit(directory):
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((str(directory), f'folder cannot be listed ({error.strerror or error})'))
            return
        for entry in entries:
            try:
                verdict, reason = photo_or_skip(entry)
            except OSError as error:                  # vanished or unreachable while we looked
                verdict, reason = SKIP, f'cannot be looked at ({error.strerror or error})'
            if verdict == FOLDER:
                visit(entry.path)
            elif verdict == PHOTO:
                photos.append(Path(entry.path))
            else:
                (skipped if verdict == SKIP else ignored).append((entry.path, reason))

    visit(folder)
    return sorted(photos), skipped, ignored


def list_photos(folder):
    """The photo files under ``folder`` (subfolders too), sorted; see ``scan_photos`` for the rest."""
    return scan_photos(folder)[0]


def image_folder(split_dir):
    """Read one split: every subfolder of ``split_dir`` is a class (sorted names)."""
    split_dir = Path(split_dir)
    class_names = sorted(entry.name for entry in split_dir.iterdir()
                         if entry.is_dir() and not entry.name.startswith('.'))
    files, labels, skipped, ignored = [], [], [], []
    for label, name in enumerate(class_names):
        photos, class_skipped, class_ignored = scan_photos(split_dir / name)
        files.extend(photos)
        labels.extend([label] * len(photos))
        skipped.extend(class_skipped)
        ignored.extend(class_ignored)
    return ImageFolder(split_dir, class_names, files, np.asarray(labels, dtype=np.int64), skipped, ignored)


def find_image_folders(data_dir, required=('train', 'validation'), optional=('test',)):
    """The splits under ``data_dir`` as ``{split: ImageFolder}`` (optional splits only if present).

    Raises DatasetLayoutError, with the expected layout in its message, when the folder or a
    required split is missing, a split has fewer than two classes or a class without photos,
    or the splits do not have the same class folders.
    """
    data_dir = Path(data_dir)

    def fail(problem, class_names=('cats', 'dogs')):
        raise DatasetLayoutError(f"{problem}\n\n{expected_layout(data_dir, class_names)}")

    if not data_dir.is_dir():
        fail(f"{data_dir}: no such folder")
    folders = {}
    for split in tuple(required) + tuple(optional):
        if not (data_dir / split).is_dir():
            if split in required:
                fail(f"{data_dir}: no {split}/ folder")
            continue
        folder = image_folder(data_dir / split)
        if len(folder.class_names) < 2:
            fail(f"{data_dir / split}: needs at least two class folders, found "
                 f"{folder.class_names or 'none'}")
        empty = [name for label, name in enumerate(folder.class_names) if not np.any(folder.labels == label)]
        if empty:
            skips = [f'{path}: {reason}' for path, reason in folder.skipped
                     if Path(path).relative_to(folder.root).parts[0] in empty]
            fail(f"{data_dir / split}: no photos ({', '.join(IMAGE_EXTENSIONS)}) in class folder(s) "
                 f"{', '.join(empty)}" + ''.join(f'\n    skipped {skip}' for skip in skips[:5]),
                 folder.class_names)
        folders[split] = folder
    first = folders[required[0]]
    for split, folder in folders.items():
        if folder.class_names != first.class_names:
            fail(f"{data_dir}: {split}/ has classes {folder.class_names} but {required[0]}/ has "
                 f"{first.class_names}", first.class_names)
    return folders

