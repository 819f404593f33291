"""Smoke tests of the profiling scripts in pipelines/: a few steps on tiny images.

Each script runs in a subprocess with a timeout; the tests check that the JSON
has the expected keys and positive figures and that the plot exists. The
figures themselves are not checked: these runs are far too short to mean
anything.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
TINY = ["--images", "40", "--image-size", "32", "--batch-size", "8", "--representatives", "2",
        "--steps", "3", "--warmup", "1", "--repeats", "2", "--no-progress"]


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DALI_REHEARSAL_CACHE"] = str(tmp_path / "cache")
    env["DALI_DISABLE_NVML"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run(cmd, tmp_path, timeout):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def _mpiexec():
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found")
    return exe


def _positive(d: dict, keys):
    for k in keys:
        assert d[k] > 0, (k, d[k])


def _check_throughput(data, world):
    assert data["script"] == "profile_throughput"
    env = data["environment"]
    for key in ("cpu_model", "versions", "date", "device"):
        assert key in env
    for lib in ("dali", "numpy", "torch", "cupy"):
        assert lib in env["versions"]
    assert data["settings"]["world_size"] == world
    assert set(data["variants"]) == {"dali", "rehearsal", "torch_replay"}
    for fig in data["variants"].values():
        _positive(fig, ["fresh_samples_per_s", "delivered_samples_per_s", "median_step_ms",
                        "p95_step_ms"])
        assert len(fig["per_repeat_fresh_samples_per_s"]) == 2
        assert fig["delivered_samples_per_s"] >= fig["fresh_samples_per_s"]
    # the replay variants deliver representatives on top of the fresh samples
    assert data["variants"]["rehearsal"]["delivered_samples"] > \
        data["variants"]["rehearsal"]["fresh_samples"]
    for key in ("rehearsal_vs_dali", "rehearsal_vs_torch_replay"):
        _positive(data["ratios"][key], ["median", "pooled"])
    _positive(data["headline"], ["rehearsal_over_dali_fresh",
                                 "rehearsal_over_torch_replay_fresh"])


@pytest.mark.slow
def test_profile_throughput(tmp_path):
    out = tmp_path / "out" / "throughput.json"
    proc = _run([sys.executable, PIPELINES / "profile_throughput.py", *TINY, "--device", "cpu",
                 "--out", out], tmp_path, timeout=300)
    data = json.loads(out.read_text())
    _check_throughput(data, 1)
    assert data["buffer"][0]["size"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "headline" in proc.stdout and "fresh/s" in proc.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_profile_throughput_mpi(tmp_path):
    out = tmp_path / "throughput_mpi.json"
    _run([_mpiexec(), "-n", "2", sys.executable, PIPELINES / "profile_throughput.py", *TINY,
          "--device", "cpu", "--out", out], tmp_path, timeout=400)
    data = json.loads(out.read_text())
    _check_throughput(data, 2)
    assert len(data["per_rank"]) == 2
    assert all(b["world_size"] == 2 and b["sampling"] == "global" for b in data["buffer"])
    agg = data["variants"]["dali"]["fresh_samples_per_s"]
    parts = sum(r["dali"]["fresh_samples_per_s"] for r in data["per_rank"])
    assert agg == pytest.approx(parts)
    assert out.with_suffix(".png").exists()


def test_bench_kernels_without_gpu_exits_cleanly(tmp_path):
    from dali_rehearsal import gpu_available
    if gpu_available():
        pytest.skip("a GPU is visible: the no-GPU message does not apply")
    out = tmp_path / "k.json"
    proc = _run([sys.executable, PIPELINES / "bench_kernels.py", "--out", out], tmp_path,
                timeout=120)
    assert "no GPU: nothing measured" in proc.stdout
    assert not out.exists()


def _check_kernels(data, device):
    assert data["script"] == "bench_kernels" and data["measured"] is True
    assert data["settings"]["device"] == device
    ops = {(r["op"], r["dtype"]) for r in data["results"]}
    for op in ("copy_rows", "gather_rows", "scatter_rows", "step"):
        assert (op, "uint8") in ops and (op, "float32") in ops
    for r in data["results"]:
        _positive(r, ["bytes", "kernel_us", "copy_us", "kernel_GBps", "copy_GBps",
                      "pct_of_copy"])
    assert "copy_rows_pct_of_copy" in data["headline"]


def test_bench_kernels_cpu(tmp_path):
    out = tmp_path / "k.json"
    proc = _run([sys.executable, PIPELINES / "bench_kernels.py", "--cpu", "--shapes",
                 "16x16x3:uint8,3x8x8:float32", "--capacity", "64", "--iters", "3",
                 "--repeats", "2", "--warmup", "1", "--out", out], tmp_path, timeout=120)
    _check_kernels(json.loads(out.read_text()), "cpu")
    assert out.with_suffix(".png").stat().st_size > 0
    assert "% of copyto" in proc.stdout


@pytest.mark.gpu
def test_bench_kernels_gpu(tmp_path):
    out = tmp_path / "k.json"
    _run([sys.executable, PIPELINES / "bench_kernels.py", "--shapes",
          "224x224x3:uint8,3x32x32:float32", "--iters", "20", "--repeats", "2", "--out", out],
         tmp_path, timeout=300)
    data = json.loads(out.read_text())
    _check_kernels(data, "gpu")
    assert {r["mode"] for r in data["results"]} >= {"eager"}


GS_TINY = TINY + ["--compute-ms", "5", "--grad-mb", "0.25"]


def _check_global(data, world):
    assert data["script"] == "profile_global_sampling"
    assert data["world_size"] == world
    for v in ("global", "local"):
        _positive(data["variants"][v], ["mean_step_ms", "median_step_ms", "p95_step_ms",
                                        "fresh_samples_per_s"])
        assert len(data["variants"][v]["per_repeat_mean_step_ms"]) == 2
    _positive(data["ratio_global_over_local"], ["median", "pooled"])
    assert "overhead_pct" in data["headline"]
    assert data["headline"]["exchange"] == ("GlobalSampler" if world > 1 else "LocalSampler")


@pytest.mark.slow
def test_profile_global_sampling_single_process(tmp_path):
    out = tmp_path / "gs.json"
    _run([sys.executable, PIPELINES / "profile_global_sampling.py", *GS_TINY, "--device", "cpu",
          "--out", out], tmp_path, timeout=300)
    _check_global(json.loads(out.read_text()), 1)
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
@pytest.mark.mpi
def test_profile_global_sampling_mpi(tmp_path):
    out = tmp_path / "gs2.json"
    _run([_mpiexec(), "-n", "2", sys.executable, PIPELINES / "profile_global_sampling.py",
          *GS_TINY, "--device", "cpu", "--out", out], tmp_path, timeout=400)
    data = json.loads(out.read_text())
    _check_global(data, 2)
    assert len(data["per_rank"]) == 2
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
@pytest.mark.mpi
def test_profile_global_sampling_launch(tmp_path):
    _mpiexec()
    out = tmp_path / "launch.json"
    _run([sys.executable, PIPELINES / "profile_global_sampling.py", "--launch", "1,2",
          *GS_TINY, "--device", "cpu", "--out", out], tmp_path, timeout=600)
    data = json.loads(out.read_text())
    assert data["mode"] == "launch" and data["failures"] == []
    assert [s["world_size"] for s in data["summary"]] == [1, 2]
    for run, world in zip(data["runs"], (1, 2)):
        _check_global(run, world)
    assert out.with_suffix(".png").exists()
