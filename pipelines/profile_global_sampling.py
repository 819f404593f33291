#!/usr/bin/env python
"""What global sampling costs: step time with global vs local-only sampling, per transport.

Every rank runs the rehearsal stage on its shard of ImageNet-like JPEGs
(read -> decode -> resize in the source pipeline, ``dr.fn.rehearsal`` and
``crop_mirror_normalize`` in the mixing pipeline, ``DALIGenericIterator``)
with buffers side by side that differ only in where representatives come
from, and a simulated training step after every batch:

* ``global``: ``sampling="global"`` over the launcher's communicator
  (``MPI.COMM_WORLD`` under mpiexec, ``torch.distributed.group.WORLD`` under
  torchrun);
* ``global_torch`` (under mpiexec, when PyTorch is installed): the same over
  torch.distributed (gloo, initialised from the MPI ranks), so that one run
  measures both transports;
* ``local``: ``sampling="local"``, no exchange.

The simulated step is ``--compute sleep`` (default: ``--compute-ms`` of idle
CPU, like a GPU training step, during which DALI and the exchange thread run)
or ``--compute matmul`` (a torch matmul loop calibrated to ``--compute-ms``,
which competes with them for the CPU), then, unless ``--grad-mb 0``, an
all-reduce of ``--grad-mb`` MiB of float32 "gradients" that keeps the ranks in
lockstep as data-parallel training does.

The variants run in interleaved segments (order rotating, ``--warmup``
uncounted steps each); the figure per transport is the ratio global/local of
the mean step time, as the median of the per-repetition ratios (target <=
1.05: the exchange is hidden behind the step). The exchange's own cost is
reported too: the time its progress thread spends per round (overlapped with
training, so not a cost to the step unless it is longer than the step) and
the bytes it moves.

Run under either launcher, or let the script launch itself for several N::

    mpiexec -n 2 python pipelines/profile_global_sampling.py
    torchrun --nproc_per_node=2 pipelines/profile_global_sampling.py
    python pipelines/profile_global_sampling.py --launch 1,2,4 --launcher torchrun
"""

from __future__ import annotations

import argparse
import json
import logging
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

#: What this script imports beyond NumPy (the `examples` extra).
NEEDS = ("nvidia.dali", "matplotlib", "tqdm", "skimage", "PIL")
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


# ----------------------------------------------------------------------------- one run
def build(args, root, comm, rank, world, device, device_id, sampling, seed_offset):
    """Buffer + pipelines + iterator of one variant; returns (next_batch, buffer)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    common = dict(num_threads=args.num_threads, device_id=device_id,
                  prefetch_queue_depth=args.prefetch)
    decode_device = "mixed" if device == "gpu" else "cpu"
    seed = args.seed + seed_offset

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


def variants_for(comm, world):
    """``{variant: (communicator, sampling)}`` for this launch."""
    if comm is None:
        return {"global": (None, "global"), "local": (None, "local")}
    out = {"global": (comm, "global")}
    if hasattr(comm, "Get_rank"):          # mpiexec: the torch transport as well
        try:
            import torch.distributed as dist
        except ImportError:
            dist = None
        if dist is not None:
            _bench.torch_from_mpi(comm)
            out["global_torch"] = (dist.group.WORLD, "global")
    out["local"] = (comm, "local")
    return out


def run_once(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    comm, bench = _bench.launched_world()
    rank, world, local_rank, local_size = _bench.ranks(comm)
    launcher = None if comm is None else ("mpiexec" if hasattr(comm, "Get_rank") else "torchrun")
    if args.out is None:
        args.out = _bench.default_out("profile_global_sampling", args.run_name, world, launcher)
    if launcher == "mpiexec":
        from mpi4py import MPI
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE and rank == 0:
            print("warning: MPI is not MPI_THREAD_MULTIPLE: the exchange cannot overlap",
                  file=sys.stderr)
    if args.num_threads is None:
        args.num_threads = _bench.threads_per_rank(local_size)
    device = args.device
    if device == "auto":
        device = "gpu" if dr.gpu_available() else "cpu"
    device_id = _bench.select_gpu(local_rank) if device == "gpu" else None
    if args.capacity is None:
        args.capacity = max(args.representatives, 1, int(round(0.3 * args.images / world)))

    root = _bench.photo_root(args, rank, bench)

    plan = variants_for(comm, world)
    names = list(plan)
    variants = {}
    for i, (name, (vcomm, sampling)) in enumerate(plan.items()):
        variants[name] = build(args, root, vcomm, rank, world, device, device_id, sampling,
                               seed_offset=100 * i)
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
        if bench is not None and grad.size:
            bench.Allreduce(grad, grad_out)
        return t1 - t0, fresh, delivered

    from tqdm import tqdm
    total = args.repeats * len(names) * (args.warmup + args.steps)
    progress = tqdm(total=total, desc=f"global sampling, {world} rank(s)", unit="step",
                    file=sys.stderr, dynamic_ncols=True,
                    disable=args.no_progress or rank != 0 or not sys.stderr.isatty())
    raw = {v: [] for v in names}
    try:
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                next_batch, _ = variants[name]
                if bench is not None:
                    bench.Barrier()
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
    sampling_of = {name: sampling for name, (_, sampling) in plan.items()}
    for name, (_, buffer) in variants.items():
        sampler = buffer.sampler
        transport = getattr(sampler, "transport", None)
        # exact counts from the public API; the round time and the transport's
        # name where the sampler shows them (None otherwise)
        counted = buffer.exchange_stats()
        timing = getattr(sampler, "stats", None) or {}
        counted["round_seconds"] = timing.get("round_seconds")
        info[name] = {"sampler": type(sampler).__name__, "size": buffer.size,
                      "capacity": buffer.capacity, "world_size": buffer.world_size,
                      "transport": (None if buffer.world_size < 2 or sampling_of[name] != "global"
                                    else getattr(transport, "name", "global")),
                      "exchange_stats": counted}
        buffer.close()

    mine = {"rank": rank, "raw": raw, "buffers": info}
    gathered = bench.gather(mine, root=0) if bench is not None else [mine]
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

    figs = {v: figures([g["raw"][v] for g in gathered]) for v in names}
    ratios = {}
    for v in names:
        if v == "local":
            continue
        per = [g / loc for g, loc in zip(figs[v]["per_repeat_mean_step_ms"],
                                         figs["local"]["per_repeat_mean_step_ms"])]
        ratios[v] = {"median": float(np.median(per)), "min": float(np.min(per)),
                     "max": float(np.max(per)), "per_repeat": per,
                     "pooled": figs[v]["mean_step_ms"] / figs["local"]["mean_step_ms"]}
    exchange = {}
    for v in names:
        if v == "local" or gathered[0]["buffers"][v]["transport"] is None:
            continue
        per_rank = [g["buffers"][v]["exchange_stats"] for g in gathered]
        rounds = sum(s.get("rounds", 0) for s in per_rank)
        timed = all(s.get("round_seconds") is not None for s in per_rank)
        exchange[v] = {
            "transport": gathered[0]["buffers"][v]["transport"],
            "rounds_per_rank": rounds / len(per_rank),
            "mean_round_ms": (1e3 * sum(s["round_seconds"] for s in per_rank) / max(rounds, 1)
                              if timed else None),
            "kib_received_per_round": sum(s.get("bytes_received", 0) for s in per_rank)
            / max(rounds, 1) / 1024,
            # exact counts per round and rank (buffer.exchange_stats())
            "per_round": {k: sum(s.get(k, 0) for s in per_rank) / max(rounds, 1)
                          for k in ("collectives", "messages_sent", "bytes_sent",
                                    "bytes_received")}}
    per_rank = [{v: figures([g["raw"][v]]) for v in names} for g in gathered]
    settings = {k: v for k, v in vars(args).items()
                if k not in ("no_progress", "launch", "same_settings")}
    settings.update(world_size=world, device=device, data_root=str(root), launcher=launcher)
    main_ratio = ratios["global"]
    result = {
        "script": "profile_global_sampling",
        "environment": _bench.environment(device),
        "settings": settings,
        "world_size": world,
        "launcher": launcher,
        "variants": figs,
        "ratio_global_over_local": main_ratio,
        "ratios_over_local": ratios,
        "exchange": exchange,
        "headline": {"global_over_local_step_time": main_ratio["median"],
                     "overhead_pct": (main_ratio["median"] - 1) * 100,
                     "target_overhead_pct": 5.0, "meets_target": main_ratio["median"] <= 1.05,
                     "exchange": gathered[0]["buffers"]["global"]["sampler"],
                     "transport": gathered[0]["buffers"]["global"]["transport"],
                     "overhead_pct_by_transport": {
                         (gathered[0]["buffers"][v]["transport"] or v): (r["median"] - 1) * 100
                         for v, r in ratios.items()}},
        "buffers": [g["buffers"] for g in gathered],
        "per_rank": per_rank,
    }
    json_path, png_path = _bench.out_paths(args.out)
    result["plot"] = str(png_path)
    result["plotted"] = plot_spec([result])
    replaced = _bench.replacing(json_path, png_path, same_settings=args.same_settings)
    _bench.write_json(json_path, result)
    print_run(result)
    _bench.bar_chart(png_path, **result["plotted"])
    print(f"wrote {json_path} and {png_path}{replaced}")
    return 0


# ------------------------------------------------------------------------ reporting
def print_run(result) -> None:
    s = result["settings"]
    print(f"\n{result['world_size']} rank(s) ({result['launcher'] or 'one process'}), "
          f"device={s['device']}, b={s['batch_size']}, r={s['representatives']}, "
          f"{s['resize_size']}px samples, capacity {s['capacity']}/rank, compute {s['compute']} "
          f"{s['compute_ms']} ms + all-reduce {s['grad_mb']} MiB, {s['repeats']} x {s['steps']} "
          f"steps (+{s['warmup']} warm-up)")
    rows = []
    for v, f in result["variants"].items():
        ex = result["exchange"].get(v, {})
        r = result["ratios_over_local"].get(v)
        rows.append([v, ex.get("transport", "-"), f["mean_step_ms"], f["median_step_ms"],
                     f["p95_step_ms"], f["mean_input_wait_ms"],
                     "-" if r is None else r["median"],
                     "-" if not ex or ex["mean_round_ms"] is None else ex["mean_round_ms"],
                     "-" if not ex else ex["kib_received_per_round"]])
    print(_bench.table(rows, ["sampling", "transport", "mean ms", "median ms", "p95 ms",
                              "input wait ms", "vs local", "round ms", "KiB/round"]))
    print("vs local: mean step time over local sampling's (median of repetitions); round ms: "
          "time the exchange thread spends per round, overlapped with the step; KiB/round: "
          "sample bytes received per round and rank")
    for v, r in result["ratios_over_local"].items():
        print(f"{v}/local step time: {r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}] "
              f"-> overhead {(r['median'] - 1) * 100:+.1f}% (target <= +5%)")


def plot_spec(results) -> dict:
    """What the plot shows (``_bench.bar_chart``'s arguments, kept in the
    JSON as ``plotted``): the figures the summary quotes, the mean step time
    with global sampling over that with local sampling in the same
    repetition, per transport and number of ranks; the median as the bar,
    the range over the repetitions as the whisker."""
    groups = [f"{r['world_size']} rank{'s' if r['world_size'] > 1 else ''}" for r in results]
    names = list(dict.fromkeys(v for r in results for v in r["ratios_over_local"]))
    label = {}
    for v in names:
        transport = next((r["exchange"][v]["transport"] for r in results
                          if r["exchange"].get(v, {}).get("transport")), None)
        label[v] = f"{v} ({transport})" if transport else v
    series = {label[v]: [r["ratios_over_local"].get(v, {}).get("median", 0.0) for r in results]
              for v in names}
    errors = {label[v]: [[r["ratios_over_local"][v]["min"], r["ratios_over_local"][v]["max"]]
                         if v in r["ratios_over_local"] else [0.0, 0.0] for r in results]
              for v in names}
    title = "mean step time, global / local sampling (medians): " + ", ".join(
        f"{g} {label[v]} {r['ratios_over_local'][v]['median']:.3f}"
        for g, r in zip(groups, results) for v in names if v in r["ratios_over_local"])
    repeats = results[0]["settings"]["repeats"]
    return {"groups": groups, "series": series, "errors": errors, "value_format": "{:.3f}",
            "reference": 1.0, "title": title,
            "ylabel": "mean step time / local sampling's, same repetition\n"
                      f"bar: median, whisker: range over {repeats} repetitions"}


def launch(args, argv) -> int:
    """Runs this script under ``--launcher`` for every N of ``--launch``."""
    counts = [int(n) for n in args.launch.split(",") if n.strip()]
    child_argv = _bench.without_options(argv, ("--launch", "--out", "--mpiexec",
                                               "--launch-timeout", "--launcher"))
    if args.launcher == "mpiexec":
        mpiexec = shutil.which(args.mpiexec)
        if mpiexec is None:
            raise SystemExit(f"{args.mpiexec} not found (pip install mpich mpi4py)")
    json_path, png_path = _bench.out_paths(args.out)
    results, failures = [], []
    script = str(pathlib.Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="profile_global_sampling-") as tmp:
        for n in counts:
            out = pathlib.Path(tmp) / f"n{n}.json"
            if args.launcher == "mpiexec":
                cmd = [mpiexec, "-n", str(n), sys.executable, script]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={n}", script]
            cmd += [*child_argv, "--out", str(out)]
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
                "overhead_pct_by_transport": r["headline"]["overhead_pct_by_transport"],
                "meets_target": r["headline"]["meets_target"]} for r in results]
    combined = {"script": "profile_global_sampling", "mode": "launch",
                "launcher": args.launcher,
                "environment": _bench.environment(results[0]["settings"]["device"]),
                "launch": counts, "summary": summary, "failures": failures, "runs": results,
                "plot": str(png_path), "plotted": plot_spec(results)}
    replaced = _bench.replacing(json_path, png_path, same_settings=args.same_settings)
    _bench.write_json(json_path, combined)
    print()
    print(_bench.table([[s["world_size"], s["global_mean_step_ms"], s["local_mean_step_ms"],
                         s["global_over_local"], s["overhead_pct"]] for s in summary],
                       ["ranks", "global ms", "local ms", "global/local", "overhead %"]))
    _bench.bar_chart(png_path, **combined["plotted"])
    print(f"wrote {json_path} and {png_path}{replaced}")
    return 0 if not failures else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_bench.HelpFormatter)
    p.add_argument("--launch", default=None, metavar="N,N,...",
                   help="comma-separated process counts: run this script under --launcher "
                        "once for each, and combine the results")
    p.add_argument("--launcher", default="mpiexec", choices=("mpiexec", "torchrun"),
                   help="what --launch starts the runs with")
    p.add_argument("--mpiexec", default="mpiexec", help="the mpiexec command for --launch")
    p.add_argument("--launch-timeout", type=float, default=1200.0,
                   help="seconds each launched run may take")
    p.add_argument("--batch-size", "-b", type=int, default=56,
                   help="b: fresh samples per step and rank")
    p.add_argument("--representatives", "-r", type=int, default=7,
                   help="r: representatives per step and rank")
    p.add_argument("--image-size", type=int, default=224,
                   help="crop size after the rehearsal stage")
    p.add_argument("--resize-size", type=int, default=None,
                   help="size of the stored samples (default: round(crop x 256 / 224))")
    p.add_argument("--jpeg-size", default=None,
                   help="HxW of the generated JPEGs (default: S x 1.25 S for stored size S)")
    p.add_argument("--images", type=int, default=1024,
                   help="JPEGs in the data set, all ranks together")
    p.add_argument("--capacity", type=int, default=None,
                   help="buffer capacity per rank (default: 30%% of the rank's shard)")
    p.add_argument("--policy", default="reservoir", choices=sorted(dr.POLICIES),
                   help="insertion policy of the buffers")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="buffer and decoding device; auto: the GPU when CuPy sees one")
    p.add_argument("--num-threads", type=int, default=None,
                   help="DALI threads per pipeline (default: the CPUs shared by the local "
                        "ranks)")
    p.add_argument("--prefetch", type=int, default=2, help="DALI prefetch_queue_depth")
    p.add_argument("--compute", default="sleep", choices=("sleep", "matmul"),
                   help="the simulated training step: idle (like a GPU step) or CPU-bound")
    p.add_argument("--compute-ms", type=float, default=150.0,
                   help="milliseconds of simulated training compute per step")
    p.add_argument("--matmul-size", type=int, default=512,
                   help="matrix size of --compute matmul")
    p.add_argument("--grad-mb", type=float, default=4.0,
                   help="MiB of float32 all-reduced per step after the compute (0: none)")
    p.add_argument("--steps", type=int, default=30,
                   help="measured steps per variant and repetition")
    p.add_argument("--warmup", type=int, default=5,
                   help="uncounted steps before each measured segment")
    p.add_argument("--repeats", type=int, default=4,
                   help="repetitions of the interleaved segments")
    p.add_argument("--seed", type=int, default=0, help="seed of the pipelines and buffers")
    p.add_argument("--data-root", default=None,
                   help="folder of JPEGs to read (default: generated photographs, cached)")
    p.add_argument("--out", default=None,
                   help="JSON output; the plot goes beside it as .png (default: "
                        "outputs/profile_global_sampling.json; options given other values add to "
                        "the name, e.g. -repeats=6, and N processes add -Nproc-mpiexec or "
                        "-Nproc-torchrun)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is off anyway when stderr is not a terminal)")
    args = p.parse_args(argv)
    args.run_name = _bench.run_name(p, args)       # before any default is filled in
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
    _bench.require("profile_global_sampling.py", NEEDS)
    args.same_settings = args.out is None
    if args.launch:
        if args.out is None:
            args.out = _bench.default_out("profile_global_sampling", args.run_name, 1, None)
        return launch(args, argv)
    rc = run_once(args)
    _bench.finish_world()
    return rc


if __name__ == "__main__":
    sys.exit(main())
