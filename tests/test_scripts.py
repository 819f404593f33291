"""Smoke tests of the profiling scripts in pipelines/: a few steps on tiny images.

Each script runs in a subprocess with a timeout; the tests check that the JSON
has the expected keys and positive figures and that the plot exists. The
figures themselves are not checked: these runs are far too short to mean
anything.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from dist_programs import launching

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
TINY = ["--images", "40", "--image-size", "32", "--batch-size", "8", "--representatives", "2",
        "--steps", "3", "--warmup", "1", "--repeats", "2", "--no-progress"]


def _env(tmp_path) -> dict:
    """The environment of a script run: this checkout first, a fresh data cache."""
    return launching.env(DALI_REHEARSAL_CACHE=tmp_path / "cache")


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
    assert set(data["variants"]) == {"dali", "rehearsal", "torch_replay", "no_buffer"}
    for fig in data["variants"].values():
        _positive(fig, ["fresh_samples_per_s", "delivered_samples_per_s", "median_step_ms",
                        "p95_step_ms"])
        assert len(fig["per_repeat_fresh_samples_per_s"]) == 2
        assert fig["delivered_samples_per_s"] >= fig["fresh_samples_per_s"]
    # the replay variants deliver representatives on top of the fresh samples
    assert data["variants"]["rehearsal"]["delivered_samples"] > \
        data["variants"]["rehearsal"]["fresh_samples"]
    # the reference delivers up to b fresh (the epochs of the plain variant: the last batch
    # of an epoch shorter) + r copies per step, as the rehearsal variant does once its
    # buffer holds r samples; and as many fresh samples per step as the plain variant
    ref = data["variants"]["no_buffer"]
    b, r = data["settings"]["batch_size"], data["settings"]["representatives"]
    assert ref["delivered_samples"] - ref["fresh_samples"] == r * ref["measured_steps"], ref
    assert ref["fresh_samples"] <= b * ref["measured_steps"]
    ratios = data["ratios"]
    for key in ("rehearsal_vs_dali", "rehearsal_vs_torch_replay", "no_buffer_vs_dali",
                "rehearsal_vs_no_buffer"):
        _positive(ratios[key], ["median", "pooled", "min", "max"])
        assert ratios[key]["min"] <= ratios[key]["median"] <= ratios[key]["max"]
        assert len(ratios[key]["per_repeat"]) == 2
    # one definition: the inherent part times the stage's part is the headline, repetition
    # by repetition
    for whole, inherent, stage in zip(ratios["rehearsal_vs_dali"]["per_repeat"],
                                      ratios["no_buffer_vs_dali"]["per_repeat"],
                                      ratios["rehearsal_vs_no_buffer"]["per_repeat"]):
        assert whole == pytest.approx(inherent * stage)
    head = data["headline"]
    assert head["rehearsal_over_dali_fresh"] == ratios["rehearsal_vs_dali"]["median"]
    assert head["rehearsal_over_dali_fresh_pooled"] == ratios["rehearsal_vs_dali"]["pooled"]
    _positive(head, ["rehearsal_over_dali_fresh", "rehearsal_over_torch_replay_fresh",
                     "no_buffer_over_dali_fresh", "rehearsal_over_no_buffer_fresh"])


def _check_throughput_output(stdout, data):
    """The printed table and headline carry the JSON's one ratio, labelled."""
    rr = data["ratios"]["rehearsal_vs_dali"]
    line = next(x for x in stdout.splitlines() if x.startswith("(2) DALI + dr.fn.rehearsal"))
    assert f"{rr['median']:.3f} [{rr['min']:.3f}..{rr['max']:.3f}]" in line
    assert f"rehearsal / plain DALI, fresh samples/s = {rr['median']:.3f}" in stdout
    assert f"(pooled {rr['pooled']:.3f}" in stdout
    assert "fresh/s (pooled)" in stdout and "median [range]" in stdout
    assert "inherent part, reference / plain DALI" in stdout
    assert "buffer and stage, rehearsal / reference" in stdout


@pytest.mark.slow
def test_profile_throughput(tmp_path):
    out = tmp_path / "out" / "throughput.json"
    # without --no-progress: off a terminal (a pipe here) there is no bar all the same
    args = [a for a in TINY if a != "--no-progress"]
    proc = _run([sys.executable, PIPELINES / "profile_throughput.py", *args, "--device", "cpu",
                 "--out", out], tmp_path, timeout=300)
    data = json.loads(out.read_text())
    _check_throughput(data, 1)
    assert data["buffer"][0]["size"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    _check_throughput_output(proc.stdout, data)
    assert "step/s" not in proc.stderr and "profile_throughput (" not in proc.stderr


def test_profile_throughput_help_explains_every_option_once(tmp_path):
    proc = _run([sys.executable, PIPELINES / "profile_throughput.py", "--help"], tmp_path,
                timeout=120)
    text = proc.stdout.split("options:", 1)[1]
    blocks = re.split(r"\n  (?=-)", text)[1:]
    assert len(blocks) > 15
    for block in blocks:
        flag, _, help_text = block.partition("  ")
        if flag.startswith("-h"):
            continue
        assert help_text.strip(), f"{flag} has no help text"
        assert block.count("default") <= 1, f"{flag}: default shown twice: {block}"
    assert "(default: None)" not in text


@pytest.mark.slow
def _check_two_processes(data, launcher):
    """A two-process run: global sampling on both, aggregate figures the sums
    of the per-process ones."""
    _check_throughput(data, 2)
    assert data["settings"]["launcher"] == launcher
    assert len(data["per_rank"]) == 2
    assert all(b["world_size"] == 2 and b["sampling"] == "global" for b in data["buffer"])
    for variant in ("dali", "rehearsal"):
        agg = data["variants"][variant]["fresh_samples_per_s"]
        assert agg == pytest.approx(sum(r[variant]["fresh_samples_per_s"]
                                        for r in data["per_rank"]))


@pytest.mark.mpi
def test_profile_throughput_mpi(tmp_path):
    out = tmp_path / "throughput_mpi.json"
    proc = _run([_mpiexec(), "-n", "2", sys.executable, PIPELINES / "profile_throughput.py",
                 *TINY, "--device", "cpu", "--out", out], tmp_path, timeout=400)
    data = json.loads(out.read_text())
    _check_two_processes(data, "mpiexec")
    assert out.with_suffix(".png").exists()
    _check_throughput_output(proc.stdout, data)


@pytest.mark.slow
@pytest.mark.torchrun
def test_profile_throughput_torchrun(tmp_path):
    """The same script under torchrun: global sampling over torch.distributed's
    default group, per-process and aggregate figures, the same ratios."""
    from dist_programs.launching import launch, output
    out = tmp_path / "throughput_torchrun.json"
    done = launch("torchrun", 2, [PIPELINES / "profile_throughput.py", *TINY, "--device", "cpu",
                                  "--out", out], timeout=400,
                  extra_env={"DALI_REHEARSAL_CACHE": tmp_path / "cache"})
    assert done[0].returncode == 0, output(done)
    data = json.loads(out.read_text())
    _check_two_processes(data, "torchrun")
    _check_throughput_output(done[0].stdout, data)


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


def test_bench_policies(tmp_path):
    out = tmp_path / "p.json"
    proc = _run([sys.executable, PIPELINES / "bench_policies.py", "--classes", "10", "300",
                 "--capacity", "100", "--steps", "3", "--repeats", "2", "--out", out],
                tmp_path, timeout=120)
    data = json.loads(out.read_text())
    assert data["script"] == "bench_policies"
    measured = {(r["classes"], r["policy"], r["stream"]) for r in data["results"]}
    assert measured == {(c, p, s) for c in (10, 300) for p in ("class_balanced", "reservoir")
                        for s in ("new", "known")}
    for r in data["results"]:
        assert len(r["ms_per_step"]) == 2 and r["median_ms"] > 0
    assert "command: " in proc.stdout and "load average" in proc.stdout


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
