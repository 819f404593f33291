"""Files written atomically and hashed as they are written: a temporary
name, created exclusively, flushed to disk (fsync) and renamed; the directory
synced after the rename."""

from __future__ import annotations

import hashlib
import os
import secrets

__all__ = ["HashingWriter", "write_atomically", "fsync_dir"]


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingWriter:
    """A write-only file that hashes what goes through it (no seek: zipfile
    then streams with data descriptors)."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def write_atomically(directory: str, name: str, write, *, temporary: str | None = None,
                     replace: bool = True) -> tuple[str, int]:
    """Writes ``name`` in ``directory`` through ``write(file)`` under a
    temporary name (``temporary`` plus a random suffix; created exclusively),
    fsyncs it and renames it. With ``replace=False`` an existing ``name`` is
    never replaced (FileExistsError). Returns (sha256, bytes)."""
    tmp = os.path.join(directory, f"{temporary or '.' + name}.tmp-{secrets.token_hex(4)}")
    target = os.path.join(directory, name)
    try:
        with open(tmp, "xb") as f:
            writer = HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        if not replace and os.path.lexists(target):
            raise FileExistsError(f"{target} exists: save() does not overwrite it")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
    return writer.sha256.hexdigest(), writer.nbytes
