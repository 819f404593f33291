"""Programs run by tests/test_global_sampling.py on several processes, over
either transport; each rank writes its result to
``OUT_DIR/<scenario>-<rank>.json`` for the test to read back.

    mpiexec -n 4 python tests/dist_programs/global_sampling.py SCENARIO OUT_DIR
    torchrun --nproc_per_node=4 tests/dist_programs/global_sampling.py SCENARIO OUT_DIR

``DR_TEST_TRANSPORT`` (``mpi`` or ``torch``) picks the communicator; by
default ``torch`` when a torch launcher set ``MASTER_ADDR``, else ``mpi``.
``DR_TEST_DEVICE=gpu`` puts the buffers on CuPy; ``DR_TEST_TORCH_BACKEND``
is the backend of torch's default group (``gloo``, or
``cpu:gloo,cuda:nccl``). ``DR_TEST_TIMEOUT`` is the buffers' timeout.
"""

import atexit
import hashlib
import json
import os
import signal
import sys
import threading
import time

import numpy as np

SCENARIO, OUT_DIR = sys.argv[1], sys.argv[2]
TRANSPORT = os.environ.get("DR_TEST_TRANSPORT") or ("torch" if os.environ.get("MASTER_ADDR")
                                                    else "mpi")
DEVICE = os.environ.get("DR_TEST_DEVICE", "cpu")
TIMEOUT = float(os.environ.get("DR_TEST_TIMEOUT", "60"))
FAIL_RANK, FAIL_STEP, STEPS = 1, 5, 12


def _path(rank):
    return os.path.join(OUT_DIR, f"{SCENARIO}-{rank}.json")


def write(result):
    result.update(rank=RANK, size=SIZE, transport=TRANSPORT)
    tmp = _path(RANK) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, _path(RANK))


def _linger():
    """A rank that leaves early waits (a bounded time) until the others have
    written their results: under torchrun (and mpiexec after a signal) the
    launcher stops the other processes as soon as one exits with an error."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if all(os.path.exists(_path(p)) for p in range(SIZE)):
            return
        time.sleep(0.1)


# Registered before dali_rehearsal registers its own exit handler: runs after it.
atexit.register(_linger)

if TRANSPORT == "mpi":
    if os.environ.get("DR_TEST_MPI_THREAD"):      # e.g. "funneled": no progress thread
        import mpi4py
        mpi4py.rc.thread_level = os.environ["DR_TEST_MPI_THREAD"]
    from mpi4py import MPI
    COMM = MPI.COMM_WORLD
    RANK, SIZE = COMM.Get_rank(), COMM.Get_size()

    def allgather(obj):
        return COMM.allgather(obj)

    def training_collective():
        """The training's own collective on the user's communicator."""
        assert COMM.allreduce(1) == SIZE
else:
    import datetime

    import torch
    import torch.distributed as dist
    backend = os.environ.get("DR_TEST_TORCH_BACKEND", "gloo")
    if DEVICE == "gpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(TIMEOUT, 60) * 3))
    COMM = dist.group.WORLD
    RANK, SIZE = dist.get_rank(), dist.get_world_size()

    def allgather(obj):
        out = [None] * SIZE
        dist.all_gather_object(out, obj)
        return out

    def training_collective():
        """The training's own collective on the default group (DDP's all-reduce)."""
        t = torch.ones(1)
        dist.all_reduce(t)
        assert int(t.item()) == SIZE

if DEVICE == "gpu":
    import cupy
    cupy.cuda.Device(int(os.environ.get("LOCAL_RANK", RANK)) % cupy.cuda.runtime.getDeviceCount()
                     ).use()

import dali_rehearsal as dr  # noqa: E402
from dali_rehearsal._backend import to_host  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/
import utils  # noqa: E402


def ident_batch(step, b, label_dtype=np.int32):
    return utils.ident_batch(RANK, step, b, label_dtype)


def check(out, step, fresh, stats):
    """Counts representatives that are not an earlier sample with its own
    label and extras (``mispaired``), and checks the fresh rows."""
    oi, ol, og = (to_host(a) for a in out)
    b = len(fresh[0])
    assert (oi[:b] == fresh[0]).all() and (ol[:b] == fresh[1]).all()
    reps = oi[b:, 0]
    ok = ((oi[b:] == reps[:, None]).all(axis=1) & (ol[b:] == reps % 7)
          & (og[b:] == (reps / 2.0)[:, None]).all(axis=1)
          & ((reps % 1_000_000) // 1000 < step) & (reps // 1_000_000 < SIZE) & (reps >= 0))
    stats["checked"] += len(reps)
    stats["mispaired"] += int((~ok).sum())
    stats["remote"] += int((reps // 1_000_000 != RANK).sum())
    if len(set(reps.tolist())) != len(reps):
        stats["duplicates"] += 1
    return reps


def new_stats():
    return {"checked": 0, "mispaired": 0, "remote": 0, "duplicates": 0}


# ------------------------------------------------------------------ scenarios
def pairing():
    """Every representative is a sample some rank inserted before this step,
    with its own label and extras; fill levels differ per rank. The training
    runs its own collective on the user's communicator after every step."""
    buf = dr.RehearsalBuffer(capacity=40, num_representatives=6, device=DEVICE, seed=3,
                             comm=COMM, policy="reservoir", timeout=TIMEOUT)
    stats = new_stats()
    for step in range(60):
        batch = ident_batch(step, RANK + 1)                # unequal arrival rates
        out = buf.mix(*batch)
        reps = check(out, step, batch, stats)
        assert (buf.last_origin[:, 0] == reps // 1_000_000).all(), "origin disagrees"
        training_collective()
    sampler = buf.sampler
    result = dict(stats, staged=getattr(sampler, "staged", None),
                  transport_name=sampler.transport.name,
                  device_buffers=sampler.transport.device_buffers,
                  threaded=sampler.transport.threaded)
    buf.close()
    return result


def uniform():
    """Draw counts over (rank, slot), shards of very different fill levels;
    every representative checked for its label and extras."""
    capacity = 4 * (RANK % 4 + 1) ** 2                 # 4, 16, 36, 64, 4, 16 ... slots
    buf = dr.RehearsalBuffer(capacity=capacity, num_representatives=5, device=DEVICE,
                             seed=11, comm=COMM, policy="reservoir", timeout=TIMEOUT)
    steps, warm = (1200, 150) if SIZE <= 4 else (900, 250)
    drawn = []                                         # (owner, slot) of every draw of mine
    stats = new_stats()
    for step in range(steps):
        batch = ident_batch(step % 1000, 1)
        out = buf.mix(*batch)
        if step < 1000:                                # (ids name steps below 1000)
            check(out, step, batch, stats)
        if step >= warm:                               # all shards are full by then
            drawn.append(buf.last_origin.copy())
    buf.close()
    drawn = np.concatenate(drawn)
    counts = [np.zeros(4 * (p % 4 + 1) ** 2, dtype=np.int64) for p in range(SIZE)]
    for owner, slot in drawn.tolist():
        counts[owner][slot] += 1
    return dict(stats, counts=[c.tolist() for c in counts], steps=steps - warm)


def reproducible(seed=None):
    digest = hashlib.sha256()
    buf = dr.RehearsalBuffer(capacity=30, num_representatives=4, device=DEVICE,
                             seed=5 if seed is None else seed, comm=COMM, timeout=TIMEOUT)
    stats = new_stats()
    for step in range(40):
        batch = ident_batch(step, 3)
        out = buf.mix(*batch)
        check(out, step, batch, stats)
        for a in out:
            digest.update(np.ascontiguousarray(to_host(a)).tobytes())
    shared = buf.sampler.shared_seed
    buf.close()
    return dict(stats, digest=digest.hexdigest(), shared_seed=shared)


def exchange_counts():
    """The transport's exact counts after the buffer's construction and after
    a known number of steps (the round opened for the next step included)."""
    b, steps = 4, 10
    buf = dr.RehearsalBuffer(capacity=1000, num_representatives=7, device=DEVICE, seed=6,
                             comm=COMM, policy="reservoir", timeout=TIMEOUT)
    built = buf.exchange_stats()
    for step in range(steps):
        buf.mix(*ident_batch(step, b))
    buf.sampler.settle()                       # the round opened for step `steps` has ended
    result = {"built": built, "stats": buf.exchange_stats(), "seed": buf.sampler.shared_seed,
              "b": b, "steps": steps, "fields": [int(f.nbytes) for f in buf.spec]}
    buf.close()
    return result


def seed_per_rank():
    """``seed=rank``-style seeds: the shared draws come from rank 0's."""
    return reproducible(seed=7 * RANK + 1)


# ------------------------------------------------------------------ failures
def _record(exc, step):
    return {"error": type(exc).__name__, "message": str(exc), "step": step,
            "t_error": time.time(), "ranks": getattr(exc, "ranks", None)}


#: Failures after which the failing rank's process ends with its buffer open.
LEAVING = ("uncaught", "sys_exit", "exit", "interrupt", "sigkill")


def failure(kind):
    """Rank 1 fails at step 5 in one of many ways (``kind``); every other rank
    must raise, none may hang, no row may be mispaired."""
    fail = RANK == FAIL_RANK
    capacity, seed = 30, 5
    if fail and kind == "capacity":
        capacity = 1                          # r > capacity x processes: ValueError
    if fail and kind == "seed":
        seed = 1.5                            # TypeError
    stats = new_stats()
    result = {"kind": kind, "t_start": time.time()}
    step = -1
    # uint64 labels on every rank, so that only the value of the label fails
    label_dtype = np.uint64 if kind == "big_labels" else np.int32
    try:
        buf = dr.RehearsalBuffer(capacity=capacity, num_representatives=4, device=DEVICE,
                                 seed=seed, comm=COMM, timeout=TIMEOUT)
    except Exception as e:
        result.update(_record(e, step), t_fail=time.time(), **stats)
        return result
    if fail and kind in LEAVING:               # no `with`, no `finally`: the buffer stays open
        for step in range(FAIL_STEP):
            batch = ident_batch(step, 3, label_dtype)
            check(buf.mix(*batch), step, batch, stats)
        result.update(planned=kind, t_fail=time.time(), **stats)
        write(result)
        _leave(kind)
    steps = STEPS - 1 if (fail and kind == "one_fewer") else STEPS
    try:
        with buf:
            for step in range(steps):
                batch = ident_batch(step, 3, label_dtype)
                if fail and step == FAIL_STEP:
                    result["t_fail"] = time.time()
                    batch = _fail(kind, buf, batch)
                    if batch is None:           # closed early: the process goes on
                        result.update(error=None, closed_at=step, **stats)
                        time.sleep(1)
                        return result
                check(buf.mix(*batch), step, batch, stats)
    except Exception as e:
        result.update(_record(e, step), **stats)
        if kind in ("sigkill", "hang") and TRANSPORT == "mpi" and not fail:
            # After a silent failure MPI_Finalize can block: under
            # `python -m mpi4py` the uncaught error aborts the job instead.
            write(result)
            raise
        return result
    result.update(error=None, **stats)
    return result


def _fail(kind, buf, batch):
    """Rank 1's failure at step 5, with the buffer open in a `with` block.
    Returns the batch to mix (None: stop mixing)."""
    images, labels, logits = batch
    if kind == "raise_in_mix":
        return images, -labels - 1, logits      # negative labels: ValueError in mix
    if kind == "float_labels":
        return images, labels.astype(np.float32), logits
    if kind == "big_labels":
        return images, labels.astype(np.uint64) + np.uint64(2**63), logits
    if kind == "object_dtype":
        return images.astype(object), labels, logits
    if kind == "raise_outside":
        raise ZeroDivisionError("the training step failed")   # `with` closes the buffer
    if kind == "close_early":
        buf.close()
        return None
    if kind == "hang":
        time.sleep(TIMEOUT + 10)               # silent: no message, no exit
        return batch
    if kind == "one_fewer":
        return batch
    raise AssertionError(f"unknown failure {kind}")


class _Leave(BaseException):
    """Ends the program normally, past every handler."""


def _leave(kind):
    """The failing rank's process ends with its buffer open."""
    if kind == "uncaught":
        raise ZeroDivisionError("uncaught in the training loop")
    if kind == "sys_exit":
        sys.exit(3)
    if kind == "exit":
        raise _Leave()
    if kind == "interrupt":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)                         # KeyboardInterrupt arrives here
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(f"unknown failure {kind}")


# --------------------------------------------------------------- mismatches
LAYOUTS = {
    # same bytes per sample, another layout
    "layout_shape_dtype": [((4, 4, 3), np.uint8, np.int64), ((13, 4, 1), np.uint8, np.int32)],
    "layout_dtype": [((4, 4, 3), np.uint16, np.int64), ((8, 4, 3), np.uint8, np.int64)],
    "layout_transposed": [((4, 6, 2), np.uint8, np.int64), ((6, 4, 2), np.uint8, np.int64)],
}


def mismatch(kind):
    """Ranks that disagree: the same MismatchError on every rank, before any
    row is exchanged."""
    kwargs = dict(capacity=20, num_representatives=4, device=DEVICE, seed=1, comm=COMM,
                  timeout=TIMEOUT)
    if RANK == 1 and kind == "r":
        kwargs["num_representatives"] = 2
    if RANK == 1 and kind == "policy":
        kwargs["policy"] = "reservoir"
    if RANK == 1 and kind == "sampling":
        kwargs["sampling"] = "local"
    if RANK == 1 and kind == "label_index":
        kwargs["label_index"] = 0
    shape, dtype, label_dtype = ((5,), np.int64, np.int32)
    if kind in LAYOUTS:
        shape, dtype, label_dtype = LAYOUTS[kind][min(RANK, 1)]
    step = -1
    delivered = 0
    try:
        buf = dr.RehearsalBuffer(**kwargs)
        with buf:
            for step in range(6):
                images = np.full((3,) + shape, step, dtype=dtype)
                labels = np.arange(3, dtype=label_dtype) + 10 * RANK
                out = buf.mix(images, labels)
                delivered += len(out[0]) - 3
    except Exception as e:
        return dict(_record(e, step), delivered_representatives=delivered)
    return {"error": None, "delivered_representatives": delivered}


# ------------------------------------------------------------ DALI, uneven
def _mnist_pipelines(files, labels, batch, buf, last_batch_policy, prepare_ahead=2):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=RANK + 1)
    def decode():
        jpegs, lab = fn.readers.file(files=files, labels=labels, name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), lab

    @pipeline_def(batch_size=batch + buf.num_representatives, num_threads=1, device_id=None)
    def train(source):
        images, lab, flag = dr.fn.rehearsal(source, buffer=buf, replay_flag=True,
                                            last_batch_policy=last_batch_policy,
                                            prepare_ahead=prepare_ahead)
        return images, lab, flag

    return train(decode())


def uneven():
    """Real DALI pipelines whose shards differ a lot in length: every epoch
    ends on every rank at the same step, and nothing is lost."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    from PIL import Image
    data = dr.LabelledFiles.from_folder(os.path.join(OUT_DIR, "mnist", "train"))
    n = 5 + 9 * RANK                                   # very unequal shards
    files = list(data.files[RANK * 40: RANK * 40 + n])
    labels = list(data.labels[RANK * 40: RANK * 40 + n])
    pixels = {np.asarray(Image.open(f)).tobytes(): (i, lab)
              for i, (f, lab) in enumerate(zip(data.files, data.labels))}
    mine = {data.files.index(f): pos for pos, f in enumerate(files)}   # dataset index -> pos
    buf = dr.RehearsalBuffer(capacity=25, num_representatives=3, device="cpu", seed=2,
                             comm=COMM, timeout=TIMEOUT)
    it = DALIGenericIterator(_mnist_pipelines(files, labels, 4, buf, dr.LastBatchPolicy.PARTIAL),
                             ["images", "labels", "flag"], auto_reset=True)
    steps, fresh_order, wrong, remote = [], [], 0, 0
    for epoch in range(4):
        k = 0
        for out in it:
            images = out[0]["images"].numpy()
            lab = out[0]["labels"].numpy().reshape(-1)
            flag = out[0]["flag"].numpy().reshape(-1)
            for img, y, f in zip(images, lab, flag):
                index, true_label = pixels[np.ascontiguousarray(img[..., 0]).tobytes()]
                wrong += true_label != int(y)
                if f == 0:
                    fresh_order.append(mine[index])
                else:
                    remote += index not in mine
            k += 1
            training_collective()
        steps.append(k)
    buf.close()
    # The reader streams the shard cyclically; the stage must deliver exactly
    # that stream, in order: no sample skipped, none repeated.
    in_order = fresh_order == [i % n for i in range(len(fresh_order))]
    return {"steps": steps, "fresh": len(fresh_order), "shard": n, "in_order": in_order,
            "wrong_labels": int(wrong), "remote_representatives": remote}


def epoch_starts():
    """The DALI stage over several epochs of uneven shards, with random pauses
    (different in every run) between steps and between epochs: the round of
    each epoch's first step opens at the epoch end, and the batches do not
    depend on the timing. Runs with the stage's worker twice, then without it
    twice."""
    runs = [_epoch_run(ahead) for ahead in (2, 2, 0, 0)]
    return {"digests": [d for d, _ in runs], "steps": [s for _, s in runs]}


def _epoch_run(prepare_ahead):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    data = dr.LabelledFiles.from_folder(os.path.join(OUT_DIR, "mnist", "train"))
    n = 9 + 5 * RANK                                   # unequal shards: epochs end early
    files = list(data.files[RANK * 40: RANK * 40 + n])
    labels = list(data.labels[RANK * 40: RANK * 40 + n])
    buf = dr.RehearsalBuffer(capacity=12, num_representatives=3, device="cpu", seed=4,
                             comm=COMM, timeout=TIMEOUT)
    it = DALIGenericIterator(_mnist_pipelines(files, labels, 4, buf, dr.LastBatchPolicy.PARTIAL,
                                              prepare_ahead),
                             ["images", "labels", "flag"], auto_reset=True)
    timing = np.random.default_rng()                   # fresh entropy: timing differs per run
    digest, steps = hashlib.sha256(), []
    for epoch in range(4):
        k = 0
        for out in it:
            for name in ("images", "labels", "flag"):
                digest.update(np.ascontiguousarray(out[0][name].numpy()).tobytes())
            k += 1
            time.sleep(timing.uniform(0, 0.02))
            training_collective()
        steps.append(k)
        time.sleep(timing.uniform(0, 0.1))
    buf.close()
    del it
    return digest.hexdigest(), steps


def stage_failure():
    """Rank 1's shard holds a corrupt PNG: its DALI stage fails when the
    decoder reaches it, and every other rank's stage raises RemoteError."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    data = dr.LabelledFiles.from_folder(os.path.join(OUT_DIR, "mnist", "train"))
    files = list(data.files[RANK * 40: RANK * 40 + 24])
    labels = list(data.labels[RANK * 40: RANK * 40 + 24])
    if RANK == FAIL_RANK:
        files[12] = os.path.join(OUT_DIR, "corrupt.png")      # the 4th batch of 4
    buf = dr.RehearsalBuffer(capacity=25, num_representatives=3, device="cpu", seed=2,
                             comm=COMM, timeout=TIMEOUT)
    steps = 0
    try:
        with buf:
            it = DALIGenericIterator(_mnist_pipelines(files, labels, 4, buf,
                                                      dr.LastBatchPolicy.PARTIAL),
                                     ["images", "labels", "flag"], auto_reset=True)
            for _ in range(3):
                for _ in it:
                    steps += 1
    except Exception as e:
        return dict(_record(e, steps), steps=steps)
    return {"error": None, "steps": steps}


def add_during_round():
    """``add()`` between steps, while the round for the next step is open and
    cannot finish yet (rank 1 is slow to take part): the insert must wait
    until the round has read the store, and every row stays paired."""
    buf = dr.RehearsalBuffer(capacity=30, num_representatives=5, device=DEVICE, seed=4,
                             comm=COMM, policy="reservoir", timeout=TIMEOUT)
    stats = new_stats()
    store = buf.core.store
    scatter = store.scatter
    early = []                 # inserts that started while the open round still ran

    def watched(*args, **kwargs):
        pending = getattr(buf.sampler, "_pending", None)
        if pending is not None and not pending.done.is_set():
            early.append(1)
        return scatter(*args, **kwargs)

    store.scatter = watched
    for step in range(12):
        batch = ident_batch(step, 3)
        check(buf.mix(*batch), step, batch, stats)
        if RANK == 1:
            time.sleep(0.2)    # rank 0's add() comes while the round waits for rank 1
        extra = [a[3:] for a in ident_batch(step, 7)]    # ids after this step's fresh ones
        buf.add(*extra)
    buf.close()
    return dict(stats, early_inserts=len(early))


def use_after_close():
    """``mix``, ``add`` and ``sample`` on a closed buffer raise a RuntimeError
    that says so, and change nothing."""
    buf = dr.RehearsalBuffer(capacity=20, num_representatives=3, device=DEVICE, seed=1,
                             comm=COMM, timeout=TIMEOUT)
    for step in range(3):
        buf.mix(*ident_batch(step, 4))
    buf.close()
    errors = {}
    for name, call in (("mix", lambda: buf.mix(*ident_batch(9, 4))),
                       ("add", lambda: buf.add(*ident_batch(9, 4))),
                       ("sample", lambda: buf.sample())):
        try:
            call()
            errors[name] = None
        except RuntimeError as e:
            errors[name] = str(e)
    buf.close()                                  # idempotent
    return {"errors": errors, "num_seen": buf.num_seen}


def close_from_another_thread():
    """Rank 0 closes its buffer from its main thread while another of its
    threads takes steps (mix() holds the buffer's lock while it waits for the
    round): close returns, that thread's steps end with an error, and rank 1
    is told that rank 0 closed its buffer."""
    buf = dr.RehearsalBuffer(capacity=20, num_representatives=3, device=DEVICE, seed=1,
                             comm=COMM, timeout=TIMEOUT)
    result = {"steps": 0, "error": None}

    def steps():
        try:
            while result["steps"] < 100_000:
                buf.mix(*ident_batch(result["steps"] % 1000, 4))
                result["steps"] += 1
        except Exception as e:        # noqa: BLE001 - recorded
            result.update(error=type(e).__name__, message=str(e))

    if RANK == 0:
        thread = threading.Thread(target=steps, daemon=True)
        thread.start()
        while result["steps"] < 20 and thread.is_alive():
            time.sleep(0.01)
        start = time.monotonic()
        buf.close()
        result["close_s"] = time.monotonic() - start
        thread.join(2 * TIMEOUT)
        result["thread_alive"] = thread.is_alive()
    else:
        steps()
        try:
            buf.close()
        except Exception as e:        # noqa: BLE001 - recorded
            result["close_error"] = f"{type(e).__name__}: {e}"
    return result


def collectives():
    """The transport's blocking collectives (checkpoints use them)."""
    from dali_rehearsal.exchange import make_transport
    with make_transport(COMM, timeout=TIMEOUT) as t:
        t.barrier()
        got = t.allgather_bytes(bytes([RANK]) * (3 * RANK))      # rank 0 sends nothing
        t.barrier()
        return {"rank_seen": t.rank, "size_seen": t.size, "name": t.name,
                "gathered": [g.hex() for g in got]}


# ------------------------------------------------------- mismatched calls
def calls(kind):
    """After a checkpoint saved together, rank 0 calls ``save()`` while rank 1
    makes another collective call (``kind``): a step (``save_vs_step``),
    ``load()`` on a new buffer (``save_vs_load``), building a buffer
    (``save_vs_build``: buffers that sample locally; ``save_alone``: rank 1
    builds a buffer that samples globally, so nothing pairs the two calls).
    Both ranks raise; the checkpoint saved together still loads."""
    path = os.path.join(OUT_DIR, "ckpt")
    kwargs = dict(capacity=20, num_representatives=3, device=DEVICE, seed=3, comm=COMM,
                  timeout=TIMEOUT, sampling="local" if kind == "save_vs_build" else "global")
    buf = dr.RehearsalBuffer(**kwargs)
    for step in range(4):
        buf.mix(*ident_batch(step, 3))
    buf.save(path)
    saved = (to_host(buf.stored(0)).tolist(), buf.num_seen)
    fresh = dr.RehearsalBuffer(**kwargs) if kind == "save_vs_load" else None
    training_collective()            # both ranks are here: the calls below start together
    result = {"kind": kind, "error": None}
    t0 = time.time()
    try:
        if RANK == 0:
            (fresh if fresh is not None else buf).save(path)
        elif kind == "save_vs_step":
            for step in range(4, 8):
                buf.mix(*ident_batch(step, 3))
        elif kind == "save_vs_load":
            fresh.load(path)
        else:
            dr.RehearsalBuffer(**kwargs)
    except Exception as e:
        result.update(_record(e, -1))
    result["elapsed"] = time.time() - t0
    if kind == "save_alone":
        # Neither call completed: a collective of each rank is still pending, so
        # the processes cannot take part in further collectives together.
        if TRANSPORT == "mpi":
            write(result)
            raise SystemExit(result["error"])     # `python -m mpi4py` aborts the job
        return result
    for b in (buf, fresh):
        if b is not None:
            b.close()
    again = dr.RehearsalBuffer(**kwargs)
    again.load(path)
    result["intact"] = (to_host(again.stored(0)).tolist(), again.num_seen) == saved
    again.mix(*ident_batch(9, 3))             # and global sampling works again
    again.close()
    return result


def task_aware():
    """Task-aware replay over every rank's shard: task 0 replays nothing, later
    tasks only earlier tasks' samples, with their labels, from the (rank, slot)
    where each owner held them before the step."""
    buf = dr.RehearsalBuffer(capacity=12, num_representatives=5, device=DEVICE, seed=4,
                             comm=COMM, policy="reservoir", timeout=TIMEOUT, task_aware=True)
    stats = new_stats()
    stats.update(first_task_rows=[], wrong_task=0, wrong_origin=0)
    held, drawn = [], []
    step = 0
    for task in range(3):
        for _ in range(8):
            held.append(to_host(buf.stored(0))[:, 0].tolist() if buf.size else [])
            batch = ident_batch(step, 3)
            out = buf.mix(*batch)
            reps = check(out, step, batch, stats)
            if task == 0:
                stats["first_task_rows"].append(len(to_host(out[0])))
            # an id's step says its task: 8 steps a task
            stats["wrong_task"] += int((((reps % 1_000_000) // 1000) // 8 >= task).sum())
            drawn.append([[int(o), int(s), int(i)] for (o, s), i
                          in zip(buf.last_origin.tolist(), reps.tolist())])
            step += 1
        buf.end_task()
    buf.close()
    # every rank's holdings before each step: a draw names the slot that held it
    everyone = allgather(held)
    for st, rows in enumerate(drawn):
        for owner, slot, ident in rows:
            if everyone[owner][st][slot] != ident:
                stats["wrong_origin"] += 1
    return stats


def task_aware_uniform():
    """Draws of task-aware replay, uniform over every rank's earlier samples:
    fixed stores (capacity 4 * (rank + 1) ** 2), no inserts while drawing."""
    capacity = 4 * (RANK + 1) ** 2
    buf = dr.RehearsalBuffer(capacity=capacity, num_representatives=5, device=DEVICE,
                             seed=12, comm=COMM, policy="reservoir", timeout=TIMEOUT,
                             task_aware=True)
    images, labels, _ = ident_batch(0, capacity)
    buf.add(images, labels)
    buf.end_task()
    core, steps = buf.core, 1000
    counts = [np.zeros(4 * (p + 1) ** 2, dtype=np.int64) for p in range(SIZE)]
    for _ in range(steps):
        reps = core.begin()
        for owner, slot in reps.origin.tolist():
            counts[owner][slot] += 1
        core.commit(core.empty_rows(reps.count), 0, np.empty(0, np.int64), reps)
    buf.close()
    return {"counts": [c.tolist() for c in counts], "steps": steps}


def feedback_save():
    """A checkpoint directory of buffers with feedback (logits = (id, writer),
    written back for every row), for an elastic load on another number of
    processes."""
    buf = dr.RehearsalBuffer(capacity=12, num_representatives=5, device=DEVICE, seed=5,
                             comm=COMM, policy="reservoir", timeout=TIMEOUT,
                             feedback={"logits": ((2,), "float64")})
    for step in range(15):
        out = buf.mix(*ident_batch(step, 3))
        ids = to_host(out[0])[:, 0]
        values = np.stack([ids, np.full(len(ids), RANK)], axis=1).astype(np.float64)
        buf.update(to_host(out[-1]), logits=values)
    buf.save(os.path.join(OUT_DIR, "ckpt"))
    stats = buf.feedback_stats()
    buf.close()
    return {"feedback": stats, "size": buf.size}


def feedback():
    """Feedback written back for representatives only, by whichever rank drew
    them (``logits = (id, the writer's rank)``): remote tickets reach their
    owners with the rounds. Every delivered row flagged as written carries
    its own sample's value; some were written by another rank; slots
    overwritten meanwhile drop their tickets (counted), never misapplied."""
    buf = dr.RehearsalBuffer(capacity=12, num_representatives=5, device=DEVICE, seed=4,
                             comm=COMM, policy="reservoir", timeout=TIMEOUT,
                             feedback={"logits": ((2,), "float64")})
    stats = new_stats()
    stats.update(written=0, wrong_value=0, written_remotely=0, fresh_flagged=0)
    for step in range(40):
        batch = ident_batch(step, 3)
        out = buf.mix(*batch)
        reps = check(out[:3], step, batch, stats)
        logits, written, tickets = (to_host(a) for a in out[3:])
        ids = to_host(out[0])[:, 0]
        b = len(batch[0])
        stats["fresh_flagged"] += int(written[:b].sum())
        w = written[b:] == 1
        stats["written"] += int(w.sum())
        stats["wrong_value"] += int((logits[b:][w, 0] != reps[w]).sum())
        stats["written_remotely"] += int((logits[b:][w, 1] != reps[w] // 1_000_000).sum())
        values = np.stack([ids[b:], np.full(len(reps), RANK)], axis=1).astype(np.float64)
        buf.update(tickets[b:], logits=values)
    stats["feedback"] = buf.feedback_stats()
    buf.close()
    stats["after_close"] = buf.feedback_stats()
    return stats


SCENARIOS = {f.__name__: f for f in (feedback, feedback_save, collectives, pairing, uniform, reproducible, seed_per_rank,
                                     exchange_counts,
                                     uneven, epoch_starts, stage_failure, add_during_round, use_after_close,
                                     close_from_another_thread, task_aware,
                                     task_aware_uniform)}
CALLS = ("save_vs_step", "save_vs_load", "save_vs_build", "save_alone")
FAILURES = ("raise_in_mix", "raise_outside", "close_early", "one_fewer", "uncaught", "sys_exit",
            "exit", "interrupt", "sigkill", "hang", "float_labels", "big_labels",
            "object_dtype", "capacity", "seed")
MISMATCHES = ("r", "policy", "sampling", "label_index", *LAYOUTS)


def main():
    if SCENARIO in SCENARIOS:
        result = SCENARIOS[SCENARIO]()
    elif SCENARIO.startswith("fail-") and SCENARIO[5:] in FAILURES:
        result = failure(SCENARIO[5:])
    elif SCENARIO.startswith("mismatch-") and SCENARIO[9:] in MISMATCHES:
        result = mismatch(SCENARIO[9:])
    elif SCENARIO.startswith("calls-") and SCENARIO[6:] in CALLS:
        result = calls(SCENARIO[6:])
    else:
        raise SystemExit(f"unknown scenario {SCENARIO}")
    write(result)


if __name__ == "__main__":
    try:
        main()
    except _Leave:              # a normal end, with the buffer still open
        pass
    else:
        if TRANSPORT != "mpi" and SCENARIO in SCENARIOS:
            # every buffer is closed: end the default group, as a torchrun program
            # should (left to the interpreter's exit, gloo's threads can abort it)
            dist.destroy_process_group()
