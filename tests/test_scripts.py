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
import subprocess
import sys
import time

import pytest

from dist_programs import launching
from utils import require_mpiexec

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
    # the plot shows the figures the headline and its title quote: the medians of the
    # ratios, whiskers from the smallest to the largest repetition
    plotted = data["plotted"]
    (bars,), (whiskers,) = plotted["series"].values(), plotted["errors"].values()
    for i, key in enumerate((None, "rehearsal_vs_dali", "no_buffer_vs_dali",
                             "torch_replay_vs_dali")):
        r = ratios[key] if key else {"median": 1.0, "min": 1.0, "max": 1.0}
        assert bars[i] == r["median"] and whiskers[i] == [r["min"], r["max"]], (key, plotted)
    rr = ratios["rehearsal_vs_dali"]
    assert f"rehearsal/plain = {rr['median']:.3f} [{rr['min']:.3f}..{rr['max']:.3f}]" in \
        plotted["title"]
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


@pytest.mark.slow
def test_profile_epochs(tmp_path):
    """The decode-heavy epoch loop: both variants, every epoch start but each
    segment's first, the ratios as defined, the command printed."""
    out = tmp_path / "out" / "epochs.json"
    proc = _run([sys.executable, PIPELINES / "profile_epochs.py", "--images", "40",
                 "--image-size", "32", "--resize-size", "40", "--batch-size", "8",
                 "--representatives", "2", "--epochs", "3", "--repeats", "2", "--breakdown",
                 "--out", out], tmp_path, timeout=300)
    data = json.loads(out.read_text())
    v = data["variants"]
    assert set(v) == {"plain", "rehearsal"}
    for name, f in v.items():
        assert len(f["epoch_start_ms"]) == 2 and all(x > 0 for x in f["epoch_start_ms"]), name
        assert len(f["fresh_per_s"]) == 2 and all(x > 0 for x in f["fresh_per_s"]), name
    assert data["epoch_start_ratio"] == pytest.approx(
        [a / b for a, b in zip(v["rehearsal"]["epoch_start_ms"], v["plain"]["epoch_start_ms"])])
    assert data["fresh_per_s_ratio"] == pytest.approx(
        [a / b for a, b in zip(v["rehearsal"]["fresh_per_s"], v["plain"]["fresh_per_s"])])
    # 40 images, b = 8: 5 steps an epoch, 3 epochs, 2 segments
    assert data["breakdown"]["plain"]["steps"] == data["breakdown"]["rehearsal"]["steps"] == 30
    assert data["breakdown"]["rehearsal"]["loop"]["stage"] > 0
    assert data["threads"]["rehearsal"]["source"] + data["threads"]["rehearsal"]["mixing"] >= 2
    assert f"command: {data['command']}" in proc.stdout
    assert "rehearsal / plain: epoch start" in proc.stdout


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
    proc = _run([require_mpiexec(), "-n", "2", sys.executable, PIPELINES / "profile_throughput.py",
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
    # the plot shows the ratios the summary quotes: medians, whiskers over the repetitions
    plotted = data["plotted"]
    for (label, bars), whiskers in zip(plotted["series"].items(),
                                       plotted["errors"].values()):
        variant = label.split(" ")[0]
        r = data["ratios_over_local"][variant]
        assert bars == [r["median"]] and whiskers == [[r["min"], r["max"]]], plotted
        assert f"{label} {r['median']:.3f}" in plotted["title"]
    assert set(plotted["series"]) and len(plotted["series"]) == len(data["ratios_over_local"])
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
    _run([require_mpiexec(), "-n", "2", sys.executable, PIPELINES / "profile_global_sampling.py",
          *GS_TINY, "--device", "cpu", "--out", out], tmp_path, timeout=400)
    data = json.loads(out.read_text())
    _check_global(data, 2)
    assert len(data["per_rank"]) == 2
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
@pytest.mark.mpi
def test_profile_global_sampling_launch(tmp_path):
    require_mpiexec()
    out = tmp_path / "launch.json"
    _run([sys.executable, PIPELINES / "profile_global_sampling.py", "--launch", "1,2",
          *GS_TINY, "--device", "cpu", "--out", out], tmp_path, timeout=600)
    data = json.loads(out.read_text())
    assert data["mode"] == "launch" and data["failures"] == []
    assert [s["world_size"] for s in data["summary"]] == [1, 2]
    for run, world in zip(data["runs"], (1, 2)):
        _check_global(run, world)
    assert out.with_suffix(".png").exists()


# --------------------------------------------------------------------- every script

SCRIPTS = sorted(p for p in PIPELINES.glob("*.py") if not p.name.startswith("_")) + \
    sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_prints_help_and_does_nothing_else(script, tmp_path):
    """``--help`` of every script in pipelines/ and scripts/ prints its help
    and exits: no data written, nothing trained, measured or downloaded."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    command = ([sys.executable] if script.suffix == ".py" else ["bash"]) + [str(script), "--help"]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120,
                          env=launching.env(DALI_REHEARSAL_CACHE=tmp_path / "cache", TMPDIR=tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert script.stem in proc.stdout, proc.stdout[:2000]     # usage: script.py ...
    assert not list(work.iterdir()) and not list(tmp.iterdir()), "--help wrote files"
    assert not (tmp_path / "cache").exists(), "--help prepared data"
    assert time.monotonic() - start < 60


def test_runs_with_other_settings_write_other_files_and_a_rerun_says_it_replaces(tmp_path):
    """Default output names: the same settings replace the earlier run's files
    (and say so), other settings write other files."""
    tiny = ["--cpu", "--shapes", "4x4x3:uint8", "--batch-size", "8", "--representatives", "2",
            "--capacity", "16", "--iters", "2",
            "--warmup", "0"]

    def run(*extra):
        proc = subprocess.run([sys.executable, PIPELINES / "bench_kernels.py", *tiny, *extra],
                              cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()[-1]

    first = run("--repeats", "2")
    assert first.startswith("wrote outputs/bench_kernels-cpu-") and "replacing" not in first
    again = run("--repeats", "2")
    assert again == first + " (replacing those of an earlier run with the same settings)"
    other = run("--repeats", "3")
    assert "repeats=3" in other and "replacing" not in other
    assert len(list((tmp_path / "outputs").glob("*.json"))) == 2


def test_profile_output_names_follow_the_launch_and_the_settings():
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, PIPELINES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    for name in ("profile_throughput", "profile_global_sampling"):
        script = load(name)
        plain = script.parse_args([]).run_name
        assert plain == "" and script.parse_args(["--repeats", "6"]).run_name == "-repeats=6"
        names = {script._bench.default_out(name, plain, world, launcher)
                 for world, launcher in ((1, None), (2, "mpiexec"), (2, "torchrun"),
                                         (4, "mpiexec"))}
        assert f"outputs/{name}.json" in names and len(names) == 4

