#!/usr/bin/env python
"""Global sampling's growth with the number of processes: global against local sampling.

For every process count of ``--processes`` and every launcher of
``--launchers`` (``mpiexec``: the MPI transport over ``MPI.COMM_WORLD``;
``torchrun``: torch.distributed with gloo over ``group.WORLD``), the script
launches itself (oversubscribed is fine) and every process runs two buffers
side by side that differ only in ``sampling`` (``"global"`` and
``"local"``), fed by ``buffer.mix()`` with ``--batch-size`` rows of
``--sample-shape`` uint8 plus an int64 label. Two kinds of segment, each run
for both buffers, interleaved over ``--repeats`` repetitions (order rotating):

* ``step``: ``mix()`` then ``--compute-ms`` of sleep, a training step of
  known length during which the exchange's round for the next step runs;
* ``tight``: ``mix()`` alone, nothing to hide the round behind: the time
  per step is the round's latency.

Reported per process count and launcher, per step and per process, from the
public API only (``buffer.exchange_stats()`` deltas over the measured steps,
read once the round opened for the next step has ended, so they are exact):
messages sent, bytes sent and received, collectives called (allgathers,
all-to-alls) and rounds; and the times: the median time ``mix()`` takes
(with global sampling the part of the exchange the step waits for; with local
sampling the floor), the exposed wait (global minus local, medians), the
mean step time with global over local sampling (median and range of the
per-repetition ratios), and the tight loop's median time per step. Times are
medians over every step of every process, with the range of the
per-repetition medians.

Everything goes to one JSON file (``--out``) that ``pipelines/scaling_model.py``
reads; a table is printed with the command beside it::

    python pipelines/bench_scaling.py                          # 2,4,8,16 x mpiexec,torchrun
    python pipelines/bench_scaling.py --processes 2,4 --launchers mpiexec --repeats 2
    mpiexec -n 4 python pipelines/bench_scaling.py --child out.json    # one launch
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
# The library of the checkout this script belongs to comes first, even when
# another version is installed: a stale install must not answer for this code.
if (_HERE.parent / "dali_rehearsal" / "__init__.py").is_file():
    sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))
import _bench  # noqa: E402

#: The counts ``exchange_stats()`` gives (reported per step and process).
COUNTED = ("rounds", "collectives", "allgathers", "exchanges", "messages_sent", "bytes_sent",
           "bytes_received")
VARIANTS = ("global", "local")
KINDS = ("step", "tight")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_bench.HelpFormatter)
    p.add_argument("--processes", default="2,4,8,16", metavar="N,N,...",
                   help="process counts to launch")
    p.add_argument("--launchers", default="mpiexec,torchrun",
                   help="launchers: mpiexec (MPI transport) and/or torchrun (gloo)")
    p.add_argument("--mpiexec", default="mpiexec",
                   help="the mpiexec command (Open MPI's gets --oversubscribe added; MPICH's "
                        "Hydra oversubscribes by itself)")
    p.add_argument("--launch-timeout", type=float, default=300.0,
                   help="seconds each launch may take (then it is killed and reported)")
    p.add_argument("--batch-size", "-b", type=int, default=8, help="fresh rows per step")
    p.add_argument("--representatives", "-r", type=int, default=7,
                   help="representatives per step")
    p.add_argument("--sample-shape", default="32,32,3",
                   help="shape of one sample (uint8); an int64 label goes with it")
    p.add_argument("--capacity", type=int, default=64, help="buffer capacity per process")
    p.add_argument("--compute-ms", type=float, default=30.0,
                   help="sleep per step in the step segments (a training step of known "
                        "length)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per segment")
    p.add_argument("--warmup", type=int, default=5,
                   help="uncounted steps before each segment")
    p.add_argument("--repeats", type=int, default=3,
                   help="repetitions of the interleaved segments")
    p.add_argument("--out", default="outputs/bench_scaling.json", help="the JSON written")
    p.add_argument("--child", default=None, metavar="JSON",
                   help="(used by the script itself) run one launch and write its JSON here")
    args = p.parse_args(argv)
    args.shape = tuple(int(x) for x in args.sample_shape.split(","))
    return args


# --------------------------------------------------------------------- one launch
def _settle(buf, rounds: int, deadline_s: float = 120.0) -> dict:
    """``buf.exchange_stats()`` once ``rounds`` rounds have ended: a round
    adds to ``rounds`` after all its counts, so the snapshot holds every
    count of every round up to there and nothing of a later one (no round is
    opened while this waits). Raises when they do not end in time."""
    end = time.monotonic() + deadline_s
    while True:
        now = buf.exchange_stats()
        if now["rounds"] >= rounds:
            if now["rounds"] > rounds:
                raise RuntimeError(f"{now['rounds']} rounds counted, {rounds} expected")
            return now
        if time.monotonic() > end:
            raise RuntimeError(f"the exchange did not end {rounds} rounds in {deadline_s:g} s "
                               f"({now['rounds']} counted)")
        time.sleep(0.002)


def _rounds_per_call(buf, images, labels, calls: int) -> tuple[int, int]:
    """``(rounds, calls)``: how many rounds the buffer has served in all once
    ``calls`` more calls of ``mix()`` are done and their rounds have ended
    (the counts unchanged for a second), and the total number of
    ``mix()`` calls; the offset between the two (the round opened ahead of
    the next step) stays the same afterwards."""
    for _ in range(calls):
        buf.mix(images, labels)
    last, still = buf.exchange_stats(), time.monotonic()
    while time.monotonic() - still < 1.0:
        time.sleep(0.01)
        now = buf.exchange_stats()
        if now != last:
            last, still = now, time.monotonic()
    return last["rounds"], calls


def child(args) -> int:
    comm, bench = _bench.launched_world()
    if comm is None:
        raise SystemExit("--child runs under mpiexec or torchrun with 2 or more processes")
    launcher = "mpiexec" if hasattr(comm, "Get_rank") else "torchrun"
    if launcher == "mpiexec":
        rank, size = comm.Get_rank(), comm.Get_size()
    else:
        import torch.distributed as dist
        rank, size = dist.get_rank(), dist.get_world_size()
    import dali_rehearsal as dr

    b, r = args.batch_size, args.representatives
    rng = np.random.default_rng(rank)
    images = rng.integers(0, 256, size=(b, *args.shape), dtype=np.uint8)
    labels = np.arange(b, dtype=np.int64) + 1000 * rank
    bufs = {v: dr.RehearsalBuffer(capacity=args.capacity, num_representatives=r,
                                  policy="reservoir", device="cpu", seed=1, comm=comm,
                                  sampling=v) for v in VARIANTS}
    transport = None
    sleep = args.compute_ms / 1e3
    # fill every shard before measuring (counts then no longer change with the fill)
    fill = -(-args.capacity // b) + 1
    g = bufs["global"]
    for _ in range(fill):
        bufs["local"].mix(images, labels)
    bench.Barrier()
    # rounds served so far; each later mix() call adds exactly one
    expected_rounds, _ = _rounds_per_call(g, images, labels, fill)
    mix_times = {(v, k): [] for v in VARIANTS for k in KINDS}      # per repetition: arrays
    step_times = {(v, k): [] for v in VARIANTS for k in KINDS}
    counts = {k: {c: 0 for c in COUNTED} for k in KINDS}
    counted_steps = {k: 0 for k in KINDS}
    segments = [(v, k) for k in KINDS for v in VARIANTS]
    for rep in range(args.repeats):
        order = segments[rep % len(segments):] + segments[:rep % len(segments)]
        for v, k in order:
            buf = bufs[v]
            for _ in range(args.warmup):
                buf.mix(images, labels)
                if k == "step":
                    time.sleep(sleep)
            if v == "global":
                expected_rounds += args.warmup
                before = _settle(buf, expected_rounds)
            bench.Barrier()
            mt = np.empty(args.steps)
            st = np.empty(args.steps)
            t_prev = time.perf_counter()
            for i in range(args.steps):
                t0 = time.perf_counter()
                buf.mix(images, labels)
                t1 = time.perf_counter()
                if k == "step":
                    time.sleep(sleep)
                mt[i] = t1 - t0
                st[i] = time.perf_counter() - t_prev
                t_prev = time.perf_counter()
            mix_times[(v, k)].append(mt)
            step_times[(v, k)].append(st)
            if v == "global":
                expected_rounds += args.steps
                after = _settle(buf, expected_rounds)
                for c in COUNTED:
                    counts[k][c] += after[c] - before[c]
                counted_steps[k] += args.steps
    transport = type(g.sampler).__name__
    for buf in bufs.values():
        buf.close()
    mine = {"rank": rank,
            "mix_ms": {f"{v}/{k}": [(a * 1e3).tolist() for a in mix_times[(v, k)]]
                       for v in VARIANTS for k in KINDS},
            "step_ms": {f"{v}/{k}": [(a * 1e3).tolist() for a in step_times[(v, k)]]
                        for v in VARIANTS for k in KINDS},
            "counts": counts, "counted_steps": counted_steps}
    gathered = bench.gather(mine, root=0)
    if rank != 0:
        return 0
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "shape")}
    settings["sample_shape"] = list(args.shape)
    out = {"launcher": launcher, "processes": size, "sampler": transport,
           "transport": "mpi" if launcher == "mpiexec" else "torch-gloo",
           "settings": settings, "ranks": gathered}
    _bench.write_json(pathlib.Path(args.child), out)
    return 0


# --------------------------------------------------------------------- summary
def _med_range(per_rep: list[np.ndarray]) -> dict:
    """Median over every value of every repetition, and the range of the
    per-repetition medians."""
    allv = np.concatenate([np.asarray(a, dtype=np.float64) for a in per_rep])
    meds = [float(np.median(a)) for a in per_rep]
    return {"median": float(np.median(allv)), "min": min(meds), "max": max(meds)}


def summarise(run: dict) -> dict:
    """Figures of one launch from every rank's raw data."""
    ranks = run["ranks"]
    n = run["processes"]
    repeats = len(ranks[0]["mix_ms"]["global/step"])

    def pooled(key, what):   # per repetition: every rank's values together
        return [np.concatenate([np.asarray(rk[what][key][i]) for rk in ranks])
                for i in range(repeats)]

    out = {"launcher": run["launcher"], "processes": n, "transport": run["transport"]}
    for k in KINDS:
        for v in VARIANTS:
            out[f"mix_ms_{v}_{k}"] = _med_range(pooled(f"{v}/{k}", "mix_ms"))
    out["exposed_wait_ms"] = (out["mix_ms_global_step"]["median"]
                              - out["mix_ms_local_step"]["median"])
    out["tight_round_ms"] = out["mix_ms_global_tight"]
    # mean step time, global over local, per repetition (means over every rank's steps)
    ratios = []
    for i in range(repeats):
        gm = np.mean(np.concatenate([rk["step_ms"]["global/step"][i] for rk in ranks]))
        lm = np.mean(np.concatenate([rk["step_ms"]["local/step"][i] for rk in ranks]))
        ratios.append(float(gm / lm))
    out["step_ratio"] = {"median": float(np.median(ratios)), "min": min(ratios),
                         "max": max(ratios), "per_repeat": ratios}
    out["mean_step_ms_global"] = float(np.mean([np.mean(np.concatenate(rk["step_ms"][
        "global/step"])) for rk in ranks]))
    out["mean_step_ms_local"] = float(np.mean([np.mean(np.concatenate(rk["step_ms"][
        "local/step"])) for rk in ranks]))
    # exact counts per step and process: both kinds of segment count the same rounds
    per_rank = []
    for rk in ranks:
        steps = sum(rk["counted_steps"].values())
        per_rank.append({c: sum(rk["counts"][k][c] for k in KINDS) / steps for c in COUNTED})
    out["per_step"] = {c: {"mean": float(np.mean([p[c] for p in per_rank])),
                           "min": float(min(p[c] for p in per_rank)),
                           "max": float(max(p[c] for p in per_rank))} for c in COUNTED}
    out["counted_steps_per_process"] = sum(ranks[0]["counted_steps"].values())
    out["totals"] = [{c: sum(rk["counts"][k][c] for k in KINDS) for c in COUNTED}
                     for rk in ranks]
    return out


def print_table(result: dict) -> None:
    s = result["settings"]
    print(f"\ncommand: {result['command']}")
    print(f"date {result['date']}, load average before {result['load_before']}, after "
          f"{result['load_after']}, {os.cpu_count()} CPUs")
    print(f"b={s['batch_size']}, r={s['representatives']}, sample {s['sample_shape']} uint8 + "
          f"int64 label ({result['sample_bytes']} bytes, 2 fields), capacity {s['capacity']}"
          f"/process, step = mix + sleep {s['compute_ms']:g} ms; {s['repeats']} repetitions x "
          f"{s['steps']} steps per segment")
    rows = []
    for f in result["summary"]:
        ps = f["per_step"]
        rows.append([f"{f['launcher']} {f['processes']}", ps["messages_sent"]["mean"],
                     ps["bytes_sent"]["mean"], ps["bytes_received"]["mean"],
                     ps["collectives"]["mean"], ps["allgathers"]["mean"],
                     ps["exchanges"]["mean"], ps["rounds"]["mean"]])
    print("\nper step and process, exact counts from exchange_stats() (mean over processes):")
    print(_bench.table(rows, ["launch N", "messages", "bytes sent", "bytes recv",
                              "collectives", "allgathers", "exchanges", "rounds"]))
    rows = []
    for f in result["summary"]:
        g, loc, t = f["mix_ms_global_step"], f["mix_ms_local_step"], f["tight_round_ms"]
        r = f["step_ratio"]
        rows.append([f"{f['launcher']} {f['processes']}",
                     f"{g['median']:.3f} ({g['min']:.3f}-{g['max']:.3f})",
                     f"{loc['median']:.3f}", f"{f['exposed_wait_ms']:.3f}",
                     f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})",
                     f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})",
                     f"{f['mix_ms_local_tight']['median']:.3f}"])
    print("\ntimes (ms): median over every step of every process (range of the "
          "per-repetition medians):")
    print(_bench.table(rows, ["launch N", "mix, global", "mix, local", "exposed wait",
                              "step global/local", "tight loop, global", "tight, local"]))
    for fail in result["failures"]:
        print(f"FAILED: {fail}")


def _load() -> str:
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _child_argv(argv: list[str]) -> list[str]:
    """The options a launched run gets: the measuring ones."""
    return _bench.without_options(argv, ("--processes", "--launchers", "--mpiexec",
                                         "--launch-timeout", "--out", "--child"))


def _oversubscribe(exe: list[str]) -> list[str]:
    """``--oversubscribe`` for Open MPI's mpiexec (more processes than cores);
    MPICH's Hydra oversubscribes without being asked and refuses the option."""
    if "--oversubscribe" in exe:
        return []
    try:
        version = subprocess.run([*exe, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []


def launch_all(args, argv) -> int:
    counts = [int(n) for n in args.processes.split(",") if n.strip()]
    launchers = [x.strip() for x in args.launchers.split(",") if x.strip()]
    script = str(pathlib.Path(__file__).resolve())
    command = " ".join(shlex.quote(a) for a in [sys.executable, "pipelines/bench_scaling.py",
                                                 *argv])
    runs, failures = [], []
    load_before = _load()
    started = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="bench_scaling-") as tmp:
        for launcher in launchers:
            for n in counts:
                out = pathlib.Path(tmp) / f"{launcher}-{n}.json"
                if launcher == "mpiexec":
                    exe = shlex.split(args.mpiexec)
                    if shutil.which(exe[0]) is None:
                        failures.append({"launcher": launcher, "processes": n,
                                         "error": f"{exe[0]} not found"})
                        continue
                    cmd = [*exe, *_oversubscribe(exe), "-n", str(n), sys.executable, script]
                elif launcher == "torchrun":
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={n}", script]
                else:
                    raise SystemExit(f"unknown launcher {launcher!r}")
                cmd += [*_child_argv(argv), "--child", str(out)]
                print(f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
                t0 = time.monotonic()
                proc = subprocess.Popen(cmd, env=env, start_new_session=True)
                try:
                    rc = proc.wait(timeout=args.launch_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    rc = "timeout"
                if rc != 0 or not out.exists():
                    failures.append({"launcher": launcher, "processes": n, "returncode": rc})
                    print(f"{launcher} -n {n} failed: {rc}", file=sys.stderr, flush=True)
                    continue
                run = json.loads(out.read_text())
                run["wall_s"] = time.monotonic() - t0
                runs.append(run)
    if not runs:
        print("no launch succeeded", file=sys.stderr)
        return 1
    sample_bytes = int(np.prod(args.shape)) + 8
    result = {"script": "bench_scaling", "command": command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
              "load_before": load_before, "load_after": _load(),
              "wall_s": time.time() - started,
              "environment": _bench.environment("cpu"),
              "settings": runs[0]["settings"], "sample_bytes": sample_bytes, "fields": 2,
              "summary": [summarise(r) for r in runs], "failures": failures, "runs": runs}
    _bench.write_json(pathlib.Path(args.out), result)
    print_table(result)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s); the model: python "
          f"pipelines/scaling_model.py {args.out}")
    return 0 if not failures else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        rc = child(args)
        _bench.finish_world()
        return rc
    return launch_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
