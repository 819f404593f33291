"""The torch.distributed transport: process groups of its own, asynchronous
collectives.

The transport never uses the group the user passes (``dist.group.WORLD``)
for its own messages, so that they cannot interleave with the training's
collectives (DDP's all-reduce). It creates, over the same ranks:

- a gloo group for the control messages (the per-round status table, the
  failure notes) and for host sample data;
- with device buffers, an NCCL group for the sample data: CuPy rows travel
  as CUDA tensors wrapped without a copy through DLPack.

Collectives are started with ``async_op=True`` and completed by polling
``Work.is_completed()``, which lets the progress thread wait without holding
a core. The groups get the transport's timeout, so that gloo itself gives up
on a peer that stopped answering.
"""

from __future__ import annotations

import datetime

import numpy as np

from .errors import RemoteError
from .transport import DEFAULT_TIMEOUT, Transport

__all__ = ["TorchTransport"]

#: The longest timeout given to a process group: gloo refuses
#: ``timedelta.max``. A longer limit, or none, waits this long (a century).
_LONGEST = datetime.timedelta(days=36500)


def _group_timeout(seconds: float | None) -> datetime.timedelta:
    """A process group's timeout for ``seconds`` (None: no limit)."""
    if seconds is None or seconds >= _LONGEST.total_seconds():
        return _LONGEST
    return datetime.timedelta(seconds=seconds)


def _backend_name(group) -> str:
    import torch.distributed as dist
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:          # a group this process is not a member of
        return ""


class _CompletedByWait:
    """A gloo point-to-point request, whose ``is_completed()`` stays False
    until ``wait()`` is called: testing it waits for it (the GIL released;
    bounded by the group's timeout, the transport's). Every request of an
    exchange is posted before any is tested, so this waits only for peers
    the status exchange has shown to be there."""

    def __init__(self, work):
        self._work = work
        self._done = False

    def is_completed(self) -> bool:
        if not self._done:
            self._work.wait()        # raises the request's error, if any
            self._done = True
        return True

    def wait(self) -> None:
        self.is_completed()


class TorchTransport(Transport):
    """Collectives over new process groups spanning the ranks of ``group``."""

    def __init__(self, group, *, timeout: float | None = DEFAULT_TIMEOUT,
                 device_buffers: bool | None = False, purpose: str | None = None):
        import torch
        import torch.distributed as dist
        if not dist.is_initialized():
            raise RuntimeError("comm is a torch.distributed process group, but "
                               "torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() first")
        self._torch, self._dist = torch, dist
        self.timeout = timeout
        self.rank = int(group.rank())
        self.size = int(group.size())
        if self.rank < 0:
            raise ValueError("this process is not a member of the process group given as comm")
        self._ranks = dist.get_process_group_ranks(group)
        user_backend = _backend_name(group)
        nccl = "nccl" in user_backend and torch.cuda.is_available()
        if device_buffers and not nccl:
            raise ValueError(f"cuda_aware=True needs an NCCL process group with a visible GPU; "
                             f"comm's backend is {user_backend or 'unknown'!r}")
        self.device_buffers = nccl if device_buffers is None else bool(device_buffers)
        self.name = "torch-nccl" if self.device_buffers else "torch-gloo"
        self._purpose = purpose
        self._pg_timeout = _group_timeout(timeout)
        self._control = self._new_group("gloo", self._pg_timeout)
        self._data = None if self.device_buffers else self._control

    def _new_group(self, backend: str, timeout):
        # Over the whole world, torch names a group from a counter that only grows;
        # a group over a subset of the ranks ("local synchronization": only its
        # members call this) gets a name hashed from its ranks and the number of
        # groups alive, which repeats once a group is destroyed, and a repeated
        # name meets the old group's keys in the rendezvous store.
        local = sorted(self._ranks) != list(range(self._dist.get_world_size()))
        self._keep_groups = local     # such groups are never destroyed: names stay unique
        try:
            return self._dist.new_group(ranks=self._ranks, backend=backend, timeout=timeout,
                                        use_local_synchronization=local)
        except Exception as e:   # a member never arrived: the store barrier timed out
            if "timeout" in str(e).lower() and self.timeout is not None:
                raise RemoteError(
                    f"rank {self.rank}: no answer from the other processes within "
                    f"{self.timeout:g} s while waiting for the other processes to create their "
                    f"exchange {backend} process group"
                    + (f" for {self._purpose}" if self._purpose else "")
                    + f" ({type(e).__name__}: {e})",
                    broken=True) from e
            raise RemoteError(f"rank {self.rank}: creating the exchange's {backend} process "
                              f"group failed: {type(e).__name__}: {e}", broken=True) from e

    def agreement(self) -> dict:
        return {"exchange data path": "nccl (device buffers)" if self.device_buffers
                else "gloo (host buffers)"}

    def open_data(self) -> None:
        """Creates the NCCL group for device data (after the processes have
        checked that they all want one)."""
        if self._data is None:
            # NCCL's own watchdog acts on its timeout: give the round protocol's
            # timeout the first word.
            self._data = self._new_group("nccl", min(2 * self._pg_timeout, _LONGEST))
            # NCCL sets up a group's communicator on its first call, which every
            # member must make: the rounds' point-to-point batches involve only
            # some of them.
            ready = self._torch.zeros(1, device=self._torch.device("cuda"))
            self.wait([self._dist.all_reduce(ready, group=self._data, async_op=True)],
                      "the other processes to set up their NCCL exchange group")

    # ---------------------------------------------------- collectives
    def _tensor(self, a):
        if isinstance(a, np.ndarray):
            return self._torch.from_numpy(a)
        return self._torch.from_dlpack(a)       # CuPy: the same device memory, no copy

    def _iallgather(self, send, recv):
        out = self._torch.from_numpy(recv.reshape(-1))
        # all_gather_single is the newer name of all_gather_into_tensor
        gather = getattr(self._dist, "all_gather_single", None) or \
            self._dist.all_gather_into_tensor
        return [gather(out, self._torch.from_numpy(send), group=self._control, async_op=True)]

    def _group_for(self, data):
        # host messages (task-aware slots, feedback) go over gloo even when the
        # samples go over NCCL, which moves device memory only
        return self._control if isinstance(data, np.ndarray) else self._data

    def _isend(self, data, peer, tag):
        group = self._group_for(data)
        return [self._p2p(self._dist.isend(self._tensor(data), dst=self._ranks[peer],
                                           group=group, tag=tag), group)]

    def _irecv(self, data, peer, tag):
        group = self._group_for(data)
        return [self._p2p(self._dist.irecv(self._tensor(data), src=self._ranks[peer],
                                           group=group, tag=tag), group)]

    def _start_exchange(self, sends, recvs, tag):
        host = all(isinstance(a, np.ndarray) for a in (*sends.values(), *recvs.values()))
        if not self.device_buffers or host:
            return super()._start_exchange(sends, recvs, tag)
        # NCCL: point-to-point requests posted one by one are serialised per peer
        # (a receive posted before a send would wait for the peer's send, queued
        # behind the peer's own receive); started together they cannot deadlock.
        P2POp, dist = self._dist.P2POp, self._dist
        ops = [P2POp(dist.irecv, self._tensor(recvs[p]), self._ranks[p], self._data, tag)
               for p in sorted(recvs)]
        ops += [P2POp(dist.isend, self._tensor(sends[p]), self._ranks[p], self._data, tag)
                for p in sorted(sends)]
        return list(dist.batch_isend_irecv(ops)) if ops else []

    def _p2p(self, work, group=None):
        # gloo reports a point-to-point request complete only through wait():
        # its is_completed() stays False. NCCL's polls (a CUDA event).
        nccl = self.device_buffers and group is not self._control
        return work if nccl else _CompletedByWait(work)

    def test(self, handles) -> bool:
        if not all(w.is_completed() for w in handles):
            return False
        for w in handles:
            w.wait()          # raises the collective's error, if any
        return True

    def close(self, *, broken: bool = False) -> None:
        groups = [g for g in {id(g): g for g in (self._control, self._data)}.values()
                  if g is not None]
        self._control = self._data = None
        if broken or getattr(self, "_keep_groups", False):
            # broken: a collective may still be pending, destroying would wait for it;
            # a group over a subset of the world keeps its name taken while it lives
            return
        for g in groups:
            try:
                self._dist.destroy_process_group(g)
            except Exception:   # the default group was destroyed first, or at exit
                pass
