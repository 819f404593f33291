"""The cost of a ``mix()`` step against the number of classes ever seen.

For each policy (``class_balanced``, ``reservoir``) and each number of classes
``N`` (default 10, 1,000, 10,000, 100,000), a buffer (NumPy backend, tiny
samples: only the host cost shows) is brought to a full state in which ``N``
classes have been seen, then timed over ``--steps`` calls of ``buffer.mix()``
in two streams:

``new``
    every label is new: each step brings ``b`` classes never seen before (the
    classes ever seen grow from ``N`` during the timed steps);
``known``
    labels drawn uniformly from the ``N`` classes already seen.

Each repetition starts again from the same state (``load_state_dict`` into a
fresh buffer, outside the timing). The figure is ms per step (the timed steps'
total over their number), printed as the median and the range over the
repetitions, with the command, the machine and its load (``uptime``) before
and after: measure on a quiet machine.

    python pipelines/bench_policies.py
    python pipelines/bench_policies.py --classes 10 100000 --repeats 9 --out bench.json
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

# The checkout's library, even when another version is installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import dali_rehearsal as dr  # noqa: E402
from _bench import environment, table, write_json  # noqa: E402

POLICIES = ("class_balanced", "reservoir")
STREAMS = ("new", "known")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 1_000, 10_000, 100_000],
                   help="numbers of classes ever seen before the timed steps")
    p.add_argument("--capacity", type=int, default=2000, help="buffer capacity (samples)")
    p.add_argument("--batch-size", type=int, default=56, help="fresh samples per step (b)")
    p.add_argument("--representatives", type=int, default=7, help="num_representatives (r)")
    p.add_argument("--steps", type=int, default=50, help="timed mix() steps per repetition")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of each measurement")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    p.add_argument("--seed", type=int, default=0, help="seed of the buffers and the labels")
    p.add_argument("--out", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    for name in ("capacity", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.classes) < 1:
        p.error("--classes must be >= 1")
    return args


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _batch(labels: np.ndarray):
    """Tiny samples (4x4x3 uint8) for ``labels``."""
    return np.zeros((len(labels), 4, 4, 3), np.uint8), labels


def _buffer(args, policy: str) -> dr.RehearsalBuffer:
    return dr.RehearsalBuffer(capacity=args.capacity, num_representatives=args.representatives,
                              policy=policy, device="cpu", seed=args.seed)


def prepared_state(args, policy: str, classes: int) -> dict:
    """The state of a full buffer that has seen ``classes`` classes: each
    class once, in order, then random labels of those classes until twice the
    capacity was offered."""
    rng = np.random.default_rng(args.seed)
    buffer = _buffer(args, policy)
    labels = np.concatenate([np.arange(classes, dtype=np.int64),
                             rng.integers(0, classes, max(0, 2 * args.capacity - classes))])
    for start in range(0, len(labels), 4096):
        buffer.add(*_batch(labels[start:start + 4096]))
    return buffer.state_dict()


def time_steps(args, policy: str, state: dict, labels: np.ndarray) -> float:
    """ms per ``mix()`` step over the rows of ``labels`` (one row per step),
    from ``state``."""
    buffer = _buffer(args, policy)
    buffer.load_state_dict(state)
    batches = [_batch(row) for row in labels]
    t0 = time.perf_counter()
    for images, row in batches:
        buffer.mix(images, row)
    return (time.perf_counter() - t0) / len(batches) * 1e3


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}")
    before = _uptime()
    print(f"uptime before: {before}", flush=True)
    b, steps = args.batch_size, args.steps
    rows, results = [], []
    for classes in args.classes:
        for policy in args.policies:
            state = prepared_state(args, policy, classes)
            for stream in args.streams:
                rng = np.random.default_rng(args.seed + 1)
                times = []
                for _ in range(args.repeats):
                    if stream == "new":
                        labels = classes + np.arange(steps * b, dtype=np.int64).reshape(steps, b)
                    else:
                        labels = rng.integers(0, classes, (steps, b))
                    times.append(time_steps(args, policy, state, labels))
                median = float(np.median(times))
                rows.append([f"{classes:,}", policy, stream, median, min(times), max(times)])
                results.append({"classes": classes, "policy": policy, "stream": stream,
                                "ms_per_step": times, "median_ms": median})
                print(table(rows[-1:], ["classes", "policy", "stream", "median ms", "min",
                                        "max"]).splitlines()[-1], flush=True)
    after = _uptime()
    print()
    print(f"ms per mix() step: b={b}, r={args.representatives}, capacity={args.capacity}, "
          f"{steps} steps x {args.repeats} repetitions (median, min, max over repetitions)")
    print(table(rows, ["classes", "policy", "stream", "median ms", "min", "max"]))
    print(f"uptime after: {after}")
    if args.out:
        write_json(pathlib.Path(args.out), {
            "script": "bench_policies", "command": command, "settings": vars(args),
            "uptime_before": before, "uptime_after": after,
            "environment": environment("cpu"), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
