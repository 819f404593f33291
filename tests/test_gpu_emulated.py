"""The GPU code paths on the CPU emulation of CuPy and CUDA streams.

``tests/emulation`` stands in for CuPy: device work is queued on its stream
and runs only when the program orders it (a host wait, an event, stream
order), so a missing ordering gives stale or never-written rows (the byte
0xCD) deterministically. This file checks

* that the emulation is faithful where the library relies on it (late
  execution, the legacy default stream, events, the CUDA array interface's
  stream, pinned and pageable copies, illegal addresses);
* the kernels' launch structure: one compile per process and device without
  name expressions (and again only after ``kernels.clear_caches()``), kernel
  objects looked up once per device, one launch per movement
  whatever the number of fields, no allocation per step;
* the buffer on ``device="gpu"`` with ``mix(stream=...)``, ``add``,
  ``sample``, ``stored``, ``state_dict``/``load_state_dict``, row for row
  against the NumPy backend with the same seed; checkpoint directories
  moving between the CPU and the GPU (and redistributed);
* teeth: with an ordering removed (the buffer's write event, its host
  waits, the staging ring's slot wait) the same checks fail;
* feedback: ``update`` on the loop's stream vs NumPy, device tickets, teeth for its orderings.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

import dali_rehearsal as dr
from dali_rehearsal import kernels
from utils import to_host
from dali_rehearsal.buffer import RehearsalBuffer
from dali_rehearsal.step import StepCore
from emulation import runtime
from emulation.kernels import RawModule

pytestmark = pytest.mark.gpu_emulated

POISON = runtime.POISON


# ------------------------------------------------------------------ the emulation itself

def test_device_work_runs_only_when_ordered(emulated_gpu):
    cp = emulated_gpu
    s = cp.cuda.Stream(non_blocking=True)
    a = cp.empty(4, np.uint8)
    a.set(np.arange(4, dtype=np.uint8), stream=s)
    # the legacy default stream does not wait for a non-blocking stream
    assert a.get(stream=cp.cuda.get_current_stream()).tolist() == [POISON] * 4
    assert a.get(stream=s).tolist() == [0, 1, 2, 3]       # ordered after the copy


def test_legacy_stream_waits_for_blocking_streams_only(emulated_gpu):
    cp = emulated_gpu
    blocking, non_blocking = cp.cuda.Stream(), cp.cuda.Stream(non_blocking=True)
    a, b = cp.empty(2, np.int64), cp.empty(2, np.int64)
    a.set(np.array([1, 2]), stream=blocking)
    b.set(np.array([3, 4]), stream=non_blocking)
    legacy = cp.cuda.get_current_stream()
    assert legacy.ptr == 0
    assert a.get(stream=legacy).tolist() == [1, 2]
    assert b.get(stream=legacy).tolist() == [POISON * 0x0101010101010101 - 2**64] * 2
    # and work queued on a blocking stream waits for earlier legacy work
    c = cp.empty(1, np.int64)
    c.set(np.array([7]), stream=legacy)
    d = cp.empty(1, np.int64)
    with blocking:
        d[...] = c
    assert d.get(stream=blocking).tolist() == [7]


def test_events_order_streams_and_mark_positions(emulated_gpu):
    cp = emulated_gpu
    producer, consumer = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    a, b = cp.empty(3, np.uint8), cp.empty(3, np.uint8)
    a.set(np.array([1, 2, 3], np.uint8), stream=producer)
    event = cp.cuda.Event(disable_timing=True)
    event.record(producer)
    a.set(np.array([9, 9, 9], np.uint8), stream=producer)    # after the event
    consumer.wait_event(event)
    with consumer:
        b[...] = a
    assert b.get(stream=consumer).tolist() == [1, 2, 3]        # the write after it is not run
    event.synchronize()
    assert a.get(stream=consumer).tolist() == [1, 2, 3]
    producer.synchronize()
    assert a.get(stream=consumer).tolist() == [9, 9, 9]


def test_cuda_array_interface_reports_the_reading_threads_stream(emulated_gpu):
    cp = emulated_gpu
    s = cp.cuda.Stream(non_blocking=True)
    a = cp.zeros(5, np.float32)
    assert a.__cuda_array_interface__["stream"] == 1             # legacy default stream
    with s:
        assert a.__cuda_array_interface__["stream"] == s.ptr
        seen = []
        t = threading.Thread(target=lambda: seen.append(a.__cuda_array_interface__["stream"]))
        t.start()
        t.join()
    assert seen == [1]                  # another thread: its own current stream (legacy)
    # consuming an interface that names a stream waits for that stream (CuPy's default)
    b = cp.empty(2, np.int64)
    b.set(np.array([5, 6]), stream=s)
    with s:
        cai = {**b.__cuda_array_interface__}

    class Producer:
        __cuda_array_interface__ = cai
    assert cp.asarray(Producer()).get(stream=cp.cuda.Stream(non_blocking=True)).tolist() == [5, 6]


def test_pageable_uploads_are_staged_pinned_ones_read_late(emulated_gpu):
    import cupyx
    cp = emulated_gpu
    s = cp.cuda.Stream(non_blocking=True)
    host = np.array([1, 2], np.int64)
    pinned = cupyx.empty_pinned(2, np.int64)
    pinned[...] = [1, 2]
    a, b = cp.empty(2, np.int64), cp.empty(2, np.int64)
    a.set(host, stream=s)
    b.set(pinned, stream=s)
    host[...] = pinned[...] = [8, 9]                # before the copies have run
    assert a.get(stream=s).tolist() == [1, 2]      # staged at the call
    assert b.get(stream=s).tolist() == [8, 9]      # read when the copy ran
    out = cupyx.empty_pinned(2, np.int64)
    cp.asnumpy(a, stream=s, out=out, blocking=False)
    a.set(np.array([3, 4]), stream=s)
    s.synchronize()
    assert out.tolist() == [1, 2]


def test_errors_a_gpu_would_raise(emulated_gpu):
    cp = emulated_gpu
    a = cp.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    out = cp.empty((2, 3), np.float32)
    kernels.gather_rows(a, cp.asarray(np.array([0, 7], np.int64)), out)   # index 7 of 4 rows
    with pytest.raises(runtime.CUDARuntimeError, match="IllegalAddress"):
        cp.cuda.get_current_stream().synchronize()
    with pytest.raises(runtime.CUDARuntimeError, match="invalid device"):
        cp.cuda.Device(1)


def test_work_on_another_devices_stream_raises():
    from emulation import emulated
    with emulated(device_count=2) as cp:
        with cp.cuda.Device(1):
            other = cp.cuda.Stream(non_blocking=True)
            on_one = cp.zeros(3, np.uint8)
        a = cp.zeros(3, np.uint8)
        with pytest.raises(RuntimeError, match="device 1"):
            with other:
                pass
        with pytest.raises(runtime.CUDARuntimeError, match="device 1"):
            a[...] = on_one


# ------------------------------------------------------------------ kernels: launch structure

def _fields_batch(rng, n, n_extras):
    images = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, n).astype(np.int64)
    extras = [rng.standard_normal((n, k + 1)).astype(np.float32) for k in range(n_extras)]
    return [images, labels, *extras]


@pytest.mark.parametrize("n_extras", [0, 3])
def test_one_compile_cached_kernels_one_launch_per_movement(emulated_gpu, n_extras):
    cp = emulated_gpu
    rng = np.random.default_rng(0)
    s = cp.cuda.Stream(non_blocking=True)
    # a filling buffer: every fresh sample is stored, so every step scatters
    buf = RehearsalBuffer(capacity=100, num_representatives=4, device="gpu", seed=0,
                          policy="reservoir")
    steps = 12
    for _ in range(steps):
        buf.mix(*_fields_batch(rng, 6, n_extras), stream=s)
    s.synchronize()
    # defect 6: one module, compiled once, without name expressions (CuPy's disk cache)
    assert RawModule.compiled == 1 and len(RawModule.instances) == 1
    module = RawModule.instances[0]
    assert module.name_expressions is None
    # defect 7: each kernel object looked up once, not per launch
    assert RawModule.lookups == 3                 # copy_fields, gather_fields, scatter_fields
    # issue 13: a step is three launches (copy, gather, scatter) whatever the fields
    assert module.launches == 3 * steps - 1       # the first step has no representatives


def test_kernel_getters_compile_once_per_device_until_caches_are_cleared():
    """cupy.memoize(for_each_device=True) getters: one compile per (module,
    device), one lookup per (kernel, device), the same objects on later calls
    whatever the current device; clear_caches() makes the next call compile
    and look up again."""
    from emulation import emulated
    with emulated(device_count=2) as cp:
        module = kernels.get_module("movement")
        assert kernels.get_module("movement", 0) is module
        copy = kernels.get_kernel("movement", "copy_fields", 0)
        with cp.cuda.Device(1):          # asked for device 0 from device 1
            assert kernels.get_kernel("movement", "copy_fields", 0) is copy
            assert kernels.get_module("movement", 0) is module
        assert kernels.get_kernel("movement", "copy_fields") is copy
        assert (RawModule.compiled, RawModule.lookups) == (1, 1)
        assert runtime.THREAD.device == 0           # the current device is restored

        on_one = kernels.get_kernel("movement", "copy_fields", 1)
        assert on_one is not copy and on_one.module is not module
        with cp.cuda.Device(1):
            assert kernels.get_kernel("movement", "copy_fields") is on_one
            assert kernels.get_module("movement") is on_one.module
        assert (RawModule.compiled, RawModule.lookups) == (2, 2)

        kernels.get_kernel("movement", "gather_fields", 0)      # a new kernel, same module
        assert (RawModule.compiled, RawModule.lookups) == (2, 3)

        kernels.clear_caches()
        again = kernels.get_kernel("movement", "copy_fields", 0)
        assert again is not copy and again.module is not module
        assert (RawModule.compiled, RawModule.lookups) == (3, 4)
        assert kernels.get_kernel("movement", "copy_fields", 0) is again
        assert (RawModule.compiled, RawModule.lookups) == (3, 4)


def test_store_movements_allocate_nothing_per_step(emulated_gpu):
    cp = emulated_gpu
    rng = np.random.default_rng(1)
    s = cp.cuda.Stream(non_blocking=True)
    buf = RehearsalBuffer(capacity=32, num_representatives=4, device="gpu", seed=0)
    with s:                  # uploaded on the stream that uses them
        batch = [cp.asarray(a) for a in _fields_batch(rng, 8, 2)]
    buf.add(*batch, stream=s)
    out = buf.core.empty_rows(12)
    store = buf.core.store
    for _ in range(3):                           # warm-up: staging slots
        store.copy(batch, out, 0, s)
        store.gather(np.arange(4), out, 8, s)
        store.scatter(batch, np.arange(8), np.arange(8, 16), s)
    before = runtime.Allocation.count
    for step in range(20):
        store.copy(batch, out, 0, s)
        store.gather(rng.permutation(32)[:4], out, 8, s)
        store.scatter(batch, rng.permutation(8), rng.permutation(32)[:8], s)
    s.synchronize()
    assert runtime.Allocation.count == before


# ------------------------------------------------------------------ the buffer against NumPy

class Samples:
    """Batches whose rows carry their id in the pixels; random labels."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.next_id = 0

    def batch(self, b):
        ids = np.arange(self.next_id, self.next_id + b)
        self.next_id += b
        images = self.rng.integers(0, 256, (b, 6, 5, 3), dtype=np.uint8)
        images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
        labels = self.rng.integers(0, 5, b).astype(np.int64)
        logits = images.reshape(b, -1)[:, :4].astype(np.float32) / 7
        return images, labels, logits


def _host_all(arrays, backend, stream):
    return [np.array(backend.to_host(a, stream)) for a in arrays]


def _run_mixes(device, *, policy, steps=25, make_stream=None, seed=4, b=7):
    samples = Samples(seed)
    buf = RehearsalBuffer(capacity=20, num_representatives=5, policy=policy, device=device,
                          seed=seed)
    stream = make_stream() if make_stream else None
    outs = []
    for _ in range(steps):
        out = buf.mix(*samples.batch(b), stream=stream)
        outs.append(_host_all(out, buf.backend, stream))
    return buf, outs, stream


@pytest.mark.parametrize("policy", sorted(dr.POLICIES))
def test_mix_on_a_stream_matches_numpy_row_for_row(emulated_gpu, policy):
    cp = emulated_gpu
    gpu, gpu_outs, _ = _run_mixes("gpu", policy=policy,
                                  make_stream=lambda: cp.cuda.Stream(non_blocking=True))
    cpu, cpu_outs, _ = _run_mixes("cpu", policy=policy)
    for g, c in zip(gpu_outs, cpu_outs):
        for x, y in zip(g, c):
            np.testing.assert_array_equal(x, y)
    assert gpu.class_counts() == cpu.class_counts()


def check_host_accessors(cp):
    """``stored``, ``sample`` and ``state_dict`` read on the host or another
    stream while the writes are queued on a non-blocking stream; a new buffer
    loaded from the state continues on another non-blocking stream. Compared
    with the NumPy backend."""
    kwargs = dict(capacity=20, num_representatives=5, seed=2)
    ref = RehearsalBuffer(device="cpu", **kwargs)
    gpu = RehearsalBuffer(device="gpu", **kwargs)
    stage = cp.cuda.Stream(non_blocking=True)
    samples_ref, samples_gpu = Samples(1), Samples(1)
    for _ in range(6):
        ref.mix(*samples_ref.batch(6))
        gpu.mix(*samples_gpu.batch(6), stream=stage)
    # read on the host (legacy stream: ordered after nothing on `stage`)
    for x, y in zip(gpu.stored(), ref.stored()):
        np.testing.assert_array_equal(to_host(x), y)
    other = cp.cuda.Stream(non_blocking=True)
    for x, y in zip(gpu.sample(stream=other), ref.sample()):
        np.testing.assert_array_equal(gpu.backend.to_host(x, other), y)
    gpu.add(*samples_gpu.batch(6), stream=stage)
    ref.add(*samples_ref.batch(6))
    state = gpu.state_dict()
    for x, y in zip(state["fields"], ref.state_dict()["fields"]):
        np.testing.assert_array_equal(x, y)
    resumed = RehearsalBuffer(device="gpu", **kwargs)
    resumed.load_state_dict(state)
    later = cp.cuda.Stream(non_blocking=True)
    for _ in range(4):
        batch = samples_ref.batch(6)
        expected = ref.mix(*batch)
        got = resumed.mix(*batch, stream=later)
        for x, y in zip(got, expected):
            np.testing.assert_array_equal(resumed.backend.to_host(x, later), y)


def test_host_accessors_and_checkpoints_are_ordered(emulated_gpu):
    check_host_accessors(emulated_gpu)


def test_checkpoints_move_between_the_cpu_and_the_gpu(emulated_gpu, tmp_path):
    """A CPU buffer's checkpoint directory loads into a GPU buffer, which goes
    on as the CPU buffer does (mixing on a non-blocking stream); saved right
    after those steps, it loads back into a CPU buffer, and, redistributed
    (``resize=True``), into a smaller GPU buffer: whole samples with their labels."""
    cp = emulated_gpu
    kwargs = dict(capacity=20, num_representatives=5, seed=2)
    samples = Samples(3)
    cpu = RehearsalBuffer(device="cpu", **kwargs)
    for _ in range(6):
        cpu.mix(*samples.batch(6))
    cpu.save(tmp_path / "cpu")
    gpu = RehearsalBuffer(device="gpu", **kwargs)
    gpu.load(tmp_path / "cpu")
    stream = cp.cuda.Stream(non_blocking=True)
    for _ in range(4):
        batch = samples.batch(6)
        expected, got = cpu.mix(*batch), gpu.mix(*batch, stream=stream)
        for x, y in zip(got, expected):
            np.testing.assert_array_equal(gpu.backend.to_host(x, stream), y)
    gpu.save(tmp_path / "gpu")                  # the last step's writes are still queued
    back = RehearsalBuffer(device="cpu", **kwargs)
    back.load(tmp_path / "gpu")
    for x, y in zip(back.stored(), cpu.stored()):
        np.testing.assert_array_equal(x, y)
    small = RehearsalBuffer(device="gpu", capacity=8, num_representatives=5, seed=2)
    small.load(tmp_path / "gpu", resize=True)
    images, labels, logits = (to_host(f) for f in small.stored())
    rows = {bytes(i): (int(lab), bytes(g)) for i, lab, g in zip(*cpu.stored())}
    assert len(images) == 8
    for i, lab, g in zip(images, labels, logits):
        assert rows[bytes(i)] == (int(lab), bytes(g))


# ------------------------------------------------------------------ teeth

def test_teeth_without_host_waits_the_accessors_read_stale_rows(emulated_gpu, monkeypatch):
    """Defect 4 put back: host accessors that do not wait for the stage stream."""
    def no_wait(self, stream=None):
        return None
    monkeypatch.setattr(StepCore, "wait_for_writes", no_wait)
    with pytest.raises(AssertionError):
        check_host_accessors(emulated_gpu)


def test_teeth_without_write_events_checkpoints_load_late(emulated_gpu, monkeypatch):
    """Defect 4 put back: no event after the writes (load_state_dict fills
    storage on the legacy stream; the next stream does not wait for it)."""
    monkeypatch.setattr(StepCore, "mark_written", lambda self, stream: None)
    with pytest.raises(AssertionError):
        check_host_accessors(emulated_gpu)


def _gather_twice(cp):
    """Two gathers with different indices, back to back on one stream, read
    only afterwards: each must use its own indices."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        src = cp.asarray(np.arange(40, dtype=np.int64).reshape(10, 4))
    first, second = cp.empty((3, 4), np.int64), cp.empty((3, 4), np.int64)
    kernels.gather_fields([src], np.array([1, 2, 3]), [first], stream=s)
    kernels.gather_fields([src], np.array([7, 8, 9]), [second], stream=s)
    s.synchronize()
    np.testing.assert_array_equal(first.get(stream=s)[:, 0], [4, 8, 12])
    np.testing.assert_array_equal(second.get(stream=s)[:, 0], [28, 32, 36])


def test_staging_slots_are_reused_only_after_their_kernel(emulated_gpu, monkeypatch):
    from dali_rehearsal.kernels import movement
    monkeypatch.setattr(movement._StagingRing, "SLOTS", 1)
    kernels.clear_caches()
    _gather_twice(emulated_gpu)


def test_teeth_staging_slot_reused_without_waiting(emulated_gpu, monkeypatch):
    """The staging ring's wait put back out: a slot refilled while its upload
    is still queued hands the first kernel the second kernel's indices."""
    from dali_rehearsal.kernels import movement
    monkeypatch.setattr(movement._StagingRing, "SLOTS", 1)

    def exit_without_event(self, *exc):           # no event recorded: nothing to wait for
        self.ring.lock.release()
        return False
    monkeypatch.setattr(movement._SlotUse, "__exit__", exit_without_event)
    kernels.clear_caches()
    with pytest.raises(AssertionError):
        _gather_twice(emulated_gpu)


def test_bench_kernels_gpu_path_runs_on_the_emulation(emulated_gpu):
    """pipelines/bench_kernels.py's GPU code path (eager and CUDA-graph modes)
    end to end; the emulation measures nothing, so only the structure is
    checked (every op captured: no host wait and no staging growth inside a
    capture)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_emulated", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--shapes", "4x4x3:uint8", "--iters", "2", "--repeats", "1",
                             "--warmup", "1", "--capacity", "64"])
    results = bench.measure(args, args.shape_list, "gpu")
    assert [(r["op"], r["mode"]) for r in results] == [
        (op, mode) for op in bench.OPS for mode in ("eager", "graph")]
    by_op = {r["op"]: r["bytes"] for r in results}
    captured = [movement for movement in results if movement["mode"] == "graph"]
    assert len(captured) == len(bench.OPS)
    assert by_op["step_fields"] == (56 + 7 + 56) * (48 + 8)
    emulated_gpu.cuda.get_current_stream().synchronize()


# ------------------------------------------------------------------ feedback

FEEDBACK = {"logits": ((3,), "float32")}


FB_BATCH = 7


def _fb_batch(step, b=FB_BATCH):
    """Rows that name themselves (as in tests/test_feedback.py): an image row
    repeats its id; label id % 5."""
    ids = step * 100 + np.arange(b, dtype=np.int64)
    return np.repeat(ids[:, None], 2, axis=1), ids % 5


def _fb_value(ids):
    """The logits written back for samples ``ids``."""
    ids = np.asarray(ids, np.float32)
    return np.stack([ids, -ids, ids / 4], axis=1)


def check_feedback(cp, policy="reservoir", steps=10, horizon=0):
    """DER's loop with the stage one step ahead: batches mixed on a
    non-blocking stream S, step k+1 queued before the loop writes step k's
    values back with ``update(stream=U)``, U another non-blocking stream that
    waits only for its own batch (an event after that batch's mix). The
    write-back must wait for the store accesses queued on S before it (step
    k+1's gather and scatter) and later steps on S for the write-back. The
    loop reads its batches on U (reading them on S would run the step queued
    ahead first); tickets go back as the delivered device array and as a host
    copy, on alternate steps. Compared with the NumPy backend making the same
    calls: every delivered row, a later step read on S, ``stored()`` and
    ``feedback_stats()``. ``horizon``: the writes a value waits (a stage
    sets it): the write-back then runs in a later step's commit, on S, and
    must wait for the values made on U; the batches are then read on S."""
    kwargs = dict(capacity=20, num_representatives=5, seed=4, policy=policy, feedback=FEEDBACK)
    cpu = RehearsalBuffer(device="cpu", **kwargs)
    gpu = RehearsalBuffer(device="gpu", **kwargs)
    cpu.core.feedback.horizon = gpu.core.feedback.horizon = horizon
    stage, loop = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)

    def deliver(step):
        expected = cpu.mix(*_fb_batch(step))
        out = gpu.mix(*_fb_batch(step), stream=stage)
        return expected, out, stage.record()

    ahead = deliver(0)
    written_reps = 0
    for step in range(steps):
        expected, out, ready = ahead
        if step + 1 < steps:
            ahead = deliver(step + 1)        # the stage works one step ahead
        loop.wait_event(ready)
        # with a horizon, read on S: it runs the later commit's write-back, which
        # must itself wait for the values queued on U
        got = [gpu.backend.to_host(x, stage if horizon else loop) for x in out]
        for x, y in zip(got, expected):
            np.testing.assert_array_equal(x, y)
        values = _fb_value(got[0][:, 0])
        written_reps += int(got[-2][FB_BATCH:].sum())
        cpu.update(expected[-1], logits=values)
        with loop:
            logits = cp.asarray(values)
        tickets = out[-1] if step % 2 == 0 else got[-1]
        gpu.update(tickets, logits=logits, stream=loop)
    later = gpu.mix(*_fb_batch(steps), stream=stage)
    for x, y in zip(later, cpu.mix(*_fb_batch(steps))):
        np.testing.assert_array_equal(gpu.backend.to_host(x, stage), y)
    for x, y in zip(gpu.stored(), cpu.stored()):
        np.testing.assert_array_equal(to_host(x), y)
    stats = gpu.feedback_stats()
    assert stats == cpu.feedback_stats()
    assert written_reps > 0 and stats["applied"] > 0 and stats["stale"] > 0, stats
    assert stats["waiting"] > 0 if horizon else stats["waiting"] == 0


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_feedback_write_back_is_ordered_between_streams(emulated_gpu, policy):
    check_feedback(emulated_gpu, policy)


def _off_during_update(monkeypatch, name):
    """``StepCore.<name>`` does nothing while ``StepCore.update`` runs."""
    original, update = getattr(StepCore, name), StepCore.update
    inside = []

    def flagged_update(self, *args, **kwargs):
        inside.append(True)
        try:
            return update(self, *args, **kwargs)
        finally:
            inside.pop()

    def patched(self, *args, **kwargs):
        if not inside:
            return original(self, *args, **kwargs)
    monkeypatch.setattr(StepCore, "update", flagged_update)
    monkeypatch.setattr(StepCore, name, patched)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_teeth_feedback_write_back_not_waiting_for_earlier_accesses(emulated_gpu, monkeypatch,
                                                                   policy):
    """The write-back's wait put back out: it lands before the step queued
    ahead of it on the stage's stream, whose representatives then show
    values the NumPy backend writes only later."""
    _off_during_update(monkeypatch, "wait_for_writes")
    with pytest.raises(AssertionError):
        check_feedback(emulated_gpu, policy)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_teeth_feedback_later_steps_not_waiting_for_the_write_back(emulated_gpu, monkeypatch,
                                                                  policy):
    """No event after the write-back: the later step on the stage's stream
    and ``stored()`` do not wait for the loop's stream, and miss values."""
    _off_during_update(monkeypatch, "mark_written")
    with pytest.raises(AssertionError):
        check_feedback(emulated_gpu, policy)


def test_feedback_update_takes_device_tickets_without_torch(emulated_gpu, monkeypatch):
    """``update`` with the delivered ticket array itself (a CuPy array, read
    on the update's stream) and CuPy values, torch not importable: the values
    land in the samples the tickets name, flagged written."""
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` raises
    cp = emulated_gpu
    s = cp.cuda.Stream(non_blocking=True)
    buf = RehearsalBuffer(capacity=10, num_representatives=3, device="gpu", seed=0,
                          policy="reservoir", feedback=FEEDBACK)
    out = buf.mix(*_fb_batch(0, 4), stream=s)
    with s:
        logits = cp.asarray(_fb_value(np.arange(4)))
    buf.update(out[-1], logits=logits, stream=s)
    assert buf.feedback_stats()["applied"] == 4
    images, _, stored, written, tickets = (to_host(x) for x in buf.stored())
    assert written.tolist() == [1] * 4
    np.testing.assert_array_equal(stored, _fb_value(images[:, 0]))
    np.testing.assert_array_equal(tickets, buf.backend.to_host(out[-1], s))


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_feedback_written_back_in_a_later_step_is_ordered(emulated_gpu, policy):
    """Values that wait for their step (a stage's horizon, here 2 writes) are
    written into the store by a later step's commit on the stage's stream."""
    check_feedback(emulated_gpu, policy, steps=12, horizon=2)


def test_teeth_feedback_written_back_later_without_the_values_event(emulated_gpu,
                                                                   monkeypatch):
    """The write-back in a later step's commit not waiting for the event after
    the values were made on the loop's stream: it reads them unwritten."""
    from dali_rehearsal import feedback
    init = feedback.Pending.__init__

    def without_event(self, tickets, positions, arrays, names, event=None):
        init(self, tickets, positions, arrays, names, None)
    monkeypatch.setattr(feedback.Pending, "__init__", without_event)
    with pytest.raises(AssertionError):
        check_feedback(emulated_gpu, "reservoir", steps=12, horizon=2)


def test_feedback_checkpoints_move_between_the_cpu_and_the_gpu(emulated_gpu, tmp_path):
    """A GPU buffer with written-back logits saved as a state dict and as a
    directory (its last writes still queued on a non-blocking stream) loads
    into a CPU buffer and into another GPU buffer: the same samples, logits,
    flags and new tickets; both go on as the CPU reference does, and a
    ticket handed out before the load names nothing."""
    cp = emulated_gpu
    kwargs = dict(capacity=20, num_representatives=5, seed=4, policy="reservoir",
                  feedback=FEEDBACK)
    ref = RehearsalBuffer(device="cpu", **kwargs)
    gpu = RehearsalBuffer(device="gpu", **kwargs)
    stage = cp.cuda.Stream(non_blocking=True)
    for step in range(8):
        expected = ref.mix(*_fb_batch(step))
        out = gpu.mix(*_fb_batch(step), stream=stage)
        ref.update(expected[-1][:FB_BATCH], logits=_fb_value(expected[0][:FB_BATCH, 0]))
        gpu.update(out[-1][:FB_BATCH], logits=_fb_value(expected[0][:FB_BATCH, 0]),
                   stream=stage)
    old_tickets = to_host(gpu.backend.to_host(out[-1], stage))
    state = gpu.state_dict()
    gpu.save(tmp_path / "gpu")
    loaded = {"cpu": RehearsalBuffer(device="cpu", **kwargs),
              "gpu": RehearsalBuffer(device="gpu", **kwargs),
              "ref": RehearsalBuffer(device="cpu", **kwargs)}
    loaded["cpu"].load(tmp_path / "gpu")
    loaded["gpu"].load_state_dict(state)
    loaded["ref"].load_state_dict(ref.state_dict())
    images, _, logits, written, _ = (to_host(f) for f in loaded["ref"].stored())
    assert written.sum() > 5
    np.testing.assert_array_equal(logits[written == 1], _fb_value(images[written == 1, 0]))
    later = cp.cuda.Stream(non_blocking=True)
    for name, buf in loaded.items():
        for x, y in zip(buf.stored(), loaded["ref"].stored()):
            np.testing.assert_array_equal(to_host(x), y)
        s = later if name == "gpu" else None
        buf.update(old_tickets, logits=np.full((len(old_tickets), 3), 9, np.float32),
                   stream=s)
        assert buf.feedback_stats()["applied"] == 0, name
    for step in range(8, 12):
        expected = loaded["ref"].mix(*_fb_batch(step))
        for name in ("cpu", "gpu"):
            got = loaded[name].mix(*_fb_batch(step), stream=later if name == "gpu" else None)
            for x, y in zip(got, expected):
                np.testing.assert_array_equal(loaded[name].backend.to_host(x, later), y)
