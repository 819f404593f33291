"""Smoke test of pipelines/bench_step.py (the per-step floor): a few steps.

Checks the JSON's structure and that the bare NumPy step really is the same
work (same rows out, same reservoir behaviour); the figures of such a short
run mean nothing and are not checked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "bench_step.py"


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_step_does_the_work_of_mix():
    """The floor is honest: it returns the fresh rows then r distinct stored
    rows with their own labels, and keeps a uniform reservoir sample."""
    bench = _load()
    step = bench.BareStep(capacity=50, r=7, shape=(2,))
    for t in range(20):
        ids = t * 50 + np.arange(50)
        images = np.stack([ids % 256, ids // 256], axis=1).astype(np.uint8)
        out_images, out_labels = step(images, ids.astype(np.int64))
        assert (out_labels[:50] == ids).all()
        reps = out_labels[50:]
        assert len(reps) == (7 if t else 0) and len(set(reps.tolist())) == len(reps)
        assert (reps < t * 50).all()
        back = out_images[50:].astype(np.int64)
        assert (back[:, 0] + 256 * back[:, 1] == reps).all()
    stored = step.labels[: step.size]
    assert step.size == 50 and len(set(stored.tolist())) == 50
    assert (stored >= 50).sum() > 40    # a sample of all 1000 arrivals, not the first 50


def test_bench_step_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, DALI_DISABLE_NVML="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "2", "--steps", "20",
                           "--stage-steps", "10", "--capacity", "100", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for v in ("bare", "reservoir", "class_balanced"):
        assert data["mix"]["us_per_step"][v]["median"] > 0
    stage = data["stage"]
    assert stage["steps_per_s_ratio"]["median"] > 0
    # the references that separate the design's inherent cost from the stage's
    for v in ("plain", "mixing_only", "two_pipelines", "rehearsal"):
        assert stage["us_per_step"][v]["median"] > 0 and stage["cpu_us_per_step"][v]["median"] > 0
    assert stage["ratio_to_plain"]["rehearsal"] == stage["steps_per_s_ratio"]
    assert stage["rehearsal_vs_two_pipelines"]["median"] > 0
    assert len(stage["repetitions"]) == 2
    assert len(data["mix"]["repetitions"]) == 2
    assert "load_average_after" in data["environment"]
    assert "<= 2x bare" in proc.stdout and ">= 0.8x steps/s" in proc.stdout
    assert "two pipelines, no buffer" in proc.stdout and "CPU time per step" in proc.stdout


def test_two_pipeline_reference_hands_over_the_source_rows():
    """The reference the stage is measured against does the stage's data work:
    the mixing pipeline's batches hold the source's b rows, then r of them again."""
    bench = _load()
    b, r, shape = 8, 3, (2, 2, 3)
    feeder = bench._cheap_source(b, shape, 10, 1)
    feeder.build()
    twin = bench._cheap_source(b, shape, 10, 1)     # same seed: the same batches
    twin.build()
    pipe = bench._fed_pipeline(b + r, 1, bench.chained_feed(feeder, r, shape))
    for _ in range(6):
        images, labels = (o.as_array() for o in pipe.run())
        want_images, want_labels = (o.as_array() for o in twin.run())
        np.testing.assert_array_equal(images[:b], want_images)
        np.testing.assert_array_equal(images[b:], want_images[:r])
        np.testing.assert_array_equal(labels.reshape(-1), np.concatenate(
            [want_labels.reshape(-1), want_labels.reshape(-1)[:r]]))


def test_help_says_what_a_step_holds():
    """One benchmark per figure: the floor benchmark says what its step holds
    and where a training loop's figure comes from."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    assert "A step here is pipe.run() and reading its outputs, nothing else" in text
    assert "continual_mnist.py --benchmark" in text
