"""Epochs and last-batch policies of the stage against DALI's own iterator.

The whole matrix: policy x ``pad_last_batch`` x shards (1, 2, 3) x
``stick_to_shard`` x ``random_shuffle``, over data sets whose shards do and do
not divide the batch size. Each configuration runs a real DALI file reader over
tiny files (4 bytes each: the file's index, which is also its label) once under
``DALIGenericIterator(reader_name=..., last_batch_policy=...)`` and once behind
the stage, for several epochs with ``auto_reset``. What must hold:

- the same number of batches per epoch as DALI's iterator, never an empty epoch;
- ``PARTIAL``: every sample of the epoch's shard exactly once;
- ``FILL``: exactly DALI's batches;
- ``DROP``: full batches holding the reader's stream in order, padding left out,
  nothing skipped (so nothing starves);
- representatives only from samples delivered earlier.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import dali_rehearsal as dr
from dali_rehearsal.epochs import DaliIteratorSteps, EpochPlan

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")
from nvidia.dali import fn, pipeline_def  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402

B, EPOCHS = 4, 4
P = dr.LastBatchPolicy


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = []
    for i in range(17):
        path = root / f"{i:03d}.bin"
        np.array([i], dtype=np.int32).tofile(path)
        paths.append(str(path))
    return paths


def reader_pipeline(paths, n, *, batch_size=B, **reader):
    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=7,
                  prefetch_queue_depth=2)
    def read():
        data, labels = fn.readers.file(files=paths[:n], labels=list(range(n)), name="Reader",
                                       **reader)
        return data, labels

    return read()


def ids(batch) -> list[int]:
    return batch.reshape(-1).tolist()


def dali_epochs(paths, n, policy, reader):
    it = DALIGenericIterator(reader_pipeline(paths, n, **reader), ["data", "labels"],
                             reader_name="Reader", last_batch_policy=policy, auto_reset=True)
    return [[ids(batch[0]["labels"].numpy()) for batch in it] for _ in range(EPOCHS)]


def stage_epochs(paths, n, policy, reader):
    buffer = dr.RehearsalBuffer(capacity=6, num_representatives=1, policy="reservoir",
                                device="cpu", seed=0)

    @pipeline_def(batch_size=B + 1, num_threads=1, device_id=None, seed=8)
    def mix(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, last_batch_policy=policy,
                                     replay_flag=True, prepare_ahead=0))

    pipe = mix(reader_pipeline(paths, n, **reader))
    it = DALIGenericIterator(pipe, ["data", "labels", "flag"], auto_reset=True)
    epochs, delivered = [], set()
    for _ in range(EPOCHS):
        epoch = []
        for batch in it:
            labels = ids(batch[0]["labels"].numpy())
            data = batch[0]["data"].numpy().view(np.int32).reshape(-1).tolist()
            assert data == labels                               # rows stay whole
            flag = ids(batch[0]["flag"].numpy())
            nf = flag.count(0)
            assert flag == [0] * nf + [1] * (len(flag) - nf)
            assert set(labels[nf:]) <= delivered                # replayed: delivered before
            delivered |= set(labels[:nf])
            epoch.append(labels[:nf])
        epochs.append(epoch)
    buffer.close()
    return epochs, pipe


def reader_stream(paths, n, reader, steps):
    """The reader's positions as ``(sample, reader epoch)``, with padding marked
    ``(None, epoch)`` (layout from EpochPlan, whose padding positions the FILL
    comparison with DALI checks)."""
    pipe = reader_pipeline(paths, n, **reader)
    pipe.build()
    raw = []
    for _ in range(steps):
        raw += ids(pipe.run()[1].as_array())
    plan = EpochPlan(pipe.reader_meta("Reader"), B)
    marked, e = [], 0
    while len(marked) < len(raw):
        for kind, count, _ in plan.reader_epoch(e):
            part = raw[len(marked):len(marked) + count]
            marked += [(i if kind == "real" else None, e) for i in part]
        e += 1
    return marked[: len(raw)]


def shard_ids(n, shard, num_shards):
    lo, hi = n * shard // num_shards, n * (shard + 1) // num_shards
    return list(range(lo, hi))


MATRIX = list(itertools.product(
    ["PARTIAL", "FILL", "DROP"], [False, True], [(1, 0), (2, 1), (3, 2)], [False, True],
    [False, True]))


@pytest.mark.parametrize("n", [12, 17, 10])
@pytest.mark.parametrize("policy, pad, shards, stick, shuffle", MATRIX)
def test_epochs_match_dalis_iterator(tiny_files, n, policy, pad, shards, stick, shuffle):
    num_shards, shard_id = shards
    reader = dict(num_shards=num_shards, shard_id=shard_id, pad_last_batch=pad,
                  stick_to_shard=stick, random_shuffle=shuffle)
    lbp = getattr(P, policy)
    if policy == "DROP" and n // num_shards < B:
        # DALI's iterator has no batch to give ("no data in the pipeline"); the
        # stage says why at once
        with pytest.raises(ValueError, match="every epoch would be empty"):
            stage_epochs(tiny_files, n, lbp, reader)
        return
    ref = dali_epochs(tiny_files, n, lbp, reader)
    got, pipe = stage_epochs(tiny_files, n, lbp, reader)

    assert [len(e) for e in got] == [len(e) for e in ref]                # DALI's count
    assert [dr.steps_per_epoch(pipe, e) for e in range(EPOCHS)] == [len(e) for e in got]
    assert all(len(e) > 0 for e in got)                                  # never empty
    for e, epoch in enumerate(got):
        assert all(len(batch) == B for batch in epoch[:-1]) or policy == "PARTIAL"
    stream = reader_stream(tiny_files, n, reader, 4 * sum(len(e) for e in got) + 8)
    real = [i for i, _ in stream if i is not None]
    if policy == "PARTIAL":
        for e, epoch in enumerate(got):
            fresh = [i for batch in epoch for i in batch]
            # exactly the reader's epoch e, in its order, padding left out
            assert fresh == [i for i, r in stream if r == e and i is not None]
            if not shuffle:
                shard = shard_id if stick else (shard_id + e) % num_shards
                assert fresh == shard_ids(n, shard, num_shards)
            sizes = [len(batch) for batch in epoch]
            full = [s for s in sizes if s]
            assert full[:-1] == [B] * (len(full) - 1)
            assert sizes[len(full):] == [0] * (len(sizes) - len(full))   # replay-only steps
    elif policy == "FILL":
        assert got == ref                                                # DALI's batches
    else:  # DROP
        delivered = [i for epoch in got for batch in epoch for i in batch]
        assert all(len(batch) == B for epoch in got for batch in epoch)
        assert delivered == real[: len(delivered)]                       # nothing skipped
    if policy != "PARTIAL" and not shuffle:
        # no sample starves: the first epoch's shard is delivered within two epochs
        first = set(i for epoch in got[:2] for batch in epoch for i in batch)
        assert set(shard_ids(n, shard_id, num_shards)) <= first


def test_the_issue_cases_of_dalis_iterator_counts():
    """The cases reported against the first stage, as DALI's iterator counts
    them (checked by running it): 43 files, 2 shards, FILL without padding."""
    meta = dict(epoch_size=43, number_of_shards=2, shard_id=0, pad_last_batch=False,
                stick_to_shard=False, epoch_size_padded=44)
    fill32 = DaliIteratorSteps(meta, 32, "FILL")
    assert [fill32.next_epoch() for _ in range(4)] == [1, 1, 1, 1]   # no empty epoch
    fill8 = DaliIteratorSteps(meta, 8, "FILL")
    assert [fill8.next_epoch() for _ in range(4)] == [3, 3, 3, 2]
    one = dict(meta, number_of_shards=1, epoch_size_padded=43)
    drop = DaliIteratorSteps(one, 8, "DROP")
    assert [drop.next_epoch() for _ in range(3)] == [5, 5, 5]
