"""The per-step host cost of rehearsal, against its floor.

Two questions, each answered as a ratio measured in one run (variants
interleaved over repetitions; median and range over repetitions):

1. ``mix``: ``buffer.mix()`` on tiny samples (default b=56, r=7, 4x4x3 uint8,
   NumPy backend) against a bare vectorised NumPy step doing the same work
   (draw r stored rows, concatenate them after the fresh rows, reservoir
   decisions for the fresh rows, scatter the kept ones). Tiny samples make the
   host cost visible: the bytes moved are negligible. Target: <= 2x.
2. ``stage``: a DALI mixing pipeline with ``dr.fn.rehearsal`` over a trivially
   cheap source (``fn.random`` samples of the same tiny shape) against the
   plain source pipeline at batch b: steps per second. Target: >= 0.8x. Two
   references in the same run separate what is inherent to the design (a
   second DALI pipeline fed by the user's: DALI does not let an operator turn
   b samples into b + r) from what the stage and the buffer add: the mixing
   pipeline alone, fed fixed arrays, and two chained pipelines without buffer,
   stage or thread. CPU time per step (all threads) is printed beside them:
   with a source this cheap every DALI iteration is mostly DALI's own host
   work, and two pipelines need about twice the CPU time of one.

What a step holds here: ``pipe.run()`` and reading its outputs as arrays,
nothing else (no framework iterator, no training step). This is the floor,
the most pessimistic ratio: a plain step costs about a hundred microseconds,
so the stage's fixed per-step cost is a large share of it. A benchmark whose
step also holds a ``DALIGenericIterator`` or any work of the loop adds the
same time to both sides and reads a higher ratio; its figures are not
comparable with these. For a training loop, use the main job's
``--benchmark`` (pipelines/continual_mnist.py) and, for decode-heavy loops,
pipelines/profile_epochs.py; docs/benchmark-method.md says what each includes.

    python pipelines/bench_step.py                 # both parts, ~1 min on 2 cores
    python pipelines/bench_step.py --parts mix --repeats 15

Writes ``outputs/bench_step/results.json`` (settings, machine, load average
before and after, every repetition; with options other than the defaults the
folder name says which, ``outputs/bench_step-repeats=15/``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

# The checkout's library, even when another version is installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import dali_rehearsal as dr  # noqa: E402
from _bench import environment, replacing, require, run_name, table, write_json  # noqa: E402


class BareStep:
    """The floor: the same work as ``mix`` with no checks and no bookkeeping
    beyond a reservoir counter."""

    def __init__(self, capacity: int, r: int, shape: tuple, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.images = np.zeros((capacity,) + shape, np.uint8)
        self.labels = np.zeros(capacity, np.int64)
        self.capacity, self.r, self.size, self.seen = capacity, r, 0, 0

    def __call__(self, images, labels):
        b = len(labels)
        k = min(self.r, self.size)
        slots = np.sort((self.rng.random(k) * self.size).astype(np.int64))
        if k > 1 and (slots[1:] == slots[:-1]).any():     # rare: draw again without repeats
            slots = self.rng.choice(self.size, size=k, replace=False)
        out = (np.concatenate([images, self.images[slots]]),
               np.concatenate([labels, self.labels[slots]]))
        free = min(self.capacity - self.size, b)
        pos = self.seen + np.arange(free, b) + 1
        j = (self.rng.random(b - free) * pos).astype(np.int64)
        keep = j < self.capacity
        dst = np.concatenate([np.arange(self.size, self.size + free), j[keep]])
        src = np.concatenate([np.arange(free), np.arange(free, b)[keep]])
        self.images[dst] = images[src]
        self.labels[dst] = labels[src]
        self.size += free
        self.seen += b
        return out


def _time_steps(step, batches, steps: int) -> float:
    """Seconds per step over ``steps`` calls."""
    n = len(batches)
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % n])
    return (time.perf_counter() - t0) / steps


def part_mix(args) -> dict:
    shape = tuple(args.shape)
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, (args.b,) + shape, dtype=np.uint8),
                rng.integers(0, args.classes, args.b).astype(np.int64)) for _ in range(64)]

    def make(name):
        if name == "bare":
            return BareStep(args.capacity, args.r, shape)
        buf = dr.RehearsalBuffer(capacity=args.capacity, num_representatives=args.r,
                                 policy=name, device="cpu", seed=0)
        return buf.mix

    variants = ["bare", "reservoir", "class_balanced"]
    steppers = {v: make(v) for v in variants}
    for v in variants:                       # fill the buffers: steady state, full buffer
        _time_steps(steppers[v], batches, 2 * args.capacity // args.b + 50)
    reps = []
    for rep in range(args.repeats):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        reps.append({v: _time_steps(steppers[v], batches, args.steps) * 1e6 for v in order})
    result = {"us_per_step": {}, "ratio_to_bare": {}}
    for v in variants:
        us = np.array([r[v] for r in reps])
        result["us_per_step"][v] = _summary(us)
        if v != "bare":
            ratio = us / np.array([r["bare"] for r in reps])
            result["ratio_to_bare"][v] = _summary(ratio)
    result["repetitions"] = reps
    return result


def _cheap_source(b, shape, classes, num_threads):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=b, num_threads=num_threads, device_id=None, seed=0,
                  prefetch_queue_depth=2)
    def source():
        images = fn.cast(fn.random.uniform(range=[0, 255], shape=list(shape)), dtype=types.UINT8)
        labels = fn.cast(fn.random.uniform(range=[0, classes]), dtype=types.INT64)
        return images, labels

    return source()


def _fed_pipeline(batch, num_threads, callback):
    """A pipeline of batch ``batch`` whose only operator is an external_source
    calling ``callback`` (two outputs: samples and labels)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=num_threads, device_id=None, seed=1,
                  prefetch_queue_depth=2)
    def fed():
        images, labels = fn.external_source(source=callback, num_outputs=2, batch=True,
                                            device="cpu", no_copy=True,
                                            dtype=[types.UINT8, types.INT64], ndim=[3, 0])
        return images, labels

    pipe = fed()
    pipe.build()
    return pipe


def _ring(count, rows, shape):
    """Preallocated output batches, each handed to DALI as tensor lists made
    once (as the stage hands over its ring): the cheapest hand-over there is."""
    from nvidia.dali.tensors import TensorListCPU
    ring = []
    for _ in range(count):
        images, labels = np.zeros((rows,) + shape, np.uint8), np.zeros(rows, np.int64)
        ring.append((images, labels, [TensorListCPU(images, ""), TensorListCPU(labels, "")]))
    return ring


def chained_feed(feeder, r, shape):
    """The ``two_pipelines`` reference's callback: runs ``feeder`` (batch b) and
    returns its b rows followed by the first r of them again, copied into a
    ring of preallocated b + r batches (deeper than the prefetch queue + 1)."""
    b = feeder.max_batch_size
    ring, turn = _ring(4, b + r, shape), [0]

    def chained():
        images, labels = feeder.run()
        images, labels = np.asarray(images.as_tensor()), np.asarray(labels.as_tensor())
        labels = labels.reshape(-1)
        out_images, out_labels, handed = ring[turn[0] % len(ring)]
        turn[0] += 1
        out_images[:b], out_labels[:b] = images, labels
        out_images[b:], out_labels[b:] = images[:r], labels[:r]
        return handed

    return chained


#: the stage part's variants, in the order of the table
STAGE_VARIANTS = {
    "plain": "plain source pipeline (batch b)",
    "mixing_only": "mixing pipeline alone (batch b + r, fixed arrays)",
    "two_pipelines": "two pipelines, no buffer (reference)",
    "rehearsal": "+ dr.fn.rehearsal",
}


def part_stage(args) -> dict:
    """Steps per second of the mixing pipeline against the plain source
    pipeline, with two references that separate what is inherent to feeding
    a second DALI pipeline from what the stage and the buffer add:

    - ``mixing_only``: a pipeline of batch b + r fed by an external_source
      that hands over the same preallocated arrays every step: the second
      pipeline's own per-iteration cost, with nothing to compute;
    - ``two_pipelines``: the same pipeline, its callback running a second
      copy of the source pipeline and copying its b rows (and r of them again)
      into preallocated b + r arrays: what any design that feeds a second
      pipeline from the user's pays, without buffer, stage or thread.
    """
    from nvidia.dali import pipeline_def

    shape, b, r = tuple(args.shape), args.b, args.r
    plain = _cheap_source(b, shape, args.classes, args.num_threads)
    plain.build()

    fixed = _ring(1, b + r, shape)[0][2]
    mixing_only = _fed_pipeline(b + r, args.num_threads, lambda: fixed)

    feeder = _cheap_source(b, shape, args.classes, args.num_threads)
    feeder.build()
    two_pipelines = _fed_pipeline(b + r, args.num_threads, chained_feed(feeder, r, shape))

    buffer = dr.RehearsalBuffer(capacity=args.capacity, num_representatives=r,
                                device="cpu", seed=0)

    @pipeline_def(batch_size=b + r, num_threads=args.num_threads, device_id=None,
                  seed=1, prefetch_queue_depth=2)
    def mixing(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, prepare_ahead=args.prepare_ahead))

    mixed = mixing(_cheap_source(b, shape, args.classes, args.num_threads))
    mixed.build()

    def run_steps(pipe, steps):
        """(wall, CPU of the whole process) seconds per step."""
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            images, labels = pipe.run()
            images.as_array(), labels.as_array()
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    pipes = {"plain": plain, "mixing_only": mixing_only, "two_pipelines": two_pipelines,
             "rehearsal": mixed}
    for p in pipes.values():
        run_steps(p, 2 * args.capacity // b + 50)
    reps = []
    variants = list(pipes)
    for rep in range(args.repeats):
        k = rep % len(variants)
        order = variants[k:] + variants[:k]
        times = {v: run_steps(pipes[v], args.stage_steps) for v in order}
        reps.append({"us_per_step": {v: t[0] * 1e6 for v, t in times.items()},
                     "cpu_us_per_step": {v: t[1] * 1e6 for v, t in times.items()}})
    buffer.close()
    wall = {v: np.array([x["us_per_step"][v] for x in reps]) for v in variants}
    cpu = {v: np.array([x["cpu_us_per_step"][v] for x in reps]) for v in variants}
    return {"us_per_step": {v: _summary(wall[v]) for v in variants},
            "cpu_us_per_step": {v: _summary(cpu[v]) for v in variants},
            # steps/s of each variant over the plain pipeline's, per repetition
            "ratio_to_plain": {v: _summary(wall["plain"] / wall[v]) for v in variants},
            "steps_per_s_ratio": _summary(wall["plain"] / wall["rehearsal"]),
            "added_us_per_step": _summary(wall["rehearsal"] - wall["plain"]),
            # what the stage and the buffer add beyond feeding a second pipeline
            "rehearsal_vs_two_pipelines": _summary(wall["two_pipelines"] / wall["rehearsal"]),
            "added_over_two_pipelines_us": _summary(wall["rehearsal"] - wall["two_pipelines"]),
            "prepare_ahead": args.prepare_ahead, "variants": dict(STAGE_VARIANTS),
            "repetitions": reps}


def _summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max())}


def _fmt(s, digits=1):
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " A step here is pipe.run() and reading its "
        "outputs, nothing else (no framework iterator, no training step): the floor, the most "
        "pessimistic ratio; a loop's figure is continual_mnist.py --benchmark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", default="mix,stage",
                        help="comma-separated parts to run: mix, stage")
    parser.add_argument("--b", type=int, default=56, help="fresh samples per step")
    parser.add_argument("--r", type=int, default=7, help="representatives per step")
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 4, 3], metavar=("H", "W", "C"),
                        help="sample shape (uint8)")
    parser.add_argument("--classes", type=int, default=10, help="distinct labels")
    parser.add_argument("--capacity", type=int, default=2000, help="buffer capacity")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repetitions")
    parser.add_argument("--steps", type=int, default=2000,
                        help="mix part: steps per variant per repetition")
    parser.add_argument("--stage-steps", type=int, default=400,
                        help="stage part: steps per variant per repetition")
    parser.add_argument("--prepare-ahead", type=int, default=2,
                        help="stage part: the stage's prepare_ahead")
    parser.add_argument("--num-threads", type=int, default=1, help="DALI threads per pipeline")
    parser.add_argument("--out", default=None,
                        help="JSON output (default: outputs/bench_step/results.json; options "
                             "given other values add to the folder name, e.g. "
                             "outputs/bench_step-repeats=15/)")
    args = parser.parse_args(argv)
    same_settings = args.out is None
    if args.out is None:
        args.out = f"outputs/bench_step{run_name(parser, args)}/results.json"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"mix", "stage"}
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from mix, stage")

    if "stage" in parts:
        require("bench_step.py --parts stage", ["nvidia.dali"])
    load_before = os.getloadavg()
    results = {"settings": vars(args), "environment": environment("cpu")}
    if "mix" in parts:
        results["mix"] = part_mix(args)
    if "stage" in parts:
        results["stage"] = part_stage(args)
    results["environment"]["load_average_after"] = list(os.getloadavg())
    replaced = replacing(args.out, same_settings=same_settings)
    write_json(pathlib.Path(args.out), results)

    print(f"b={args.b}, r={args.r}, samples {tuple(args.shape)} uint8, capacity {args.capacity}; "
          f"median (range) over {args.repeats} interleaved repetitions")
    rows = []
    if "mix" in results:
        m = results["mix"]
        rows.append(["mix: bare NumPy step", _fmt(m["us_per_step"]["bare"]), "1 (reference)",
                     ""])
        for v in ("reservoir", "class_balanced"):
            rows.append([f"mix: buffer.mix ({v})", _fmt(m["us_per_step"][v]),
                         _fmt(m["ratio_to_bare"][v], 2), "<= 2x bare"])
    if "stage" in results:
        s = results["stage"]
        for v, label in STAGE_VARIANTS.items():
            if v == "rehearsal":
                label += f" (prepare_ahead={s['prepare_ahead']})"
            ratio = ("1 (reference)" if v == "plain"
                     else _fmt(s["ratio_to_plain"][v], 2) + " steps/s")
            rows.append([f"stage: {label}", _fmt(s["us_per_step"][v]), ratio,
                         ">= 0.8x steps/s" if v == "rehearsal" else ""])
    print(table(rows, ["variant", "us per step", "ratio", "target"]))
    if "stage" in results:
        s = results["stage"]
        print(f"stage: CPU time per step (all threads, us): "
              + ", ".join(f"{v} {s['cpu_us_per_step'][v]['median']:.0f}" for v in STAGE_VARIANTS)
              + f"; {os.cpu_count()} CPUs")
        print(f"stage: the stage and the buffer beyond the two-pipeline reference: "
              f"{_fmt(s['added_over_two_pipelines_us'])} us per step, steps/s "
              f"{_fmt(s['rehearsal_vs_two_pipelines'], 2)} of the reference's")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"JSON: {args.out}{replaced}")
    return results


if __name__ == "__main__":
    main()
