"""The main job, pipelines/continual_mnist.py, on a shortened configuration.

A real (if small) class-incremental run on held-out MNIST digits: rehearsal
must clearly beat plain incremental training, and the report (JSON, PNG) must
hold every figure for all four modes. The multi-process tests run two ranks
with DDP and global sampling across their buffers, under mpiexec and under
torchrun, which must give the same figures for the same seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "continual_mnist.py"
MODES = ("incremental", "rehearsal", "task-aware", "der", "derpp", "scratch")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 100 digits per class (80 train, 20 test), 5 tasks of 2 classes. Chosen so that
# replay clearly helps in a few seconds: over seeds 0..3 rehearsal beat incremental
# by 0.58..0.79 in final accuracy (incremental 0.10..0.18, rehearsal 0.76..0.89).
SHORT = ["--per-class", "100", "--epochs", "5", "--batch-size", "16",
         "--representatives", "32", "--capacity", "300", "--seed", "0", "--no-progress"]


def _load_script():
    spec = importlib.util.spec_from_file_location("continual_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("DALI_REHEARSAL_CACHE", str(path))
    return path


@pytest.mark.slow
def test_rehearsal_beats_incremental(tmp_path, cache, capsys):
    out = tmp_path / "out"
    script = _load_script()
    report = script.main(SHORT + ["--device", "cpu", "--out", str(out)])

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("mode"))
    assert header.split() == ["mode", "task", "1", "task", "2", "task", "3", "task", "4",
                              "task", "5", "final", "avg-inc", "train", "s", "samples/s"]
    for line in script.TABLE_LEGEND:                       # every column explained
        assert line in printed
    assert f"run time {report['total_wall_s']:.1f} s, of which training" in printed

    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(report))          # main() returns what it wrote
    for key in ("settings", "versions", "device", "world_size", "class_order", "tasks",
                "modes", "gap_closure", "total_wall_s", "test_samples", "torch_cpu_capability"):
        assert key in data, key
    assert data["world_size"] == 1 and data["device"] == "cpu"
    assert data["settings"]["representatives"] == 32 and data["settings"]["per_class"] == 100
    assert data["versions"]["nvidia-dali"] and data["versions"]["torch"]
    assert len(data["tasks"]) == 5 and sorted(data["class_order"]) == list(range(10))
    assert data["test_samples"] == 200

    modes = data["modes"]
    assert set(modes) == set(MODES)
    for mode, r in modes.items():
        assert len(r["accuracy"]) == 5, mode
        assert len(r["task_time_s"]) == 5 and all(t > 0 for t in r["task_time_s"]), mode
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"]), mode
        assert [len(row) for row in r["task_accuracy"]] == [1, 2, 3, 4, 5], mode
        assert r["final_accuracy"] == r["accuracy"][-1]
        assert r["train_time_s"] > 0 and r["samples"] > 0
        assert r["accuracy"][0] >= 0.8, (mode, r["accuracy"])    # two classes: easy
    # identical first task: same init, data order and optimizer (rehearsal's
    # first step has an empty buffer, later steps may already replay)
    assert modes["incremental"]["accuracy"][0] == modes["scratch"]["accuracy"][0]
    # every mode reads the same fresh samples; rehearsal adds up to r per step
    assert modes["incremental"]["samples"] == 5 * 5 * 160
    assert modes["scratch"]["samples"] == 5 * 160 * (1 + 2 + 3 + 4 + 5)
    assert modes["rehearsal"]["samples"] > modes["incremental"]["samples"]
    assert modes["rehearsal"]["buffer"]["size_rank0"] == 300
    # task-aware replay: task 1 trains on the fresh rows alone, like incremental
    # training; from task 2 on, at most r more rows a step (80 + 80 samples a
    # task per class pair, batches of 16: 10 steps an epoch, 5 epochs)
    ta, inc_tasks = modes["task-aware"]["task_samples"], modes["incremental"]["task_samples"]
    assert ta[0] == inc_tasks[0] == 5 * 160
    assert all(inc < t <= inc + 32 * 50 for t, inc in zip(ta[1:], inc_tasks[1:])), ta

    inc = modes["incremental"]["final_accuracy"]
    reh = modes["rehearsal"]["final_accuracy"]
    scr = modes["scratch"]["final_accuracy"]
    assert inc <= 0.35, f"incremental training should forget the old tasks, got {inc}"
    assert reh - inc >= 0.25, f"rehearsal {reh} vs incremental {inc}"
    assert scr >= 0.8, scr
    assert data["gap_closure"] == pytest.approx((reh - inc) / (scr - inc), abs=1e-3)
    tas = modes["task-aware"]["final_accuracy"]
    assert tas - inc >= 0.25, f"task-aware {tas} vs incremental {inc}"
    closures = {"rehearsal": data["gap_closure"]}
    for mode in ("task-aware", "der", "derpp"):
        final = modes[mode]["final_accuracy"]
        assert final - inc >= 0.25, f"{mode} {final} vs incremental {inc}"
        closures[mode] = pytest.approx((final - inc) / (scr - inc), abs=1e-3)
        assert f"gap closure ({mode} - incremental)" in printed
    assert data["gap_closure_by_mode"] == closures
    # DER and DER++: the fresh rows' logits were written back by ticket, and
    # what the stage, working ahead, had overwritten meanwhile was dropped
    for mode in ("der", "derpp"):
        fb = modes[mode]["buffer"]["feedback"]
        assert fb["applied"] > 150, fb           # half the capacity (300)
        assert fb["sent"] == fb["received"] == fb["undelivered"] == 0, fb
        assert fb["applied"] + fb["stale"] + fb["not_stored"] == \
            modes["incremental"]["samples"], fb
        assert modes[mode]["samples"] == modes["rehearsal"]["samples"]

    png = (out / "accuracy.png").read_bytes()
    assert len(png) > 1000 and png.startswith(PNG_SIGNATURE)


TINY = ["--per-class", "20", "--epochs", "2", "--batch-size", "8", "--representatives", "8",
        "--capacity", "40", "--seed", "0", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_breakdown_of_the_main_job(tmp_path, cache, capsys, prepare_ahead):
    """``--breakdown``: per mode and task, where the steps' time went; the
    steps are the optimizer steps, and the phases add up to the steps' time."""
    from dali_rehearsal import profiling
    out = tmp_path / "out"
    report = _load_script().main(TINY + ["--modes", "incremental,rehearsal", "--breakdown",
                                         "--prepare-ahead", str(prepare_ahead),
                                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert "incremental, task 1: per-step breakdown" in printed
    assert "rehearsal, tasks 2-5: per-step breakdown" in printed
    assert report["settings"]["prepare_ahead"] == prepare_ahead
    for mode, r in report["modes"].items():
        assert len(r["breakdown"]) == 5 and sum(r["task_samples"]) == r["samples"]
        for task in r["breakdown"]:
            # 32 training digits a task (16 a class), b = 8: 4 steps an epoch, 2 epochs
            assert task["steps"] == 8, (mode, task)
            assert all(v >= 0 for v in task["loop"].values())
            assert sum(task["loop"].values()) == pytest.approx(task["loop_s"], rel=1e-6)
            assert task["loop"]["train"] > 0 and task["loop"]["mixing"] > 0
        stage = sum(t["loop"]["stage"] for t in r["breakdown"])
        assert (stage > 0) == (mode == "rehearsal"), mode
    reh = report["modes"]["rehearsal"]["breakdown"]
    where = "loop" if prepare_ahead == 0 else "background"
    assert all(t[where].get("source", 0) > 0 for t in reh)
    assert not profiling.is_enabled()


def test_benchmark_mode_prints_the_ratio_with_its_command(tmp_path, cache, capsys):
    """``--benchmark N``: N interleaved runs of rehearsal (b + r rows a step)
    and incremental at batch b + r; the ratio of samples/s, run by run."""
    out = tmp_path / "out"
    fig = _load_script().main(TINY + ["--benchmark", "2", "--breakdown", "--out", str(out)])
    printed = capsys.readouterr().out
    # the breakdown groups the runs' tasks: task 1 of every run, then tasks 2-5 of every run
    # (16 training digits a class, 2 classes a task, b = 8, 2 epochs: 8 steps a task)
    assert "rehearsal, task 1: per-step breakdown: 16 steps" in printed
    assert "rehearsal, tasks 2-5: per-step breakdown: 64 steps" in printed
    assert "incremental, task 1: per-step breakdown: 8 steps" in printed   # batch 16
    assert "rehearsal / incremental samples/s at 16 rows a step (b=8 + r=8 vs --batch-size 16)" \
        in printed
    assert "command: " in printed and "median" in printed
    data = json.loads((out / "benchmark.json").read_text())
    assert data == json.loads(json.dumps(fig))
    assert data["runs"] == 2 and len(data["ratio"]) == 2
    reh, inc = data["samples_per_s"]["rehearsal"], data["samples_per_s"]["incremental"]
    assert all(x > 0 for x in reh + inc)
    assert data["ratio"] == pytest.approx([a / b for a, b in zip(reh, inc)])
    assert len(data["task1_per_row_over_rest"]) == 2
    assert not (out / "results.json").exists()      # no comparison, no evaluation


def test_options_are_checked():
    script = _load_script()
    args = script.parse_args(["--modes", "scratch,incremental"])
    assert args.modes == ["incremental", "scratch"]
    assert (args.batch_size, args.epochs, args.per_class) == (32, 3, 500)
    # methods by the names papers use, beside the two bounds; DER's weights stated
    args = script.parse_args(["--methods", "derpp,er"])
    assert args.modes == ["incremental", "rehearsal", "derpp", "scratch"]
    assert (args.der_alpha, args.der_beta) == (1.0, 0.5)
    assert script.parse_args(["--method", "er-task"]).modes == \
        ["incremental", "task-aware", "scratch"]
    for bad in (["--modes", "replay"], ["--methods", "icarl"], ["--methods", ""],
                ["--per-class", "0"], ["--batch-size", "0"],
                ["--policy", "fifo"], ["--prepare-ahead", "-1"], ["--benchmark", "-1"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_runs_with_other_settings_or_launches_write_other_folders():
    script = _load_script()

    def folder(argv, world=1, launcher=None):
        return script.default_out(script.parse_args(argv).run_name, world, launcher)

    assert script.parse_args([]).out is None          # chosen once the launch is known
    assert folder([]) == "outputs/continual_mnist"
    assert folder(["--seed", "0", "--epochs", "3"]) == "outputs/continual_mnist"  # the defaults
    assert folder([], 2, "mpiexec") == "outputs/continual_mnist-2proc-mpiexec"
    assert folder([], 2, "torchrun") == "outputs/continual_mnist-2proc-torchrun"
    assert folder(["--seed", "1"]) == "outputs/continual_mnist-seed=1"
    assert folder(["--modes", "rehearsal", "--representatives", "16"], 4, "torchrun") == \
        "outputs/continual_mnist-modes=rehearsal-representatives=16-4proc-torchrun"
    assert folder(["--no-progress"]) == "outputs/continual_mnist"  # changes no figure
    many = folder(["--seed", "1", "--epochs", "2", "--per-class", "100", "--lr", "0.001",
                   "--batch-size", "16", "--representatives", "8", "--capacity", "100",
                   "--increment", "5", "--policy", "reservoir"])
    assert many.startswith("outputs/continual_mnist-") and len(many) < 60   # a digest
    assert many != folder(["--seed", "2", "--epochs", "2", "--per-class", "100", "--lr",
                           "0.001", "--batch-size", "16", "--representatives", "8",
                           "--capacity", "100", "--increment", "5", "--policy", "reservoir"])


def _have_mpi() -> bool:
    if shutil.which("mpiexec") is None:
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


# 48 training digits per class: 96 per task, 48 per rank; odd batches leave
# a partial last step; 3 epochs. No --no-progress: bars must stay off when the
# output is not a terminal.
TWO_RANKS = ["--modes", "rehearsal,derpp", "--per-class", "60", "--epochs", "3", "--batch-size", "10",
             "--representatives", "6", "--capacity", "40", "--device", "cpu"]


def _two_ranks(launcher, tmp_path, sampling):
    """Runs the main job on two ranks, writing where it writes by default
    (under ``outputs/`` of the working folder, ``tmp_path``)."""
    script = _load_script()
    argv = [*TWO_RANKS, "--sampling", sampling]
    out = tmp_path / script.default_out(script.parse_args(argv).run_name, 2, launcher)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DALI_REHEARSAL_CACHE"] = str(tmp_path / "cache")
    env["DALI_DISABLE_NVML"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    args = [str(SCRIPT), *argv]
    if launcher == "mpiexec":
        cmd = ["mpiexec", "-n", "2", sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr\n{proc.stderr[-4000:]}")
    assert "\r" not in proc.stderr + proc.stdout, "progress bars in a log"
    data = json.loads((out / "results.json").read_text())
    assert data["world_size"] == 2 and data["launcher"] == launcher
    r = data["modes"]["rehearsal"]
    assert len(r["accuracy"]) == 5 and r["accuracy"][0] >= 0.8
    assert r["buffer"]["sampling"] == sampling
    assert r["buffer"]["capacity_per_rank"] == 20      # --capacity is shared by the ranks
    if sampling == "global":
        assert r["buffer"]["exchange"] == ("mpi" if launcher == "mpiexec" else "torch-gloo")
    # both ranks' fresh samples (5 tasks x 96 x 3 epochs) plus the representatives
    assert r["samples"] > 5 * 96 * 3
    assert (out / "accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    return data


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(not _have_mpi(), reason="mpiexec or mpi4py not available")
def test_two_ranks_sampling_locally(tmp_path):
    _two_ranks("mpiexec", tmp_path, "local")


@pytest.mark.mpi
@pytest.mark.torchrun
@pytest.mark.slow
@pytest.mark.skipif(not _have_mpi(), reason="mpiexec or mpi4py not available")
def test_mpiexec_and_torchrun_give_the_same_figures(tmp_path):
    """DDP over gloo under both launchers; the buffers exchange over MPI under
    mpiexec and over torch.distributed under torchrun: the same seed gives the
    same samples, losses and accuracies."""
    mpi = _two_ranks("mpiexec", tmp_path, "global")
    torch = _two_ranks("torchrun", tmp_path, "global")
    # each launch wrote its own folder: the second did not replace the first
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(folders) == 2 and folders[0].endswith("-2proc-mpiexec") \
        and folders[1].endswith("-2proc-torchrun"), folders
    for mode in ("rehearsal", "derpp"):
        a, b = mpi["modes"][mode], torch["modes"][mode]
        assert a["accuracy"] == b["accuracy"], mode
        assert a["task_accuracy"] == b["task_accuracy"], mode
        assert a["samples"] == b["samples"], mode
        if mode == "derpp":
            assert a["buffer"]["feedback"] == b["buffer"]["feedback"]
            assert a["buffer"]["feedback"]["applied"] > 0
