"""dali_rehearsal.profiling: the per-step breakdown of a real training loop.

A real DALI loop (file reader -> decoder -> the rehearsal stage -> a crop in
the mixing pipeline, consumed by DALI's PyTorch iterator) is timed with the
breakdown on: every phase the stage goes through must be there, none
negative, and the loop's phases must add up to the loop's own time (no phase
counted twice, none lost). With profiling off nothing is recorded.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
torch = pytest.importorskip("torch")

import dali_rehearsal as dr  # noqa: E402
from dali_rehearsal import profiling  # noqa: E402


@pytest.fixture
def folder(tmp_path):
    """40 small PNGs in 4 class folders."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(4):
        d = tmp_path / f"c{c}"
        d.mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path


@pytest.fixture(autouse=True)
def off_afterwards():
    yield
    profiling.disable()
    profiling.reset()


def _loop(folder, prepare_ahead: int, epochs: int = 2):
    """Trains a tiny model for ``epochs`` epochs; returns (delivered labels, wall time)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=1)
    def source():
        jpegs, labels = fn.readers.file(file_root=str(folder), random_shuffle=True,
                                        name="Reader", seed=1)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels

    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=3, device="cpu", seed=0)

    @pipeline_def(batch_size=9, num_threads=1, device_id=None, seed=2)
    def mixing():
        images, labels = dr.fn.rehearsal(source(), buffer=buffer, prepare_ahead=prepare_ahead)
        return fn.crop(images, crop=(8, 8), dtype=types.FLOAT), labels

    it = DALIGenericIterator(mixing(), ["x", "y"], auto_reset=True)
    model = torch.nn.Linear(64, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = []
    start = time.perf_counter()
    for _ in range(epochs):
        for data in profiling.iterate(it):
            with profiling.phase("train"):
                x = data[0]["x"].reshape(data[0]["x"].shape[0], -1)
                y = data[0]["y"].reshape(-1).long()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            labels.append(y)
    wall = time.perf_counter() - start
    del it
    buffer.close()
    return torch.cat(labels), wall


def _check_sums(rep, wall):
    loop = rep["loop"]
    assert set(profiling.PHASES) <= set(loop)
    assert all(v >= 0 for v in loop.values()), loop
    assert all(v >= 0 for v in rep["background"].values()), rep["background"]
    # the phases (``other`` included) are the loop's time, each second once
    assert sum(loop.values()) == pytest.approx(rep["loop_s"], rel=1e-6, abs=1e-9)
    assert sum(v for k, v in loop.items() if k != "other") <= rep["loop_s"] * (1 + 1e-6)
    # and the loop's time is the time the loop took, less only the iterator's own steps
    assert rep["loop_s"] <= wall
    assert rep["loop_s"] >= 0.5 * wall
    assert sum(rep["per_step_ms"].values()) == pytest.approx(rep["step_ms"], rel=1e-6)


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_breakdown_of_a_real_loop_adds_up(folder, prepare_ahead):
    profiling.enable()
    labels, wall = _loop(folder, prepare_ahead)
    profiling.disable()
    rep = profiling.report()
    # 40 samples, b = 6: 7 steps an epoch, 2 epochs
    assert rep["steps"] == 14
    assert len(labels) >= 80
    _check_sums(rep, wall)
    loop, calls = rep["loop"], rep["calls"]
    assert loop["train"] > 0 and loop["mixing"] > 0 and loop["stage"] > 0
    if prepare_ahead == 0:      # the stage works in the loop's thread
        assert calls["loop:source"] >= 12 and calls["loop:exchange"] >= 12
        assert loop["source"] > 0 and loop["exchange"] > 0
        assert loop["stage_wait"] == 0 and not rep["background"]
    else:                       # in its worker, the loop waits for the prepared batch
        assert calls["loop:stage_wait"] >= 12
        assert loop["source"] == 0 and loop["exchange"] == 0
        assert rep["background"]["source"] > 0 and rep["background"]["exchange"] > 0
        assert rep["background"]["stage"] > 0
    text = profiling.format_report(rep)
    for p in profiling.PHASES:
        assert p in text


def test_off_records_nothing(folder):
    assert not profiling.is_enabled()
    assert profiling.phase("train") is profiling.phase("x")   # one shared no-op context
    _loop(folder, 2, epochs=1)
    rep = profiling.report()
    assert rep["steps"] == 0 and rep["loop_s"] == 0
    assert not rep["background"] and not any(rep["loop"].values())


def test_same_batches_with_profiling_on_and_off(folder):
    """Profiling only watches: the same seed gives the same batches."""
    off, _ = _loop(folder, 2)
    profiling.enable()
    on, _ = _loop(folder, 2)
    assert torch.equal(off, on)


def test_a_loop_calling_next_itself(folder):
    """``step()`` and ``next_batch()``: an epoch end is loop time, not a step."""
    it = iter(range(5))
    profiling.enable()
    n = 0
    while True:
        with profiling.step():
            try:
                profiling.next_batch(it)
            except StopIteration:
                break
            with profiling.phase("train"):
                n += 1
    rep = profiling.report()
    assert rep["steps"] == n == 5
    assert rep["loop"]["mixing"] > 0 and rep["loop"]["train"] > 0
    assert sum(rep["loop"].values()) == pytest.approx(rep["loop_s"], rel=1e-6, abs=1e-9)


def test_nvtx_ranges_when_asked(folder):
    pytest.importorskip("nvtx")
    profiling.enable(nvtx=True)
    with profiling.phase("train"):
        with profiling.phase("inner"):
            pass
    rep = profiling.report()
    assert rep["calls"] == {"outside:train": 1, "outside:inner": 1}
