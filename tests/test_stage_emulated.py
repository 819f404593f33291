"""The GPU stage on the CPU emulation of CUDA streams, driven as DALI drives it.

The stage is built by ``dr.fn.rehearsal`` itself, inside the definition of a
GPU mixing pipeline (the graph only: nothing of DALI's GPU backend is built),
over a real DALI pipeline reading and decoding the MNIST PNGs whose outputs
arrive as emulated device memory overwritten by each run, as DALI's are
(``emulation.dali.GpuSourcePipeline``). The callback and the keyword
arguments ``dr.fn.rehearsal`` gives ``fn.external_source`` are recorded, and
the callback is driven as DALI drives it (``emulation.dali.ExternalSource``):
called in the thread that runs the pipeline, each batch fed right after it
returns and read when its iteration runs, at once or a prefetch queue later.
With the arguments the stage gives (``no_copy=False``, ``cuda_stream`` = the
stage's stream) DALI copies the batch into its own memory on that stream when
it is fed (``InputOperator::CopyUserData``); a ``no_copy=True`` consumer reads
the stage's arrays on its own stream without waiting for any other stream
(``ShareUserData``, then ``set_order(stream, false)``).

Every batch is compared byte for byte with the CPU path: a CPU buffer and a
CPU mixing pipeline over the same source pipeline and seeds give the same
batches. Teeth: with the stage's orderings removed by a test-only patch (the
hand-over's synchronisation, the synchronisation before the source pipeline
runs again, those after a stage stops) the same checks fail.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import dali_rehearsal as dr
from dali_rehearsal.buffer import RehearsalBuffer
from dali_rehearsal.step import StepCore
from dali_rehearsal.stage import Handover, Mixer, SourceStream

pytest.importorskip("nvidia.dali")
from nvidia.dali import pipeline_def  # noqa: E402
from utils import source_pipeline  # noqa: E402

pytestmark = pytest.mark.gpu_emulated

B, R, CAPACITY, EPOCHS = 8, 3, 24, 2
PREFETCH = 2        # the mixing pipeline's prefetch_queue_depth


class Stage:
    """A mixing pipeline built by ``dr.fn.rehearsal`` and DALI's side of it."""

    def __init__(self, train_root, *, device, prepare_ahead, capacity=CAPACITY,
                 exec_dynamic=None, device_id=0):
        from emulation.dali import GpuSourcePipeline, recording_external_source
        gpu = device == "gpu"
        self.device_id = device_id
        if gpu:
            import cupy
            with cupy.cuda.Device(device_id):     # the buffer lives on the current device
                self.buffer = RehearsalBuffer(capacity=capacity, num_representatives=R,
                                              device="gpu", seed=0)
        else:
            self.buffer = RehearsalBuffer(capacity=capacity, num_representatives=R,
                                          device="cpu", seed=0)
        source = source_pipeline(
            B, extras=("logits",), num_threads=1, file_root=str(train_root), random_shuffle=True,
            pipeline=None if exec_dynamic is None else {"exec_dynamic": exec_dynamic})
        if gpu:
            source = GpuSourcePipeline(source, device_id=device_id,
                                       exec_dynamic=exec_dynamic is not False)

        @pipeline_def(batch_size=B + R, num_threads=1, device_id=device_id if gpu else None,
                      prefetch_queue_depth=PREFETCH)
        def mixing():
            return tuple(dr.fn.rehearsal(source, buffer=self.buffer, replay_flag=True,
                                         prepare_ahead=prepare_ahead))

        with recording_external_source() as calls:
            # the stage lives as long as this pipeline
            self.pipe = mixing()
        (self.kwargs,) = calls
        self.mixer = dr.stage.stage_of(self.pipe)

    def dali(self, *, read_after=0, **overrides):
        """DALI's side: runs the recorded callback (``overrides`` change the
        arguments external_source was given)."""
        from emulation.dali import ExternalSource
        return ExternalSource(self.kwargs, read_after=read_after, device_id=self.device_id,
                              **overrides)

    def run(self, epochs=EPOCHS, *, read_after=0, **overrides):
        """The batches of ``epochs`` epochs, as lists of host arrays per step."""
        dali = self.dali(read_after=read_after, **overrides)
        result, batches = [], []
        while len(result) < epochs:
            try:
                batches += dali.step()
            except StopIteration:
                batches += dali.drain()
                result.append(batches)
                batches = []
        return result

    def close(self):
        self.buffer.close()


def gpu_run(train_root, *, prepare_ahead, read_after, **overrides):
    stage = Stage(train_root, device="gpu", prepare_ahead=prepare_ahead,
                  exec_dynamic=overrides.pop("exec_dynamic", None))
    try:
        return stage.run(read_after=read_after, **overrides), stage
    finally:
        stage.close()


@pytest.fixture(scope="module")
def reference(mnist):
    stage = Stage(mnist[0], device="cpu", prepare_ahead=0)
    try:
        return stage.run()
    finally:
        stage.close()


def assert_same_batches(got, expected):
    assert [len(e) for e in got] == [len(e) for e in expected]
    replayed = 0
    for e, (g_epoch, x_epoch) in enumerate(zip(got, expected)):
        for s, (g, x) in enumerate(zip(g_epoch, x_epoch)):
            assert len(g) == len(x) == 4                # images, labels, logits, flag
            for field, (a, b) in enumerate(zip(g, x)):
                assert a.shape == b.shape and a.dtype == b.dtype, (e, s, field)
                if not np.array_equal(a, b):
                    rows = np.flatnonzero([not np.array_equal(p, q) for p, q in zip(a, b)])
                    raise AssertionError(f"epoch {e} step {s} field {field}: rows "
                                         f"{rows.tolist()} differ from the CPU path")
            replayed += int(x[3].sum())
    assert replayed > 0


# ------------------------------------------------------------------ the emulated DALI side

def test_dali_tensor_list_is_emulated_only_while_the_emulation_is_installed():
    """The stage wraps its outputs in DALI's TensorListGPU, which needs a CUDA
    driver: the emulation puts its own in place, and puts DALI's back."""
    import nvidia.dali.tensors as tensors

    from emulation import emulated
    real = tensors.TensorListGPU
    for _ in range(2):
        with emulated() as cp:
            from emulation.dali import TensorListGPU
            assert tensors.TensorListGPU is TensorListGPU
            s = cp.cuda.Stream(non_blocking=True)
            with s:
                a = cp.zeros((3, 2), np.uint8)
                wrapped = TensorListGPU(a, "HW", 0)
            assert wrapped.order == s and wrapped.layout() == "HW"   # the reading thread's
            assert TensorListGPU(a, "", 0).order.ptr == 0            # legacy, outside `with`
        assert tensors.TensorListGPU is real


# ------------------------------------------------------------------ the stage as built

def test_the_stage_hands_gpu_batches_over_by_copy_on_its_stream(mnist, emulated_gpu):
    """What the tests below model: on the GPU, ``dr.fn.rehearsal`` gives
    ``external_source`` the stage's stream and asks DALI to copy each batch;
    its ring holds ``prefetch_queue_depth + prepare_ahead + 2`` batches."""
    stage = Stage(mnist[0], device="gpu", prepare_ahead=2)
    try:
        kwargs = stage.kwargs
        assert kwargs["device"] == "gpu" and kwargs["batch"] is True
        assert kwargs["no_copy"] is False
        assert kwargs["cuda_stream"] is stage.mixer.stream is not None
        assert stage.mixer.stream.non_blocking
        assert stage.mixer.handover.depth == PREFETCH + 2 + 2
    finally:
        stage.close()


@pytest.mark.parametrize("prepare_ahead", [0, 2])
@pytest.mark.parametrize("read_after", [0, PREFETCH])
def test_stage_batches_as_dali_copies_them_match_the_cpu_path(mnist, reference, emulated_gpu,
                                                              prepare_ahead, read_after):
    """The steps (source hand-over, copies, gathers, scatters, flags, epoch
    ends, the worker) and the hand-over as the stage configures it: DALI
    copies each batch on the stage's stream when it is fed, and runs the
    iteration at once or a prefetch queue later."""
    got, _ = gpu_run(mnist[0], prepare_ahead=prepare_ahead, read_after=read_after)
    assert_same_batches(got, reference)


@pytest.mark.parametrize("prepare_ahead", [0, 2])
@pytest.mark.parametrize("read_after", [0, PREFETCH])
def test_stage_no_copy_batches_match_the_cpu_path(mnist, reference, emulated_gpu,
                                                  prepare_ahead, read_after):
    """The hand-over's promise that a batch is complete whatever stream DALI
    reads it on: a ``no_copy=True`` consumer, which waits for no stream at
    all, reads the stage's own arrays, at once or a prefetch queue later (the
    ring is deep enough)."""
    got, _ = gpu_run(mnist[0], prepare_ahead=prepare_ahead, read_after=read_after,
                     no_copy=True, cuda_stream=None)
    assert_same_batches(got, reference)


def test_stage_buffer_contents_after_the_run(mnist, emulated_gpu):
    """What the stage stored is readable from the host once the stage stops."""
    from utils import to_host
    _, stage = gpu_run(mnist[0], prepare_ahead=2, read_after=PREFETCH)
    images, labels, logits = (to_host(f) for f in stage.buffer.stored())
    assert len(images) == CAPACITY and (images != 0xCD).any()
    np.testing.assert_allclose(logits.reshape(CAPACITY, 28),
                               images.reshape(CAPACITY, 28, 28).mean(axis=2), rtol=1e-5)


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_stage_with_a_source_off_the_dynamic_executor(mnist, reference, emulated_gpu,
                                                      prepare_ahead):
    """Defect 2 of issue 8: a source pipeline that DALI does not let hand its
    outputs over on a stream (``exec_dynamic=False``: ``run(stream)`` raises)
    runs without one, and its recycled outputs stay correct."""
    from dali_rehearsal.stage import runs_with_stream
    stage = Stage(mnist[0], device="gpu", prepare_ahead=prepare_ahead, exec_dynamic=False)
    try:
        assert not runs_with_stream(stage.mixer.source.source)
        got = stage.run(read_after=PREFETCH)
    finally:
        stage.close()
    assert_same_batches(got, reference)


def test_stage_on_another_device_than_the_calling_threads(mnist, reference):
    """Defect 5 of issue 8: a buffer, source and mixing pipeline on GPU 1,
    driven from a thread whose current device is GPU 0. The emulation raises
    on any stream or memory of one device used from the other."""
    from emulation import emulated
    with emulated(device_count=2) as cp:
        for prepare_ahead in (0, 2):
            assert cp.cuda.runtime.getDevice() == 0
            stage = Stage(mnist[0], device="gpu", prepare_ahead=prepare_ahead, device_id=1)
            try:
                assert stage.buffer.backend.device_id == 1
                assert stage.mixer.stream.device_id == 1
                got = stage.run(read_after=PREFETCH)
            finally:
                stage.close()
            assert_same_batches(got, reference)


# ------------------------------------------------------------------ teeth

def _without_hand_over_ordering(monkeypatch):
    assert callable(getattr(Handover, "_order", None)), "Handover._order is gone: update " \
        "the teeth tests to the hand-over's ordering point"
    monkeypatch.setattr(Handover, "_order", lambda self: None)


def test_teeth_no_copy_batches_without_the_hand_over_ordering(mnist, reference, emulated_gpu,
                                                              monkeypatch):
    """Defect 1 put back: without ``Handover._order`` a batch leaves the stage
    while its writes are still queued on the stage's stream, and a consumer
    that does not wait for that stream (DALI's no_copy path) reads stale or
    never-written rows. (Deterministic without the worker; with it, a later
    step's synchronisation may happen to come first.)"""
    _without_hand_over_ordering(monkeypatch)
    got, _ = gpu_run(mnist[0], prepare_ahead=0, read_after=0, no_copy=True, cuda_stream=None)
    with pytest.raises(AssertionError, match="differ from the CPU path"):
        assert_same_batches(got, reference)


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_copy_path_is_ordered_by_the_stage_stream_alone(mnist, reference, emulated_gpu,
                                                        monkeypatch, prepare_ahead):
    """The other half of the hand-over's argument: DALI's copy is queued on
    the stage's own stream, after the stage's writes in stream order, so the
    batches the stage delivers as configured are right even without
    ``Handover._order`` (which keeps any consumer right, no_copy included)."""
    _without_hand_over_ordering(monkeypatch)
    got, _ = gpu_run(mnist[0], prepare_ahead=prepare_ahead, read_after=PREFETCH)
    assert_same_batches(got, reference)


def test_teeth_source_outputs_recycled_before_the_stage_copied_them(mnist, reference,
                                                                    emulated_gpu, monkeypatch):
    """Defect 2's synchronisation put back out: the stage must let its copies
    out of the source's outputs finish before it runs the source again (DALI
    recycles them). The MNIST epoch (180 images) is no multiple of the batch:
    the first step of the second epoch copies the rest of a source batch,
    then runs the source; without the synchronisation those copies read the
    next batch."""
    fetch = SourceStream.fetch

    def fetch_without_sync(self):
        self.batch = None                   # what the synchronisation is conditioned on
        return fetch(self)
    monkeypatch.setattr(SourceStream, "fetch", fetch_without_sync)
    got, _ = gpu_run(mnist[0], prepare_ahead=0, read_after=PREFETCH, exec_dynamic=False)
    with pytest.raises(AssertionError, match="epoch 1 step 0"):
        assert_same_batches(got, reference)


# ------------------------------------------------------------------ defect 4: after a stage

STOP_CAPACITY, STOP_CALLS = 64, 2


def stage_then_checkpoint(train_root, device, prepare_ahead, path, *, reload=True):
    """A stage runs ``STOP_CALLS`` steps and stops (as a newer stage or
    ``buffer.close()`` stops it); then ``state_dict()``, ``save()``, and (with
    ``reload``) a new buffer ``load()``\\ s the saved directory. Returns host
    copies of the state's fields, the reloaded buffer's stored rows, and the
    state's size."""
    from utils import to_host
    stage = Stage(train_root, device=device, prepare_ahead=prepare_ahead,
                  capacity=STOP_CAPACITY)
    try:
        dali = stage.dali(read_after=PREFETCH)
        for _ in range(STOP_CALLS):
            dali.step()
        dr.stage.stage_of(stage.pipe).stop()
        state = stage.buffer.state_dict()
        fields = [np.array(to_host(f)) for f in state["fields"]]
        stage.buffer.save(path)
    finally:
        stage.close()
    if not reload:
        return fields, None, int(state["policy"]["size"])
    reloaded = RehearsalBuffer(capacity=STOP_CAPACITY, num_representatives=R, device=device,
                               seed=0)
    reloaded.load(path)
    stored = [np.array(to_host(f)) for f in reloaded.stored()]
    reloaded.close()
    return fields, stored, int(state["policy"]["size"])


@pytest.fixture(scope="module")
def checkpoint_reference(mnist, tmp_path_factory):
    return {p: stage_then_checkpoint(mnist[0], "cpu", p, tmp_path_factory.mktemp(f"cpu{p}"))
            for p in (0, 2)}


def _without(monkeypatch, orderings):
    """Removes the named orderings between the stage's writes and a host read."""
    if "hand-over" in orderings:
        _without_hand_over_ordering(monkeypatch)
    if "stop" in orderings:
        stop = Mixer.stop

        def stop_without_sync(self, *, drain=True):
            backend, caller = self.core.backend, threading.current_thread()
            synchronize = backend.synchronize

            def skip_in_caller(stream=None):     # the worker's own waits stay
                if threading.current_thread() is not caller:
                    synchronize(stream)
            backend.synchronize = skip_in_caller
            try:
                stop(self, drain=drain)
            finally:
                del backend.synchronize
        monkeypatch.setattr(Mixer, "stop", stop_without_sync)
    if "host wait" in orderings:
        wait = StepCore.wait_for_writes

        def wait_on_streams_only(self, stream=None):
            if stream is not None:
                wait(self, stream)
        monkeypatch.setattr(StepCore, "wait_for_writes", wait_on_streams_only)


ORDERINGS = ("hand-over", "stop", "host wait")


@pytest.mark.parametrize("prepare_ahead", [0, 2])
@pytest.mark.parametrize("kept", ["all", *ORDERINGS])
def test_checkpoint_right_after_a_stage_sees_every_row_it_wrote(
        mnist, checkpoint_reference, emulated_gpu, monkeypatch, tmp_path, prepare_ahead, kept):
    """Defect 4 on the stage side: ``state_dict()`` and ``save()`` right after
    a stage stopped hold every row the stage wrote (the last step's scatter
    included), and a buffer loaded from the save stores them. Three orderings
    guarantee it, and each one alone suffices: the hand-over synchronises the
    stage's stream after every step, ``stop()`` joins the worker and then
    synchronises it, and host reads wait for the buffer's last write event."""
    _without(monkeypatch, [o for o in ORDERINGS if kept not in ("all", o)])
    fields, stored, size = stage_then_checkpoint(mnist[0], "gpu", prepare_ahead, tmp_path)
    ref_fields, ref_stored, ref_size = checkpoint_reference[prepare_ahead]
    assert size == ref_size == STOP_CALLS * B + (prepare_ahead + 1) * B * (prepare_ahead > 0)
    for got, expected in ((fields, ref_fields), (stored, ref_stored)):
        for g, x in zip(got, expected):
            np.testing.assert_array_equal(g, x)


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_teeth_checkpoint_after_a_stage_without_its_orderings(
        mnist, checkpoint_reference, emulated_gpu, monkeypatch, tmp_path, prepare_ahead):
    """Defect 4 put back: without the hand-over's synchronisation, the one in
    ``stop()`` and the host wait, the checkpoint holds rows the last step had
    not written yet (here never-written slots: ``load`` then refuses the saved
    directory, whose label rows disagree with the policy's slot labels)."""
    from dali_rehearsal.checkpoint import CheckpointError
    _without(monkeypatch, ORDERINGS)
    fields, _, _ = stage_then_checkpoint(mnist[0], "gpu", prepare_ahead, tmp_path,
                                         reload=False)
    ref_fields = checkpoint_reference[prepare_ahead][0]
    assert any(not np.array_equal(g, x) for g, x in zip(fields, ref_fields))
    with pytest.raises(CheckpointError, match="disagrees with the policy's slot labels"):
        RehearsalBuffer(capacity=STOP_CAPACITY, num_representatives=R, device="gpu",
                        seed=0).load(tmp_path)
