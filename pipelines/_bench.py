"""Shared helpers of the profiling scripts in ``pipelines/``.

Environment capture (library versions, CPU model, GPU), launcher detection
(``mpiexec`` or ``torchrun``, without importing mpi4py or initialising
torch.distributed in a plain run), timing statistics, the printed table, JSON
output, a bar chart, the help formatter, the names of a run's output files
(:func:`run_name`, :func:`default_out`) and the check that the packages a
script needs are installed (:func:`require`). Nothing here depends on DALI.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import re
import socket
import sys

import numpy as np

__all__ = ["environment", "cpu_model", "mpi_world", "launched_world", "torch_from_mpi", "stats",
           "table", "write_json", "bar_chart", "parse_hw", "out_paths", "gpu_name", "finish_world",
           "HelpFormatter", "require", "run_name", "default_out", "replacing"]

#: The extra that installs what the scripts of pipelines/ import.
EXAMPLES = 'pip install "dali-rehearsal[examples]"'
#: Where each module a script may need comes from.
_PACKAGES = {"nvidia.dali": "nvidia-dali-cuda120 (or nvidia-dali-cuda130)", "torch": "torch",
             "tqdm": "tqdm", "matplotlib": "matplotlib", "mlxtend": "mlxtend",
             "skimage": "scikit-image", "PIL": "pillow", "mpi4py": "mpi4py"}


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(script: str, modules) -> None:
    """Exits with the command that installs them when modules ``script``
    needs are missing (a bare ``No module named ...`` says neither)."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        names = ", ".join(f"{m} ({_PACKAGES.get(m, m)})" for m in missing)
        raise SystemExit(f"{script} needs {names}, not installed: {EXAMPLES} installs what "
                         "every script in pipelines/ needs")


def run_name(parser: argparse.ArgumentParser, args: argparse.Namespace,
             ignore=("out", "no_progress", "help")) -> str:
    """The options given with a value other than their default, as a file
    name suffix (``"-seed=1-representatives=16"``; ``""`` for a run with the
    defaults): runs with other settings write other files. Call it on what
    ``parse_args`` returned, before any default is filled in."""
    parts = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ignore:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len).lstrip("-")
        if value is True and action.nargs == 0:
            parts.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            value = "x".join(map(str, value))
        value = re.sub(r"[^A-Za-z0-9.,+_-]+", "_", str(value)).strip("_")[:40]
        parts.append(f"{flag}={value}")
    name = "".join(f"-{p}" for p in parts)
    if len(name) > 100:    # many options: a digest (results.json holds the settings)
        name = "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def default_out(script: str, name: str, world: int, launcher: str | None,
                suffix: str = ".json") -> str:
    """``outputs/SCRIPT[-settings][-Nproc-LAUNCHER]SUFFIX``: runs with other
    settings, launchers or process counts never write the same files; a
    run with the same ones replaces them (and says so: :func:`replacing`)."""
    launch = f"-{world}proc-{launcher or 'launcher'}" if world > 1 else ""
    return f"outputs/{script}{name}{launch}{suffix}"


def replacing(*paths, same_settings: bool = True) -> str:
    """What to add to the line that names the files written: that they
    replace an earlier run's, when one of ``paths`` exists already."""
    if not any(pathlib.Path(p).exists() for p in paths):
        return ""
    return (" (replacing those of an earlier run with the same settings)" if same_settings
            else " (replacing an earlier run's files there)")

_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE",
                  "SLURM_NTASKS_PER_JOB_STEP")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform says)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """Name of CUDA device 0 as CuPy sees it, or None without a GPU."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return None


def environment(device: str | None = None) -> dict:
    """Versions, machine and date, for the JSON of every script."""
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": gpu_name(),
        "versions": {name: _version(mod) for name, mod in (
            ("dali", "nvidia.dali"), ("numpy", "numpy"), ("torch", "torch"), ("cupy", "cupy"),
            ("mpi4py", "mpi4py"), ("dali_rehearsal", "dali_rehearsal"))},
        "argv": [pathlib.Path(sys.argv[0]).name] + sys.argv[1:],
    }
    if device is not None:
        env["device"] = device
    return env


def mpi_world():
    """``MPI.COMM_WORLD`` when launched by ``mpiexec`` with more than one process,
    else None. mpi4py is imported (and MPI initialised) only in that case."""
    size = next((os.environ[v] for v in _MPI_SIZE_VARS if os.environ.get(v)), None)
    try:
        size = int(size) if size is not None else 1
    except ValueError:
        size = 1
    if size <= 1:
        return None
    require(f"{pathlib.Path(sys.argv[0]).name} under mpiexec", ["mpi4py"])
    from mpi4py import MPI
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def torchrun_world_size() -> int:
    """The number of processes torchrun (or torch.distributed's environment)
    started; 1 in any other run."""
    if not os.environ.get("MASTER_ADDR"):
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class TorchBench:
    """The MPI-like calls the scripts make for their own bookkeeping
    (``Barrier``, ``gather``, ``Allreduce``), over torch.distributed's default
    group: what a torchrun job has instead of an MPI communicator."""

    def __init__(self):
        import torch.distributed as dist
        self._dist = dist

    def Barrier(self) -> None:
        self._dist.barrier()

    def gather(self, obj, root: int = 0):
        out = [None] * self._dist.get_world_size() if self._dist.get_rank() == root else None
        self._dist.gather_object(obj, out, dst=root)
        return out

    def Allreduce(self, send, recv) -> None:
        import torch
        recv[...] = send
        self._dist.all_reduce(torch.from_numpy(recv))


def _init_torch(**kwargs) -> None:
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                **kwargs)


def torch_from_mpi(comm) -> None:
    """Initialises torch.distributed (gloo, plus NCCL with a GPU) over the
    ranks of an MPI job: rank 0 picks the address and port and broadcasts them."""
    address = None
    if comm.Get_rank() == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            address = (socket.gethostname(), sock.getsockname()[1])
    host, port = comm.bcast(address, root=0)
    _init_torch(init_method=f"tcp://{host}:{port}", rank=comm.Get_rank(),
                world_size=comm.Get_size())


def launched_world():
    """``(comm, bench)`` for this run. Under ``torchrun``: torch's default group
    (initialised here, gloo, plus NCCL with a GPU) and a :class:`TorchBench`;
    under ``mpiexec``: ``MPI.COMM_WORLD`` and a duplicate of it; a plain run:
    ``(None, None)``. ``comm`` is what a RehearsalBuffer takes; ``bench``
    carries the script's own barriers, gathers and all-reduces."""
    if torchrun_world_size() > 1:
        import torch.distributed as dist
        _init_torch()
        return dist.group.WORLD, TorchBench()
    comm = mpi_world()
    return comm, (comm.Dup() if comm is not None else None)


def finish_world() -> None:
    """Ends torch.distributed's default group (a torchrun job's, or the one
    :func:`torch_from_mpi` set up under mpiexec) on every rank, after a
    barrier (no rank leaves while another is still in a collective). Without
    it, gloo's worker threads are torn down with the interpreter and the
    process can die with SIGABRT ("terminate called without an active
    exception") after a run that succeeded. Nothing to do where torch's is
    not initialised."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stats(step_times, counts=None) -> dict:
    """Median / p95 / mean of step times (s) and, with per-step sample
    ``counts``, samples per second over the whole run (total / total time)."""
    t = np.asarray(step_times, dtype=np.float64)
    out = {"steps": int(t.size), "total_s": float(t.sum()),
           "median_step_ms": float(np.median(t) * 1e3) if t.size else float("nan"),
           "p95_step_ms": float(np.percentile(t, 95) * 1e3) if t.size else float("nan"),
           "mean_step_ms": float(t.mean() * 1e3) if t.size else float("nan")}
    if counts is not None:
        out["samples"] = int(np.sum(counts))
        out["samples_per_s"] = float(np.sum(counts) / t.sum()) if t.sum() > 0 else float("nan")
    return out


def table(rows: list[list], headers: list[str]) -> str:
    """A plain-text table (right-aligned numbers)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                     enumerate(zip(headers, widths)))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(row, widths))) for row in cells]
    return "\n".join([line, sep, *body])


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: pathlib.Path, obj: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default) + "\n")
    os.replace(tmp, path)


def out_paths(out: str) -> tuple[pathlib.Path, pathlib.Path]:
    """``--out`` is the JSON path; the plot goes next to it with ``.png``."""
    path = pathlib.Path(out)
    if path.suffix.lower() != ".json":
        path = path.with_suffix(".json") if path.suffix else path / "results.json"
    return path, path.with_suffix(".png")


def bar_chart(path: pathlib.Path, groups: list[str], series: dict[str, list[float]], *,
              errors: dict[str, list[tuple[float, float]]] | None = None, ylabel: str,
              title: str, annotate: bool = True, value_format: str | None = None,
              reference: float | None = None) -> None:
    """Grouped bar chart: one group per entry of ``groups``, one bar per series.
    ``errors[name][i]`` is (low, high) drawn as an error bar; each bar is
    labelled with its value (``value_format``, e.g. ``"{:.3f}"``); ``reference``
    draws a horizontal line (1 for ratios)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    x = np.arange(len(groups))
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups) + 2), 4.2))
    for i, (name, values) in enumerate(series.items()):
        pos = x - 0.4 + width * (i + 0.5)
        yerr = None
        if errors and name in errors:
            lo = [max(v - e[0], 0.0) for v, e in zip(values, errors[name])]
            hi = [max(e[1] - v, 0.0) for v, e in zip(values, errors[name])]
            yerr = [lo, hi]
        bars = ax.bar(pos, values, width, label=name, yerr=yerr, capsize=3)
        if annotate:
            tops = [max(v, e[1]) for v, e in zip(values, errors[name])] \
                if errors and name in errors else values
            for bar, v, top in zip(bars, values, tops):
                text = (value_format.format(v) if value_format is not None
                        else f"{v:,.0f}" if v >= 10 else f"{v:.2f}")
                ax.annotate(text,
                            (bar.get_x() + bar.get_width() / 2, top),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
    if reference is not None:
        ax.axhline(reference, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_hw(text: str) -> tuple[int, int]:
    """``"256x320"`` or ``"256"`` -> (height, width)."""
    parts = str(text).lower().replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"expected HxW, got {text!r}")
    h, w = (int(p) for p in parts)
    if h < 1 or w < 1:
        raise ValueError(f"sizes must be positive, got {text!r}")
    return h, w


def endless(iterator):
    """Batches of a DALI iterator across epochs (it has ``auto_reset=True``)."""
    while True:
        got = False
        for batch in iterator:
            got = True
            yield batch[0]
        if not got:
            raise RuntimeError("the iterator delivered an empty epoch")


def ranks(comm) -> tuple[int, int, int, int]:
    """``(rank, world, local_rank, local_size)`` under mpiexec (MPICH or Open
    MPI environment variables), torchrun (``comm`` a torch process group) or
    in a plain run (``comm`` None)."""
    if comm is None:
        rank, world = 0, 1
    elif hasattr(comm, "Get_rank"):
        rank, world = comm.Get_rank(), comm.Get_size()
    else:
        rank, world = comm.rank(), comm.size()

    def env(names, default):
        for name in names:
            if os.environ.get(name):
                return int(os.environ[name])
        return default
    local_size = env(("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"), world)
    local_rank = env(("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"), rank)
    return rank, world, local_rank, local_size


def threads_per_rank(local_size: int) -> int:
    """DALI threads per pipeline: this machine's CPUs shared by the local ranks."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(local_size, 1))


def select_gpu(local_rank: int) -> int:
    """Binds this rank to GPU ``local_rank % count`` (CuPy and, if present,
    PyTorch); returns the device id."""
    import cupy
    device_id = local_rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(device_id).use()
    try:
        import torch
        torch.cuda.set_device(device_id)
    except ImportError:
        pass
    return device_id


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help once, unless the help text
    already says what the default is (or there is none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings
                or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def photo_root(args, rank: int, bench_comm):
    """The benchmark's JPEG folder: ``--data-root``, or the cached photo set,
    generated once by rank 0 while the others wait."""
    if args.data_root:
        return pathlib.Path(args.data_root)
    from dali_rehearsal.datasets import photo_jpegs
    if rank == 0:
        photo_jpegs(count=args.images, size=args.jpeg_hw)
    if bench_comm is not None:
        bench_comm.Barrier()
    return photo_jpegs(count=args.images, size=args.jpeg_hw)


def without_options(argv, options) -> list[str]:
    """``argv`` without the ``options`` (each with its value: ``--opt v`` or
    ``--opt=v``): the arguments a launched child run gets."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out
