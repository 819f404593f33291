"""The hand-over of the stage's batches to DALI, as far as a CPU shows it.

- Batches handed out stay intact while the stage reuses its output ring
  (DALI's CPU outputs are its own buffers; the ring covers what DALI reads).
- Every batch passes the ordering point (``Handover._order``) before DALI sees
  it: in the worker thread with ``prepare_ahead > 0`` (nothing for the training
  thread to wait for), in DALI's thread with ``prepare_ahead=0``. The GPU
  emulation tests check what that point orders; here, that no batch bypasses it.
- ``stop()`` joins the worker before it synchronises the stage's stream, so
  that no stage work runs when the buffer is read or saved.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import dali_rehearsal as dr
from dali_rehearsal.stage import Handover

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402


def pipelines(mnist, buffer, prepare_ahead, *, b=8, prefetch=2):
    data = dr.LabelledFiles.from_folder(mnist[0])

    @pipeline_def(batch_size=b, num_threads=2, device_id=None, seed=1)
    def decode():
        jpegs, labels = fn.readers.file(files=list(data.files), labels=list(data.labels),
                                        random_shuffle=True)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels

    @pipeline_def(batch_size=b + buffer.num_representatives, num_threads=2, device_id=None,
                  seed=2, prefetch_queue_depth=prefetch)
    def train(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, replay_flag=True,
                                     prepare_ahead=prepare_ahead))

    return train(decode())


@pytest.mark.parametrize("prepare_ahead, prefetch", [(0, 1), (2, 2), (3, 1)])
def test_batches_handed_out_stay_intact(mnist, prepare_ahead, prefetch):
    """The training loop keeps every batch (zero-copy torch tensors, as DALI's
    iterator hands them out) while the stage goes round its ring many times."""
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=3, device="cpu", seed=0)
    pipe = pipelines(mnist, buffer, prepare_ahead, prefetch=prefetch)
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"], auto_reset=True)
    label_of = {}
    for root in mnist:
        data = dr.LabelledFiles.from_folder(root)
        for path, label in zip(data.files, data.labels):
            label_of[np.asarray(Image.open(path).convert("L")).tobytes()] = label
    held, copies = [], []
    for _ in range(2):
        for batch in it:
            images = batch[0]["images"].numpy()
            labels = batch[0]["labels"].numpy().reshape(-1).tolist()
            # every row whole when it arrives (no slot rewritten while DALI read it)
            assert [label_of[np.ascontiguousarray(x[..., 0]).tobytes()] for x in images] \
                == labels
            held.append(batch[0])
            copies.append({k: v.numpy().copy() for k, v in batch[0].items()})
    ring = dr.stage.stage_of(pipe).handover.depth
    assert len(held) > 4 * ring
    for tensors, snapshot in zip(held, copies):
        for k, v in tensors.items():
            np.testing.assert_array_equal(v.numpy(), snapshot[k])
    buffer.close()


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_every_batch_passes_the_ordering_point(mnist, monkeypatch, prepare_ahead):
    calls = []
    original = Handover._order

    def spy(self):
        calls.append(threading.current_thread().name)
        original(self)

    monkeypatch.setattr(Handover, "_order", spy)
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=3, device="cpu", seed=0)
    pipe = pipelines(mnist, buffer, prepare_ahead)
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"], auto_reset=True)
    delivered = sum(1 for _ in it)
    stage = dr.stage.stage_of(pipe)
    buffer.close()                        # the worker stops: every batch built is counted
    built = sum(dr.steps_per_epoch(pipe, e) for e in range(stage.epoch)) + stage.steps
    assert delivered == dr.steps_per_epoch(pipe) and built >= delivered
    assert len(calls) == built
    if prepare_ahead:
        assert set(calls) == {"dali-rehearsal-stage"}      # not the training thread
    else:
        assert set(calls) == {threading.main_thread().name}


def test_stop_joins_the_worker_then_synchronises_the_stream(mnist, monkeypatch):
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=3, device="cpu", seed=0)
    pipe = pipelines(mnist, buffer, 2)
    pipe.build()
    for _ in range(3):
        pipe.run()
    stage = dr.stage.stage_of(pipe)
    # this stage's worker (threads of earlier tests' pipelines may still be alive)
    worker = [stage._worker._thread]
    assert worker[0].name == "dali-rehearsal-stage" and worker[0].is_alive()
    seen = []
    backend = buffer.backend
    original = type(backend).synchronize

    def spy(self, stream=None):
        seen.append((stream is stage.stream, worker[0].is_alive()))
        original(self, stream)

    monkeypatch.setattr(type(backend), "synchronize", spy)
    stage.stop()
    assert seen and seen[-1] == (True, False)     # the stage's stream, after the join
    assert stage.stopped
    with pytest.raises(RuntimeError, match="stopped"):
        stage.run_step()
    buffer.close()
