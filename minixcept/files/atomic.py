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

Any OSError on the way - a full disk, a quota, a folder made read-only, an I/O error -
comes out as one ``WriteError``: an OSError with the same errno whose one-line message
names the target and what the errno means ("cannot write runs/head.h5: No space left on
device (ENOSPC)"), after the temporary file is removed. Writers that go through a library
which may fail badly on a full disk (HDF5) build the file in memory first and hand
``write`` plain bytes.
"""
import errno as errno_names
import os
import tempfile
from pathlib import Path

__all__ = ["WriteError", "write_atomically", "temporary_name_prefix"]


class WriteError(OSError):
    """A file could not be written; the message is one line naming it and the reason. The
    file it would have replaced is as it was, and no temporary file is left."""


    def __init__(self, code, target, reason):
        super().__init__(code, f"cannot write {target}: {reason}")
        self.target, self.reason = target, reason

    def __str__(self):
        return self.strerror                 # the one line, without OSError's "[Errno 28]" prefix


def write_error(target, error):
    """The WriteError for ``error`` (an OSError) met while writing ``target``; one met by a
    nested atomic write (into this one's temporary file) is said of ``target``."""
    if isinstance(error, WriteError):
        return WriteError(error.errno, target, error.reason)
    code = error.errno
    reason = (f"{os.strerror(code)} ({errno_names.errorcode.get(code, code)})" if code
              else str(error).splitlines()[0] if str(error) else type(error).__name__)
    return WriteError(code, target, reason)


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=temporary_name_prefix(target),
                                         suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise write_error(target, error) from None
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())      # the bytes on disk before the name points at them
        _make_readable(temporary)
        os.replace(temporary, target)
    except OSError as error:
        raise write_error(target, error) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target


def _make_readable(path):
    """0666 less the umask, as open() would have made it (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
