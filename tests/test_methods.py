"""Rehearsal methods: task-aware replay (representatives only from earlier tasks).

One test body over the backends (NumPy the reference, the emulated GPU where
the emulation is installed: see tests/test_gpu_emulated.py), real MNIST
digits, every row's pairing checked by its pixels.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import chisquare

import dali_rehearsal as dr
from test_global_sampling import MPI, TRANSPORTS, run
from utils import to_host

B, R = 8, 4


def _ids_batch(task: int, step: int, b: int = B):
    """Rows whose content names them: id = task * 10_000 + step * 100 + i, the
    label is the task (two classes per task: 2 * task and 2 * task + 1)."""
    ids = task * 10_000 + step * 100 + np.arange(b, dtype=np.int64)
    images = np.repeat(ids[:, None], 3, axis=1)
    labels = (2 * task + (ids % 2)).astype(np.int64)
    return images, labels


def _rows(out):
    images, labels = (np.asarray(to_host(f)) for f in out)
    return images[:, 0], labels


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_task_aware_replays_only_earlier_tasks(policy):
    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=R, policy=policy,
                                device="cpu", seed=0, task_aware=True)
    assert buffer.task_aware and buffer.task == 0
    # The first task: nothing to replay, b rows a step, like incremental training.
    for step in range(10):
        ids, labels = _rows(buffer.mix(*_ids_batch(0, step)))
        assert len(ids) == B
        assert (ids // 10_000 == 0).all()
    buffer.end_task()
    assert buffer.task == 1
    for task in (1, 2, 3):
        for step in range(15):
            ids, labels = _rows(buffer.mix(*_ids_batch(task, step)))
            fresh, reps = ids[:B], ids[B:]
            assert (fresh // 10_000 == task).all()
            assert len(reps) == R, "earlier tasks hold more than r samples"
            # every representative is an earlier task's sample, with its own label
            assert (reps // 10_000 < task).all(), reps
            assert (labels[B:] == 2 * (reps // 10_000) + reps % 2).all()
            assert len(set(reps.tolist())) == R
        buffer.end_task()


def test_without_task_aware_the_current_task_is_replayed():
    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=R, policy="reservoir",
                                device="cpu", seed=0)
    current = 0
    for step in range(10):
        ids, _ = _rows(buffer.mix(*_ids_batch(0, step)))
        current += int((ids[B:] // 10_000 == 0).sum())
    assert current > 0      # online experience replay: task 0 replays itself
    buffer.end_task()       # counts tasks only
    assert buffer.task == 1


def test_task_aware_draws_are_uniform_over_earlier_samples():
    """Draws are uniform over the slots stored before the current task, also
    while the current task overwrites some of them (reservoir)."""
    capacity, r = 30, 5
    buffer = dr.RehearsalBuffer(capacity=capacity, num_representatives=r, policy="reservoir",
                                device="cpu", seed=3, task_aware=True)
    buffer.add(*_ids_batch(0, 0, b=capacity))        # fills every slot with task 0
    buffer.end_task()
    counts: dict[int, int] = {}
    steps = 1500
    old = set(range(capacity))
    for step in range(steps):
        # the same sample set every step: add() nothing, draw with mix() of a
        # batch the reservoir no longer keeps (the buffer has seen many samples)
        reps = buffer.core.begin()
        slots = reps.origin[:, 1]
        for s in slots.tolist():
            counts[s] = counts.get(s, 0) + 1
        assert set(slots.tolist()) <= old
        # commit nothing new: write the draws into scratch rows, insert no fresh row
        out = buffer.core.empty_rows(r)
        buffer.core.commit(out, 0, np.empty(0, np.int64), reps)
    observed = np.array([counts.get(s, 0) for s in range(capacity)])
    assert chisquare(observed, np.full(capacity, steps * r / capacity)).pvalue > 1e-3


def test_overwritten_earlier_samples_are_no_longer_replayed():
    """Each step replays only earlier-task samples still stored before it: one
    the current task overwrote is never drawn."""
    capacity = 16
    buffer = dr.RehearsalBuffer(capacity=capacity, num_representatives=R, policy="reservoir",
                                device="cpu", seed=1, task_aware=True)
    buffer.add(*_ids_batch(0, 0, b=capacity))
    buffer.end_task()
    replaced = 0
    for step in range(60):
        stored = np.asarray(to_host(buffer.stored(0)))[:, 0].copy()
        left = set((stored[stored // 10_000 == 0]).tolist())
        ids, _ = _rows(buffer.mix(*_ids_batch(1, step)))
        assert set(ids[B:].tolist()) <= left
        assert len(ids) == B + min(R, len(left))
        replaced = capacity - len(left)
    assert replaced > 0       # the test saw task 1 overwrite task 0 samples


def test_task_aware_must_be_a_bool():
    with pytest.raises(TypeError, match="task_aware"):
        dr.RehearsalBuffer(capacity=4, num_representatives=1, device="cpu", task_aware="yes")


def test_end_task_on_a_closed_buffer_raises():
    buffer = dr.RehearsalBuffer(capacity=4, num_representatives=1, device="cpu",
                                task_aware=True)
    buffer.close()
    with pytest.raises(RuntimeError, match="closed"):
        buffer.end_task()


# ------------------------------------------------------------ global sampling
@pytest.mark.parametrize("transport,n", [(t, 2) for t in TRANSPORTS] + [(MPI, 4)])
def test_task_aware_global_replays_earlier_tasks_from_every_rank(transport, n, tmp_path):
    results, _ = run(transport, n, "task_aware", tmp_path)
    for r in results.values():
        assert r["first_task_rows"] == [3] * 8, "the first task trains on b rows"
        assert r["mispaired"] == 0 and r["duplicates"] == 0, r
        assert r["wrong_task"] == 0, r
        assert r["wrong_origin"] == 0, r
        assert r["checked"] == 16 * 5
        assert r["remote"] > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_task_aware_global_draws_are_uniform_over_rank_and_slot(transport, tmp_path):
    results, _ = run(transport, 2, "task_aware_uniform", tmp_path)
    counts = sum(np.concatenate([np.asarray(c) for c in r["counts"]]) for r in results.values())
    assert counts.sum() == results[0]["steps"] * 2 * 5
    assert chisquare(counts).pvalue > 1e-3, counts


# ------------------------------------------------------------------ the DALI stage
def test_task_aware_through_the_stage(mnist):
    """Real DALI pipelines over MNIST PNGs, two tasks of five classes: task 0
    delivers b rows a step, task 1 replays only task-0 digits; end_task()
    stops the first task's stage."""
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("torch")
    from utils import assert_unchanged, mixing_pipeline, run_epochs, snapshot, source_pipeline

    files = dr.LabelledFiles.from_folder(mnist[0])
    b, r = 16, 6
    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=r, device="cpu", seed=0,
                                task_aware=True)
    for task, classes in enumerate([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]):
        data = files.subset(classes)
        src = source_pipeline(b, files=list(data.files), labels=list(data.labels),
                              random_shuffle=True, seed=10 + task)
        pipe = mixing_pipeline(src, buffer, b + r, seed=20 + task)
        epochs = run_epochs(pipe, ["images", "labels", "flag"], 2)
        for batches in epochs:
            for batch in batches:
                flags, labels = batch["flag"], batch["labels"].reshape(-1)
                fresh, replayed = labels[flags == 0], labels[flags == 1]
                assert set(fresh.tolist()) <= set(classes)
                if task == 0:
                    assert len(replayed) == 0 and len(labels) == len(fresh)
                else:
                    assert len(replayed) == r
                    assert set(replayed.tolist()) <= {0, 1, 2, 3, 4}
        buffer.end_task()
        # the stage is stopped: its worker writes nothing more into the buffer
        held = snapshot(buffer)
        time.sleep(0.3)
        assert_unchanged(buffer, held)
        # each task: 2 epochs of its files, plus at most what the stage built
        # ahead (DALI prefetch 2, prepare_ahead 2, the step being built)
        assert held.num_seen <= (task + 1) * (2 * len(data.files) + 5 * b)
    buffer.close()


# ------------------------------------------------------------------ checkpoints
def _two_tasks(buffer, steps=12):
    for task in range(2):
        for step in range(steps):
            buffer.mix(*_ids_batch(task, step))
        buffer.end_task()
    for step in range(5):                   # into the third task
        buffer.mix(*_ids_batch(2, step))


@pytest.mark.parametrize("how", ["state_dict", "directory"])
def test_task_aware_resumes_exactly_from_a_checkpoint(how, tmp_path):
    kwargs = dict(capacity=30, num_representatives=R, policy="class_balanced", device="cpu",
                  seed=7, task_aware=True)
    ref = dr.RehearsalBuffer(**kwargs)
    _two_tasks(ref)
    resumed = dr.RehearsalBuffer(**kwargs)
    if how == "state_dict":
        resumed.load_state_dict(ref.state_dict())
    else:
        ref.save(tmp_path / "ckpt")
        resumed.load(tmp_path / "ckpt")
    assert resumed.task == ref.task == 2
    for step in range(5, 15):
        a = _rows(ref.mix(*_ids_batch(2, step)))
        b = _rows(resumed.mix(*_ids_batch(2, step)))
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
        assert (a[0][B:] // 10_000 < 2).all()


def test_an_elastic_load_keeps_each_sample_s_task(tmp_path):
    """Loading into a buffer of another capacity redistributes the samples;
    each keeps the task it was stored in, so task-aware replay goes on
    drawing only earlier tasks."""
    ref = dr.RehearsalBuffer(capacity=30, num_representatives=R, policy="reservoir",
                             device="cpu", seed=7, task_aware=True)
    _two_tasks(ref)
    ref.save(tmp_path / "ckpt")
    small = dr.RehearsalBuffer(capacity=20, num_representatives=R, policy="reservoir",
                               device="cpu", seed=8, task_aware=True)
    small.load(tmp_path / "ckpt", resize=True)
    assert small.task == 2 and small.size == 20
    ids = np.asarray(to_host(small.stored(0)))[:, 0]
    tasks = small.core.policy.slot_task[: small.size]
    assert (tasks == ids // 10_000).all()
    for step in range(5, 25):
        got, labels = _rows(small.mix(*_ids_batch(2, step)))
        assert (got[B:] // 10_000 < 2).all()


def test_a_state_without_task_bookkeeping_loads_as_task_0():
    """States saved before tasks were recorded load: every sample from task 0."""
    ref = dr.RehearsalBuffer(capacity=30, num_representatives=R, device="cpu", seed=7)
    for step in range(6):
        ref.mix(*_ids_batch(0, step))
    state = ref.state_dict()
    del state["policy"]["task"], state["policy"]["slot_task"]
    new = dr.RehearsalBuffer(capacity=30, num_representatives=R, device="cpu", seed=7,
                             task_aware=True)
    new.load_state_dict(state)
    assert new.task == 0 and new.size == ref.size
    new.end_task()
    ids, _ = _rows(new.mix(*_ids_batch(1, 0)))
    assert len(ids) == B + R and (ids[B:] // 10_000 == 0).all()


@pytest.mark.parametrize("bad,match", [
    (lambda p: p.update(task=-1), "task"),
    (lambda p: p.pop("task"), "go together"),
    (lambda p: p["slot_task"].__setitem__(0, 5), "slot_task"),
])
def test_bad_task_bookkeeping_is_refused(bad, match):
    ref = dr.RehearsalBuffer(capacity=30, num_representatives=R, device="cpu", seed=7,
                             task_aware=True)
    _two_tasks(ref, steps=3)
    state = ref.state_dict()
    state["policy"] = {k: (v.numpy().copy() if hasattr(v, "numpy") else v)
                       for k, v in state["policy"].items()}
    bad(state["policy"])
    new = dr.RehearsalBuffer(capacity=30, num_representatives=R, device="cpu", seed=7,
                             task_aware=True)
    with pytest.raises(dr.CheckpointError, match=match):
        new.load_state_dict(state)
    assert new.size == 0
