"""Global sampling between emulated GPUs, on two processes (tests/test_exchange_emulated.py).

    DALI_REHEARSAL_CUDA_AWARE=0|1 \\
        mpiexec -n 2 python tests/emulation/exchange_program.py OUT_DIR [TEETH] [READ]
    RANK=.. WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. DR_EMU_TRANSPORT=torch \\
        python tests/emulation/exchange_program.py OUT_DIR [TEETH] [READ]

``DR_EMU_TRANSPORT`` picks the communicator: ``mpi`` (default: ``MPI.COMM_WORLD``,
the mpi4py transport, staged through pinned host memory, or CUDA-aware when
``DALI_REHEARSAL_CUDA_AWARE=1``: the emulated device arrays are handed to MPI)
or ``torch`` (a gloo process group initialised from torchrun's environment:
the torch.distributed transport, staged through pinned host memory).

Each process runs two buffers in lockstep over the same communicator and
seeds: one on ``device="gpu"`` (the emulation: ``mix(stream=s)`` on a
non-blocking stream, the exchange on its own stream), one on the CPU. Every
output row must be equal. ``READ`` says when the outputs are read (on the
stream they were mixed on, as a training step would):

- ``end`` (default): only after the last step, so nothing but the library's
  own orderings makes step ``t``'s writes visible to round ``t + 1``'s
  gathers;
- ``each``: right after each step, before the exchange's progress thread gets
  to the next round, so nothing but the library's own orderings makes a
  round's staged uploads visible to the step that copies them.

Without teeth, over MPI, half way through the buffers are saved (``save``, a
collective call), closed, and new buffers ``load`` the saves and go on: the
first rounds after it gather rows ``load`` uploaded on another stream. ``TEETH`` removes an
ordering (defects of issue 8):

- ``no_event``: the buffer's write event is not passed to the exchange
  (``sampler.start(event=None)``): a round's gathers are not ordered after
  the previous step's scatter (defect 3);
- ``no_ready``: the step does not wait for a round's ``ready`` event before
  copying the staged rows it received (``Representatives.write_into``).

Each process writes ``OUT_DIR/exchange-<rank>.json``: the steps whose output
differs from the CPU's, the rows checked, the transport's name, whether rows
were staged, what kind of memory went to the transport, and how many write and
ready events the ordering had.
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # tests/
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))   # the checkout

from emulation import install  # noqa: E402

cp = install()["cupy"]

import numpy as np  # noqa: E402

import dali_rehearsal as dr  # noqa: E402
from dali_rehearsal.exchange import GlobalSampler  # noqa: E402
from dali_rehearsal.representatives import Representatives  # noqa: E402
from emulation import runtime  # noqa: E402
import utils  # noqa: E402

TRANSPORT = os.environ.get("DR_EMU_TRANSPORT", "mpi")
STEPS, SAVE_AT = 40, 20
# Over torch.distributed, every save and load creates process groups whose names
# torch derives from the number of live groups: after a buffer is closed they can
# repeat (see the xfail test in tests/test_exchange_emulated.py). No checkpoint there.
CHECKPOINT = TRANSPORT == "mpi"

if TRANSPORT == "mpi":
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
else:
    import datetime

    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    comm = dist.group.WORLD
    rank = dist.get_rank()


def ident_batch(step, b):
    return utils.ident_batch(rank, step, b)


COUNTS = {"write_events": 0, "ready_events": 0}
KINDS: set = set()


def install_spies(teeth):
    """Counts the orderings the step hands over (and drops one for ``teeth``)."""
    start = GlobalSampler.start

    def counting_start(self, *, active=True, event=None):
        if event is not None and self._backend.is_gpu:
            COUNTS["write_events"] += 1
            if teeth == "no_event":
                event = None
        return start(self, active=active, event=event)
    GlobalSampler.start = counting_start

    write_into = Representatives.write_into

    def counting_write_into(self, store, out, offset, stream=None):
        if self.ready is not None:
            COUNTS["ready_events"] += 1
            if teeth == "no_ready":
                self.ready = None
        return write_into(self, store, out, offset, stream)
    Representatives.write_into = counting_write_into


def kind_of(array) -> str:
    if isinstance(array, cp.ndarray):
        return "device"
    return "pinned" if runtime.MEMORY.is_pinned(array) else "pageable"


def spy_on_transport(buffer):
    """Records what kind of memory the GPU buffer's exchange gives its transport."""
    transport = buffer.sampler.transport
    iexchange = transport.iexchange

    def spy(sends, recvs, tag):
        KINDS.update(kind_of(a) for a in (*sends.values(), *recvs.values()))
        return iexchange(sends, recvs, tag)
    transport.iexchange = spy


def buffers():
    kwargs = dict(capacity=30, num_representatives=6, seed=3, comm=comm, policy="reservoir")
    gpu = dr.RehearsalBuffer(device="gpu", **kwargs)
    cpu = dr.RehearsalBuffer(device="cpu", **kwargs)
    spy_on_transport(gpu)
    return gpu, cpu


def main(out_dir, teeth, read):
    install_spies(teeth)
    gpu, cpu = buffers()
    info = {"transport_name": gpu.sampler.transport.name, "staged": gpu.sampler.staged,
            "device_buffers": gpu.sampler.transport.device_buffers,
            "checkpointed": CHECKPOINT and teeth == "none"}
    stream = cp.cuda.Stream(non_blocking=True)
    mismatched_steps, checked, remote, outputs = [], 0, 0, []
    for step in range(STEPS):
        if step == SAVE_AT and CHECKPOINT and teeth == "none":
            for name, buffer in (("gpu", gpu), ("cpu", cpu)):
                buffer.save(os.path.join(out_dir, f"checkpoint-{name}"))
            gpu.close()
            cpu.close()
            gpu, cpu = buffers()
            gpu.load(os.path.join(out_dir, "checkpoint-gpu"))
            cpu.load(os.path.join(out_dir, "checkpoint-cpu"))
        batch = ident_batch(step, rank + 2)
        got = gpu.mix(*batch, stream=stream)
        expected = [np.array(a) for a in cpu.mix(*batch)]
        if read == "each":
            check(step, got, expected, stream, mismatched_steps)
        else:
            outputs.append((step, got, expected))
        checked += len(expected[0]) - len(batch[0])
        remote += int((cpu.last_origin[:, 0] != rank).sum())
    for step, got, expected in outputs:      # read at the end (see the module doc)
        check(step, got, expected, stream, mismatched_steps)
    result = dict(info, rank=rank, mismatched_steps=mismatched_steps, checked=checked,
                  remote=remote, kinds=sorted(KINDS), **COUNTS)
    gpu.close()
    cpu.close()
    with open(os.path.join(out_dir, f"exchange-{rank}.json"), "w") as f:
        json.dump(result, f)


def check(step, got, expected, stream, mismatched_steps):
    """Reads a step's output on the stream it was mixed on (the user's side)."""
    host = [a.get(stream=stream) for a in got]
    if any(h.shape != e.shape or not np.array_equal(h, e) for h, e in zip(host, expected)):
        mismatched_steps.append(step)


class Batches:
    """A source of ``n`` batches per epoch (then StopIteration) whose rows
    name themselves, as in :func:`ident_batch`."""

    def __init__(self, b, n):
        self.b, self.n, self.i, self.epoch = b, n, 0, 0

    def __call__(self):
        if self.i == self.n:
            self.i, self.epoch = 0, self.epoch + 1
            raise StopIteration
        self.i += 1
        images, labels, _ = ident_batch(100 * self.epoch + self.i, self.b)
        return images, labels


def stage_program(out_dir, prepare_ahead, teeth, source_kind):
    """The DALI stage with global sampling: on each process a GPU stage (an
    emulated GPU source, the stage built by ``dr.fn.rehearsal``, its callback
    driven as DALI drives it: batches copied on the stage's stream and read
    a prefetch queue later) and a CPU stage over the same source, called in
    turn the same number of times. ``source_kind``:

    - ``reader``: the PNGs of ``OUT_DIR/images`` (``labels.json``), a shard of
      10 files on rank 0 and 17 on rank 1 (``fn.readers.file``), batches of 3;
    - ``readerless-equal`` / ``readerless-unequal``: an ``external_source``
      of 5 batches per epoch on every process, or 5 + rank.
    """
    from nvidia.dali import fn, pipeline_def, types

    from emulation.dali import ExternalSource, GpuSourcePipeline, recording_external_source
    install_spies(teeth)
    r, calls = 4, 24
    if source_kind == "reader":
        names = json.loads(open(os.path.join(out_dir, "images", "labels.json")).read())
        shard = names[:10] if rank == 0 else names[10:27]
        files = [os.path.join(out_dir, "images", name) for name, _ in shard]
        labels = [label for _, label in shard]
        b = 3
    else:
        b = 2
        per_epoch = 5 + (rank if source_kind == "readerless-unequal" else 0)

    def source_pipeline():
        @pipeline_def(batch_size=b, num_threads=1, device_id=None, prefetch_queue_depth=2)
        def source():
            if source_kind == "reader":
                pngs, lab = fn.readers.file(files=files, labels=labels, name="Reader")
                return fn.decoders.image(pngs, device="cpu", output_type=types.GRAY), lab
            return tuple(fn.external_source(source=Batches(b, per_epoch), num_outputs=2,
                                            batch=True, dtype=[types.INT64, types.INT32]))
        return source()

    def stage(device):
        src = source_pipeline()
        if device == "gpu":
            src = GpuSourcePipeline(src)
        buffer = dr.RehearsalBuffer(capacity=12, num_representatives=r, seed=3, comm=comm,
                                    policy="reservoir", device=device, timeout=60)

        @pipeline_def(batch_size=b + r, num_threads=1, prefetch_queue_depth=2,
                      device_id=0 if device == "gpu" else None)
        def mixing():
            return tuple(dr.fn.rehearsal(src, buffer=buffer, replay_flag=True,
                                         prepare_ahead=prepare_ahead))
        with recording_external_source() as calls_made:
            pipe = mixing()
        return pipe, buffer, ExternalSource(calls_made[0], read_after=2)

    stages = {"gpu": stage("gpu"), "cpu": stage("cpu")}
    info = {"transport_name": stages["gpu"][1].sampler.transport.name,
            "staged": stages["gpu"][1].sampler.staged}
    events = {"gpu": [], "cpu": []}         # batches, and "end" for an epoch end
    for _ in range(calls):
        for device, (_, _, dali) in stages.items():
            try:
                events[device] += dali.step()
            except StopIteration:
                events[device] += dali.drain() + ["end"]
    for device, (_, _, dali) in stages.items():
        events[device] += dali.drain()
    errors = []
    for _, buffer, _ in stages.values():
        try:
            buffer.close()
        except Exception as e:          # reported to the test
            errors.append(f"{type(e).__name__}: {e}")
    got, expected = events["gpu"], events["cpu"]
    mismatched_steps, epoch_steps, k = [], [], 0
    if len(got) != len(expected):
        mismatched_steps.append(f"{len(got)} events != {len(expected)}")
    for step, (g, x) in enumerate(zip(got, expected)):
        if isinstance(g, str) or isinstance(x, str):
            if g != x:
                mismatched_steps.append(step)
        elif any(a.shape != e.shape or not np.array_equal(a, e) for a, e in zip(g, x)):
            mismatched_steps.append(step)
    for x in expected:
        if isinstance(x, str):
            epoch_steps.append(k)
            k = 0
        else:
            k += 1
    replayed = sum(int(x[-1].sum() > 0) for x in expected if not isinstance(x, str))
    result = dict(info, rank=rank, mismatched_steps=mismatched_steps, events=len(expected),
                  epoch_steps=epoch_steps, steps_with_representatives=replayed,
                  close_errors=errors, **COUNTS)
    with open(os.path.join(out_dir, f"exchange-{rank}.json"), "w") as f:
        json.dump(result, f)


def save_after_closing_another_buffer(out_dir):
    """Two buffers over the same communicator; the first is closed, then the
    second is saved three times and a third buffer loads it (the result file
    says whether it all worked)."""
    kwargs = dict(capacity=8, num_representatives=2, seed=0, comm=comm, device="cpu")
    first, second = dr.RehearsalBuffer(**kwargs), dr.RehearsalBuffer(**kwargs)
    for buffer in (first, second):
        buffer.mix(*ident_batch(0, 4))
    first.close()
    try:
        for _ in range(3):               # each save makes (and closes) a transport of its own
            second.save(os.path.join(out_dir, "second"))
        third = dr.RehearsalBuffer(**kwargs)      # and a new buffer after those
        third.load(os.path.join(out_dir, "second"))
        third.close()
        error = None
    except Exception as e:          # reported to the test
        error = f"{type(e).__name__}: {e}"
    second.close()
    with open(os.path.join(out_dir, f"exchange-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "error": error}, f)


def finish() -> None:
    """Every buffer is closed: a torchrun program ends its default group
    (left to the interpreter's exit, gloo's threads can abort the process)."""
    if TRANSPORT != "mpi":
        dist.destroy_process_group()


if __name__ == "__main__":
    scenario = os.environ.get("DR_EMU_SCENARIO")
    if scenario == "save_after_closing_another_buffer":
        save_after_closing_another_buffer(sys.argv[1])
    elif scenario == "stage":
        stage_program(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "none",
             sys.argv[3] if len(sys.argv) > 3 else "end")
    finish()
