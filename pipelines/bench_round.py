#!/usr/bin/env python
"""The exposed latency of a global-sampling round: ``mix()`` in a tight loop.

Every rank calls ``buffer.mix()`` on tiny batches (``--batch-size`` rows of
``--row-bytes`` bytes, reservoir, ``-r`` representatives) with nothing in
between, so no training step hides the round: the time per step is the
exchange's latency. The same loop runs with ``sampling="global"`` over
``MPI.COMM_WORLD`` and with ``sampling="local"`` (no exchange), in interleaved
segments. Per variant it prints the median milliseconds per step with the
range over segments (each segment's median), and the CPU time per step of the
whole process (``time.process_time()``: the caller and the exchange's progress
thread together, so a wait that spins shows up here), then the exchange's
exact counts per step (``buffer.exchange_stats()``).

Run under mpiexec, or let the script launch itself for several N::

    mpiexec -n 2 python pipelines/bench_round.py
    python pipelines/bench_round.py --launch 2,4,8     # oversubscribed is fine
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
# The library of this checkout comes first, even when another version is installed.
if (_HERE.parent / "dali_rehearsal" / "__init__.py").is_file():
    sys.path.insert(0, str(_HERE.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launch", default=None, metavar="N,N,...",
                   help="run this script under mpiexec once per process count and print each "
                        "result")
    p.add_argument("--mpiexec", default="mpiexec", help="the mpiexec command for --launch")
    p.add_argument("--launch-timeout", type=float, default=600.0,
                   help="seconds each launched run may take")
    p.add_argument("--batch-size", "-b", type=int, default=4, help="fresh rows per step")
    p.add_argument("--row-bytes", type=int, default=16, help="bytes of the image field per row")
    p.add_argument("--representatives", "-r", type=int, default=7,
                   help="representatives per step")
    p.add_argument("--capacity", type=int, default=200, help="buffer capacity per rank")
    p.add_argument("--steps", type=int, default=300, help="measured steps per segment")
    p.add_argument("--segments", type=int, default=5,
                   help="segments per variant (interleaved global, local)")
    p.add_argument("--warmup", type=int, default=50, help="uncounted steps before the segments")
    return p.parse_args(argv)


def _launch(args) -> int:
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--launch")
    del argv[i:i + 2]
    worst = 0
    for n in [int(x) for x in args.launch.split(",")]:
        cmd = shlex.split(args.mpiexec) + ["-n", str(n), sys.executable, __file__] + argv
        print(f"$ {' '.join(cmd)}", flush=True)
        try:
            done = subprocess.run(cmd, timeout=args.launch_timeout)
            worst = worst or done.returncode
        except subprocess.TimeoutExpired:
            print(f"(timed out after {args.launch_timeout:g} s)", flush=True)
            worst = worst or 124
    return worst


def _settled(buf, deadline_s: float = 10.0) -> dict:
    """``buf.exchange_stats()`` once the round opened for the next step has
    ended (the counts unchanged for 50 ms): exact counts of the steps done."""
    end = time.monotonic() + deadline_s
    last, still = buf.exchange_stats(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.005)
        now = buf.exchange_stats()
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still >= 0.05:
            break
    return last


def _segment(buf, images, labels, steps) -> tuple[np.ndarray, float]:
    times = np.empty(steps)
    cpu = time.process_time()
    for i in range(steps):
        t = time.perf_counter()
        buf.mix(images, labels)
        times[i] = time.perf_counter() - t
    return times, time.process_time() - cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.launch:
        return _launch(args)
    from mpi4py import MPI

    import dali_rehearsal as dr
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    b = args.batch_size
    images = np.arange(b * args.row_bytes, dtype=np.uint8).reshape(b, args.row_bytes)
    labels = np.arange(b, dtype=np.int64)
    bufs = {v: dr.RehearsalBuffer(capacity=args.capacity, num_representatives=args.representatives,
                                  policy="reservoir", device="cpu", seed=1, comm=comm, sampling=v)
            for v in ("global", "local")}
    for buf in bufs.values():
        for _ in range(args.warmup):
            buf.mix(images, labels)
    per_step = {v: [] for v in bufs}
    medians = {v: [] for v in bufs}
    cpu = {v: 0.0 for v in bufs}
    counted = hasattr(bufs["global"], "exchange_stats")    # (older versions: no counts)
    before = _settled(bufs["global"]) if counted else {}
    for s in range(args.segments):
        for v in (("global", "local") if s % 2 == 0 else ("local", "global")):
            comm.Barrier()
            times, c = _segment(bufs[v], images, labels, args.steps)
            per_step[v].append(times)
            medians[v].append(float(np.median(times)))
            cpu[v] += c
    after = _settled(bufs["global"]) if counted else {}
    for buf in bufs.values():
        buf.close()
    # rank 0 prints every rank's figures
    mine = {v: (float(np.median(np.concatenate(per_step[v]))) * 1e3, min(medians[v]) * 1e3,
                max(medians[v]) * 1e3, cpu[v] / (args.steps * args.segments) * 1e3)
            for v in bufs}
    rows = comm.gather(mine, root=0)
    steps = args.steps * args.segments
    counts = {k: (after[k] - before[k]) / steps for k in after if k != "rounds"}
    counts = comm.gather(counts, root=0)
    if rank == 0:
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(f"command: {' '.join(shlex.quote(a) for a in sys.argv)} (mpiexec -n {size})")
        print(f"uptime: {load}; cpus: {os.cpu_count()}")
        print(f"{size} processes, b={b}, rows of {args.row_bytes} + 8 bytes, "
              f"r={args.representatives}, {args.segments} x {args.steps} steps per variant")
        print("rank  variant  median ms/step  range of segment medians  cpu ms/step")
        for p, row in enumerate(rows):
            for v, (med, lo, hi, c) in row.items():
                print(f"{p:4d}  {v:7s}  {med:14.3f}  {lo:10.3f} .. {hi:10.3f}  {c:11.3f}")
        c0 = counts[0]
        if c0:
            print("rank 0 exchange per step: " + ", ".join(f"{k} {c0[k]:.2f}" for k in c0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
