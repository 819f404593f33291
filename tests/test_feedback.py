"""Model feedback into the buffer (DER's logits): tickets, ``update``, stale
tickets dropped, feedback fields through ``mix``, the DALI stage,
checkpoints, elastic restores and global sampling (mpiexec and torchrun).

Rows name themselves (an image row repeats its id): every value written
back is a function of the id, so a value applied to another sample shows.
The GPU paths are in tests/test_gpu_emulated.py (the same checks on the
emulated GPU against NumPy, and the orderings with teeth).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import dali_rehearsal as dr
from test_global_sampling import TRANSPORTS, run
from utils import ident_batch, to_host

FEEDBACK = {"logits": ((3,), "float32")}


def _batch(step: int, b: int = 4):
    ids = step * 100 + np.arange(b, dtype=np.int64)
    return np.repeat(ids[:, None], 2, axis=1), ids % 5


def _value(ids):
    """The logits written back for samples ``ids``."""
    ids = np.asarray(ids, np.float32)
    return np.stack([ids, -ids, ids / 4], axis=1)


def _buffer(**kw):
    args = dict(capacity=10, num_representatives=3, device="cpu", seed=0,
                policy="reservoir", feedback=FEEDBACK)
    args.update(kw)
    return dr.RehearsalBuffer(**args)


def _check_rows(out, b):
    """Every row flagged written carries its own sample's value; fresh rows
    are zeros, flag 0. Returns (ids, written, tickets)."""
    images, labels, logits, written, tickets = (np.asarray(to_host(a)) for a in out)
    ids = images[:, 0]
    assert (labels == ids % 5).all()
    assert logits.dtype == np.float32 and written.dtype == np.uint8
    assert tickets.dtype == np.int64 and tickets.shape == (len(ids), 3)
    assert (written[:b] == 0).all() and (logits[:b] == 0).all()
    w = written == 1
    np.testing.assert_array_equal(logits[w], _value(ids[w]))
    assert (logits[~w] == 0).all()
    return ids, written, tickets


def test_written_back_logits_come_back_with_their_samples(xp, device):
    """DER's loop: the fresh rows' logits written back after each step; every
    representative brings its own, flagged written. NumPy, and CuPy on a GPU
    (tickets and values given as device arrays)."""
    buf = _buffer(device=device)
    assert buf.feedback_fields == ("logits",)
    seen_written = 0
    for step in range(30):
        out = buf.mix(*_batch(step))
        ids, written, tickets = _check_rows(out, 4)
        assert (tickets[:, 0] == 0).all()
        seen_written += int(written[4:].sum())
        buf.update(out[-1][:4], logits=xp.asarray(_value(ids[:4])))
    assert seen_written > 60            # nearly every representative was written
    stats = buf.feedback_stats()
    assert stats["applied"] + stats["not_stored"] == 30 * 4
    assert stats["stale"] == 0         # mix is not ahead of the loop: nothing overwritten
    images, _, logits, written, tickets = (to_host(a) for a in buf.stored())
    np.testing.assert_array_equal(logits[written == 1], _value(images[written == 1, 0]))
    assert (tickets[:, 1] == np.arange(buf.size)).all()


def test_a_ticket_whose_slot_was_overwritten_is_dropped_and_counted(device):
    buf = _buffer(capacity=4, num_representatives=2, device=device)
    out = buf.mix(*_batch(0))
    ids, _, first = _check_rows(out, 4)
    for step in range(1, 6):            # every slot is overwritten (reservoir, 24 offers)
        buf.mix(*_batch(step))
    buf.update(first, logits=_value(ids))
    stats = buf.feedback_stats()
    replaced = int(sum(g != buf.core.feedback.generation[s] for _, s, g in first))
    assert stats["stale"] == replaced and stats["applied"] == 4 - replaced
    # no stored sample carries another's value
    images, _, logits, written, _ = (to_host(a) for a in buf.stored())
    np.testing.assert_array_equal(logits[written == 1], _value(images[written == 1, 0]))


def test_tickets_and_values_from_torch_tensors_with_a_graph():
    torch = pytest.importorskip("torch")
    buf = _buffer()
    ids, _, tickets = _check_rows(buf.mix(*_batch(0)), 4)
    logits = torch.tensor(_value(ids), dtype=torch.float64, requires_grad=True) * 1
    buf.update(torch.from_numpy(tickets), logits=logits)    # cast to float32, detached
    _, _, stored, written, _ = buf.stored()
    assert written.tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(stored, _value(ids))


def test_add_and_sample_carry_feedback_fields():
    buf = _buffer()
    images, labels = _batch(0, 6)
    buf.add(images, labels)
    drawn, _, logits, written, tickets = buf.sample(4)
    assert (written == 0).all() and (logits == 0).all()
    assert sorted(tickets[:, 1].tolist()) == sorted(set(tickets[:, 1].tolist()))
    buf.update(tickets, logits=_value(drawn[:, 0]))
    images, _, logits, written, _ = buf.stored()
    assert written.sum() == 4
    np.testing.assert_array_equal(logits[written == 1], _value(images[written == 1, 0]))
    _check_rows(buf.mix(*_batch(1)), 4)


@pytest.mark.parametrize("bad, error, match", [
    ([1, 2, 3], TypeError, "feedback must be a dict"),
    ({}, ValueError, "declares no field"),
    ({"ticket": (3,)}, ValueError, "reserved"),
    ({"not a name": (3,)}, ValueError, "identifiers"),
    ({"logits": (0,)}, ValueError, "positive integers"),
    ({"logits": ((3,), "U4")}, TypeError, "not numeric"),
    ({"logits": ((3,), "nonsense")}, TypeError, "not a dtype"),
])
def test_bad_feedback_declarations_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        _buffer(feedback=bad)


def test_a_bare_shape_means_float32():
    buf = _buffer(feedback={"score": 1, "logits": (2,)})
    out = buf.mix(*_batch(0))
    assert [a.dtype for a in out[2:4]] == [np.float32, np.float32]
    assert out[2].shape == (4, 1) and out[3].shape == (4, 2)
    buf.update(out[-1], score=np.ones((4, 1)))       # one field; the other keeps its zeros
    _, _, score, logits, written, _ = buf.stored()
    assert (score == 1).all() and (logits == 0).all() and (written == 1).all()


def test_bad_updates_raise_before_anything_changes():
    plain = dr.RehearsalBuffer(capacity=4, num_representatives=1, device="cpu")
    plain.mix(*_batch(0))
    with pytest.raises(RuntimeError, match="feedback fields"):
        plain.update(np.zeros((1, 3), np.int64), logits=np.zeros((1, 3)))
    buf = _buffer()
    with pytest.raises(RuntimeError, match="no ticket yet"):
        buf.update(np.zeros((1, 3), np.int64), logits=np.zeros((1, 3)))
    ids, _, tickets = _check_rows(buf.mix(*_batch(0)), 4)
    cases = [
        (dict(tickets=tickets[:, :2], logits=_value(ids)), ValueError, r"\(n, 3\) integer"),
        (dict(tickets=tickets.astype(float), logits=_value(ids)), ValueError, "integer array"),
        (dict(tickets=tickets, logits=_value(ids)[:3]), ValueError, "shape"),
        (dict(tickets=tickets, scores=_value(ids)), ValueError, "feedback fields are"),
        (dict(tickets=tickets), ValueError, "at least one"),
        (dict(tickets=tickets + [[1, 0, 0]], logits=_value(ids)), ValueError, "ranks or slots"),
        (dict(tickets=tickets + [[0, 50, 0]], logits=_value(ids)), ValueError, "ranks or slots"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            buf.update(**kwargs)
    assert buf.feedback_stats()["applied"] == 0
    assert (buf.stored()[3] == 0).all()
    buf.close()
    with pytest.raises(RuntimeError, match="closed"):
        buf.update(tickets, logits=_value(ids))


def _trained(buf, steps=12):
    for step in range(steps):
        ids, _, tickets = _check_rows(buf.mix(*_batch(step)), 4)
        buf.update(tickets[:4], logits=_value(ids[:4]))
    return tickets


@pytest.mark.parametrize("how", ["state_dict", "directory"])
def test_checkpoints_keep_feedback_and_void_older_tickets(how, tmp_path):
    buf = _buffer(seed=3)
    old_tickets = _trained(buf)
    other = _buffer(seed=3)
    if how == "state_dict":
        other.load_state_dict(buf.state_dict())
    else:
        buf.save(tmp_path / "ckpt")
        other.load(tmp_path / "ckpt")
    for a, b in zip(other.stored()[:4], buf.stored()[:4]):
        np.testing.assert_array_equal(a, b)      # samples, logits and flags
    # tickets handed out before the load name no sample of the loaded buffer
    other.update(old_tickets, logits=np.full((len(old_tickets), 3), 7, np.float32))
    stats = other.feedback_stats()
    assert stats["applied"] == 0
    assert stats["stale"] == int((old_tickets[:, 1] >= 0).sum())
    assert stats["not_stored"] == int((old_tickets[:, 1] < 0).sum())
    # and it goes on exactly as the original
    for step in range(12, 18):
        a, b = buf.mix(*_batch(step)), other.mix(*_batch(step))
        for x, y in zip(a[:4], b[:4]):
            np.testing.assert_array_equal(x, y)
        _check_rows(b, 4)


def test_feedback_declarations_must_match_to_load(tmp_path):
    buf = _buffer()
    _trained(buf, 3)
    state = buf.state_dict()
    with pytest.raises(dr.CheckpointError, match="feedback fields"):
        dr.RehearsalBuffer(capacity=10, num_representatives=3, device="cpu",
                           policy="reservoir").load_state_dict(state)
    with pytest.raises(dr.CheckpointError, match="feedback fields"):
        _buffer(feedback={"logits": ((4,), "float32")}).load_state_dict(state)
    plain = dr.RehearsalBuffer(capacity=10, num_representatives=3, device="cpu",
                               policy="reservoir")
    plain.mix(*_batch(0))
    with pytest.raises(dr.CheckpointError, match="feedback fields"):
        _buffer().load_state_dict(plain.state_dict())


def test_an_elastic_restore_keeps_each_sample_s_logits(tmp_path):
    buf = _buffer(capacity=12)
    _trained(buf, 10)
    buf.save(tmp_path / "ckpt")
    small = _buffer(capacity=5, seed=1)
    small.load(tmp_path / "ckpt", resize=True)
    images, _, logits, written, tickets = small.stored()
    assert len(images) == 5 and written.sum() > 0
    np.testing.assert_array_equal(logits[written == 1], _value(images[written == 1, 0]))
    assert (tickets[:, 1] == np.arange(5)).all() and (tickets[:, 2] > 0).all()
    _check_rows(small.mix(*_batch(20)), 4)


# ------------------------------------------------------------------ the DALI stage
def test_the_stage_delivers_feedback_fields_and_takes_updates(mnist):
    """Real MNIST PNGs through the two pipelines, working two steps ahead:
    the stage's outputs carry logits, flags and tickets; the loop writes
    back per-image values (the image's pixel sum) by ticket; every row
    flagged written carries its own image's value; tickets whose slots the
    stage overwrote meanwhile are counted as stale."""
    from nvidia.dali import fn, pipeline_def, types
    train, _ = mnist
    buf = dr.RehearsalBuffer(capacity=24, num_representatives=8, device="cpu", seed=1,
                             policy="reservoir", feedback={"logits": ((1,), "float64")})

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=1)
    def source():
        jpegs, labels = fn.readers.file(file_root=str(train), random_shuffle=True, name="r")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        return images, fn.cast(labels, dtype=types.INT64)

    @pipeline_def(batch_size=24, num_threads=1, device_id=None)
    def mixing(src):
        return tuple(dr.fn.rehearsal(src, buffer=buf, prepare_ahead=2))

    pipe = mixing(source())
    pipe.build()
    written_rows = 0
    for epoch in range(2):
        for _ in range(dr.steps_per_epoch(pipe, epoch)):
            images, labels, logits, written, tickets = (np.asarray(o.as_tensor())
                                                        for o in pipe.run())
            sums = images.reshape(len(images), -1).sum(axis=1).astype(np.float64)
            w = written == 1
            written_rows += int(w.sum())
            np.testing.assert_array_equal(logits[w, 0], sums[w])
            buf.update(tickets, logits=sums[:, None])
        pipe.reset()
    stats = buf.feedback_stats()
    assert written_rows > 50
    assert stats["applied"] > 100 and stats["stale"] + stats["applied"] + \
        stats["not_stored"] >= 200
    buf.close()


def test_through_the_stage_the_same_seed_gives_the_same_run_whatever_the_timing(mnist):
    """The stage builds steps ahead of the loop; written-back logits wait for
    their step (feedback.py), so which representatives carry them does not
    depend on how far ahead it was: runs with random pauses in the loop, or
    in the source, give the same batches, values and flags as a run without."""
    import random
    from nvidia.dali import fn, pipeline_def, types
    train, _ = mnist

    def run(pause_loop, pause_source, seed):
        buf = dr.RehearsalBuffer(capacity=20, num_representatives=6, device="cpu", seed=3,
                                 policy="reservoir", feedback={"logits": ((1,), "float64")})
        rng = random.Random(seed)

        def slow(x):
            if pause_source:
                time.sleep(rng.random() * 0.02)
            return x

        @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=1)
        def source():
            jpegs, labels = fn.readers.file(file_root=str(train), random_shuffle=True,
                                            name="r", seed=5)
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
            return fn.python_function(images, function=slow), fn.cast(labels,
                                                                      dtype=types.INT64)

        @pipeline_def(batch_size=14, num_threads=1, device_id=None,
                      exec_dynamic=True)
        def mixing(src):
            return tuple(dr.fn.rehearsal(src, buffer=buf, prepare_ahead=2, replay_flag=True))

        pipe = mixing(source())
        pipe.build()
        seen = []
        for epoch in range(2):
            for _ in range(dr.steps_per_epoch(pipe, epoch)):
                images, labels, logits, written, tickets, flags = (
                    np.asarray(o.as_tensor()) for o in pipe.run())
                seen.append((images.tobytes(), logits.tobytes(), written.tobytes()))
                sums = images.reshape(len(images), -1).sum(axis=1).astype(np.float64)
                fresh = flags == 0
                if pause_loop:
                    time.sleep(rng.random() * 0.02)
                buf.update(tickets[fresh], logits=sums[fresh, None])
            pipe.reset()
        buf.end_task()
        state = [a.copy() for a in buf.stored()]
        stats = buf.feedback_stats()
        buf.close()
        return seen, state, stats

    ref = run(False, False, 0)
    assert sum(np.frombuffer(w, np.uint8).sum() for _, _, w in ref[0]) > 20
    for pauses in ((True, False, 1), (False, True, 2)):
        other = run(*pauses)
        assert other[0] == ref[0], pauses
        for a, b in zip(other[1], ref[1]):
            np.testing.assert_array_equal(a, b)
        assert other[2] == ref[2]


# ------------------------------------------------------------------ global sampling
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_feedback_for_other_ranks_samples_reaches_their_owners(transport, tmp_path):
    """Each rank writes back values for its representatives only, half of
    them other ranks' samples: those reach their owners with the rounds
    (MPI, gloo), every flagged row carries its own sample's value, and
    every ticket is accounted for: what a rank sent is what its peer
    received plus what was still waiting at close."""
    results, _ = run(transport, 2, "feedback", tmp_path)
    for rank, r in results.items():
        assert r["mispaired"] == 0 and r["wrong_value"] == 0, r
        assert r["fresh_flagged"] == 0, r
        assert r["written"] > 50 and r["written_remotely"] > 10, r
        fb = r["feedback"]
        assert fb["sent"] == r["remote"] > 0 and fb["received"] > 0, r
        assert fb["applied"] > 0 and fb["stale"] > 0, r
    for rank, r in results.items():
        peer = results[1 - rank]
        assert r["feedback"]["sent"] == (peer["after_close"]["received"]
                                         + r["after_close"]["undelivered"]), (r, peer)
        # and every row that arrived or was written back is accounted for
        fb = r["after_close"]
        assert fb["applied"] + fb["stale"] + fb["dropped"] == fb["received"] + (
            r["checked"] - r["remote"]), r


@pytest.mark.mpi
def test_an_elastic_load_on_another_number_of_processes_keeps_the_logits(tmp_path):
    """Two ranks write logits back (their own samples' and, through the
    rounds, the other rank's) and save a directory; one process loads it:
    every sample flagged written keeps its own value, and gets a ticket of
    this process (rank 0, its new slot, a generation above every saved one)."""
    results, _ = run("mpi", 2, "feedback_save", tmp_path)
    assert all(r["feedback"]["applied"] > 0 for r in results.values())
    buf = dr.RehearsalBuffer(capacity=24, num_representatives=5, device="cpu", seed=5,
                             policy="reservoir", feedback={"logits": ((2,), "float64")})
    buf.load(tmp_path / "ckpt", resize=True)
    images, labels, extras, logits, written, tickets = buf.stored()
    ids = images[:, 0]
    assert len(ids) == 24 and set(ids // 1_000_000) == {0, 1}   # both ranks' samples
    assert (labels == ids % 7).all()
    w = written == 1
    assert w.sum() > 12
    np.testing.assert_array_equal(logits[w, 0], ids[w])
    assert (logits[~w] == 0).all()
    assert (tickets[:, 0] == 0).all() and (tickets[:, 1] == np.arange(24)).all()
    assert len(set(tickets[:, 2].tolist())) == 24 and tickets[:, 2].min() > 0
    out = [to_host(a) for a in buf.mix(*ident_batch(5, 100, 3))]     # and it goes on
    ids, logits, written = out[0][:, 0], out[3], out[4]
    assert len(ids) == 8 and (written[:3] == 0).all()
    np.testing.assert_array_equal(logits[written == 1, 0], ids[written == 1])
