"""Checkpoint scenarios run under ``mpiexec -n N`` (or alone) by
tests/test_checkpoint.py; each rank writes ``OUT_DIR/<scenario>-<rank>.json``.

    mpiexec -n 2 python tests/dist_programs/checkpoint.py SCENARIO OUT_DIR [ARGS...]

Samples name themselves: sample ``id`` has the image bytes
``(id & 255, id >> 8 & 255, id >> 16 & 255, 7)``, logits ``id / 2`` (float32),
task ``id // 1000`` (int32) and a label drawn from a fixed hash of the id
(random-looking, so a label paired with another sample shows up).
The helpers are imported by the test module too (MPI is imported only when run).
"""

import hashlib
import json
import os
import sys

import numpy as np

import dali_rehearsal as dr

NUM_CLASSES = 4


def label_of(ids):
    """Each sample's class: a fixed hash of its id."""
    z = np.asarray(ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)     # splitmix64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z % np.uint64(NUM_CLASSES)).astype(np.int64)


def make_batch(ids):
    ids = np.asarray(ids, dtype=np.int64)
    images = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255,
                       np.full(len(ids), 7)], axis=1).astype(np.uint8)
    return images, label_of(ids), (ids / 2).astype(np.float32), (ids // 1000).astype(np.int32)


def ident(images):
    images = np.asarray(images).astype(np.int64)
    return images[:, 0] + 256 * images[:, 1] + 65536 * images[:, 2]


def check_fields(fields):
    """Every row's label and extras belong to its sample; returns the ids."""
    from dali_rehearsal._backend import to_host
    images, labels, logits, task = (to_host(f) for f in fields)
    ids = ident(images)
    assert (images[:, 3] == 7).all(), "image bytes are not a sample's"
    assert (logits == (ids / 2).astype(np.float32)).all(), "logits belong to another sample"
    assert (task == ids // 1000).all(), "task id belongs to another sample"
    assert (labels.astype(np.int64) == label_of(ids)).all(), "label belongs to another sample"
    return ids


def feed(buffer, rank, steps, b, start=0):
    """``steps`` mix() calls of ``b`` fresh samples (ids from ``rank``, ``step``);
    returns a digest of the outputs, after checking every row's fields
    belong together."""
    digest = hashlib.sha256()
    for step in range(start, start + steps):
        out = buffer.mix(*make_batch(rank * 100_000 + step * 100 + np.arange(b)))
        check_fields(out)
        for a in out:
            digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def shard_report(buffer):
    state = buffer.state_dict()
    policy = {k: np.asarray(v).tolist() if hasattr(v, "shape") else v
              for k, v in state["policy"].items() if k != "rng"}
    stored = buffer.stored() if buffer.size else None
    return {"rank": buffer.rank, "size": buffer.size, "num_seen": buffer.num_seen,
            "class_counts": {str(k): v for k, v in buffer.class_counts().items()},
            "ids": [] if stored is None else ident(stored[0]).tolist(),
            "labels": [] if stored is None else np.asarray(stored[1]).tolist(),
            "policy": policy}


# ------------------------------------------------------------------ scenarios
def roundtrip(comm, out_dir, policy):
    """Save mid-stream (directory and torch state dict); new buffers loading
    either continue with exactly the batches of the original."""
    import io
    import torch
    rank = comm.Get_rank()
    kwargs = dict(capacity=24, num_representatives=5, policy=policy, device="cpu", seed=8,
                  comm=comm)
    original = dr.RehearsalBuffer(**kwargs)
    feed(original, rank, 12, rank + 3)
    path = os.path.join(out_dir, "ckpt")
    original.save(path)
    blob = io.BytesIO()
    torch.save({"buffer": original.state_dict()}, blob)
    digests = [feed(original, rank, 10, rank + 3, start=12)]
    original.close()
    for how in ("files", "torch"):
        buffer = dr.RehearsalBuffer(**kwargs)
        if how == "files":
            buffer.load(path)
        else:
            blob.seek(0)
            buffer.load_state_dict(torch.load(blob, weights_only=True)["buffer"])
        digests.append(feed(buffer, rank, 10, rank + 3, start=12))
        buffer.close()
    return {"digests": digests}


def save(comm, out_dir, path, policy, capacity, steps):
    """Writes a checkpoint after ``steps`` steps; reports what each shard holds.
    (Local sampling: quick on a loaded machine; the loads use global sampling.)"""
    rank = comm.Get_rank() if comm is not None else 0
    buffer = dr.RehearsalBuffer(capacity=int(capacity), num_representatives=3, policy=policy,
                                device="cpu", seed=5, comm=comm, sampling="local")
    feed(buffer, rank, int(steps), 9)
    buffer.save(path)
    report = shard_report(buffer)
    buffer.close()
    return report


def load(comm, out_dir, path, policy, capacity, seed, resize="0"):
    """Loads a checkpoint (of any number of processes), checks and reports
    the shard, then checks that the restored buffers keep mixing valid
    batches (with global sampling across the new processes)."""
    rank = comm.Get_rank() if comm is not None else 0
    buffer = dr.RehearsalBuffer(capacity=int(capacity), num_representatives=3, policy=policy,
                                device="cpu", seed=int(seed), comm=comm)
    buffer.load(path, resize=resize == "1")
    report = shard_report(buffer)
    report["checked"] = len(check_fields(buffer.stored())) if buffer.size else 0
    feed(buffer, rank + 50, 5, 4)
    report["continued"] = True
    buffer.close()
    return report


def selection_counts(comm, out_dir, path, policy, capacity, loads):
    """How often each saved sample is restored, over ``loads`` loads with
    different seeds (collective: every rank loads each time)."""
    rank = comm.Get_rank()
    counts = {}
    for seed in range(int(loads)):
        buffer = dr.RehearsalBuffer(capacity=int(capacity), num_representatives=3,
                                    policy=policy, device="cpu", seed=1000 + seed, comm=comm,
                                    sampling="local")
        buffer.load(path)
        ids = check_fields(buffer.stored()).tolist() if buffer.size else []
        everyone = comm.allgather(ids)
        if rank == 0:
            flat = [i for ids in everyone for i in ids]
            assert len(flat) == len(set(flat)), "a sample restored twice"
            for i in flat:
                counts[i] = counts.get(i, 0) + 1
        buffer.close()
    return {"counts": {str(k): v for k, v in counts.items()}}


def corrupt(comm, out_dir, policy):
    """Rank 1's shard of one checkpoint is corrupted: loading it raises on
    every rank and changes nothing; loading a good checkpoint then works."""
    rank = comm.Get_rank()
    kwargs = dict(capacity=20, num_representatives=3, policy=policy, device="cpu", seed=2,
                  comm=comm)
    original = dr.RehearsalBuffer(**kwargs)
    feed(original, rank, 6, 5)
    good, bad = os.path.join(out_dir, "good"), os.path.join(out_dir, "bad")
    original.save(good)
    original.save(bad)
    comm.Barrier()
    if rank == 0:
        shard = [n for n in os.listdir(bad) if n.endswith("-00001-of-00002.npz")][0]
        with open(os.path.join(bad, shard), "r+b") as f:
            f.seek(-40, os.SEEK_END)
            byte = f.read(1)
            f.seek(-40, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    comm.Barrier()
    buffer = dr.RehearsalBuffer(**kwargs)
    error = None
    try:
        buffer.load(bad)
    except ValueError as e:
        error = f"{type(e).__name__}: {e}"
    unchanged = buffer.size == 0 and buffer.num_seen == 0 and buffer.spec is None
    buffer.load(good)
    same = buffer.size == original.size and buffer.class_counts() == original.class_counts()
    a = feed(original, rank, 4, 5, start=6)
    b = feed(buffer, rank, 4, 5, start=6)
    original.close()
    buffer.close()
    return {"error": error, "unchanged": unchanged, "same": same and a == b}


# ------------------------------------------------ one directory, many writers
def fed_buffer(seed, steps=12, b=7, capacity=24):
    """The buffer whose state ``save_loop`` writes (the tests rebuild it to
    know what a loaded checkpoint must hold)."""
    buffer = dr.RehearsalBuffer(capacity=int(capacity), num_representatives=5, device="cpu",
                                seed=int(seed))
    feed(buffer, int(seed), int(steps), b)
    return buffer


def save_loop(comm, out_dir, path, seed, saves, go_file):
    """A process of its own (``comm=None``) that saves its buffer into
    ``path`` ``saves`` times, as fast as it can, once ``go_file`` exists
    (prints ``ready`` when it waits for it). Counts the saves that
    committed, those refused because another save held the directory, and
    any other error; prints the counts as its last line."""
    from dali_rehearsal.checkpoint import ConcurrentSaveError
    import time
    buffer = fed_buffer(seed)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.001)
    counts = {"seed": int(seed), "saved": 0, "busy": 0, "other": []}
    for _ in range(int(saves)):
        try:
            buffer.save(path)
            counts["saved"] += 1
        except ConcurrentSaveError as e:
            counts["busy"] += 1
            counts["busy_message"] = str(e)
        except Exception as e:  # anything else is a failure of the test
            counts["other"].append(f"{type(e).__name__}: {e}")
    print(json.dumps(counts), flush=True)
    return counts


def save_forever(comm, out_dir, path, seed_a, seed_b):
    """Saves two buffers' states into ``path`` in turn until killed; prints
    ``ready`` first and ``saved`` after each save (unbuffered)."""
    buffers = [fed_buffer(seed_a, capacity=600), fed_buffer(seed_b, capacity=600)]
    print("ready", flush=True)
    k = 0
    while True:
        buffers[k % 2].save(path)
        print("saved", flush=True)
        k += 1


def hostile_loads(comm, out_dir, cases_dir):
    """Loads each checkpoint directory of ``cases_dir`` (a good one first, to
    warm up) into a new buffer; reports each error and how much the peak
    memory of the process grew over all the bad ones."""
    import resource

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # KiB on Linux

    def fresh():
        return dr.RehearsalBuffer(capacity=24, num_representatives=5, device="cpu", seed=8)

    fresh().load(os.path.join(cases_dir, "good"), resize=True)
    fresh().load(os.path.join(cases_dir, "good"), resize=True)
    before = peak()
    errors = {}
    for name in sorted(os.listdir(cases_dir)):
        if name == "good":
            continue
        try:
            fresh().load(os.path.join(cases_dir, name), resize=True)
            errors[name] = None
        except BaseException as e:  # reported: the test checks each one
            errors[name] = {"type": type(e).__name__,
                            "is_checkpoint_error": isinstance(e, dr.CheckpointError),
                            "message": str(e)[:2000]}
    return {"errors": errors, "peak_growth": peak() - before}


def forge_meta(path, edit):
    """Edits the metadata of every shard of checkpoint ``path`` with
    ``edit(meta)`` and recomputes the checksums: well-formed files, hostile
    values."""
    import io
    import zipfile
    from dali_rehearsal.checkpoint.atomic import HashingWriter
    from dali_rehearsal.checkpoint.manifest import manifest_bytes
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        body = json.load(f)["body"]
    for entry in body["shards"]:
        file = os.path.join(path, entry["file"])
        with zipfile.ZipFile(file) as z:
            members = {n: z.read(n) for n in z.namelist()}
        meta = json.loads(np.load(io.BytesIO(members["meta.npy"])).tobytes())
        edit(meta)
        blob = io.BytesIO()
        np.lib.format.write_array(blob, np.frombuffer(json.dumps(meta).encode(), np.uint8))
        members["meta.npy"] = blob.getvalue()
        with open(file, "wb") as f:
            writer = HashingWriter(f)
            with zipfile.ZipFile(writer, "w") as z:
                for name, data in members.items():
                    z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
        entry.update(sha256=writer.sha256.hexdigest(), bytes=writer.nbytes)
    with open(manifest, "wb") as f:
        f.write(manifest_bytes(body))


def forged_seed(comm, out_dir, seed):
    """A checkpoint of two processes whose shared seed (the sampler's) is
    ``seed`` (2**64: more than the exchange's int64 holds), checksums
    recomputed: loading it raises CheckpointError on every rank at once and
    changes nothing; the checkpoint it was forged from loads and mixes."""
    import time
    rank = comm.Get_rank()
    kwargs = dict(capacity=20, num_representatives=3, device="cpu", seed=2, comm=comm,
                  timeout=120)
    original = dr.RehearsalBuffer(**kwargs)
    feed(original, rank, 6, 5)
    good, bad = os.path.join(out_dir, "good"), os.path.join(out_dir, "bad")
    original.save(good)
    original.save(bad)
    original.close()
    comm.Barrier()
    if rank == 0:
        def edit(meta):
            meta["sampler"]["seed"] = int(seed)
        forge_meta(bad, edit)
    comm.Barrier()
    buffer = dr.RehearsalBuffer(**kwargs)
    error, t0 = None, time.time()
    try:
        buffer.load(bad)
    except Exception as e:
        error = {"type": type(e).__name__, "message": str(e),
                 "is_checkpoint_error": isinstance(e, dr.CheckpointError)}
    elapsed = time.time() - t0
    unchanged = buffer.size == 0 and buffer.num_seen == 0 and buffer.spec is None
    buffer.load(good)
    feed(buffer, rank, 3, 5, start=6)
    buffer.close()
    return {"error": error, "elapsed": elapsed, "unchanged": unchanged}


def split_paths(comm, out_dir):
    """Rank 1 saves into another directory than rank 0 (or one rank 0 cannot
    see): every rank raises, naming rank 1's missing shard; neither directory
    keeps a file of that save, the earlier checkpoint still loads."""
    import time
    rank = comm.Get_rank()
    kwargs = dict(capacity=20, num_representatives=3, device="cpu", seed=2, comm=comm,
                  timeout=120)
    original = dr.RehearsalBuffer(**kwargs)
    feed(original, rank, 6, 5)
    shared, other = os.path.join(out_dir, "shared"), os.path.join(out_dir, "other")
    original.save(shared)
    first = sorted(os.listdir(shared))
    feed(original, rank, 2, 5, start=6)
    os.makedirs(other, exist_ok=True)
    comm.Barrier()
    error, t0 = None, time.time()
    try:
        original.save(shared if rank == 0 else other)
    except Exception as e:
        error = {"type": type(e).__name__, "message": str(e)}
    elapsed = time.time() - t0
    comm.Barrier()
    buffer = dr.RehearsalBuffer(**kwargs)
    buffer.load(shared)
    loads = buffer.num_seen == 6 * 5
    original.close()
    buffer.close()
    return {"error": error, "elapsed": elapsed, "loads": loads,
            "shared_unchanged": sorted(os.listdir(shared)) == first,
            "other": sorted(os.listdir(other))}


SCENARIOS = {"roundtrip": roundtrip, "save": save, "load": load,
             "selection_counts": selection_counts, "corrupt": corrupt, "save_loop": save_loop,
             "save_forever": save_forever, "hostile_loads": hostile_loads,
             "forged_seed": forged_seed, "split_paths": split_paths}


def main():
    scenario, out_dir, *args = sys.argv[1:]
    comm = None
    if os.environ.get("DR_TEST_NO_MPI") != "1":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    rank = comm.Get_rank() if comm is not None else 0
    result = SCENARIOS[scenario](comm, out_dir, *args)
    result["rank"] = rank
    if scenario != "save_loop":       # (processes of their own: their results on stdout)
        with open(os.path.join(out_dir, f"{scenario}-{rank}.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
