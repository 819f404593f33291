#!/usr/bin/env python
"""Input throughput: plain DALI vs DALI + ``dr.fn.rehearsal`` vs a PyTorch replay buffer.

Four variants read the same ImageNet-like JPEGs (real photographs, see
:func:`dali_rehearsal.datasets.photo_jpegs`) and deliver batches through
``DALIGenericIterator``, so the conversion to torch tensors counts for all:

``dali``
    The plain pipeline, batch ``b``: ``fn.readers.file(random_shuffle=True)`` ->
    ``fn.decoders.image`` -> ``fn.resize(size=(S, S))`` ->
    ``fn.crop_mirror_normalize(crop=(C, C), mirror=coin_flip, FLOAT, CHW)``.
``rehearsal``
    The same work split over the two pipelines of the rehearsal stage: the
    source pipeline (batch ``b``) reads, decodes and resizes; the mixing
    pipeline (batch ``b + r``) runs ``dr.fn.rehearsal(source, buffer=buffer)``
    and then ``crop_mirror_normalize`` (so representatives are augmented too).
``torch_replay``
    What users write today (Mammoth's ``Buffer``): the plain pipeline's batches
    mixed in the training loop with a preallocated ``torch.empty((capacity, C,
    H, W))`` float buffer on the same device, reservoir insertion by per-sample
    index assignment, ``torch.randperm`` sampling and ``torch.cat``.
``no_buffer`` (the reference)
    The rehearsal variant without buffer and stage: the same two pipelines
    (the same DALI threads), the mixing pipeline fed by an ``external_source``
    that hands over the source's ``b`` images followed by ``r`` of them again,
    then ``crop_mirror_normalize`` on all ``b + r``. Its epochs are those of
    (1) and (2) (``LastBatchPolicy.PARTIAL``: the shard once, the last batch
    shorter, the rest of that reader batch opening the next epoch), and like
    any ``external_source`` feed it ends an epoch with ``StopIteration``, after
    which DALI restarts the mixing pipeline's prefetching. It does what is
    inherent to mixing representatives into a DALI pipeline (``r`` more
    samples augmented per step, a second pipeline, epochs ended by the feed)
    and nothing else.

So the headline ratio splits in two, each measured in the same run:
``rehearsal / dali = (no_buffer / dali) x (rehearsal / no_buffer)``: the first
factor is the inherent part, the second what the buffer and the stage cost.

One definition of a ratio throughout: variants run in interleaved segments
(the order rotates every repetition, so that drift of a shared machine hits
all alike; every segment starts with ``--warmup`` uncounted steps, which also
drain the batches a variant prefetched while another one ran); a ratio is
taken between the fresh samples/s of two variants in each repetition, and
reported as the median and the range over repetitions. The pooled figure
(all measured steps of a variant together: samples / time) is printed beside
it, labelled ``pooled``.

Under ``mpiexec -n N`` or ``torchrun --nproc_per_node=N`` every process reads
its shard, the rehearsal buffer uses global sampling over the launcher's group
(``MPI.COMM_WORLD``, or torch.distributed's default group: ``--sampling``),
and the output has per-process and aggregate (summed) figures; rank 0 writes
the files. Progress bars are shown only on a terminal.

Example::

    python pipelines/profile_throughput.py                # about 2 min on 2 idle cores
    mpiexec -n 2 python pipelines/profile_throughput.py --steps 20
    torchrun --nproc_per_node=2 pipelines/profile_throughput.py --steps 20
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
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
NEEDS = ("nvidia.dali", "torch", "matplotlib", "tqdm", "skimage", "PIL")
VARIANTS = ("dali", "rehearsal", "torch_replay", "no_buffer")
LABELS = {"dali": "(1) DALI", "rehearsal": "(2) DALI + dr.fn.rehearsal",
          "torch_replay": "(3) DALI + PyTorch replay",
          "no_buffer": "(R) reference: (2) without buffer"}
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]

log = logging.getLogger("profile_throughput")


# --------------------------------------------------------------------------- pipelines
def _pipelines(args, root, device, device_id, rank, world):
    """Pipeline factories of the three variants (DALI imported here)."""
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "mixed" if device == "gpu" else "cpu"
    crop = (args.image_size, args.image_size)
    resize = (args.resize_size, args.resize_size)
    common = dict(num_threads=args.num_threads, device_id=device_id,
                  prefetch_queue_depth=args.prefetch)

    def read_decode_resize():
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=True, name="Reader",
                                        shard_id=rank, num_shards=world, seed=args.seed + rank)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, size=resize)
        return images, labels

    def augment(images):
        return fn.crop_mirror_normalize(images, crop=crop, mirror=fn.random.coin_flip(),
                                        dtype=types.FLOAT, output_layout="CHW",
                                        mean=MEAN, std=STD)

    @pipeline_def(batch_size=args.batch_size, seed=args.seed + 10 + rank, **common)
    def plain():
        images, labels = read_decode_resize()
        return augment(images), labels

    @pipeline_def(batch_size=args.batch_size, seed=args.seed + 20 + rank, **common)
    def source():
        return read_decode_resize()

    @pipeline_def(batch_size=args.batch_size + args.representatives,
                  seed=args.seed + 30 + rank, **common)
    def mixing(src, buffer):
        images, labels, flags = dr.fn.rehearsal(src, buffer=buffer, reader_name="Reader",
                                                replay_flag=True)
        return augment(images), labels, flags

    @pipeline_def(batch_size=args.batch_size + args.representatives,
                  seed=args.seed + 30 + rank, **common)
    def fed(callback):
        images, labels = fn.external_source(
            source=callback, num_outputs=2, batch=True, device=device,
            no_copy=device == "cpu", layout=["HWC", ""], dtype=[types.UINT8, types.INT32],
            ndim=[3, 1])
        return augment(images), labels

    return plain, source, mixing, fed


def no_buffer_feed(src, r: int, device: str, depth: int, epoch_samples: int):
    """The reference's ``external_source`` callback: runs the source pipeline
    ``src`` (batch b) and returns b of its images and labels followed by the
    first r of them again, as one b + r batch. Epochs of ``epoch_samples``
    samples as (1) and (2) have them (``PARTIAL``): the last batch of an epoch
    is shorter, the rest of that reader batch opens the next epoch, and the
    call after an epoch's last batch raises ``StopIteration``. On the CPU the
    batch is written into a ring of ``depth`` preallocated arrays that DALI
    reads in place (as the stage hands over its own ring); on the GPU it is a
    new CuPy array that DALI copies (as it copies the stage's)."""
    ring, turn = [], [0]
    pending = []                  # rows of the last reader batch not delivered yet
    left = [epoch_samples]        # samples still to deliver in this epoch

    def rows(n):
        """The next ``n`` rows of the reader's stream (host or device arrays)."""
        got, count = [], 0
        while count < n:
            if not pending:
                images, labels = src.run()
                images, labels = images.as_tensor(), labels.as_tensor()
                if device == "gpu":
                    import cupy
                    pending.append((cupy.asarray(images), cupy.asarray(np.asarray(labels))))
                else:
                    pending.append((np.asarray(images), np.asarray(labels)))
            x, y = pending.pop(0)
            take = min(n - count, len(x))
            got.append((x[:take], y[:take]))
            if take < len(x):
                pending.insert(0, (x[take:], y[take:]))
            count += take
        return got

    def feed():
        if left[0] == 0:
            left[0] = epoch_samples
            raise StopIteration
        b = src.max_batch_size
        n = min(b, left[0])
        left[0] -= n
        parts = rows(n)
        if device == "gpu":
            import cupy
            x = cupy.concatenate([p[0] for p in parts])
            y = cupy.concatenate([p[1] for p in parts])
            again = cupy.arange(r) % n           # the first r rows (fewer: repeated)
            return cupy.concatenate([x, x[again]]), cupy.concatenate([y, y[again]])
        if not ring:
            x0, y0 = parts[0]
            ring.extend((np.empty((b + r,) + x0.shape[1:], x0.dtype),
                         np.empty((b + r,) + y0.shape[1:], y0.dtype)) for _ in range(depth))
        out_x, out_y = ring[turn[0] % depth]
        turn[0] += 1
        at = 0
        for x, y in parts:
            out_x[at:at + len(x)], out_y[at:at + len(y)] = x, y
            at += len(x)
        again = np.arange(r) % n                 # the first r rows (fewer: repeated)
        out_x[n:n + r], out_y[n:n + r] = out_x[again], out_y[again]
        return out_x[:n + r], out_y[:n + r]

    return feed


def shard_samples(src, rank: int, world: int) -> int:
    """Samples of this process's shard per epoch, as DALI's iterator counts
    them with ``reader_name`` (no padding)."""
    total = int(src.reader_meta("Reader")["epoch_size"])
    return total * (rank + 1) // world - total * rank // world


class TorchReplay:
    """Mammoth-style replay buffer (``utils/buffer.py``): preallocated tensors on
    the training device, reservoir sampling with a per-sample loop, uniform
    sampling without replacement, ``torch.cat`` with the fresh batch."""

    def __init__(self, capacity: int, device, seed: int):
        import torch
        self.torch = torch
        self.capacity = capacity
        self.device = device
        self.num_seen = 0
        self.examples = None
        self.labels = None
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def _reservoir(self) -> int:
        if self.num_seen < self.capacity:
            return self.num_seen
        rand = int(self.rng.integers(0, self.num_seen + 1))
        return rand if rand < self.capacity else -1

    def add_data(self, examples, labels) -> None:
        if self.examples is None:
            self.examples = self.torch.empty((self.capacity, *examples.shape[1:]),
                                             dtype=examples.dtype, device=self.device)
            self.labels = self.torch.empty((self.capacity, *labels.shape[1:]),
                                           dtype=labels.dtype, device=self.device)
        for i in range(examples.shape[0]):
            index = self._reservoir()
            self.num_seen += 1
            if index >= 0:
                self.examples[index] = examples[i].to(self.device)
                self.labels[index] = labels[i].to(self.device)

    def get_data(self, size: int):
        n = min(self.num_seen, self.capacity)
        choice = self.torch.randperm(n, generator=self.gen)[:min(size, n)].to(self.device)
        return self.examples[choice], self.labels[choice]

    def is_empty(self) -> bool:
        return self.num_seen == 0


class Variant:
    """One variant: ``step()`` delivers one training batch and returns
    ``(fresh, delivered)`` sample counts."""

    def __init__(self, name, step, close=lambda: None):
        self.name, self.step, self.close = name, step, close


def build_variants(args, root, device, device_id, rank, world, comm):
    import torch
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    plain, source, mixing, fed = _pipelines(args, root, device, device_id, rank, world)
    tdev = torch.device(f"cuda:{device_id}") if device == "gpu" else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(tdev)) if device == "gpu" else (lambda: None)
    r = args.representatives
    variants = {}

    def plain_iter():
        pipe = plain()
        pipe.build()
        return _bench.endless(DALIGenericIterator(
            pipe, ["images", "labels"], reader_name="Reader",
            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True))

    # (1) plain DALI
    it1 = plain_iter()

    def step_plain():
        batch = next(it1)
        n = batch["images"].shape[0]
        sync()
        return n, n
    variants["dali"] = Variant("dali", step_plain)

    # (2) DALI + rehearsal stage
    kwargs = dict(capacity=args.capacity, num_representatives=r, policy=args.policy,
                  device=device, seed=args.seed)
    if comm is not None:
        kwargs.update(comm=comm, sampling=args.sampling)
    buffer = dr.RehearsalBuffer(**kwargs)
    mix_pipe = mixing(source(), buffer)
    mix_pipe.build()
    it2 = _bench.endless(DALIGenericIterator(mix_pipe, ["images", "labels", "flags"],
                                       auto_reset=True))

    def step_rehearsal():
        batch = next(it2)
        delivered = batch["images"].shape[0]
        fresh = int((batch["flags"] == 0).sum())
        sync()
        return fresh, delivered
    variants["rehearsal"] = Variant("rehearsal", step_rehearsal, buffer.close)

    # (3) DALI + PyTorch replay buffer in the training loop
    it3 = plain_iter()
    replay = TorchReplay(args.capacity, tdev, args.seed + rank)

    def step_torch():
        batch = next(it3)
        x, y = batch["images"], batch["labels"].to(tdev)
        if not replay.is_empty():
            bx, by = replay.get_data(r)
            inputs, labels = torch.cat([x, bx]), torch.cat([y, by])
        else:
            inputs, labels = x, y
        replay.add_data(x, y)
        sync()
        return x.shape[0], inputs.shape[0]
    variants["torch_replay"] = Variant("torch_replay", step_torch)

    # (R) the reference: the two pipelines of (2) without buffer and stage
    ref_source = source()
    ref_source.build()
    ref_pipe = fed(no_buffer_feed(ref_source, r, device, args.prefetch + 2,
                                  shard_samples(ref_source, rank, world)))
    ref_pipe.build()
    it4 = _bench.endless(DALIGenericIterator(ref_pipe, ["images", "labels"], auto_reset=True))

    def step_no_buffer():
        batch = next(it4)
        delivered = batch["images"].shape[0]
        sync()
        return delivered - r, delivered
    variants["no_buffer"] = Variant("no_buffer", step_no_buffer)
    return variants, buffer


# --------------------------------------------------------------------------- measurement
def run_segment(variant, warmup, steps, progress):
    for _ in range(warmup):
        variant.step()
        progress.update(1)
    times, fresh, delivered = [], [], []
    t_prev = time.perf_counter()
    for _ in range(steps):
        f, d = variant.step()
        t = time.perf_counter()
        times.append(t - t_prev)
        fresh.append(f)
        delivered.append(d)
        t_prev = t
        progress.update(1)
    return times, fresh, delivered


def summarize(per_rep: list[dict]) -> dict:
    """Figures of one variant from its segments (one per repetition)."""
    times = np.concatenate([s["times"] for s in per_rep])
    fresh = np.concatenate([s["fresh"] for s in per_rep])
    delivered = np.concatenate([s["delivered"] for s in per_rep])
    st = _bench.stats(times)
    return {
        "fresh_samples_per_s": float(fresh.sum() / times.sum()),
        "delivered_samples_per_s": float(delivered.sum() / times.sum()),
        "median_step_ms": st["median_step_ms"],
        "p95_step_ms": st["p95_step_ms"],
        "mean_step_ms": st["mean_step_ms"],
        "measured_steps": int(times.size),
        "fresh_samples": int(fresh.sum()),
        "delivered_samples": int(delivered.sum()),
        "per_repeat_fresh_samples_per_s": [float(np.sum(s["fresh"]) / np.sum(s["times"]))
                                           for s in per_rep],
        "per_repeat_delivered_samples_per_s": [
            float(np.sum(s["delivered"]) / np.sum(s["times"])) for s in per_rep],
    }


def ratio(num: dict, den: dict) -> dict:
    """The one ratio this script reports: fresh samples/s of ``num`` over
    ``den`` in each repetition (interleaved segments), as the median and the
    range over repetitions; ``pooled`` is the same quotient over all measured
    steps of each variant together (total fresh samples / total time)."""
    per = [a / b for a, b in zip(num["per_repeat_fresh_samples_per_s"],
                                 den["per_repeat_fresh_samples_per_s"])]
    return {"median": float(np.median(per)), "min": float(np.min(per)),
            "max": float(np.max(per)), "per_repeat": per,
            "pooled": num["fresh_samples_per_s"] / den["fresh_samples_per_s"]}


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}]"


def aggregate(per_rank: list[dict], raw: list[dict]) -> dict:
    """Aggregate figures over ranks: samples/s summed, step times pooled."""
    out = {}
    for v in VARIANTS:
        ranks = [p[v] for p in per_rank]
        times = np.concatenate([np.concatenate([s["times"] for s in r[v]]) for r in raw])
        st = _bench.stats(times)
        out[v] = {
            "fresh_samples_per_s": float(sum(p["fresh_samples_per_s"] for p in ranks)),
            "delivered_samples_per_s": float(sum(p["delivered_samples_per_s"] for p in ranks)),
            "median_step_ms": st["median_step_ms"], "p95_step_ms": st["p95_step_ms"],
            "mean_step_ms": st["mean_step_ms"],
            "measured_steps": int(sum(p["measured_steps"] for p in ranks)),
            "fresh_samples": int(sum(p["fresh_samples"] for p in ranks)),
            "delivered_samples": int(sum(p["delivered_samples"] for p in ranks)),
            "per_repeat_fresh_samples_per_s": [
                float(x) for x in np.sum([p["per_repeat_fresh_samples_per_s"] for p in ranks], 0)],
            "per_repeat_delivered_samples_per_s": [
                float(x) for x in np.sum([p["per_repeat_delivered_samples_per_s"]
                                          for p in ranks], 0)],
        }
    return out


# --------------------------------------------------------------------------- plot
#: (variant, its ratio to plain DALI) in the order of the plot
PLOTTED = (("dali", None), ("rehearsal", "rehearsal_vs_dali"), ("no_buffer", "no_buffer_vs_dali"),
           ("torch_replay", "torch_replay_vs_dali"))


def plot_spec(args, device: str, world: int, ratios: dict) -> dict:
    """What the plot shows (``_bench.bar_chart``'s arguments, kept in the
    JSON as ``plotted``): the figures the headline quotes, each variant's
    fresh samples/s over plain DALI's in the same repetition, the median as
    the bar and the range over the repetitions as the whisker (plain DALI is 1
    by definition)."""
    medians, ranges = [], []
    for _, key in PLOTTED:
        r = ratios[key] if key else {"median": 1.0, "min": 1.0, "max": 1.0}
        medians.append(r["median"])
        ranges.append([r["min"], r["max"]])
    rr, st = ratios["rehearsal_vs_dali"], ratios["rehearsal_vs_no_buffer"]
    name = "fresh samples/s over plain DALI's"
    return {
        "groups": [LABELS[v].replace(" + ", "\n+ ").replace(": ", ":\n") for v, _ in PLOTTED],
        "series": {name: medians}, "errors": {name: ranges}, "value_format": "{:.3f}",
        "reference": 1.0,
        "ylabel": "fresh samples/s / plain DALI's, same repetition\n"
                  f"bar: median, whisker: range over {args.repeats} repetitions",
        "title": f"b={args.batch_size}, r={args.representatives}, {device}, {world} "
                 f"process(es): rehearsal/plain = {rr['median']:.3f} "
                 f"[{rr['min']:.3f}..{rr['max']:.3f}], rehearsal/reference = "
                 f"{st['median']:.3f} (medians)"}


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=_bench.HelpFormatter)
    p.add_argument("--batch-size", "-b", type=int, default=56, help="fresh samples per step (b)")
    p.add_argument("--representatives", "-r", type=int, default=7,
                   help="representatives per step (r)")
    p.add_argument("--image-size", type=int, default=224,
                   help="crop size C fed to the model (crop_mirror_normalize)")
    p.add_argument("--resize-size", type=int, default=None,
                   help="decode + resize size S (default: round(C * 256 / 224), 256 for C=224)")
    p.add_argument("--jpeg-size", default=None,
                   help="size HxW of the generated JPEGs (default: S x round(1.25 S), "
                        "256x320 for S=256)")
    p.add_argument("--images", type=int, default=1024,
                   help="JPEGs in the generated data set (all processes together)")
    p.add_argument("--capacity", type=int, default=None,
                   help="buffer capacity per process (default: 30%% of the process's shard, "
                        "as in the reference system)")
    p.add_argument("--policy", default="reservoir", choices=sorted(dr.POLICIES),
                   help="insertion policy of the rehearsal buffer (the PyTorch baseline is "
                        "reservoir)")
    p.add_argument("--sampling", default="global", choices=("global", "local"),
                   help="where representatives come from when several processes run (under "
                        "mpiexec or torchrun): every process's buffer, or its own")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where decoding, augmentation and the buffers run (auto: the GPU if "
                        "CuPy and PyTorch see one, else the CPU)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="DALI worker threads per pipeline (default: CPUs / processes on this "
                        "machine)")
    p.add_argument("--prefetch", type=int, default=2, help="DALI prefetch_queue_depth")
    p.add_argument("--steps", type=int, default=20,
                   help="measured steps per segment (one variant, one repetition)")
    p.add_argument("--warmup", type=int, default=4,
                   help="uncounted steps at the start of every segment")
    p.add_argument("--repeats", type=int, default=9,
                   help="repetitions: segments per variant, interleaved (the order rotates)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the readers' shuffling, the augmentation and the buffers")
    p.add_argument("--data-root", default=None,
                   help="folder of JPEGs in class subfolders to read instead of the generated "
                        "ones (default: the photo_jpegs cache, under $DALI_REHEARSAL_CACHE)")
    p.add_argument("--out", default=None,
                   help="JSON output; the plot is written next to it as .png (default: "
                        "outputs/profile_throughput.json; options given other values add to "
                        "the name, e.g. -repeats=6, and N processes add -Nproc-mpiexec or "
                        "-Nproc-torchrun)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, also on a terminal (there is none off a terminal)")
    args = p.parse_args(argv)
    args.run_name = _bench.run_name(p, args)       # before any default is filled in
    if args.resize_size is None:
        args.resize_size = int(round(args.image_size * 256 / 224))
    if args.resize_size < args.image_size:
        p.error("--resize-size must be >= --image-size")
    if args.jpeg_size is None:
        args.jpeg_hw = (args.resize_size, int(round(args.resize_size * 1.25)))
    else:
        args.jpeg_hw = _bench.parse_hw(args.jpeg_size)
    for name in ("batch_size", "steps", "repeats", "images", "prefetch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.representatives < 0 or args.warmup < 0:
        p.error("--representatives and --warmup must be >= 0")
    return args


def resolve_device(choice: str) -> str:
    if choice == "auto":
        try:
            import torch
            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
        return "gpu" if dr.gpu_available() and cuda else "cpu"
    if choice == "gpu" and not dr.gpu_available():
        raise SystemExit("--device gpu: no CUDA device visible to CuPy")
    return choice


def main(argv=None) -> int:
    rc = run(argv)
    _bench.finish_world()
    return rc


def run(argv=None) -> int:
    args = parse_args(argv)
    _bench.require("profile_throughput.py", NEEDS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    comm, bench_comm = _bench.launched_world()      # mpiexec or torchrun; barriers, gathers
    rank, world, local_rank, local_size = _bench.ranks(comm)
    launcher = None if comm is None else ("mpiexec" if hasattr(comm, "Get_rank") else "torchrun")
    same_settings = args.out is None
    if args.out is None:
        args.out = _bench.default_out("profile_throughput", args.run_name, world, launcher)
    if args.num_threads is None:
        args.num_threads = _bench.threads_per_rank(local_size)
    device = resolve_device(args.device)
    device_id = _bench.select_gpu(local_rank) if device == "gpu" else None
    if args.capacity is None:
        args.capacity = max(args.representatives, 1, int(round(0.3 * args.images / world)))

    root = _bench.photo_root(args, rank, bench_comm)
    json_path, png_path = _bench.out_paths(args.out)

    from tqdm import tqdm
    variants, buffer = build_variants(args, root, device, device_id, rank, world, comm)
    total = args.repeats * len(VARIANTS) * (args.warmup + args.steps)
    # a bar only on a terminal: in a log file it would be thousands of lines
    progress = tqdm(total=total, desc=f"profile_throughput ({device}, {world} process"
                    f"{'es' if world > 1 else ''})", unit="step", file=sys.stderr,
                    disable=args.no_progress or rank != 0 or not sys.stderr.isatty(),
                    dynamic_ncols=True)
    raw = {v: [] for v in VARIANTS}
    t_start = time.perf_counter()
    try:
        for rep in range(args.repeats):
            k = rep % len(VARIANTS)
            order = VARIANTS[k:] + VARIANTS[:k]
            for name in order:
                if bench_comm is not None:
                    bench_comm.Barrier()
                progress.set_postfix_str(f"rep {rep + 1}/{args.repeats} {name}")
                times, fresh, delivered = run_segment(variants[name], args.warmup, args.steps,
                                                      progress)
                raw[name].append({"times": times, "fresh": fresh, "delivered": delivered})
    finally:
        progress.close()
    elapsed = time.perf_counter() - t_start
    buffer_state = {"size": buffer.size, "num_seen": buffer.num_seen,
                    "capacity": buffer.capacity, "nbytes": buffer.nbytes,
                    "sampling": buffer.sampling, "world_size": buffer.world_size}
    for v in variants.values():
        v.close()

    mine = {v: summarize(raw[v]) for v in VARIANTS}
    if bench_comm is not None:
        all_figs = bench_comm.gather(mine, root=0)
        all_raw = bench_comm.gather(raw, root=0)
        all_buffers = bench_comm.gather(buffer_state, root=0)
    else:
        all_figs, all_raw, all_buffers = [mine], [raw], [buffer_state]
    if rank != 0:
        return 0

    figures = aggregate(all_figs, all_raw) if world > 1 else mine
    ratios = {"rehearsal_vs_dali": ratio(figures["rehearsal"], figures["dali"]),
              "no_buffer_vs_dali": ratio(figures["no_buffer"], figures["dali"]),
              "rehearsal_vs_no_buffer": ratio(figures["rehearsal"], figures["no_buffer"]),
              "rehearsal_vs_torch_replay": ratio(figures["rehearsal"], figures["torch_replay"]),
              "torch_replay_vs_dali": ratio(figures["torch_replay"], figures["dali"])}
    rr = ratios["rehearsal_vs_dali"]
    headline = {
        "definition": "fresh samples/s of the first variant over the second's in each "
                      "repetition: median and range over the interleaved repetitions; "
                      "pooled: over all measured steps of each variant",
        "rehearsal_over_dali_fresh": rr["median"],
        "rehearsal_over_dali_fresh_range": [rr["min"], rr["max"]],
        "rehearsal_over_dali_fresh_pooled": rr["pooled"],
        # the inherent part: r more samples augmented per step, a second pipeline
        "no_buffer_over_dali_fresh": ratios["no_buffer_vs_dali"]["median"],
        # what the buffer and the stage cost beyond it
        "rehearsal_over_no_buffer_fresh": ratios["rehearsal_vs_no_buffer"]["median"],
        "rehearsal_over_torch_replay_fresh": ratios["rehearsal_vs_torch_replay"]["median"],
        "target_rehearsal_over_dali_min": 0.95,
        "meets_cost_target": rr["median"] >= 0.95,
        "beats_torch_replay": ratios["rehearsal_vs_torch_replay"]["median"] > 1.0,
    }
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    settings.update(data_root=str(root), world_size=world, device=device, launcher=launcher,
                    images_per_rank=args.images // world)
    result = {
        "script": "profile_throughput",
        "environment": _bench.environment(device),
        "settings": settings,
        "variants": figures,
        "ratios": ratios,
        "headline": headline,
        "buffer": all_buffers,
        "elapsed_s": elapsed,
        "plot": str(png_path),
        "plotted": plot_spec(args, device, world, ratios),
    }
    if world > 1:
        result["per_rank"] = all_figs
    replaced = _bench.replacing(json_path, png_path, same_settings=same_settings)
    _bench.write_json(json_path, result)

    def row(label, figs, v):
        f = figs[v]
        vs = "1 (reference)" if v == "dali" else fmt_ratio(ratio(f, figs["dali"]))
        return [label, f["fresh_samples_per_s"], f["delivered_samples_per_s"],
                f["median_step_ms"], f["p95_step_ms"], vs]

    shown = ("dali", "rehearsal", "no_buffer", "torch_replay")
    rows = [row(LABELS[v], figures, v) for v in shown]
    if world > 1:
        for i, figs in enumerate(all_figs):
            rows.extend(row(f"  rank {i}: {v}", figs, v) for v in shown)
    print(f"\n{world} process(es){'' if launcher is None else f' ({launcher})'}, device={device}, "
          f"b={args.batch_size}, r={args.representatives}, JPEG {args.jpeg_hw[0]}x"
          f"{args.jpeg_hw[1]} -> resize {args.resize_size} -> crop {args.image_size}, capacity "
          f"{args.capacity}/process, {args.repeats} repetitions x {args.steps} steps "
          f"(+{args.warmup} warm-up) per variant, {args.num_threads} DALI threads per pipeline"
          f"{'' if world == 1 else ', aggregate = sum over processes'}")
    print(_bench.table(rows, ["variant", "fresh/s (pooled)", "delivered/s (pooled)",
                              "median ms", "p95 ms", "fresh/s vs (1): median [range]"]))
    print(f"fresh/s, delivered/s: all measured steps of a variant pooled. A ratio: the fresh "
          f"samples/s of two variants in each of the {args.repeats} interleaved repetitions, "
          f"median [min..max]; pooled: the same over all steps.")
    nb, st = ratios["no_buffer_vs_dali"], ratios["rehearsal_vs_no_buffer"]
    rt = ratios["rehearsal_vs_torch_replay"]
    print(f"headline: rehearsal / plain DALI, fresh samples/s = {fmt_ratio(rr)} (pooled "
          f"{rr['pooled']:.3f}; target >= 0.95)\n"
          f"  inherent part, reference / plain DALI = {fmt_ratio(nb)} (pooled "
          f"{nb['pooled']:.3f}): {args.representatives} more samples augmented per step, a "
          f"second pipeline and its epoch ends, no buffer\n"
          f"  buffer and stage, rehearsal / reference = {fmt_ratio(st)} (pooled "
          f"{st['pooled']:.3f})\n"
          f"rehearsal / PyTorch replay, fresh samples/s = {fmt_ratio(rt)} (pooled "
          f"{rt['pooled']:.3f})")

    _bench.bar_chart(png_path, **result["plotted"])
    print(f"wrote {json_path} and {png_path}{replaced}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
