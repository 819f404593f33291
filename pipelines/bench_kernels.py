#!/usr/bin/env python
"""Microbenchmark of the rehearsal buffer's per-step data-movement kernels.

Each step of the buffer moves three sets of rows (one row = one sample):

``copy_rows``     the ``b`` fresh samples into the output batch,
``gather_rows``   ``r`` representatives from random buffer slots after them,
``scatter_rows``  the accepted fresh samples into random buffer slots,

and ``step`` is the three in a row. The ``*_fields`` ops do the same for a
sample of two fields (the image and an int64 label) in one launch each, as
the buffer does (descriptor table and indices uploaded from the host with
every call), and ``step_fields`` is the three: a whole step of the buffer.

Each is timed against the device's own
copy of the same number of bytes between contiguous buffers: on the GPU
``cudaMemcpyAsync`` device-to-device (and, for reference, CuPy's
``dst[...] = src``), on the CPU (``--cpu``: the NumPy paths) ``np.copyto``.
GB/s counts the bytes written (the bytes read are the same number), so the
percentage is independent of that convention.

GPU timing uses CUDA events around ``--iters`` back-to-back calls on one
stream, in two modes: ``eager`` (Python launches, what a training step pays;
small copies are bounded by launch overhead on both sides) and ``graph`` (the
same calls captured once into a CUDA graph and replayed: device time only).
Kernel and reference alternate within every repetition; the figure is the
median over ``--repeats``.

Without a GPU (and without ``--cpu``) the script prints "no GPU: nothing
measured" and exits with status 0.

Examples::

    python pipelines/bench_kernels.py                       # GPU
    python pipelines/bench_kernels.py --cpu --shapes 224x224x3:uint8
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
# The library of the checkout this script belongs to comes first, even when
# another version is installed: a stale install must not answer for this code.
if (_HERE.parent / "dali_rehearsal" / "__init__.py").is_file():
    sys.path.insert(0, str(_HERE.parent))
from dali_rehearsal import gpu_available  # noqa: E402
from dali_rehearsal.kernels import (copy_fields, copy_rows, gather_fields,  # noqa: E402
                                   gather_rows, scatter_fields, scatter_rows)
from dali_rehearsal.kernels.movement import reserve_staging  # noqa: E402

sys.path.insert(0, str(_HERE))
import _bench  # noqa: E402

DEFAULT_SHAPES = ("224x224x3:uint8", "32x32x3:uint8", "64x64x3:uint8", "256x256x3:uint8",
                  "3x224x224:float32")
OPS = ("copy_rows", "gather_rows", "scatter_rows", "step", "copy_fields", "gather_fields",
       "scatter_fields", "step_fields")
#: Issue 13's GPU target: the kernels at >= 90 % of a device-to-device copy of the same bytes.
TARGET_PCT = 90.0
SINGLE = ("copy_rows", "gather_rows", "scatter_rows")
FIELDS = ("copy_fields", "gather_fields", "scatter_fields")


def parse_shape(text: str) -> tuple[tuple[int, ...], np.dtype]:
    dims, _, dtype = text.partition(":")
    shape = tuple(int(d) for d in dims.lower().split("x"))
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}")
    return shape, np.dtype(dtype or "uint8")


# ------------------------------------------------------------------------------ setup
class Case:
    """Arrays and callables of one sample shape."""

    def __init__(self, xp, shape, dtype, *, b, r, accepted, capacity, seed, stream=None):
        rng = np.random.default_rng(seed)
        self.xp, self.stream = xp, stream
        self.row_bytes = int(math.prod(shape)) * np.dtype(dtype).itemsize
        self.b, self.r, self.k = b, r, accepted

        def fill(n):
            # values do not matter for a copy; touching every page does (CPU)
            return xp.full((n, *shape), 7, dtype=dtype)

        self.src = fill(b)                       # the fresh batch
        self.storage = fill(capacity)            # the buffer
        self.out = xp.empty((b + r, *shape), dtype=dtype)
        self.scratch = xp.empty((max(b, r, accepted), *shape), dtype=dtype)
        slots = np.sort(rng.choice(capacity, size=r, replace=False)).astype(np.int64)
        self.gidx = xp.asarray(slots)
        self.sidx = xp.asarray(np.sort(rng.choice(b, size=accepted, replace=False))
                               .astype(np.int64))
        self.didx = xp.asarray(rng.choice(capacity, size=accepted, replace=False)
                               .astype(np.int64))
        # host indices for the multi-field ops (uploaded with their descriptor table)
        self.gidx_host = slots
        self.sidx_host = np.sort(rng.choice(b, size=accepted, replace=False)).astype(np.int64)
        self.didx_host = rng.choice(capacity, size=accepted, replace=False).astype(np.int64)
        # the label field of the multi-field ops
        self.lab_src = xp.full((b,), 3, dtype=np.int64)
        self.lab_storage = xp.full((capacity,), 3, dtype=np.int64)
        self.lab_out = xp.empty((b + r,), dtype=np.int64)
        most = (b + r + accepted) * (self.row_bytes + 8)
        self.flat_src = xp.full((most,), 7, dtype=np.uint8)
        self.flat_dst = xp.empty((most,), dtype=np.uint8)

    def kernels(self):
        s = self.stream
        fields_src, fields_storage = [self.src, self.lab_src], [self.storage, self.lab_storage]
        fields_out = [self.out, self.lab_out]
        return {
            "copy_rows": lambda: copy_rows(self.src, self.out, stream=s),
            "gather_rows": lambda: gather_rows(self.storage, self.gidx, self.out,
                                               dst_offset=self.b, stream=s),
            "scatter_rows": lambda: scatter_rows(self.src, self.sidx, self.storage, self.didx,
                                                 stream=s),
            "copy_fields": lambda: copy_fields(fields_src, fields_out, stream=s),
            "gather_fields": lambda: gather_fields(fields_storage, self.gidx_host, fields_out,
                                                   dst_offset=self.b, stream=s),
            "scatter_fields": lambda: scatter_fields(fields_src, self.sidx_host, fields_storage,
                                                     self.didx_host, stream=s),
        }

    def nbytes(self):
        row, field_row = self.row_bytes, self.row_bytes + 8
        return {"copy_rows": self.b * row, "gather_rows": self.r * row,
                "scatter_rows": self.k * row, "step": (self.b + self.r + self.k) * row,
                "copy_fields": self.b * field_row, "gather_fields": self.r * field_row,
                "scatter_fields": self.k * field_row,
                "step_fields": (self.b + self.r + self.k) * field_row}

    def pairs(self):
        """(dst view, src view) of contiguous buffers with each kernel's byte count."""
        pairs = {"copy_rows": (self.out[:self.b], self.src),
                 "gather_rows": (self.out[self.b:], self.storage[:self.r]),
                 "scatter_rows": (self.storage[-self.k:] if self.k else self.storage[:0],
                                  self.scratch[:self.k])}
        nbytes = self.nbytes()
        for op in FIELDS:      # one contiguous copy of the same bytes
            pairs[op] = (self.flat_dst[:nbytes[op]], self.flat_src[:nbytes[op]])
        return pairs


def _sequence(fns):
    def run():
        for f in fns:
            f()
    return run


def build_ops(case: Case, copy, assign):
    """{op: (kernel call, reference copy call, optional assign call)}."""
    kern = case.kernels()
    pairs = case.pairs()
    ref = {op: (lambda d=d, s=s: copy(d, s)) for op, (d, s) in pairs.items()}
    asg = {op: (lambda d=d, s=s: assign(d, s)) for op, (d, s) in pairs.items()}
    ops = {op: (kern[op], ref[op], asg[op]) for op in kern}
    for name, parts in (("step", SINGLE), ("step_fields", FIELDS)):
        ops[name] = (_sequence([kern[o] for o in parts]), _sequence([ref[o] for o in parts]),
                     _sequence([asg[o] for o in parts]))
    return {op: ops[op] for op in OPS}


# ------------------------------------------------------------------------------ timers
def time_cpu(fn, iters: int) -> float:
    """Seconds per call (perf_counter around ``iters`` calls)."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


class GpuTimer:
    def __init__(self, cupy, stream):
        self.cp, self.stream = cupy, stream

    def eager(self, fn, iters: int) -> float:
        cp = self.cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        with self.stream:
            start.record(self.stream)
            for _ in range(iters):
                fn()
            end.record(self.stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / iters

    def capture(self, fn, iters: int):
        """A CUDA graph of ``iters`` calls of ``fn`` (None if capture fails)."""
        try:
            with self.stream:
                self.stream.begin_capture()
                try:
                    for _ in range(iters):
                        fn()
                finally:
                    graph = self.stream.end_capture()
            return graph
        except Exception as e:                      # noqa: BLE001
            print(f"warning: CUDA graph capture failed ({type(e).__name__}: {e}); "
                  "graph mode skipped", file=sys.stderr)
            return None

    def graph(self, graph, iters: int) -> float:
        cp = self.cp
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(self.stream)
        graph.launch(self.stream)
        end.record(self.stream)
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end) / 1e3 / iters


# ------------------------------------------------------------------------------ main
def measure(args, shapes, device):
    if device == "gpu":
        import cupy as cp
        stream = cp.cuda.Stream(non_blocking=True)
        kind = cp.cuda.runtime.memcpyDeviceToDevice

        def copy(dst, src):
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, kind,
                                        stream.ptr)

        def assign(dst, src):
            with stream:
                dst[...] = src
        xp, timer = cp, GpuTimer(cp, stream)
        modes = ("eager",) if args.no_graph else ("eager", "graph")
    else:
        stream = None
        xp, timer = np, None

        def copy(dst, src):
            np.copyto(dst, src)

        def assign(dst, src):
            dst[...] = src
        modes = ("eager",)

    results = []
    for shape, dtype in shapes:
        case = Case(xp, shape, dtype, b=args.batch_size, r=args.representatives,
                    accepted=args.accepted, capacity=args.capacity, seed=args.seed,
                    stream=stream)
        ops = build_ops(case, copy, assign)
        if device == "gpu":
            cp.cuda.Device().synchronize()
        nbytes = case.nbytes()
        for op, (kern, ref, asg) in ops.items():
            for f in (kern, ref, asg):               # warm-up (and NVRTC compile)
                for _ in range(args.warmup):
                    f()
            if device == "gpu":
                stream.synchronize()
            for mode in modes:
                samples = {"kernel": [], "copy": [], "assign": []}
                graphs = None
                if mode == "graph":
                    # the multi-field ops' staging slots cannot grow inside a capture
                    reserve_staging(cp.cuda.Device().id, 1 << 16)
                    graphs = {n: timer.capture(f, args.iters)
                              for n, f in (("kernel", kern), ("copy", ref), ("assign", asg))}
                    if any(g is None for g in graphs.values()):
                        continue
                for _ in range(args.repeats):
                    for name, f in (("kernel", kern), ("copy", ref), ("assign", asg)):
                        if device != "gpu":
                            t = time_cpu(f, args.iters)
                        elif mode == "eager":
                            t = timer.eager(f, args.iters)
                        else:
                            t = timer.graph(graphs[name], args.iters)
                        samples[name].append(t)
                t = {n: float(np.median(v)) for n, v in samples.items()}
                gbps = {n: nbytes[op] / v / 1e9 if v > 0 else float("nan")
                        for n, v in t.items()}
                results.append({
                    "shape": list(shape), "dtype": str(np.dtype(dtype)), "op": op,
                    "mode": mode, "row_bytes": case.row_bytes, "bytes": nbytes[op],
                    "kernel_us": t["kernel"] * 1e6, "copy_us": t["copy"] * 1e6,
                    "assign_us": t["assign"] * 1e6,
                    "kernel_GBps": gbps["kernel"], "copy_GBps": gbps["copy"],
                    "assign_GBps": gbps["assign"],
                    "pct_of_copy": 100.0 * t["copy"] / t["kernel"] if t["kernel"] > 0
                    else float("nan"),
                    "per_repeat_kernel_us": [v * 1e6 for v in samples["kernel"]],
                    "per_repeat_copy_us": [v * 1e6 for v in samples["copy"]],
                })
        del case, ops
        if device == "gpu":
            cp.get_default_memory_pool().free_all_blocks()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="measure the NumPy paths against np.copyto instead of the GPU")
    p.add_argument("--batch-size", "-b", type=int, default=56,
                   help="fresh samples per step, b (default: 56)")
    p.add_argument("--representatives", "-r", type=int, default=7,
                   help="representatives gathered per step, r (default: 7)")
    p.add_argument("--accepted", type=int, default=None,
                   help="fresh samples stored per step (default: b, a filling buffer: the most "
                        "a step ever scatters)")
    p.add_argument("--capacity", type=int, default=None,
                   help="buffer slots (default: 2000 on the GPU, 512 on the CPU)")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help="comma-separated sample shapes DIMS:dtype; the first is the headline "
                        f"(default: {','.join(DEFAULT_SHAPES)})")
    p.add_argument("--iters", type=int, default=None,
                   help="calls per timing (default: 200 on the GPU, 20 on the CPU)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timings per op and mode; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed calls of each op first, NVRTC compile included (default: 5)")
    p.add_argument("--no-graph", action="store_true",
                   help="GPU: eager mode only, no CUDA graph mode")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random slots and indices (default: 0)")
    p.add_argument("--out", default=None,
                   help="JSON output, plot next to it as .png (default: "
                        "outputs/bench_kernels.json; options given other values add to the "
                        "name: outputs/bench_kernels-cpu.json with --cpu)")
    args = p.parse_args(argv)
    args.run_name = _bench.run_name(p, args)       # before any default is filled in
    args.same_settings = args.out is None
    args.accepted = args.batch_size if args.accepted is None else args.accepted
    if not 0 <= args.accepted <= args.batch_size:
        p.error("--accepted must be between 0 and --batch-size")
    if args.capacity is None:
        args.capacity = 512 if args.cpu else 2000
    if args.capacity < max(args.representatives, args.accepted):
        p.error("--capacity must be at least --representatives and --accepted")
    if args.iters is None:
        args.iters = 20 if args.cpu else 200
    if args.out is None:
        args.out = _bench.default_out("bench_kernels", args.run_name, 1, None)
    args.shape_list = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        device = "cpu"
    elif gpu_available():
        device = "gpu"
    else:
        print("no GPU: nothing measured (no CUDA device visible to CuPy). "
              "Run with --cpu to measure the NumPy paths against np.copyto.")
        return 0
    _bench.require("bench_kernels.py", ["matplotlib"])
    results = measure(args, args.shape_list, device)
    json_path, png_path = _bench.out_paths(args.out)
    head_shape = list(args.shape_list[0][0])
    head_dtype = str(np.dtype(args.shape_list[0][1]))
    head_mode = "graph" if device == "gpu" and any(
        r["mode"] == "graph" for r in results) else "eager"
    headline = {f"{r['op']}_pct_of_copy": r["pct_of_copy"] for r in results
                if r["shape"] == head_shape and r["dtype"] == head_dtype
                and r["mode"] == head_mode}
    headline.update(shape=head_shape, dtype=head_dtype, mode=head_mode, target_pct=TARGET_PCT,
                    meets_target=all(v >= TARGET_PCT for k, v in headline.items()
                                     if k.endswith("_pct_of_copy")))
    settings = {k: v for k, v in vars(args).items() if k not in ("shape_list", "same_settings")}
    settings["device"] = device
    replaced = _bench.replacing(json_path, png_path, same_settings=args.same_settings)
    _bench.write_json(json_path, {
        "script": "bench_kernels", "measured": True,
        "environment": _bench.environment(device), "settings": settings,
        "reference": "cudaMemcpyAsync D2D" if device == "gpu" else "np.copyto",
        "headline": headline, "results": results, "plot": str(png_path)})

    rows = [[f"{'x'.join(map(str, r['shape']))}:{r['dtype']}", r["op"], r["mode"],
             r["bytes"] / 2**20, r["kernel_us"], r["copy_us"], r["kernel_GBps"],
             r["copy_GBps"], r["assign_GBps"], r["pct_of_copy"]] for r in results]
    ref = "memcpy" if device == "gpu" else "copyto"
    print(f"device={device} ({_bench.gpu_name() or _bench.cpu_model()}), b={args.batch_size}, "
          f"r={args.representatives}, accepted={args.accepted}, capacity={args.capacity}, "
          f"{args.iters} calls x {args.repeats} repeats (median)")
    print(_bench.table(rows, ["shape", "op", "mode", "MiB", "kernel us", f"{ref} us",
                              "kernel GB/s", f"{ref} GB/s", "assign GB/s", f"% of {ref}"]))
    print(f"headline ({'x'.join(map(str, head_shape))}:{head_dtype}, {head_mode}): "
          + ", ".join(f"{k.replace('_pct_of_copy', '')} {v:.0f}%" for k, v in headline.items()
                      if k.endswith("_pct_of_copy"))
          + f" of copy bandwidth (target >= {TARGET_PCT:.0f}%)")

    head = [r for r in results if r["shape"] == head_shape and r["dtype"] == head_dtype
            and r["mode"] == head_mode]
    def spread(r, key):      # GB/s of the slowest and the fastest repeat
        return (r["bytes"] / max(r[key]) / 1e3, r["bytes"] / min(r[key]) / 1e3)
    _bench.bar_chart(png_path, [r["op"] for r in head],
                     {"kernel": [r["kernel_GBps"] for r in head],
                      ref: [r["copy_GBps"] for r in head]},
                     errors={"kernel": [spread(r, "per_repeat_kernel_us") for r in head],
                             ref: [spread(r, "per_repeat_copy_us") for r in head]},
                     ylabel="GB/s (bytes written)\n"
                            f"bar: median, whisker: range over {args.repeats} repeats",
                     title=f"{device}: {'x'.join(map(str, head_shape))} {head_dtype}, "
                           f"b={args.batch_size}, r={args.representatives} ({head_mode})")
    print(f"wrote {json_path} and {png_path}{replaced}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
