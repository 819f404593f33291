#!/usr/bin/env python
"""The software cost of a global-sampling round that grows with the number of processes.

Every process computes every process's draws of a round (rank 0's seed and
the round number: that is how an owner knows what to serve without request
messages), then which of them fall in its own shard. This script times that
work on one core, as the round does it (``dali_rehearsal.exchange.protocol.draws``
and the same NumPy operations as ``GlobalSampler._serve``), for N processes
of equal shards, ``r`` representatives each, and prints the median
microseconds per round with the range over repetitions, and per process of
the job (the ``c_peer`` of ``pipelines/scaling_model.py``)::

    python pipelines/bench_draws.py
    python pipelines/bench_draws.py --processes 2,128,1024 --representatives 7
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
# The library of this checkout comes first, even when another version is installed.
if (_HERE.parent / "dali_rehearsal" / "__init__.py").is_file():
    sys.path.insert(0, str(_HERE.parent))

from dali_rehearsal.exchange.protocol import draws  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="2,16,128,1024",
                   help="comma-separated numbers of processes N")
    p.add_argument("--representatives", "-r", type=int, default=7, help="r per process")
    p.add_argument("--capacity", type=int, default=2000, help="samples per shard")
    p.add_argument("--rounds", type=int, default=200, help="rounds timed per repetition")
    p.add_argument("--repeats", type=int, default=7, help="repetitions (median and range)")
    return p.parse_args(argv)


def one_round(seed: int, number: int, world: int, sizes: np.ndarray, k: int, me: int = 0):
    """What a round computes from the status table: the draws, then the rows
    this process serves to each peer and requests from each owner."""
    total = int(sizes.sum())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    picks = draws(seed, number, world, total, k)
    mine = picks[me]
    owners = np.searchsorted(starts, mine, side="right") - 1
    request = np.bincount(owners, minlength=world)
    lo, hi = starts[me], starts[me] + sizes[me]
    hits = (picks >= lo) & (picks < hi)
    hits[me] = False
    serve = [(int(p), picks[p][hits[p]] - lo) for p in np.flatnonzero(hits.any(axis=1))]
    return request, serve


def main(argv=None) -> dict:
    args = parse_args(argv)
    worlds = [int(n) for n in args.processes.split(",") if n.strip()]
    print(f"command: python pipelines/bench_draws.py --processes {args.processes} "
          f"--representatives {args.representatives} --capacity {args.capacity} "
          f"--rounds {args.rounds} --repeats {args.repeats}")
    results = {}
    for n in worlds:
        sizes = np.full(n, args.capacity, dtype=np.int64)
        per_round = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(args.rounds):
                one_round(11, rep * args.rounds + i, n, sizes, args.representatives)
            per_round.append((time.perf_counter() - t0) / args.rounds * 1e6)
        med = float(np.median(per_round))
        results[n] = {"us_per_round": med, "range": [min(per_round), max(per_round)],
                      "us_per_process": med / n}
        print(f"N={n:5d}: {med:9.1f} us a round ({min(per_round):.1f} to "
              f"{max(per_round):.1f}), {med / n:6.3f} us per process of the job")
    return results


if __name__ == "__main__":
    main()
