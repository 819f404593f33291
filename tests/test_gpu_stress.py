"""Stage stress test: ImageNet-size rows through the GPU stage, every row checked.

Every image of the data set names itself: its first pixel holds its id and
every other byte is ``(BASE + id) % 256`` for a fixed random ``BASE``, so a
row that is stale, half written, shifted or paired with another row's label
is caught byte for byte. Labels are ``id % 10``. For each configuration
(``prepare_ahead`` 0 and 2, with a concurrent GPU load on another stream) the
test runs many epochs (``DR_STRESS_EPOCHS``, default 3; the GPU validation
script runs 20) and checks, batch by batch: every row's bytes and label,
fresh rows first then replayed ones (the flag), ``r`` representatives once the
buffer holds them, representatives drawn only from rows delivered before,
and every image exactly once per epoch. With ``DR_STRESS_REPORT=path`` the
figures are written there as JSON.

The GPU test (``gpu``) runs the real stage in a DALI pipeline on a GPU
(224x224x3 PNGs decoded by ``device="mixed"``). The same checks run in CI on
the CUDA emulation (``gpu_emulated``: smaller rows, the stage's callback
driven directly, batches read on the stage's stream), which keeps the
checker itself tested.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

import dali_rehearsal as dr

pytest.importorskip("nvidia.dali")

B, R, CAPACITY = 56, 7, 200
STEPS_PER_EPOCH = 8
N_IMAGES = B * STEPS_PER_EPOCH - 5          # a partial last batch every epoch
EPOCHS = int(os.environ.get("DR_STRESS_EPOCHS", "3"))
MARKER = 0x5A


def base_pattern(shape):
    return np.random.default_rng(1234).integers(0, 256, shape, dtype=np.uint8)


def expected_images(ids, base):
    ids = np.asarray(ids, dtype=np.int64)
    images = ((base[None].astype(np.int64) + ids[:, None, None, None]) % 256).astype(np.uint8)
    images[:, 0, 0, 0] = ids % 256
    images[:, 0, 0, 1] = ids // 256
    images[:, 0, 0, 2] = MARKER
    return images


def write_dataset(folder, shape):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    base = base_pattern(shape)
    files, labels = [], []
    for i in range(N_IMAGES):
        path = folder / f"{i:05d}.png"
        Image.fromarray(expected_images([i], base)[0]).save(path, compress_level=1)
        files.append(str(path))
        labels.append(i % 10)
    return files, labels, base


class Checker:
    """Checks the stage's batches in order (see the module docstring)."""

    def __init__(self, base):
        self.base = base
        self.delivered: set[int] = set()
        self.epoch_ids: list[int] = []
        self.epochs = self.steps = self.rows = self.replayed = 0

    def batch(self, images, labels, flags):
        images = np.asarray(images)
        labels = np.asarray(labels).reshape(-1)
        flags = np.asarray(flags).reshape(-1)
        assert images.shape[1:] == self.base.shape and images.dtype == np.uint8
        assert len(images) == len(labels) == len(flags)
        assert (images[:, 0, 0, 2] == MARKER).all(), "a row that is no image of the data set"
        ids = images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)
        assert (ids < N_IMAGES).all()
        bad = [i for i, (row, e) in enumerate(zip(images, expected_images(ids, self.base)))
               if not np.array_equal(row, e)]
        assert not bad, f"step {self.steps}: rows {bad} are not whole images (stale or torn)"
        assert (labels == ids % 10).all(), f"step {self.steps}: a label of another image"
        fresh = int((flags == 0).sum())
        assert (flags[:fresh] == 0).all() and (flags[fresh:] == 1).all()
        reps = ids[fresh:].tolist()
        if len(self.delivered) >= R:
            assert len(reps) == R, f"step {self.steps}: {len(reps)} representatives"
        assert set(reps) <= self.delivered, "a representative not delivered before"
        self.delivered |= set(ids[:fresh].tolist())
        self.epoch_ids += ids[:fresh].tolist()
        self.steps += 1
        self.rows += len(ids)
        self.replayed += len(reps)

    def end_epoch(self):
        assert sorted(self.epoch_ids) == list(range(N_IMAGES)), \
            f"epoch {self.epochs}: not every image exactly once"
        self.epoch_ids = []
        self.epochs += 1

    def figures(self):
        return {"epochs": self.epochs, "steps": self.steps, "rows_checked": self.rows,
                "replayed_rows": self.replayed}


def _record(name, figures):
    path = os.environ.get("DR_STRESS_REPORT")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.exists(path) else {}
    data[name] = figures
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# ------------------------------------------------------------------ on a GPU

class GpuLoad:
    """Matrix products on their own CUDA stream while the stage runs."""

    def __init__(self):
        import torch
        self.torch = torch
        self.stop = threading.Event()
        self.iterations = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        torch = self.torch
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            a = torch.randn(2048, 2048, device="cuda")
            while not self.stop.is_set():
                for _ in range(4):
                    a = torch.tanh(a @ a)
                stream.synchronize()
                self.iterations += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def dataset_224(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stress224"), (224, 224, 3))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_stage_stress_on_a_gpu(dataset_224, prepare_ahead):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    files, labels, base = dataset_224
    buffer = dr.RehearsalBuffer(capacity=CAPACITY, num_representatives=R, device="gpu",
                                seed=0, policy="reservoir")

    @pipeline_def(batch_size=B, num_threads=4, device_id=0, seed=1, prefetch_queue_depth=2)
    def source():
        pngs, lab = fn.readers.file(files=files, labels=labels, random_shuffle=True,
                                    name="Reader")
        return fn.decoders.image(pngs, device="mixed", output_type=types.RGB), lab

    @pipeline_def(batch_size=B + R, num_threads=4, device_id=0, prefetch_queue_depth=2)
    def mixing(src):
        images, lab, flag = dr.fn.rehearsal(src, buffer=buffer, replay_flag=True,
                                            prepare_ahead=prepare_ahead)
        return images, lab, flag

    checker = Checker(base)
    start = time.monotonic()
    it = DALIGenericIterator(mixing(source()), ["images", "labels", "flag"], auto_reset=True)
    with GpuLoad() as load:
        for _ in range(EPOCHS):
            for batch in it:
                out = batch[0]
                checker.batch(out["images"].cpu().numpy(), out["labels"].cpu().numpy(),
                              out["flag"].cpu().numpy())
            checker.end_epoch()
    buffer.close()
    figures = dict(checker.figures(), prepare_ahead=prepare_ahead, row_shape=[224, 224, 3],
                   seconds=round(time.monotonic() - start, 1), load_iterations=load.iterations)
    _record(f"gpu_prepare_ahead_{prepare_ahead}", figures)
    assert checker.epochs == EPOCHS and load.iterations > 0


# ------------------------------------------------------------------ on the emulation

@pytest.fixture(scope="module")
def dataset_small(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stress_small"), (16, 12, 3))


@pytest.mark.gpu_emulated
@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_stage_stress_checks_on_the_emulation(dataset_small, emulated_gpu, prepare_ahead):
    from nvidia.dali import fn, pipeline_def, types

    from dali_rehearsal.stage import Mixer
    from emulation.dali import ExternalSourceReader, GpuSourcePipeline
    files, labels, base = dataset_small

    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=1)
    def source():
        pngs, lab = fn.readers.file(files=files, labels=labels, random_shuffle=True,
                                    name="Reader")
        return fn.decoders.image(pngs, device="cpu", output_type=types.RGB), lab

    buffer = dr.RehearsalBuffer(capacity=CAPACITY, num_representatives=R, device="gpu",
                                seed=0, policy="reservoir")
    mixer = Mixer(GpuSourcePipeline(source()), buffer.core, out_batch_size=B + R, replay_flag=True,
                  prepare_ahead=prepare_ahead, ring_depth=4)
    reader = ExternalSourceReader(read_after=2, cuda_stream=mixer.stream)
    checker = Checker(base)
    epochs = 2
    try:
        while checker.epochs < epochs:
            try:
                batches = reader.feed(mixer())
            except StopIteration:
                for images, lab, flag in reader.drain():
                    checker.batch(images, lab, flag)
                checker.end_epoch()
                continue
            for images, lab, flag in batches:
                checker.batch(images, lab, flag)
    finally:
        buffer.close()
    assert checker.steps == epochs * STEPS_PER_EPOCH and checker.replayed > 0


@pytest.mark.parametrize("damage", ["torn_row", "stale_row", "wrong_label", "flag_order"])
def test_the_checker_catches_damaged_batches(damage):
    base = base_pattern((16, 12, 3))
    checker = Checker(base)
    ids = np.arange(B)
    checker.batch(expected_images(ids, base), ids % 10, np.zeros(B, np.uint8))
    ids = np.concatenate([np.arange(B, 2 * B), [3, 9, 27, 1, 0, 40, 41]])
    images, labels = expected_images(ids, base), ids % 10
    flags = np.r_[np.zeros(B, np.uint8), np.ones(R, np.uint8)]
    if damage == "torn_row":
        images[5, 8:] = expected_images([7], base)[0, 8:]
    elif damage == "stale_row":
        images[B + 2] = 0xCD
    elif damage == "wrong_label":
        labels = labels.copy()
        labels[B + 1] += 1
    else:
        flags[3], flags[-1] = 1, 0
    with pytest.raises(AssertionError):
        checker.batch(images, labels, flags)
