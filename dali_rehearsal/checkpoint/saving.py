"""Saving a checkpoint directory (:func:`save`): a collective call in steps.

Every process captures its state and writes its shard; rank 0, holding the
directory's lock (:class:`~.directory.DirectoryWriter`), checks that every
shard is where the manifest will say, commits the manifest, then removes
the files the new checkpoint replaced. A failure at any step raises on every
process and removes what this save wrote: the previous checkpoint stays.
"""

from __future__ import annotations

import logging
import os

from ..version import __version__
from .atomic import write_atomically
from .calls import open_call
from .directory import ConcurrentSaveError, DirectoryWriter, shard_name, shard_temporary
from .manifest import DIR_FORMAT, DIR_VERSION, manifest_bytes
from .shards import write_shard
from .state import capture

__all__ = ["save", "SAVE_ERRORS"]

log = logging.getLogger("dali_rehearsal")

#: Errors raised again with their own type on the processes where they did not happen.
SAVE_ERRORS = (ConcurrentSaveError, FileExistsError, FileNotFoundError, PermissionError)


def save(core, path, *, allow_other_files: bool = False) -> None:
    """:meth:`RehearsalBuffer.save`: every process writes its shard, rank 0
    (holding the directory's lock) commits the manifest, then removes the
    files the new checkpoint replaced."""
    path = os.fspath(path)
    with open_call(core, "save") as channel:
        captured: dict = {}

        def take_state():
            captured["state"] = capture(core)

        channel.run("capture", take_state)
        writer = DirectoryWriter(path, allow_other_files=allow_other_files) \
            if channel.rank == 0 else None
        try:
            save_id = channel.run("begin", writer.begin if writer is not None else lambda: None,
                                  errors=SAVE_ERRORS)[0]
            name = shard_name(save_id, core.rank, core.world_size)
            written = []

            def discard():
                """Removes what this save wrote; the previous checkpoint stays."""
                for done in written:
                    _remove(os.path.join(path, done))
                if writer is not None:
                    writer.abandon()

            def write_shard_file():
                state = captured["state"]
                if not os.path.isdir(path):
                    raise FileNotFoundError(
                        f"{path} does not exist on this process's filesystem: with several "
                        "processes the checkpoint directory must be one they all reach")
                sha, nbytes = write_atomically(
                    path, name, lambda f: write_shard(f, state), replace=False,
                    temporary=shard_temporary(save_id, core.rank, core.world_size))
                written.append(name)
                return {"rank": core.rank, "file": name, "sha256": sha, "bytes": nbytes,
                        "settings": state["settings"], "size": state["policy"]["size"],
                        "num_seen": state["policy"]["num_seen"]}

            try:
                entries = channel.run("shards", write_shard_file, errors=SAVE_ERRORS)
            except BaseException:
                if channel.in_step:          # every process has stopped writing
                    discard()
                raise
            body = {"format": DIR_FORMAT, "version": DIR_VERSION, "save_id": save_id,
                    "world_size": core.world_size, "library_version": __version__,
                    "shards": entries}
            committed = []

            def commit():
                if writer is not None:
                    for entry in entries:
                        _check_written(path, entry)
                    writer.commit(manifest_bytes(body))
                    committed.append(True)

            try:
                channel.run("commit", commit, errors=SAVE_ERRORS)
            except BaseException:
                if committed:
                    writer.clean_up({e["file"] for e in entries})
                elif channel.in_step:        # nobody needs the new files
                    discard()
                raise
            # Every process returns once the directory holds the new checkpoint alone.
            channel.run("clean up", lambda: writer.clean_up({e["file"] for e in entries})
                        if writer is not None else None)
        finally:
            if writer is not None:
                writer.release()
    log.log(core.log_level, "rehearsal buffer: checkpoint saved in %s (%d shard%s, "
            "%d samples)", path, len(entries), "" if len(entries) == 1 else "s",
            sum(e["size"] for e in entries))


def _check_written(path: str, entry: dict) -> None:
    """Rank 0 sees every process's shard where the manifest will say it is."""
    try:
        size = os.stat(os.path.join(path, entry["file"])).st_size
    except FileNotFoundError:
        size = None
    if size != entry["bytes"]:
        raise FileNotFoundError(
            f"rank {entry['rank']}'s shard {entry['file']} is not in {path} as rank 0 sees it: "
            "every process must save into the same directory, on a filesystem they all reach")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
