"""Writing a file so that readers see the old version or the whole new one, never half of it.

    write_atomically(target, write)

``write(temporary_path)`` fills a temporary file in the target's folder (the same file
system, so the rename below cannot turn into a copy); the file is flushed to disk with
``fsync`` and renamed over ``target`` with ``os.replace``, which POSIX and Windows both
perform as one step. Whatever happens before the rename - an exception, Ctrl-C, SIGKILL,
a full disk - ``target`` keeps its old content (or stays absent). On an exception the
temporary file is removed; after a killed process it stays behind as
``.<name>.<random>.tmp``, which is never mistaken for ``target`` and which callers that
own a folder (the feature cache) sweep away.
"""
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomically", "temporary_name_prefix"]


def temporary_name_prefix(target):
    """How temporary files for ``target`` are named: ``.<name>.`` (then random, ``.tmp``)."""
    return f".{Path(target).name}."


def write_atomically(target, write):
    """Call ``write(temporary_path)``, then put the finished file in place as ``target``.

    target: the path to create or replace (its folder is created if missing).
    write: a function that writes the whole file at the path it is given (a ``str``).
    Returns ``target`` as a Path. The file gets the usual permissions (0666 less the
    umask), not the owner-only ones of a fresh temporary file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=temporary_name_prefix(target),
                                     suffix=".tmp")
    os.close(fd)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())      # the bytes on disk before the name points at them
        _make_readable(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target


def _make_readable(path):
    """0666 less the umask, as open() would have made it (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
