"""Loading a checkpoint directory (:func:`load`): a collective call in steps.

Every process reads and checks the manifest (the processes must read the
same one); then each prepares what it will hold: its own shard when the
checkpoint was saved by as many processes with the same capacities (an exact
restore), else its share of every shard (:mod:`.elastic`). Everything is
checked on every process before any buffer changes; a failure on one process
raises on every process and changes nothing.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .calls import open_call
from .elastic import prepare_elastic
from .files import CheckpointError, FieldReader
from .manifest import read_manifest
from .shards import Replaced, Shard, in_file
from .state import Prepared, apply
from .validation import SETTINGS, check_empty, check_sampler_state, check_settings, \
    check_state, check_storage, compare_settings

__all__ = ["load", "LOAD_ERRORS"]

log = logging.getLogger("dali_rehearsal")

#: Errors raised again with their own type on the processes where they did not happen.
LOAD_ERRORS = (FileNotFoundError, CheckpointError, RuntimeError)


def load(core, path, *, resize: bool = False) -> None:
    """:meth:`RehearsalBuffer.load`. A single process whose checkpoint is
    replaced while it reads it (another process saving into the directory)
    reads the new one."""
    path = os.fspath(path)
    alone = core.comm is None or core.world_size == 1
    for attempt in range(3):
        try:
            return _load(core, path, resize)
        except Replaced:
            if not alone or attempt == 2:
                raise


def _load(core, path, resize: bool) -> None:
    shards: list[Shard] = []
    with open_call(core, "load") as channel:
        try:
            found: dict = {}

            def open_manifest():
                check_empty(core)
                found["manifest"], digest = read_manifest(path)
                entropy = (int(np.random.SeedSequence().entropy) if core.seed is None
                           else int(core.seed))
                return {"capacity": core.capacity, "entropy": entropy, "manifest": digest}

            everyone = channel.run("manifest", open_manifest, error_type=CheckpointError,
                                   errors=LOAD_ERRORS)
            digest = everyone[0]["manifest"]
            if len({e["manifest"] for e in everyone}) > 1:
                raise CheckpointError(f"the processes read different manifests in {path}: it "
                                      "was replaced while they loaded it (a save() into it); "
                                      "load it again")
            entries = found["manifest"]["shards"]
            capacities = [e["capacity"] for e in everyone]
            exact = (len(entries) == core.world_size
                     and capacities == [e["settings"]["capacity"] for e in entries])
            prepared: dict = {}

            def prepare():
                if exact:
                    prepared["state"] = _prepare_exact(core, path, entries[core.rank], shards,
                                                       digest)
                    return
                saved = {e["settings"]["capacity"] for e in entries}
                if not resize and saved != set(capacities):
                    raise CheckpointError(
                        f"the saved buffers have capacity={sorted(saved)}, these "
                        f"{sorted(set(capacities))}; load(path, resize=True) redistributes "
                        "the samples into buffers of another capacity")
                seed = [everyone[0]["entropy"]] + [int(e["sha256"][:16], 16) for e in entries]
                prepared["state"] = prepare_elastic(core, path, entries, capacities, seed,
                                                    shards, digest)

            channel.run("prepare", prepare, error_type=CheckpointError, errors=LOAD_ERRORS)
            apply(core, prepared["state"])
        finally:
            for shard in shards:
                shard.close()
    log.log(core.log_level, "rehearsal buffer: checkpoint of %d process(es) loaded "
            "from %s%s", len(entries), path,
            "" if exact else f" and redistributed over {core.world_size}")


def _prepare_exact(core, path, entry, shards, digest=None) -> Prepared:
    """This process's own shard, checked against this buffer."""
    shard = Shard(path, entry, digest)
    shards.append(shard)
    try:
        compare_settings(core, check_settings(shard.state["settings"]), SETTINGS)
        checked = check_state(shard.state, core.policy)
        sampler_state = check_sampler_state(core.sampler, checked.sampler_state)
        check_storage(core, checked.spec, shard.file)
    except CheckpointError as e:
        raise in_file(shard.file, e) from None
    fields = [f.read() if isinstance(f, FieldReader) else f for f in checked.fields]
    return Prepared(checked.spec, fields, checked.policy_state, sampler_state)
