"""A checkpoint directory's ownership and its one writer at a time (used by
:func:`dali_rehearsal.checkpoint.save`).

**What the library owns.** ``save()`` writes, deletes and replaces only
files it can tell it wrote:

- ``manifest.json`` when it is a manifest of this library;
- the shard files that manifest lists (names of the form
  ``shard-<save id>-<rank>-of-<N>.npz``);
- ``.dali-rehearsal.lock``, the writers' lock file (kept);
- ``.dali-rehearsal-pending-<save id>``: written (and synced) before any
  file of save ``<save id>`` exists, removed once that save is committed
  and cleaned up; while it exists, the files named after that save id
  (its shards and the temporary files of its shards and manifest) are the
  library's too (left behind by a save that was killed or failed), and so
  are the shards of the manifest that save replaces, which it lists.

A directory that holds anything else is refused (FileExistsError naming the
files), unless ``save(path, allow_other_files=True)``: the checkpoint is
then written next to those files, which are never read, replaced or
deleted. A ``manifest.json`` that is not this library's is never replaced.

**One writer at a time.** The process that commits a save (rank 0) holds an
exclusive ``flock`` on the lock file from before the first file is written
until the old files are removed; the kernel releases it when the process
dies (``kill -9`` included). A second writer of the same directory, in this
process or another, fails at once with :class:`ConcurrentSaveError`, before
it writes anything. Shard names are new for every save and the manifest is
replaced atomically last, so whatever happens, the directory holds the
previous checkpoint or the new one, complete. On a filesystem without file
locks (some parallel filesystems) saves still never leave the directory
unloadable: a save removes only the shards of the manifest it replaced and
its own leftovers (a warning says that concurrent saves are not detected
there), and the last manifest written wins.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import threading
import time

from .atomic import fsync_dir, write_atomically
from .files import CheckpointError, load_json

try:
    import fcntl
except ImportError:          # not a POSIX system: no locks (see the module documentation)
    fcntl = None

__all__ = ["ConcurrentSaveError", "DirectoryWriter", "MANIFEST", "shard_name", "is_shard_name"]

log = logging.getLogger("dali_rehearsal")

MANIFEST = "manifest.json"
LOCK = ".dali-rehearsal.lock"
PENDING = ".dali-rehearsal-pending-"
DIR_FORMAT = "dali_rehearsal.checkpoint"
_ID = r"[0-9a-f]{16}"
_SHARD = re.compile(rf"shard-(?P<id>{_ID})-\d+-of-\d+\.npz")
_SHARD_TMP = re.compile(rf"\.shard-(?P<id>{_ID})-\d+-of-\d+\.npz\.tmp-[0-9a-f]{{8}}")
_MANIFEST_TMP = re.compile(rf"\.manifest-(?P<id>{_ID})\.json\.tmp-[0-9a-f]{{8}}")
_PENDING = re.compile(rf"{re.escape(PENDING)}(?P<id>{_ID})")
#: At most this many unknown files are named in an error.
_NAMED = 8

# Directories this process is saving into: flock conflicts between two open
# files of one process too, but not every filesystem's emulation of it does.
_saving: set[str] = set()
_saving_lock = threading.Lock()
_warned_no_lock = False


class ConcurrentSaveError(RuntimeError):
    """Another ``save()`` is writing into the same checkpoint directory (in
    this process or another). Nothing was written; the checkpoint there is
    the other save's, or the previous one."""


def shard_name(save_id: str, rank: int, world_size: int) -> str:
    return f"shard-{save_id}-{rank:05d}-of-{world_size:05d}.npz"


def shard_temporary(save_id: str, rank: int, world_size: int) -> str:
    """The prefix of a shard's temporary name (a random suffix follows)."""
    return "." + shard_name(save_id, rank, world_size)


def manifest_temporary(save_id: str) -> str:
    return f".manifest-{save_id}.json"


def is_shard_name(name) -> bool:
    return isinstance(name, str) and _SHARD.fullmatch(name) is not None


def _save_id_of(name: str) -> str | None:
    """The save id a file name of the library belongs to (None: none)."""
    for pattern in (_SHARD, _SHARD_TMP, _MANIFEST_TMP):
        match = pattern.fullmatch(name)
        if match:
            return match.group("id")
    return None


def _manifest_shards(path: str) -> tuple[bool, set[str]]:
    """Whether ``path``'s manifest.json is this library's, and the shard files
    it lists (read loosely: a damaged manifest of the library is still its
    own; only names of the library's form count)."""
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, "rb") as f:
            raw = f.read(64 << 20)
        outer = load_json(raw, file)
    except (OSError, CheckpointError):
        return False, set()
    body = outer.get("body") if isinstance(outer, dict) else None
    if not isinstance(body, dict) or body.get("format") != DIR_FORMAT:
        return False, set()
    shards = body.get("shards")
    files = {s.get("file") for s in shards if isinstance(s, dict)} \
        if isinstance(shards, list) else set()
    return True, {f for f in files if is_shard_name(f)}


class DirectoryWriter:
    """The committing process's side of a save into ``path``: lock, check
    the directory, announce the save, commit its manifest, clean up."""

    def __init__(self, path: str, *, allow_other_files: bool = False):
        self.path = path
        self.allow_other_files = bool(allow_other_files)
        self.save_id = secrets.token_hex(8)
        self._key = None
        self._fd = None
        self.locked = False
        self._previous: set[str] = set()       # the shards of the manifest in place
        self._pending: dict[str, str] = {}     # save id -> its marker's name
        self._replaced: set[str] = set()       # shards the markers say their saves replace

    # ------------------------------------------------------------ begin
    def begin(self) -> str:
        """Takes the lock, checks that the directory is the library's, and
        marks the new save's files as the library's. Returns the save id.
        Raises ConcurrentSaveError, FileExistsError, or OSError; nothing is
        written then (and the lock is released)."""
        try:
            os.makedirs(self.path, exist_ok=True)
            if not os.path.lexists(os.path.join(self.path, LOCK)):
                # No save went through here: refuse before writing the lock file
                # (with a lock file, what another save is changing is no reason).
                self._survey()
            self._lock()
            self._survey()          # what the directory holds, no other save changing it
            # Written in place and synced before any other file of the save: it
            # names them (by the save id) and the shards its manifest replaces.
            marker = PENDING + self.save_id
            with open(os.path.join(self.path, marker), "xb") as f:
                f.write(json.dumps({"save_id": self.save_id, "pid": os.getpid(),
                                    "time": time.time(),
                                    "replaces": sorted(self._previous)}).encode())
                os.fsync(f.fileno())
            self._pending[self.save_id] = marker
            fsync_dir(self.path)
        except BaseException:
            self.release()
            raise
        return self.save_id

    def _lock(self) -> None:
        global _warned_no_lock
        key = os.path.realpath(self.path)
        with _saving_lock:
            if key in _saving:
                raise ConcurrentSaveError(self._busy("another save() of this process"))
            _saving.add(key)
        self._key = key
        if fcntl is None:
            return
        file = os.path.join(self.path, LOCK)
        if os.path.islink(file) or (os.path.lexists(file) and not os.path.isfile(file)):
            raise FileExistsError(f"{file} is not the lock file save() writes (not a regular "
                                  "file): save() does not use it")
        self._fd = os.open(file, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.locked = True
        except BlockingIOError:
            raise ConcurrentSaveError(self._busy("another process")) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            if not _warned_no_lock:
                _warned_no_lock = True
                log.warning("rehearsal buffer: the filesystem of %s does not support file "
                            "locks (%s): concurrent saves into one directory are not "
                            "detected there (the last one to finish wins; none leaves the "
                            "directory unloadable)", self.path, e)

    def _busy(self, who: str) -> str:
        return (f"{who} is saving a checkpoint into {self.path} (it holds {LOCK} there): one "
                "writer at a time. Processes that save together must build their buffers "
                "with the same comm= (save() is then one collective call); otherwise give each "
                "its own directory")

    def _survey(self) -> None:
        """Reads what the directory holds; refuses files the library did not
        write (see the module documentation)."""
        names = set(os.listdir(self.path))
        ours, self._previous = _manifest_shards(self.path)
        if MANIFEST in names and not ours:
            raise FileExistsError(
                f"{os.path.join(self.path, MANIFEST)} is not a manifest written by "
                "dali_rehearsal (unreadable, or another program's): save() never replaces it. "
                "Save into another directory, or remove it if it is a damaged checkpoint")
        self._pending, self._replaced = {}, set()
        for name in names:
            match = _PENDING.fullmatch(name)
            if match:
                self._pending[match.group("id")] = name
                self._replaced |= _replaced_by(os.path.join(self.path, name))
        known = {MANIFEST, LOCK} | self._previous | self._replaced | set(self._pending.values())
        unknown = sorted(n for n in names - known if _save_id_of(n) not in self._pending)
        if unknown and not self.allow_other_files:
            shown = ", ".join(unknown[:_NAMED]) + (f" and {len(unknown) - _NAMED} more"
                                                   if len(unknown) > _NAMED else "")
            raise FileExistsError(
                f"save(): {self.path} holds files dali_rehearsal did not write ({shown}). "
                "save() writes into an empty directory or one holding its own checkpoint, and "
                "never deletes or replaces other files: choose another directory, move them, "
                "or pass allow_other_files=True to write the checkpoint next to them (they are "
                "left untouched)")

    # ----------------------------------------------------------- commit
    def commit(self, manifest: bytes) -> None:
        """Replaces the manifest (the save is then committed)."""
        write_atomically(self.path, MANIFEST, lambda f: f.write(manifest),
                         temporary=manifest_temporary(self.save_id))

    def clean_up(self, keep: set[str]) -> None:
        """After the commit: removes the shards of the replaced manifest and
        what saves that never committed left behind (their files, then their
        marker), keeping ``keep`` (the new manifest's shards). Without a lock
        only this save's own leftovers: other saves may be under way."""
        ids = set(self._pending) if self.locked else {self.save_id}
        doomed = (self._previous | (self._replaced if self.locked else set())) - keep
        try:
            names = os.listdir(self.path)
        except OSError as e:
            log.warning("rehearsal buffer: could not list %s to remove old files: %s",
                        self.path, e)
            return
        doomed |= {n for n in names if n not in keep and _save_id_of(n) in ids}
        for name in sorted(doomed):
            _remove(os.path.join(self.path, name))
        for save_id in ids:
            if save_id in self._pending:
                _remove(os.path.join(self.path, self._pending[save_id]))
        fsync_dir(self.path)

    def abandon(self) -> None:
        """A save that did not commit (every process has stopped writing):
        removes its files and its marker."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            if _save_id_of(name) == self.save_id:
                _remove(os.path.join(self.path, name))
        _remove(os.path.join(self.path, PENDING + self.save_id))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # releases the flock
            self._fd = None
        self.locked = False
        if self._key is not None:
            with _saving_lock:
                _saving.discard(self._key)
            self._key = None


def _replaced_by(marker: str) -> set[str]:
    """The shards a pending save's marker says its manifest replaces (none
    when the marker cannot be read: then that save never got to write)."""
    try:
        with open(marker, "rb") as f:
            listed = load_json(f.read(16 << 20), marker).get("replaces")
    except (OSError, CheckpointError, AttributeError):
        return set()
    return {n for n in listed if is_shard_name(n)} if isinstance(listed, list) else set()


def _remove(file: str) -> None:
    try:
        os.unlink(file)
    except OSError:
        pass
