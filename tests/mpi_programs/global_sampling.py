"""Programs run under ``mpiexec -n N`` by tests/test_mpi.py; each rank writes
its result to ``OUT_DIR/<scenario>-<rank>.json`` for the test to read back.

    mpiexec -n 4 python tests/mpi_programs/global_sampling.py SCENARIO OUT_DIR
"""

import hashlib
import json
import os
import sys

import numpy as np
from mpi4py import MPI

import dali_rehearsal as dr

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# "gpu" runs the buffer on CuPy; DALI_REHEARSAL_CUDA_AWARE picks direct or staged transfers.
DEVICE = os.environ.get("DR_TEST_DEVICE", "cpu")


def ident_batch(step, b):
    """A batch whose content names it: id = rank * 1e6 + step * 1000 + i;
    image rows repeat the id, label = id % 7, logits = id / 2."""
    ids = rank * 1_000_000 + step * 1000 + np.arange(b, dtype=np.int64)
    images = np.repeat(ids[:, None], 5, axis=1)
    labels = (ids % 7).astype(np.int32)
    logits = (ids / 2.0).astype(np.float64)[:, None].repeat(2, axis=1)
    return images, labels, logits


def pairing(out_dir):
    """Every representative is a sample some rank inserted before this step,
    with its own label and extras; fill levels differ per rank."""
    from dali_rehearsal._backend import to_host
    buf = dr.RehearsalBuffer(capacity=40, num_representatives=6, device=DEVICE, seed=3,
                             comm=comm, policy="reservoir")
    checked = remote = 0
    for step in range(60):
        b = rank + 1                                    # unequal arrival rates
        images, labels, logits = ident_batch(step, b)
        oi, ol, og = (to_host(a) for a in buf.mix(images, labels, logits))
        assert (oi[:b] == images).all() and (ol[:b] == labels).all()
        reps = oi[b:, 0]
        assert len(set(reps.tolist())) == len(reps), "duplicate representative in a step"
        assert (oi[b:] == reps[:, None]).all()
        assert (ol[b:] == reps % 7).all(), "label does not belong to its sample"
        assert (og[b:] == (reps / 2.0)[:, None]).all(), "extra does not belong to its sample"
        src_rank, src_step = reps // 1_000_000, (reps % 1_000_000) // 1000
        assert (src_step < step).all(), "replayed inside the batch that brought it"
        assert ((src_rank >= 0) & (src_rank < size)).all()
        assert (buf.last_origin[:, 0] == src_rank).all(), "origin rank disagrees with content"
        checked += len(reps)
        remote += int((src_rank != rank).sum())
    staged = getattr(buf.sampler, "staged", None)
    buf.close()
    return {"checked": checked, "remote": remote, "staged": staged}


def uniform(out_dir):
    """Draw counts over (rank, slot), shards of very different fill levels."""
    capacity = 4 * (rank + 1) ** 2                     # 4, 16, 36, 64 slots
    buf = dr.RehearsalBuffer(capacity=capacity, num_representatives=5, device="cpu",
                             seed=11, comm=comm, policy="reservoir")
    counts = np.zeros(capacity, dtype=np.int64)
    steps = 1500
    for step in range(steps):
        images, labels, logits = ident_batch(step % 1000, 1)
        buf.mix(images, labels)
        if step >= 200:                                # all shards are full by then
            drawn_from = [[] for _ in range(size)]     # slots drawn from each owner
            for owner, slot in buf.last_origin.tolist():
                drawn_from[owner].append(slot)
            for slots in comm.alltoall(drawn_from):     # the draws that hit my slots
                np.add.at(counts, np.asarray(slots, dtype=np.int64), 1)
    buf.close()
    all_counts = comm.gather(counts.tolist(), root=0)
    return {"counts": all_counts if rank == 0 else None, "steps": steps - 200}


def reproducible(out_dir):
    digest = hashlib.sha256()
    buf = dr.RehearsalBuffer(capacity=30, num_representatives=4, device="cpu", seed=5,
                             comm=comm)
    for step in range(40):
        images, labels, logits = ident_batch(step, 3)
        for a in buf.mix(images, labels, logits):
            digest.update(np.ascontiguousarray(a).tobytes())
    buf.close()
    return {"digest": digest.hexdigest()}


def checkpoint(out_dir):
    """Each rank saves its shard mid-stream; new buffers that load the states
    continue with exactly the batches the original buffers deliver."""
    import pickle
    kwargs = dict(capacity=25, num_representatives=4, device="cpu", seed=8, comm=comm)
    original = dr.RehearsalBuffer(**kwargs)
    for step in range(20):
        original.mix(*ident_batch(step, rank + 2)[:2])
    state = pickle.dumps(original.state_dict())
    digests = []
    for buf in (original, None):
        if buf is None:
            buf = dr.RehearsalBuffer(**kwargs)
            buf.load_state_dict(pickle.loads(state))
        digest = hashlib.sha256()
        for step in range(20, 35):
            for a in buf.mix(*ident_batch(step, rank + 2)[:2]):
                digest.update(np.ascontiguousarray(a).tobytes())
        digests.append(digest.hexdigest())
        buf.close()
    return {"digests": digests}


def failure(out_dir):
    """Rank 1 feeds a bad batch at step 5: every rank must raise, none may hang."""
    buf = dr.RehearsalBuffer(capacity=30, num_representatives=4, device="cpu", seed=5,
                             comm=comm)
    try:
        for step in range(20):
            images, labels, logits = ident_batch(step, 3)
            if rank == 1 and step == 5:
                labels = -labels - 1
            buf.mix(images, labels)
    except Exception as e:  # reported to the test
        return {"error": type(e).__name__, "step": step, "message": str(e)[:200]}
    finally:
        buf.close()
    return {"error": None}


def _mnist_pipelines(files, labels, batch, buf, last_batch_policy):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=rank + 1)
    def decode():
        jpegs, lab = fn.readers.file(files=files, labels=labels, name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), lab

    @pipeline_def(batch_size=batch + buf.num_representatives, num_threads=1, device_id=None)
    def train(source):
        images, lab, flag = dr.fn.rehearsal(source, buffer=buf, replay_flag=True,
                                            last_batch_policy=last_batch_policy)
        return images, lab, flag

    return train(decode())


def uneven(out_dir):
    """Real DALI pipelines whose shards differ a lot in length: every epoch
    ends on every rank at the same step, and nothing is lost."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    from PIL import Image
    data = dr.LabelledFiles.from_folder(os.path.join(out_dir, "mnist", "train"))
    # rank k reads 5 + 9k of the files: very unequal shards
    n = 5 + 9 * rank
    files = list(data.files[rank * 40: rank * 40 + n])
    labels = list(data.labels[rank * 40: rank * 40 + n])
    pixels = {np.asarray(Image.open(f)).tobytes(): (i, lab)
              for i, (f, lab) in enumerate(zip(data.files, data.labels))}
    mine = {data.files.index(f): pos for pos, f in enumerate(files)}   # dataset index -> shard pos
    buf = dr.RehearsalBuffer(capacity=25, num_representatives=3, device="cpu", seed=2,
                             comm=comm)
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
        steps.append(k)
    buf.close()
    # The reader streams the shard cyclically; the stage must deliver exactly
    # that stream, in order: no sample skipped, none repeated.
    in_order = fresh_order == [i % n for i in range(len(fresh_order))]
    return {"steps": steps, "fresh": len(fresh_order), "shard": n, "in_order": in_order,
            "wrong_labels": int(wrong), "remote_representatives": remote}


SCENARIOS = {f.__name__: f for f in (pairing, uniform, reproducible, failure, uneven,
                                     checkpoint)}

if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], sys.argv[2]
    result = SCENARIOS[scenario](out_dir)
    result.update(rank=rank, size=size)
    with open(os.path.join(out_dir, f"{scenario}-{rank}.json"), "w") as f:
        json.dump(result, f)
