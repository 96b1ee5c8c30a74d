"""Output paths, checked before a run starts.

A run that will write a report after twenty minutes of extraction should learn in its first
second that the report's folder is read-only, or is a file. ``check_output_paths`` looks at
every path a run will write, creates nothing, and raises OutputPathError naming the first one
that cannot be written (``minixcept.files.atomic`` then writes each file so that an
interrupted run leaves the old file or the whole new one).
"""
import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """A path a run must write to cannot be written: the message names it and says why."""


def _nearest_existing(path):
    """``path`` itself or its closest ancestor that exists."""
    path = Path(path).absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder):
    """Create and remove a file in ``folder``: the one test that also holds for root, read-only
    mounts and immutable folders, where permission bits alone would say yes."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.minixcept-write-test.')
    except OSError as error:
        return error.strerror or str(error)
    os.close(fd)
    os.remove(probe)
    return None


def check_folder(path, what='output folder'):
    """Raise OutputPathError unless ``path`` is a folder that exists and can be written, or does
    not exist yet and could be created (every existing part of it a folder, the nearest
    existing one writable). Creates nothing."""
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        kind = 'a broken link' if existing.is_symlink() and not existing.exists() else 'a file'
        if existing == path.absolute():
            raise OutputPathError(f'{path}: the {what} is {kind}, not a folder')
        raise OutputPathError(f'{path}: the {what} cannot be made: {existing} is {kind}')
    problem = _probe_writable(existing)
    if problem:
        where = '' if existing == path.absolute() else f' (in {existing})'
        raise OutputPathError(f'{path}: the {what} cannot be written{where}: {problem}')


def check_file(path, what='output file'):
    """Raise OutputPathError unless the file ``path`` could be written: its folder passes
    ``check_folder`` and the path is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f'{path}: the {what} is a folder')
    check_folder(path.parent, f'folder of the {what}')


def check_output_paths(folders=(), files=()):
    """Check every folder and file a run will write, before it starts: ``folders`` and
    ``files`` are ``{description: path}``. Raises OutputPathError on the first that fails."""
    for what, path in dict(folders).items():
        check_folder(path, what)
    for what, path in dict(files).items():
        check_file(path, what)


def _inside(path, folder):
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def check_path_relations(outputs=(), exclusive=(), photo_folders=(), inputs=()):
    """Check a run's paths against each other before it starts; every argument is
    ``{description: path}``:

    outputs:        the files the run writes (its report, a head, a picture...);
    exclusive:      folders the run owns whole (the feature cache): no other output inside;
    photo_folders:  the folders it reads photos from: no output inside (a second run would
                    take a report or a picture for a photo);
    inputs:         the files it reads (a head, weights, photos): no output over one.

    Paths are compared resolved (links followed, relative paths made absolute). Raises
    OutputPathError naming both paths of the first clash.
    """
    def resolved(paths):
        return [(what, Path(path), Path(path).resolve()) for what, path in dict(paths).items()]
    outputs, exclusive = resolved(outputs), resolved(exclusive)
    photo_folders, inputs = resolved(photo_folders), resolved(inputs)
    for index, (what, path, real) in enumerate(outputs):
        for other_what, other, other_real in outputs[:index]:
            if real == other_real:
                raise OutputPathError(f'{path}: the {what} and the {other_what} ({other}) would be the same file')
        for input_what, input_path, input_real in inputs:
            if real == input_real:
                raise OutputPathError(f'{path}: the {what} would overwrite the {input_what} the run reads '
                                      f'({input_path})')
    for what, path, real in outputs + exclusive:
        for folder_what, folder, folder_real in photo_folders:
            if _inside(real, folder_real):
                raise OutputPathError(f'{path}: the {what} lies inside the {folder_what} {folder}, '
                                      'which the run reads photos from')
    for what, path, real in outputs:
        for folder_what, folder, folder_real in exclusive:
            if _inside(real, folder_real):
                raise OutputPathError(f'{path}: the {what} lies inside the {folder_what} {folder}, '
                                      'which holds nothing else')
