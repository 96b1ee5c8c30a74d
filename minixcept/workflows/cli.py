"""What the example scripts share at their edges: argument types, up-front checks, JSON reports.

Every value a user types is checked by argparse before any work starts: ``--batch-size -1``
is refused with a usage line, not discovered as an empty cache twenty minutes later. Then
``check_batch_memory`` refuses an image size whose activations would not fit in memory, and
``minixcept.files.paths.check_output_paths`` every path the run will write. At the end,
``write_json`` writes a report that any JSON reader accepts: a NaN or an infinity becomes
null (``json.dumps`` would write the bare words ``NaN`` and ``Infinity``, which are not JSON).
"""
import argparse
import json
import math
import os
from pathlib import Path

from .. import backend
from ..files.atomic import write_atomically

#: Xception's smallest input side: five stride-2 stages must leave at least one pixel.
MIN_IMAGE_SIZE = 71

#: Float32 numbers alive per input pixel at the peak of one Xception forward pass (per photo):
#: block 1's 64-channel maps at a quarter of the pixels (16 per pixel), about four of them at
#: once (a layer's input, its output, the residual and a cache), rounded up.
ACTIVATIONS_PER_PIXEL = 64


# -- argument types ------------------------------------------------------------------------------

def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'{text} is not a finite number')
    return value


def _bounded(name, parse, accept, problem, doc):
    """An argparse type named ``name``: ``parse`` the text, then refuse a value that ``accept``
    rejects, saying ``problem`` (formatted with the value and the text as given)."""
    def check(text):
        value = parse(text)
        if not accept(value):
            raise argparse.ArgumentTypeError(problem.format(value=value, text=text))
        return value
    check.__name__, check.__doc__ = name, doc
    return check


positive_int = _bounded('positive_int', _integer, lambda value: value >= 1,
                        '{value} is not a positive whole number (1 or more)',
                        'An int >= 1 (a batch size, a number of epochs, a limit per class).')
non_negative_int = _bounded('non_negative_int', _integer, lambda value: value >= 0,
                            '{value} is negative', 'An int >= 0 (a seed).')
positive_float = _bounded('positive_float', _finite_float, lambda value: value > 0,
                          '{text} is not a finite number above 0', 'A finite float > 0 (a learning rate).')
non_negative_float = _bounded('non_negative_float', _finite_float, lambda value: value >= 0,
                              '{text} is not a finite number of 0 or more',
                              'A finite float >= 0 (an amount of noise).')
image_size = _bounded('image_size', _integer, lambda value: value >= MIN_IMAGE_SIZE,
                      '{value} is too small: Xception needs at least ' + str(MIN_IMAGE_SIZE)
                      + ' px (five stride-2 stages)',
                      'A square input side Xception can take: an int >= 71.')


def existing_file(text):
    """The path of a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f'{text}: ' + ('is a folder, not a file' if path.is_dir()
                                                        else 'no such file'))
    return path


#: --weights random: an untrained base, to test the plumbing quickly.
RANDOM_WEIGHTS = 'random'


def weights_file(text):
    """'random' (an untrained base) or the path of a weights file that exists."""
    return text if text == RANDOM_WEIGHTS else existing_file(text)


# -- up-front checks -----------------------------------------------------------------------------

class RunError(RuntimeError):
    """A run cannot start, or cannot go on, for a reason the message states (an example's
    ``main`` prints it as one line and exits non-zero)."""


def use_backend(name):
    """Switch to the backend ``name``; with None, check the one $MINIXCEPT_BACKEND chose (a
    bad choice there is reported now, as a BackendError, not when ``minixcept`` was imported)."""
    if name is None:
        backend.xp()
    else:
        backend.use(name)


def available_memory():
    """Bytes of memory free for this process (MemAvailable on Linux; the physical memory elsewhere)."""
    try:
        with open('/proc/meminfo') as meminfo:
            for line in meminfo:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def batch_memory(image_size, batch_size):
    """Rough bytes one batch of Xception's forward pass needs at its peak (float32)."""
    return 4 * ACTIVATIONS_PER_PIXEL * image_size * image_size * batch_size


def check_batch_memory(image_size, batch_size, photo_count=None, available=None, size_name='--image-size'):
    """Raise RunError, naming the size and the batch, when one batch would not fit in memory:
    better than a MemoryError from inside a layer, or the machine swapping for an hour.
    photo_count: the most photos a batch can hold here (a batch is never larger), if known;
    size_name: where the size came from, for the message."""
    photos = batch_size if photo_count is None else max(1, min(batch_size, photo_count))
    needed = batch_memory(image_size, photos)
    available = available_memory() if available is None else available
    if needed > available:
        raise RunError(f'{size_name} {image_size} with --batch-size {batch_size} needs about '
                       f'{needed / 2**30:,.1f} GiB for a batch of {photos:,} photos, and '
                       f'{available / 2**30:,.1f} GiB are free: use a smaller image size or batch size')


# -- reports -------------------------------------------------------------------------------------

def finite_or_none(value):
    """``value`` with every float that is NaN or infinite replaced by None, in dicts, lists and
    tuples too: what JSON can hold (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(path, value):
    """Write ``value`` as indented JSON, non-finite numbers as null, atomically (a reader
    never sees half a report). Returns the path."""
    text = json.dumps(finite_or_none(value), indent=2, allow_nan=False) + '\n'
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))
