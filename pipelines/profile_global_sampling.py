#!/usr/bin/env python
"""What global sampling costs: step time with global vs local-only sampling.

Every rank runs the rehearsal stage on its shard of ImageNet-like JPEGs
(read -> decode -> resize in the source pipeline, ``dr.fn.rehearsal`` and
``crop_mirror_normalize`` in the mixing pipeline, ``DALIGenericIterator``)
with two buffers side by side, ``RehearsalBuffer(..., comm=MPI.COMM_WORLD,
sampling="global")`` and ``sampling="local"``, and a simulated training step
after every batch:

* ``--compute sleep`` (default): ``--compute-ms`` of idle CPU, like a GPU
  training step, during which DALI and the exchange thread run;
* ``--compute matmul``: a torch matmul loop calibrated to ``--compute-ms``,
  which competes with them for the CPU;
* then, unless ``--grad-mb 0``, an ``Allreduce`` of ``--grad-mb`` MiB of
  float32 "gradients" that keeps the ranks in lockstep as data-parallel
  training does.

The two variants run in interleaved segments (order alternating, ``--warmup``
uncounted steps each); the figure is the ratio global/local of the mean step
time, as the median of the per-repetition ratios. The exchange is overlapped
once its cost is hidden behind the step: target ratio <= 1.05.

Run under ``mpiexec -n N``, or let the script launch itself for several N::

    mpiexec -n 2 python pipelines/profile_global_sampling.py
    python pipelines/profile_global_sampling.py --launch 1,2,4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
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
import dali_rehearsal as dr  # noqa: E402
sys.path.insert(0, str(_HERE))
import _bench  # noqa: E402

VARIANTS = ("global", "local")
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


# ----------------------------------------------------------------------------- one run
def build(args, root, comm, rank, world, device, device_id, sampling):
    """Buffer + pipelines + iterator of one variant; returns (next_batch, buffer)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    common = dict(num_threads=args.num_threads, device_id=device_id,
                  prefetch_queue_depth=args.prefetch)
    decode_device = "mixed" if device == "gpu" else "cpu"
    seed = args.seed + 100 * (sampling == "local")

    @pipeline_def(batch_size=args.batch_size, seed=seed + rank, **common)
    def source():
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=True, name="Reader",
                                        shard_id=rank, num_shards=world, seed=seed + rank)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        return fn.resize(images, size=(args.resize_size, args.resize_size)), labels

    kwargs = dict(capacity=args.capacity, num_representatives=args.representatives,
                  policy=args.policy, device=device, seed=seed)
    if comm is not None:
        kwargs.update(comm=comm, sampling=sampling)
    buffer = dr.RehearsalBuffer(**kwargs)

    @pipeline_def(batch_size=args.batch_size + args.representatives, seed=seed + 50 + rank,
                  **common)
    def mixing(src):
        images, labels, flags = dr.fn.rehearsal(src, buffer=buffer, reader_name="Reader",
                                                replay_flag=True)
        images = fn.crop_mirror_normalize(images, crop=(args.image_size, args.image_size),
                                          mirror=fn.random.coin_flip(), dtype=types.FLOAT,
                                          output_layout="CHW", mean=MEAN, std=STD)
        return images, labels, flags

    pipe = mixing(source())
    pipe.build()
    iterator = DALIGenericIterator(pipe, ["images", "labels", "flags"], auto_reset=True)

    gen = _bench.endless(iterator)
    return (lambda: next(gen)), buffer


def make_compute(args, device):
    """The simulated training step (compute part)."""
    seconds = args.compute_ms / 1e3
    if seconds <= 0:
        return lambda batch: None
    if args.compute == "sleep":
        def compute(batch):
            if device == "gpu":
                import torch
                torch.cuda.synchronize()
            time.sleep(seconds)
        return compute
    import torch
    tdev = torch.device("cuda") if device == "gpu" else torch.device("cpu")
    n = args.matmul_size
    a = torch.randn(n, n, device=tdev)

    def one():
        b = a @ a
        if device == "gpu":
            torch.cuda.synchronize()
        return b
    one()
    t0 = time.perf_counter()
    k = 0
    while time.perf_counter() - t0 < 0.2 or k < 3:
        one()
        k += 1
    reps = max(1, int(round(seconds / ((time.perf_counter() - t0) / k))))

    def compute(batch):
        for _ in range(reps):
            one()
    return compute


def run_once(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    comm = _bench.mpi_world()
    rank, world, local_rank, local_size = _bench.ranks(comm)
    if comm is not None:
        from mpi4py import MPI
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE and rank == 0:
            print("warning: MPI is not MPI_THREAD_MULTIPLE: the exchange cannot overlap",
                  file=sys.stderr)
    bench_comm = comm.Dup() if comm is not None else None
    if args.num_threads is None:
        args.num_threads = _bench.threads_per_rank(local_size)
    device = args.device
    if device == "auto":
        device = "gpu" if dr.gpu_available() else "cpu"
    device_id = _bench.select_gpu(local_rank) if device == "gpu" else None
    if args.capacity is None:
        args.capacity = max(args.representatives, 1, int(round(0.3 * args.images / world)))

    root = _bench.photo_root(args, rank, bench_comm)

    variants = {}
    for sampling in VARIANTS:
        variants[sampling] = build(args, root, comm, rank, world, device, device_id, sampling)
    compute = make_compute(args, device)
    grad = np.ones(int(args.grad_mb * 2**20 / 4), dtype=np.float32)
    grad_out = np.empty_like(grad)

    def step(next_batch):
        t0 = time.perf_counter()
        batch = next_batch()
        fresh = int((batch["flags"] == 0).sum())
        delivered = int(batch["images"].shape[0])
        t1 = time.perf_counter()
        compute(batch)
        if bench_comm is not None and grad.size:
            bench_comm.Allreduce(grad, grad_out)
        return t1 - t0, fresh, delivered

    from tqdm import tqdm
    total = args.repeats * len(VARIANTS) * (args.warmup + args.steps)
    progress = tqdm(total=total, desc=f"global sampling, {world} rank(s)", unit="step",
                    file=sys.stderr, disable=args.no_progress or rank != 0, dynamic_ncols=True)
    raw = {v: [] for v in VARIANTS}
    try:
        for rep in range(args.repeats):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            for name in order:
                next_batch, _ = variants[name]
                if bench_comm is not None:
                    bench_comm.Barrier()
                for _ in range(args.warmup):
                    step(next_batch)
                    progress.update(1)
                seg = {"times": [], "wait": [], "fresh": [], "delivered": []}
                t_prev = time.perf_counter()
                for _ in range(args.steps):
                    wait, fresh, delivered = step(next_batch)
                    t = time.perf_counter()
                    seg["times"].append(t - t_prev)
                    seg["wait"].append(wait)
                    seg["fresh"].append(fresh)
                    seg["delivered"].append(delivered)
                    t_prev = t
                    progress.update(1)
                raw[name].append(seg)
    finally:
        progress.close()
    info = {}
    for name, (_, buffer) in variants.items():
        info[name] = {"sampler": type(buffer.sampler).__name__, "size": buffer.size,
                      "capacity": buffer.capacity, "world_size": buffer.world_size}
        buffer.close()

    mine = {"rank": rank, "raw": raw, "buffers": info}
    gathered = bench_comm.gather(mine, root=0) if bench_comm is not None else [mine]
    if rank != 0:
        return 0

    def figures(segs_by_rank):
        times = np.concatenate([np.concatenate([s["times"] for s in segs]) for segs in
                                segs_by_rank])
        wait = np.concatenate([np.concatenate([s["wait"] for s in segs]) for segs in
                               segs_by_rank])
        fresh = sum(float(np.sum(s["fresh"])) for segs in segs_by_rank for s in segs)
        delivered = sum(float(np.sum(s["delivered"])) for segs in segs_by_rank for s in segs)
        # per repetition: mean over ranks of each rank's mean step time
        per_rep = [float(np.mean([np.mean(segs[i]["times"]) for segs in segs_by_rank]))
                   for i in range(args.repeats)]
        per_rank_time = [float(np.sum([np.sum(s["times"]) for s in segs]))
                         for segs in segs_by_rank]
        st = _bench.stats(times)
        return {"mean_step_ms": st["mean_step_ms"], "median_step_ms": st["median_step_ms"],
                "p95_step_ms": st["p95_step_ms"],
                "mean_input_wait_ms": float(wait.mean() * 1e3),
                "p95_input_wait_ms": float(np.percentile(wait, 95) * 1e3),
                "fresh_samples_per_s": float(sum(
                    np.sum([np.sum(s["fresh"]) for s in segs]) / t
                    for segs, t in zip(segs_by_rank, per_rank_time))),
                "delivered_samples_per_s": float(sum(
                    np.sum([np.sum(s["delivered"]) for s in segs]) / t
                    for segs, t in zip(segs_by_rank, per_rank_time))),
                "fresh_samples": int(fresh), "delivered_samples": int(delivered),
                "per_repeat_mean_step_ms": [v * 1e3 for v in per_rep]}

    figs = {v: figures([g["raw"][v] for g in gathered]) for v in VARIANTS}
    per = [g / l for g, l in zip(figs["global"]["per_repeat_mean_step_ms"],
                                 figs["local"]["per_repeat_mean_step_ms"])]
    ratio = {"median": float(np.median(per)), "min": float(np.min(per)),
             "max": float(np.max(per)), "per_repeat": per,
             "pooled": figs["global"]["mean_step_ms"] / figs["local"]["mean_step_ms"]}
    per_rank = [{v: figures([g["raw"][v]]) for v in VARIANTS} for g in gathered]
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress", "launch")}
    settings.update(world_size=world, device=device, data_root=str(root))
    result = {
        "script": "profile_global_sampling",
        "environment": _bench.environment(device),
        "settings": settings,
        "world_size": world,
        "variants": figs,
        "ratio_global_over_local": ratio,
        "headline": {"global_over_local_step_time": ratio["median"],
                     "overhead_pct": (ratio["median"] - 1) * 100, "target_overhead_pct": 5.0,
                     "meets_target": ratio["median"] <= 1.05,
                     "exchange": gathered[0]["buffers"]["global"]["sampler"]},
        "buffers": [g["buffers"] for g in gathered],
        "per_rank": per_rank,
    }
    json_path, png_path = _bench.out_paths(args.out)
    result["plot"] = str(png_path)
    _bench.write_json(json_path, result)
    print_run(result)
    plot([result], png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


# ------------------------------------------------------------------------ reporting
def print_run(result) -> None:
    s = result["settings"]
    print(f"\n{result['world_size']} rank(s), device={s['device']}, b={s['batch_size']}, "
          f"r={s['representatives']}, {s['resize_size']}px samples, capacity {s['capacity']}/rank,"
          f" compute {s['compute']} {s['compute_ms']} ms + allreduce {s['grad_mb']} MiB, "
          f"{s['repeats']} x {s['steps']} steps (+{s['warmup']} warm-up), exchange: "
          f"{result['headline']['exchange']}")
    rows = []
    for v in VARIANTS:
        f = result["variants"][v]
        rows.append([v, f["mean_step_ms"], f["median_step_ms"], f["p95_step_ms"],
                     f["mean_input_wait_ms"], f["fresh_samples_per_s"]])
    print(_bench.table(rows, ["sampling", "mean ms", "median ms", "p95 ms", "input wait ms",
                              "fresh/s (sum)"]))
    r = result["ratio_global_over_local"]
    print(f"global/local step time: {r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}] "
          f"-> overhead {(r['median'] - 1) * 100:+.1f}% (target <= +5%)")


def plot(results, png_path) -> None:
    groups = [f"{r['world_size']} rank{'s' if r['world_size'] > 1 else ''}" for r in results]
    series = {v: [r["variants"][v]["mean_step_ms"] for r in results] for v in VARIANTS}
    title = "mean step time, global vs local sampling: " + ", ".join(
        f"{g} {r['ratio_global_over_local']['median']:.3f}" for g, r in zip(groups, results))
    _bench.bar_chart(png_path, groups, series, ylabel="mean step time (ms)", title=title)


def launch(args, argv) -> int:
    """Runs this script under ``mpiexec -n N`` for every N of ``--launch``."""
    mpiexec = shutil.which(args.mpiexec)
    if mpiexec is None:
        raise SystemExit(f"{args.mpiexec} not found (pip install mpich mpi4py)")
    counts = [int(n) for n in args.launch.split(",") if n.strip()]
    child_argv = _strip(argv, ("--launch", "--out", "--mpiexec", "--launch-timeout"))
    json_path, png_path = _bench.out_paths(args.out)
    results, failures = [], []
    with tempfile.TemporaryDirectory(prefix="profile_global_sampling-") as tmp:
        for n in counts:
            out = pathlib.Path(tmp) / f"n{n}.json"
            cmd = [mpiexec, "-n", str(n), sys.executable, str(pathlib.Path(__file__).resolve()),
                   *child_argv, "--out", str(out)]
            print(f"$ {' '.join(cmd)}", flush=True)
            try:
                proc = subprocess.run(cmd, timeout=args.launch_timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc != 0 or not out.exists():
                failures.append({"world_size": n, "returncode": rc})
                print(f"run with {n} rank(s) failed: {rc}", file=sys.stderr)
                continue
            results.append(json.loads(out.read_text()))
    if not results:
        print("no run succeeded", file=sys.stderr)
        return 1
    summary = [{"world_size": r["world_size"],
                "global_mean_step_ms": r["variants"]["global"]["mean_step_ms"],
                "local_mean_step_ms": r["variants"]["local"]["mean_step_ms"],
                "global_over_local": r["ratio_global_over_local"]["median"],
                "overhead_pct": r["headline"]["overhead_pct"],
                "meets_target": r["headline"]["meets_target"]} for r in results]
    combined = {"script": "profile_global_sampling", "mode": "launch",
                "environment": _bench.environment(results[0]["settings"]["device"]),
                "launch": counts, "summary": summary, "failures": failures, "runs": results,
                "plot": str(png_path)}
    _bench.write_json(json_path, combined)
    print()
    print(_bench.table([[s["world_size"], s["global_mean_step_ms"], s["local_mean_step_ms"],
                         s["global_over_local"], s["overhead_pct"]] for s in summary],
                       ["ranks", "global ms", "local ms", "global/local", "overhead %"]))
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0 if not failures else 1


def _strip(argv, options):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--launch", default=None,
                   help="comma-separated process counts: run under mpiexec -n N for each")
    p.add_argument("--mpiexec", default="mpiexec")
    p.add_argument("--launch-timeout", type=float, default=1200.0,
                   help="seconds per launched run")
    p.add_argument("--batch-size", "-b", type=int, default=56)
    p.add_argument("--representatives", "-r", type=int, default=7)
    p.add_argument("--image-size", type=int, default=224, help="crop size")
    p.add_argument("--resize-size", type=int, default=None,
                   help="stored sample size (default round(crop * 256 / 224))")
    p.add_argument("--jpeg-size", default=None, help="JPEG HxW (default S x 1.25 S)")
    p.add_argument("--images", type=int, default=1024, help="JPEGs in the data set (all ranks)")
    p.add_argument("--capacity", type=int, default=None,
                   help="buffer capacity per rank (default 30%% of the rank's shard)")
    p.add_argument("--policy", default="reservoir", choices=sorted(dr.POLICIES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--compute", default="sleep", choices=("sleep", "matmul"))
    p.add_argument("--compute-ms", type=float, default=150.0,
                   help="simulated training compute per step")
    p.add_argument("--matmul-size", type=int, default=512)
    p.add_argument("--grad-mb", type=float, default=4.0,
                   help="MiB allreduced per step after the compute (0: none)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="outputs/profile_global_sampling.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.resize_size is None:
        args.resize_size = int(round(args.image_size * 256 / 224))
    if args.resize_size < args.image_size:
        p.error("--resize-size must be >= --image-size")
    args.jpeg_hw = (_bench.parse_hw(args.jpeg_size) if args.jpeg_size else
                    (args.resize_size, int(round(args.resize_size * 1.25))))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.launch:
        return launch(args, argv)
    return run_once(args)


if __name__ == "__main__":
    sys.exit(main())
