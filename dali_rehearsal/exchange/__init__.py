"""Where representatives come from, and the exchange between processes.

The factories (this module) pick what the buffer's settings ask for:
:func:`make_sampler` (local or global sampling), :func:`make_transport`
(mpi4py or torch.distributed), :func:`open_channel` (the channel of a
collective ``save()``/``load()``), and :func:`world_of`. Below them, each
module one idea, imports pointing downward only:

- :mod:`.local`: :class:`LocalSampler`, draws from this process's shard;
- :mod:`.rounds`: :class:`GlobalSampler`, the round state machine (shared
  draws, rounds, lockstep epoch ends, failure rounds, timeouts) and its
  progress thread, written once against the transport interface;
- :mod:`.status`: the status table that opens every exchange, and the
  agreement checks; :mod:`.messages`: the text of every error it raises;
  :mod:`.protocol`: the status row's columns and kinds, the shared draws;
- :mod:`.staging`: moving a round's rows (gather, pack, transfer, unpack;
  GPU rows through device or pinned host memory);
- :mod:`.collective`: the buffer's other collective calls (``save``,
  ``load``): tagged exchanges that fail together;
- :mod:`.transport`: the :class:`Transport` interface, written once over a
  few primitives, implemented by :mod:`.mpi` (``comm=MPI.COMM_WORLD``) and
  :mod:`.torch` (``comm=torch.distributed.group.WORLD``: gloo, or NCCL for
  GPU storage);
- :mod:`.launch`: what the launcher's environment says about the job;
- :mod:`.errors`: :class:`RemoteError`, :class:`MismatchError` and
  :class:`CollectiveMismatchError`.

The types a sampler shares with the step (:class:`StoreView`,
:class:`Representatives`) live in the leaf module
:mod:`dali_rehearsal.representatives`.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..representatives import StoreView
from .alone import AloneTransport
from .collective import Channel
from .errors import CollectiveMismatchError, MismatchError, RemoteError
from .launch import check_world, warn_unshared
from .local import LocalSampler
from .mpi import MPITransport, cuda_aware_mpi
from .protocol import LOAD, SAVE
from .rounds import GlobalSampler
from .status import announce, handshake
from .torch import TorchTransport
from .transport import DEFAULT_TIMEOUT, Transport, check_timeout, is_mpi_comm, is_torch_group

__all__ = ["GlobalSampler", "LocalSampler", "RemoteError", "MismatchError",
           "CollectiveMismatchError", "cuda_aware_mpi", "Transport", "make_transport",
           "make_sampler", "world_of", "open_channel", "SAVE", "LOAD", "DEFAULT_TIMEOUT"]


def _not_a_comm(comm) -> TypeError:
    return TypeError("comm must be an mpi4py communicator (MPI.COMM_WORLD) or a "
                     "torch.distributed process group (torch.distributed.group.WORLD), got "
                     f"{type(comm).__module__}.{type(comm).__name__}")


def world_of(comm) -> tuple[int, int]:
    """``(rank, size)`` of a communicator: an mpi4py communicator, a
    torch.distributed process group, or ``None`` (``(0, 1)``).

    Raises when ``comm`` has one process although the launcher started
    several that its library does not know about (``torchrun`` with
    ``MPI.COMM_WORLD``): global sampling would silently stay local.
    """
    if comm is None:
        return 0, 1
    if is_mpi_comm(comm):
        rank, size = int(comm.Get_rank()), int(comm.Get_size())
    elif is_torch_group(comm):
        rank, size = int(comm.rank()), int(comm.size())
    else:
        raise _not_a_comm(comm)
    check_world(comm, size)
    return rank, size


def make_transport(comm, *, timeout: float | None = DEFAULT_TIMEOUT,
                   device_buffers: bool | None = False, purpose: str | None = None) -> Transport:
    """The transport for ``comm``: an mpi4py communicator (the
    :class:`~.mpi.MPITransport`) or a ``torch.distributed`` process group
    such as ``dist.group.WORLD`` (the :class:`~.torch.TorchTransport`).

    Creating one is a collective call over ``comm``. ``device_buffers``:
    whether the sample data may travel as device arrays (``None``: when the
    library supports it, CUDA-aware MPI or an NCCL group). ``purpose`` (for
    example ``"save()"``) names, in a timeout's message, the call the other
    processes did not join.
    """
    timeout = check_timeout(timeout)
    if is_mpi_comm(comm):
        return MPITransport(comm, timeout=timeout, device_buffers=device_buffers,
                            purpose=purpose)
    if is_torch_group(comm):
        return TorchTransport(comm, timeout=timeout, device_buffers=device_buffers,
                              purpose=purpose)
    raise _not_a_comm(comm)


def make_sampler(view: StoreView, *, comm, sampling: str, seed, rng: np.random.Generator,
                 settings: dict | None = None, cuda_aware=None,
                 timeout: float | None = DEFAULT_TIMEOUT):
    """The sampler for a buffer's settings: global over ``comm`` when it has
    several processes and ``sampling == "global"``, else local. ``view``: the
    shard the sampler draws from (:class:`StoreView`).

    With several processes, construction is a collective call: the processes
    check that they agree on ``sampling`` and, sampling globally, on
    ``settings`` (the buffer's ``policy`` and ``label_index``) and
    ``num_representatives``. ``comm=None`` in a job the launcher started
    with several processes warns (once) that each samples its own shard.
    ``cuda_aware`` (GPU storage): pass device memory to the transport (True),
    stage it through pinned host memory (False), or decide from what the
    library supports (None). ``timeout`` bounds every wait for the other
    processes (seconds; None: no limit; the default is :data:`DEFAULT_TIMEOUT`).
    """
    timeout = check_timeout(timeout)
    if comm is None:
        warn_unshared()
        return LocalSampler(view, rng)
    rank, size = world_of(comm)
    if size > 1 and sampling == "global":
        wants_device = (None if cuda_aware is None else bool(cuda_aware)) \
            if view.backend.is_gpu else False
        transport = make_transport(comm, timeout=timeout, device_buffers=wants_device)
        try:
            return GlobalSampler(view, transport, rng, seed=seed, settings=settings)
        except BaseException:
            transport.close(broken=True)
            raise
    if size > 1:
        with make_transport(comm, timeout=timeout, purpose="building a RehearsalBuffer") as t:
            handshake(t, {"sampling": sampling})
    sampler = LocalSampler(view, rng, rank=rank, world_size=size)
    sampler.timeout = timeout       # bounds the waits of collective checkpoints
    return sampler


@contextlib.contextmanager
def open_channel(core, kind: int, what: str):
    """A :class:`~.collective.Channel` for the collective call ``what`` of
    the buffer whose step object is ``core`` (``kind``: :data:`SAVE` or :data:`LOAD`).

    Global sampling: over the sampler's transport, between two steps
    (:meth:`GlobalSampler.collective`). Local sampling on several processes:
    over a transport of its own (a collective call over ``comm``, like
    building a buffer). One process: no messages.
    """
    sampler = core.sampler
    if core.comm is None or core.world_size == 1:
        yield Channel(AloneTransport(), what)
        return
    if getattr(sampler, "is_global", False):
        with sampler.collective(kind, what) as channel:
            yield channel
        return
    transport = make_transport(core.comm, timeout=getattr(sampler, "timeout", DEFAULT_TIMEOUT),
                               purpose=what)
    channel = Channel(transport, what)
    broken = False
    try:
        announce(transport, kind, what)
        yield channel
    except BaseException as e:
        broken = bool(getattr(e, "broken", False)) or not channel.in_step
        raise
    finally:
        transport.close(broken=broken)
