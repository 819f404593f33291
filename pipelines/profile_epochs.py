#!/usr/bin/env python
"""Epoch starts and fresh samples/s in a decode-heavy training loop with short epochs.

A real training loop (a tiny PyTorch model, one optimizer step per batch) over
``--images`` photographs (JPEGs 256x320 by default, from scikit-image, see
:func:`dali_rehearsal.datasets.photo_jpegs`), ``--epochs`` short epochs per
segment, two variants interleaved (the order rotates every repetition):

``plain``      the user's pipeline alone, batch ``b``: ``fn.readers.file`` -> decode ->
               resize -> ``crop_mirror_normalize`` (random crop and mirror), consumed by
               ``DALIGenericIterator(reader_name="Reader", auto_reset=True)``.
``rehearsal``  the same work in the stage's two pipelines: the source pipeline (batch
               ``b``) reads, decodes and resizes, the mixing pipeline (batch ``b + r``)
               runs ``dr.fn.rehearsal`` then ``crop_mirror_normalize``, consumed by
               ``DALIGenericIterator(auto_reset=True)``; one buffer for all segments.

Both loops are ``for epoch ...: for data in iterator: train(data)``. Figures:

- **epoch start**: from the end of an epoch's last training step to the arrival of
  the next epoch's first batch (the iterator's ``StopIteration``, its reset, the
  first batch), median over all epoch starts but each segment's first;
- **fresh samples/s**: fresh samples trained on per second of the whole loop,
  epoch starts included (the rehearsal variant also trains on ``r``
  representatives a step, which the figure does not count);
- the ratios rehearsal / plain of both, per repetition, median and range.

Threads: ``--threads T`` DALI threads in all for each variant (default: the
CPUs of this machine). The plain pipeline gets ``T``; the stage's pipelines
share ``T``: the source pipeline (decoding, the heavy part) gets ``T`` and the
mixing pipeline (the crop and normalisation of ``b + r`` rows)
``--mixing-threads`` (default 1) of them: the two pipelines run one after the
other on each batch's rows, so that their threads are seldom busy at once.
PyTorch gets ``--torch-threads`` (default: the CPUs).

Example::

    python pipelines/profile_epochs.py                   # about 2 min on 2 idle cores
    python pipelines/profile_epochs.py --repeats 3 --epochs 3 --images 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
if (_HERE.parent / "dali_rehearsal" / "__init__.py").is_file():
    sys.path.insert(0, str(_HERE.parent))
import dali_rehearsal as dr  # noqa: E402
sys.path.insert(0, str(_HERE))
import _bench  # noqa: E402

NEEDS = ("nvidia.dali", "torch", "skimage", "PIL")
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
VARIANTS = ("plain", "rehearsal")

log = logging.getLogger("profile_epochs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_bench.HelpFormatter)
    p.add_argument("--batch-size", "-b", type=int, default=56, help="fresh samples per step (b)")
    p.add_argument("--representatives", "-r", type=int, default=7,
                   help="representatives per step (r)")
    p.add_argument("--image-size", type=int, default=224, help="crop size fed to the model")
    p.add_argument("--resize-size", type=int, default=256, help="decode + resize size")
    p.add_argument("--images", type=int, default=1024, help="JPEGs (256x320) in the data set")
    p.add_argument("--epochs", type=int, default=4, help="epochs per segment")
    p.add_argument("--repeats", type=int, default=5,
                   help="repetitions: segments per variant, interleaved")
    p.add_argument("--threads", type=int, default=None,
                   help="DALI threads of each variant in all (default: the CPUs)")
    p.add_argument("--mixing-threads", type=int, default=1,
                   help="of --threads, those of the stage's mixing pipeline")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch CPU threads (default: the CPUs)")
    p.add_argument("--mixing-prefetch", type=int, default=2,
                   help="prefetch_queue_depth of the stage's mixing pipeline (the plain "
                        "pipeline and the source keep DALI's default, 2)")
    p.add_argument("--prepare-ahead", type=int, default=2,
                   help="dr.fn.rehearsal(prepare_ahead=...)")
    p.add_argument("--continuous", action="store_true",
                   help="the stage with continuous_epochs=True (static batches, DROP; the "
                        "iterator counts the epoch with size=dr.epoch_size(pipe)); the plain "
                        "pipeline with DROP too")
    p.add_argument("--breakdown", action="store_true",
                   help="also print dali_rehearsal.profiling's per-step breakdown of each "
                        "variant (all segments together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None,
                   help="folder of JPEGs in class subfolders instead of the generated ones")
    p.add_argument("--out", default=None,
                   help="JSON output (default: outputs/profile_epochs.json; options given "
                        "other values add to the name)")
    args = p.parse_args(argv)
    args.run_name = _bench.run_name(p, args)
    for name in ("batch_size", "epochs", "repeats", "images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def build(args, root):
    """(plain pipeline factory, (source, mixing) factories)."""
    from nvidia.dali import fn, pipeline_def, types

    crop = (args.image_size, args.image_size)

    def read_decode_resize():
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=True, name="Reader",
                                        seed=args.seed)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return fn.resize(images, size=(args.resize_size, args.resize_size)), labels

    def augment(images):
        return fn.crop_mirror_normalize(images, crop=crop, mirror=fn.random.coin_flip(),
                                        crop_pos_x=fn.random.uniform(range=(0, 1)),
                                        crop_pos_y=fn.random.uniform(range=(0, 1)),
                                        dtype=types.FLOAT, output_layout="CHW",
                                        mean=MEAN, std=STD)

    total = args.threads
    mixing_threads = max(1, min(args.mixing_threads, total))

    @pipeline_def(batch_size=args.batch_size, num_threads=total, device_id=None,
                  seed=args.seed + 1)
    def plain():
        images, labels = read_decode_resize()
        return augment(images), labels

    @pipeline_def(batch_size=args.batch_size, num_threads=total, device_id=None,
                  seed=args.seed + 1)
    def source():
        return read_decode_resize()

    @pipeline_def(batch_size=args.batch_size + args.representatives,
                  num_threads=mixing_threads, device_id=None, seed=args.seed + 2,
                  prefetch_queue_depth=args.mixing_prefetch)
    def mixing(src, buffer):
        images, labels = dr.fn.rehearsal(src, buffer=buffer, reader_name="Reader",
                                          prepare_ahead=args.prepare_ahead,
                                          static_batch=args.continuous,
                                          last_batch_policy="DROP" if args.continuous
                                          else "PARTIAL",
                                          continuous_epochs=args.continuous)
        return augment(images), labels

    return plain, source, mixing


def tiny_model(seed: int):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    return nn.Sequential(nn.AvgPool2d(8), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10))


def segment(it, model, opt, epochs: int, fresh_of) -> dict:
    """``epochs`` epochs of the training loop; epoch starts and fresh samples."""
    import torch.nn.functional as F
    from dali_rehearsal import profiling

    starts, fresh, steps = [], 0, 0
    t0 = last = time.perf_counter()
    for epoch in range(epochs):
        first = True
        for data in profiling.iterate(it):
            if first:
                starts.append(time.perf_counter() - last)
                first = False
            x, y = data[0]["images"], data[0]["labels"].reshape(-1).long() % 10
            with profiling.phase("train"):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            fresh += fresh_of(x)
            steps += 1
            last = time.perf_counter()
    return {"seconds": last - t0, "fresh": fresh, "steps": steps,
            "epoch_starts_s": starts[1:]}      # the first: the segment's, not an epoch's


def main(argv=None) -> dict:
    args = parse_args(argv)
    _bench.require("profile_epochs.py", NEEDS)
    import torch
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    from dali_rehearsal import profiling

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads is None:
        args.threads = cpus()
    torch.set_num_threads(args.torch_threads or cpus())
    root = pathlib.Path(args.data_root) if args.data_root else \
        dr.datasets.photo_jpegs(count=args.images, size=(256, 320))
    plain, source, mixing = build(args, root)
    b = args.batch_size
    buffer = dr.RehearsalBuffer(capacity=max(args.representatives, args.images * 3 // 10),
                                num_representatives=args.representatives, policy="reservoir",
                                device="cpu", seed=args.seed)
    policy = LastBatchPolicy.DROP if args.continuous else LastBatchPolicy.PARTIAL
    mixing_pipe = mixing(source(), buffer)
    iters = {
        "plain": DALIGenericIterator(plain(), ["images", "labels"], reader_name="Reader",
                                     last_batch_policy=policy, auto_reset=True),
        # continuous epochs: the iterator counts the epoch (the stage does not end it)
        "rehearsal": DALIGenericIterator(mixing_pipe, ["images", "labels"], auto_reset=True,
                                         **({"size": dr.epoch_size(mixing_pipe)}
                                            if args.continuous else {})),
    }
    fresh_of = {"plain": lambda x: x.shape[0],
                "rehearsal": lambda x: min(x.shape[0], b)}   # the fresh rows come first
    models = {v: tiny_model(args.seed) for v in VARIANTS}
    opts = {v: torch.optim.SGD(models[v].parameters(), lr=0.01) for v in VARIANTS}
    # warm-up: one epoch each (pipelines' first runs, PyTorch's first calls)
    for v in VARIANTS:
        segment(iters[v], models[v], opts[v], 1, fresh_of[v])
    runs = {v: [] for v in VARIANTS}
    breakdown = {}
    for k in range(args.repeats):
        for v in (VARIANTS if k % 2 == 0 else VARIANTS[::-1]):
            if args.breakdown:
                profiling.enable()
            runs[v].append(segment(iters[v], models[v], opts[v], args.epochs, fresh_of[v]))
            if args.breakdown:
                profiling.disable()
                rep = profiling.report()
                acc = breakdown.setdefault(v, [])
                acc.append(rep)
    buffer.close()

    def med(x):
        return statistics.median(x) if x else float("nan")
    fig = {"command": "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + sys.argv[1:])
           if sys.argv and sys.argv[0].endswith(".py") else "profile_epochs.main(...)",
           "settings": {k: v for k, v in vars(args).items()},
           "threads": {"plain": args.threads,
                       "rehearsal": {"source": args.threads,
                                     "mixing": max(1, min(args.mixing_threads, args.threads))},
                       "torch": torch.get_num_threads()},
           "variants": {}, "environment": _bench.environment("cpu")}
    for v in VARIANTS:
        fig["variants"][v] = {
            "epoch_start_ms": [1e3 * med(r["epoch_starts_s"]) for r in runs[v]],
            "fresh_per_s": [r["fresh"] / r["seconds"] for r in runs[v]]}
    start_ratio = [a / b_ for a, b_ in zip(fig["variants"]["rehearsal"]["epoch_start_ms"],
                                           fig["variants"]["plain"]["epoch_start_ms"])]
    speed_ratio = [a / b_ for a, b_ in zip(fig["variants"]["rehearsal"]["fresh_per_s"],
                                           fig["variants"]["plain"]["fresh_per_s"])]
    fig["epoch_start_ratio"] = start_ratio
    fig["fresh_per_s_ratio"] = speed_ratio
    print(f"decode-heavy loop: {args.images} JPEGs, b={b}, r={args.representatives}, "
          f"{args.image_size} crops, {args.epochs} epochs x {args.repeats} interleaved "
          f"segments; DALI threads: plain {args.threads}, rehearsal source {args.threads} + "
          f"mixing {fig['threads']['rehearsal']['mixing']}; torch {torch.get_num_threads()}")
    for v in VARIANTS:
        f = fig["variants"][v]
        print(f"  {v:<10} epoch start median {med(f['epoch_start_ms']):7.1f} ms   "
              f"fresh samples/s median {med(f['fresh_per_s']):7.1f}")
    print(f"  rehearsal / plain: epoch start {med(start_ratio):.2f}x "
          f"(range {min(start_ratio):.2f}-{max(start_ratio):.2f}), fresh samples/s "
          f"{med(speed_ratio):.3f}x (range {min(speed_ratio):.3f}-{max(speed_ratio):.3f})")
    print(f"  command: {fig['command']}")
    if args.breakdown:
        for v, reps in breakdown.items():
            merged = profiling.merge(reps)
            fig.setdefault("breakdown", {})[v] = merged
            print(f"{v}: " + profiling.format_report(merged))
    out = pathlib.Path(args.out) if args.out else pathlib.Path(
        _bench.default_out("profile_epochs", args.run_name, 1, None))
    json_path = out if out.suffix == ".json" else out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _bench.write_json(json_path, fig)
    print(f"wrote {json_path}")
    return fig


if __name__ == "__main__":
    main()
