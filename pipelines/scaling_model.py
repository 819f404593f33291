#!/usr/bin/env python
"""A model of global sampling's exchange, calibrated on bench_scaling.py's measurements.

Reads the JSON of ``pipelines/bench_scaling.py`` and prints, as Markdown
tables (the ones docs/scaling.md quotes):

1. **Counts**: per step and process, the messages, bytes and collectives the
   model predicts for the dense protocol (status allgather + one all-to-all
   per field) and for the sparse one (status allgather + one message per
   peer that has rows, every field in it), beside the measured exact counts.
2. **Times**: the tight loop's exposed round time (global minus local
   sampling) fitted as ``c0 + a * L(N)``, ``L`` the latency terms of the
   measured protocol, with the residuals; the step segments' exposed wait and
   step ratio against the model's ``max(0, round - step)``.
3. **At scale**: the per-step exchange time of both protocols for N = 128
   and 1,024 on an HDR InfiniBand-class and a 25 GbE-class network, for the
   reference's setting (b = 56, r = 7, 224x224x3 uint8 + int64 label) and a
   100 ms step: the fraction of the step it adds when not hidden, and with
   the library's overlap (the round for step t+1 runs during step t).

    python pipelines/scaling_model.py outputs/bench_scaling.json
    python pipelines/scaling_model.py --no-measurements       # part 3 only

The formulas and their assumptions are in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shlex
import sys

#: Bytes of one process's status row in the round's allgather (docs/exchange.md).
STATUS_BYTES = 64

#: Networks of part 3: (name, one-way latency per message in s, bandwidth in bytes/s).
#: Sources in docs/scaling.md.
NETWORKS = (
    ("HDR InfiniBand (200 Gb/s, 1.5 us)", 1.5e-6, 200e9 / 8),
    ("25 GbE, TCP (25 Gb/s, 30 us)", 30e-6, 25e9 / 8),
)


# ------------------------------------------------------------------ the model
def p_peer_draws_from_me(n: int, r: int, capacity: int | None) -> float:
    """Probability that a given other process draws at least one of its
    ``r`` representatives from my shard (equal shards of ``capacity``; draws
    without replacement from all ``n * capacity`` rows; with replacement
    when ``capacity`` is None)."""
    if n < 2:
        return 0.0
    if capacity is None:
        return 1.0 - (1.0 - 1.0 / n) ** r
    total, mine = n * capacity, capacity
    if r > total - mine:
        return 1.0
    return 1.0 - math.comb(total - mine, r) / math.comb(total, r)


def peers_served(n: int, r: int, capacity: int | None = None) -> float:
    """Expected number of other processes a process sends rows to in one round."""
    return (n - 1) * p_peer_draws_from_me(n, r, capacity)


def rows_from_others_sd(n: int, r: int, capacity: int) -> float:
    """Standard deviation of the rows one process draws from the others' shards
    in one step (hypergeometric: ``r`` draws from ``n * capacity`` rows)."""
    total = n * capacity
    p = (n - 1) / n
    if total <= 1:
        return 0.0
    return math.sqrt(r * p * (1 - p) * (total - r) / (total - 1))


def busiest_owner_rows(n: int, r: int) -> int:
    """Rows served by the busiest process of a round (median of the maximum
    over ``n`` processes): each serves ~Poisson(r (n-1)/n) rows to others."""
    lam = r * (n - 1) / n
    if lam == 0:
        return 0
    k, cdf, term = 0, math.exp(-lam), math.exp(-lam)
    while cdf ** n < 0.5:
        k += 1
        term *= lam / k
        cdf += term
    return max(k, r)


def counts(protocol: str, n: int, r: int, sample_bytes: int, fields: int,
           capacity: int | None = None) -> dict:
    """Per step and process: what the protocol asks the library to move
    (logical counts, as ``exchange_stats()`` counts them)."""
    m = peers_served(n, r, capacity)
    rows_out = r * (n - 1) / n
    status = STATUS_BYTES * (n - 1)
    out = {"allgathers": 1.0, "bytes_sent": status + rows_out * sample_bytes,
           "bytes_received": status + rows_out * sample_bytes}
    if protocol == "dense":
        out.update(alltoalls=float(fields), collectives=1.0 + fields,
                   messages_sent=(n - 1) + fields * m)
    else:
        out.update(alltoalls=0.0, collectives=1.0, messages_sent=(n - 1) + m)
    return out


def latency_terms(protocol: str, n: int, r: int, fields: int) -> float:
    """Latencies on a round's critical path: the allgather's log2 N (recursive
    doubling), then one per peer per field (dense all-to-all), or one per
    message of the busiest process (sparse: at most its peers with rows)."""
    ag = math.ceil(math.log2(n)) if n > 1 else 0
    if protocol == "dense":
        return ag + fields * (n - 1)
    return ag + min(busiest_owner_rows(n, r), n - 1)


def round_time(protocol: str, n: int, r: int, sample_bytes: int, fields: int, alpha: float,
               beta: float, software: float = 0.0) -> dict:
    """Seconds of one round: ``software`` (per-round cost of the library's
    own work, measured) + latency terms x ``alpha`` + bytes on the busiest
    link / ``beta`` (the status rows of every peer, the busiest owner's rows)."""
    lat = latency_terms(protocol, n, r, fields) * alpha
    status = STATUS_BYTES * (n - 1) / beta
    rows = busiest_owner_rows(n, r) * sample_bytes / beta
    return {"latency": lat, "status": status, "rows": rows, "software": software,
            "network": lat + status + rows, "total": software + lat + status + rows}


# ------------------------------------------------------------------ calibration
def fit_line(xs, ys):
    """Least squares ``y = c0 + a x``; returns (c0, a)."""
    n = len(xs)
    if n == 1:
        return ys[0], 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - a * mx, a


def measured_protocol(summary) -> str:
    """``dense`` when the measured rounds run all-to-alls, else ``sparse``."""
    a2a = [f["per_step"].get("alltoalls", {}).get("mean", 0.0) for f in summary]
    return "dense" if any(a > 0.5 for a in a2a) else "sparse"


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def part_counts(data) -> str:
    s = data["settings"]
    r, cap = s["representatives"], s["capacity"]
    sb, fields = data["sample_bytes"], data.get("fields", 2)
    protocol = measured_protocol(data["summary"])
    rows = []
    for f in data["summary"]:
        n, ps = f["processes"], f["per_step"]
        d = counts("dense", n, r, sb, fields, cap)
        sp = counts("sparse", n, r, sb, fields, cap)
        steps = f["counted_steps_per_process"]
        # the mean over processes and steps of bytes received = of bytes sent
        se = rows_from_others_sd(n, r, cap) * sb / math.sqrt(n * steps)
        rows.append([f"{f['launcher']} {n}",
                     f"{ps['messages_sent']['mean']:.2f}", f"{d['messages_sent']:.2f}",
                     f"{sp['messages_sent']:.2f}",
                     f"{ps['bytes_sent']['mean']:,.0f} ({ps['bytes_sent']['min']:,.0f}-"
                     f"{ps['bytes_sent']['max']:,.0f})",
                     f"{d['bytes_sent']:,.0f} ± {2 * se:,.0f}",
                     f"{ps['collectives']['mean']:.2f}", f"{d['collectives']:.0f}",
                     f"{sp['collectives']:.0f}", f"{ps['rounds']['mean']:.3f}"])
    head = ("measured protocol: " + protocol + f" (r = {r}, {sb} bytes per sample in "
            f"{fields} fields, shards of {cap} rows, "
            f"{data['summary'][0]['counted_steps_per_process']} counted steps per process)")
    return head + "\n\n" + md_table(
        ["launch N", "messages: measured", "dense model", "sparse model",
         "bytes sent: measured, mean (range over processes)", "model (both) ± 2 SE",
         "collectives: measured", "dense", "sparse", "rounds"], rows)


def part_times(data) -> tuple[str, dict]:
    s = data["settings"]
    r, fields = s["representatives"], data.get("fields", 2)
    protocol = measured_protocol(data["summary"])
    out, fits = [], {}
    for launcher in dict.fromkeys(f["launcher"] for f in data["summary"]):
        pts = [f for f in data["summary"] if f["launcher"] == launcher]
        xs = [latency_terms(protocol, f["processes"], r, fields) for f in pts]
        ys = [f["tight_round_ms"]["median"] - f["mix_ms_local_tight"]["median"] for f in pts]
        c0, a = fit_line(xs, ys)
        fits[launcher] = {"c0_ms": c0, "a_ms": a}
        rows = []
        for f, x, y in zip(pts, xs, ys):
            pred = c0 + a * x
            exposed_model = max(0.0, y - s["compute_ms"])
            rt = f["tight_round_ms"]
            rows.append([f["processes"], f"{x:g}",
                         f"{y:.2f} ({rt['min'] - f['mix_ms_local_tight']['median']:.2f}-"
                         f"{rt['max'] - f['mix_ms_local_tight']['median']:.2f})",
                         f"{pred:.2f}", f"{(y - pred) / pred * 100 if pred else 0:+.0f} %",
                         f"{f['exposed_wait_ms']:.3f}", f"{exposed_model:.2f}",
                         f"{f['step_ratio']['median']:.3f} ({f['step_ratio']['min']:.3f}-"
                         f"{f['step_ratio']['max']:.3f})"])
        out.append(f"{launcher}: round = {c0:.2f} ms + {a * 1e3:.1f} us x L(N) "
                   f"(L: latency terms of the {protocol} protocol)\n\n" + md_table(
                       ["N", "L(N)", "tight-loop round, ms (range)", "fit, ms", "residual",
                        f"exposed wait in a {s['compute_ms']:g} ms step, ms",
                        "model: max(0, round - step)", "step time global/local (range)"],
                       rows))
    return "\n\n".join(out), fits


def part_scale(step_ms: float, software_ms: float, per_peer_us: float, b: int, r: int, shape,
               counts_at) -> str:
    sb = int(math.prod(shape)) + 8
    fields = 2
    rows = []
    for name, alpha, beta in NETWORKS:
        for n in counts_at:
            for protocol in ("dense", "sparse"):
                software = software_ms / 1e3 + per_peer_us * 1e-6 * n
                t = round_time(protocol, n, r, sb, fields, alpha, beta, software)
                c = counts(protocol, n, r, sb, fields)
                net_ms, tot_ms = t["network"] * 1e3, t["total"] * 1e3
                exposed = max(0.0, tot_ms - step_ms)
                ideal = r * sb + STATUS_BYTES * (n - 1)
                row_msgs = c["messages_sent"] - (n - 1)
                rows.append([name, n, protocol, f"{row_msgs:.1f}",
                             f"{latency_terms(protocol, n, r, fields):g}",
                             f"{c['bytes_sent'] / 1e6:.3f}",
                             f"{c['bytes_sent'] / ideal:.3f}",
                             f"{t['latency'] * 1e3:.3f}", f"{(t['status'] + t['rows']) * 1e3:.3f}",
                             f"{net_ms:.3f}", f"{software * 1e3:.2f}",
                             f"{net_ms / step_ms * 100:.2f} %",
                             f"{tot_ms / step_ms * 100:.2f} %",
                             f"{exposed / step_ms * 100:.2f} %"])
    head = (f"b = {b}, r = {r}, samples {'x'.join(map(str, shape))} uint8 + int64 label "
            f"({sb:,} bytes, 2 fields), step {step_ms:g} ms, per-round software cost "
            f"{software_ms:.2f} ms + {per_peer_us:g} us per process of the job")
    return head + "\n\n" + md_table(
        ["network", "N", "protocol", "row messages/step", "latency terms L(N)",
         "MB sent/step",
         "bytes / (r x sample + status)", "latency ms", "transfer ms", "network ms",
         "software ms", "of the step (network only)", "of the step (+ software)",
         "exposed with overlap"], rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", default="outputs/bench_scaling.json",
                   help="bench_scaling.py's output")
    p.add_argument("--no-measurements", action="store_true",
                   help="only part 3 (no JSON needed)")
    p.add_argument("--step-ms", type=float, default=100.0, help="training step of part 3")
    p.add_argument("--software-ms", type=float, default=None,
                   help="part 3: fixed software cost per round (default: the measured tight-loop "
                        "round at 2 processes, the faster launcher's; else 1 ms)")
    p.add_argument("--per-peer-us", type=float, default=0.13,
                   help="part 3: software cost per round and process of the job (every "
                        "process's draws, vectorised: measured by pipelines/bench_draws.py, "
                        "0.13 us at 1,024 processes in series D; the former one generator per "
                        "process cost 17 us)")
    p.add_argument("--batch-size", "-b", type=int, default=56)
    p.add_argument("--representatives", "-r", type=int, default=7)
    p.add_argument("--sample-shape", default="224,224,3")
    p.add_argument("--processes", default="128,1024", help="N of part 3")
    args = p.parse_args(argv)
    print(f"command: python pipelines/scaling_model.py {' '.join(shlex.quote(a) for a in argv)}")
    software = args.software_ms
    if not args.no_measurements:
        data = json.loads(pathlib.Path(args.json).read_text())
        print(f"measurements: {args.json} ({data['command']}; {data['date']}, load average "
              f"before {data['load_before']}, after {data['load_after']})\n")
        print("## 1. Counts per step and process\n")
        print(part_counts(data))
        print("\n## 2. Times on this machine\n")
        text, fits = part_times(data)
        print(text)
        two = [f["tight_round_ms"]["median"] - f["mix_ms_local_tight"]["median"]
               for f in data["summary"] if f["processes"] == 2]
        if software is None and two:
            # the round at 2 processes (not oversubscribed on 2 cores), the
            # faster transport: what one round costs beyond the network here
            software = max(0.0, min(two))
    if software is None:
        software = 1.0
    print("\n## 3. At scale\n")
    shape = tuple(int(x) for x in args.sample_shape.split(","))
    print(part_scale(args.step_ms, software, args.per_peer_us, args.batch_size, args.representatives, shape,
                     [int(n) for n in args.processes.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
