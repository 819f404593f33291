"""A checkpoint directory of ``N`` processes loaded on ``M`` processes (or
into buffers of other capacities): every process reads every shard's
metadata, checks each shard against a policy of the saved kind and capacity,
and takes its share of the samples.

Which samples each process keeps, and the policy state that goes with them,
is the policy's decision (:meth:`~dali_rehearsal.policies.InsertionPolicy.redistribute`):
this module names no policy. Every process computes the same plan from the
same random stream (rank 0's seed and the shards' checksums), then reads only
the rows of its own share, shard by shard, in file order. The random streams
of the new buffers are their own: those of the checkpoint belong to processes
of another layout, and the sampler starts afresh (the sampling mode may
differ).
"""

from __future__ import annotations

import numpy as np

from ..policies import make_policy
from .files import CheckpointError
from .shards import Shard, in_file
from .state import Prepared
from .validation import check_settings, check_state, check_storage, compare_settings

__all__ = ["prepare_elastic"]


def prepare_elastic(core, path, entries, capacities, seed, shards, digest=None) -> Prepared:
    """This process's share of a checkpoint of ``len(entries)`` processes,
    over processes of ``capacities`` (one per process, in rank order):
    checked, with the rows read. ``seed``: the plan's random stream, the same
    on every process. Opened shards are appended to ``shards``."""
    states = []
    for entry in entries:
        shard = Shard(path, entry, digest)
        shards.append(shard)
        try:
            saved = check_settings(shard.state["settings"])
            compare_settings(core, saved, ("num_representatives", "policy", "label_index"))
            # (the capacity is backed by the file: see Shard)
            checker = make_policy(saved["policy"], saved["capacity"], np.random.default_rng(0))
            states.append(check_state(shard.state, checker))
        except CheckpointError as e:
            raise in_file(shard.file, e) from None
    layouts = {None if s.spec is None else tuple((f.shape, f.dtype.str) for f in s.spec)
               for s in states} - {None}
    if len(layouts) > 1:
        raise CheckpointError(f"{path}: the shards store samples of different layouts")
    spec = next((s.spec for s in states if s.spec is not None), None)
    check_storage(core, spec, path)

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    try:
        mine, state = core.policy.redistribute([s.policy_state for s in states],
                                               np.asarray(capacities, dtype=np.int64),
                                               core.rank, rng)
        # Every sample keeps the task it was stored in (task-aware replay),
        # whichever process it moves to; the task count is the furthest.
        stored_tasks = np.concatenate([np.zeros(0, np.int64)] + [
            np.asarray(s.policy_state["slot_task"][: s.policy_state["size"]], np.int64)
            for s in states])
        state["task"] = max(int(s.policy_state["task"]) for s in states)
        state["slot_task"] = np.zeros(core.capacity, dtype=np.int64)
        state["slot_task"][: len(mine)] = stored_tasks[mine]
        valid = core.policy.validate_state(state)
    except ValueError as e:
        raise CheckpointError(f"internal: redistributed state is inconsistent: {e}") from None

    # This process's samples, slot by slot: sample j of the checkpoint is
    # slot slot[j] of shard source[j].
    sizes = np.array([len(s.labels) for s in states], dtype=np.int64)
    source = np.repeat(np.arange(len(states)), sizes)
    slot = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
    fields = [] if spec is None else [np.empty((len(mine),) + f.shape, f.dtype) for f in spec]
    for k, s in enumerate(states):
        pick = np.flatnonzero(source[mine] == k)
        if len(pick) == 0:
            continue
        rows = slot[mine[pick]]
        order = np.argsort(rows, kind="stable")
        for out, field in zip(fields, s.fields):
            out[pick[order]] = field.read_rows(rows[order])
    return Prepared(spec, fields, valid, None)
