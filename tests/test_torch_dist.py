"""What is particular to the torch.distributed transport: NCCL with device
buffers (GPU machines), gloo staging for GPU storage, launches without a
communicator, a process group of one. The sampling guarantees themselves are
tested over both transports in tests/test_global_sampling.py."""

from pathlib import Path

import numpy as np
import pytest

from dist_programs.launching import launch, output, read_results

HERE = Path(__file__).parent / "dist_programs"
PROGRAM = HERE / "global_sampling.py"
CHECKS = HERE / "launch_checks.py"


@pytest.mark.torchrun
def test_no_comm_in_a_torchrun_job_warns_once_on_rank_0(tmp_path):
    done = launch("torchrun", 2, [CHECKS, "no_comm", tmp_path], timeout=300)
    results = read_results(tmp_path, "no_comm", 2)
    assert set(results) == {0, 1}, output(done)
    assert len(results[0]["warnings"]) == 1, results[0]     # three buffers, one warning
    assert results[0]["categories"] == ["RuntimeWarning"]
    assert "each process samples representatives only from its own shard" in \
        results[0]["warnings"][0]
    assert results[1]["warnings"] == []                      # quiet except on rank 0


def test_a_process_group_of_one_samples_locally():
    """``comm=dist.group.WORLD`` in a one-process job: the single-process buffer."""
    import torch.distributed as dist
    from torch.distributed import HashStore
    import dali_rehearsal as dr
    from dali_rehearsal.exchange import LocalSampler
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        buf = dr.RehearsalBuffer(capacity=5, num_representatives=2, device="cpu", seed=0,
                                 comm=dist.group.WORLD)
        assert isinstance(buf.sampler, LocalSampler)
        assert (buf.rank, buf.world_size) == (0, 1)
        buf.mix(np.zeros((3, 2)), np.arange(3))
        assert len(buf.mix(np.ones((3, 2)), np.arange(3))[0]) == 5
        buf.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("timeout, kept", [(float("inf"), None), (1e300, 1e300), (None, None),
                                           (10**400, None)])
def test_timeouts_beyond_what_a_process_group_takes_mean_no_limit(timeout, kept):
    """``timeout=float("inf")`` means no limit, as on MPI; limits beyond what a
    process group takes (``timedelta`` cannot hold 1e300 s, gloo refuses
    ``timedelta.max``) give the exchange's groups the longest timeout gloo
    takes instead of an OverflowError, and the transport works."""
    import torch.distributed as dist
    from torch.distributed import HashStore
    from dali_rehearsal.exchange import make_transport
    dist.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        with make_transport(dist.group.WORLD, timeout=timeout) as t:
            assert t.timeout == kept
            assert t.allgather_bytes(b"abc") == [b"abc"]
            t.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.torchrun
@pytest.mark.gpu
@pytest.mark.parametrize("backend, device_buffers", [("cpu:gloo,cuda:nccl", True),
                                                     ("gloo", False)],
                         ids=["nccl-device-buffers", "gloo-staged"])
def test_gpu_buffers_exchange_their_samples(backend, device_buffers, tmp_path):
    """CuPy shards over torch.distributed: with an NCCL group, rows travel as
    CUDA tensors wrapped through DLPack (no host staging); with gloo, through
    pinned host memory. Ranks may share one GPU."""
    import torch
    if device_buffers and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank")
    done = launch("torchrun", 2, [PROGRAM, "pairing", tmp_path], timeout=300,
                  extra_env={"DR_TEST_TRANSPORT": "torch", "DR_TEST_DEVICE": "gpu",
                             "DR_TEST_TORCH_BACKEND": backend})
    results = read_results(tmp_path, "pairing", 2)
    assert set(results) == {0, 1}, output(done)
    for r in results.values():
        assert r["checked"] > 200 and r["remote"] > 0 and r["mispaired"] == 0
        assert r["device_buffers"] is device_buffers
        assert r["staged"] is (not device_buffers)
        assert r["transport_name"] == ("torch-nccl" if device_buffers else "torch-gloo")


@pytest.mark.torchrun
@pytest.mark.gpu
def test_nccl_failures_stop_every_rank(tmp_path):
    """The failure rounds travel on the gloo control group also when the data
    goes over NCCL."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank")
    done = launch("spawn", 2, [PROGRAM, "fail-raise_in_mix", tmp_path], timeout=300,
                  extra_env={"DR_TEST_TRANSPORT": "torch", "DR_TEST_DEVICE": "gpu",
                             "DR_TEST_TORCH_BACKEND": "cpu:gloo,cuda:nccl",
                             "DR_TEST_TIMEOUT": "120"})
    results = read_results(tmp_path, "fail-raise_in_mix", 2)
    assert set(results) == {0, 1}, output(done)
    assert results[1]["error"] == "ValueError"
    assert results[0]["error"] == "RemoteError"
    assert "rank 1 failed (ValueError: labels must be non-negative" in results[0]["message"]


@pytest.mark.torchrun
@pytest.mark.slow
def test_profile_global_sampling_runs_under_torchrun(tmp_path):
    """The profiling script takes torchrun's launch: global sampling over the
    torch transport against local sampling, with the exchange's own figures."""
    import json
    out = tmp_path / "gs.json"
    tiny = ["--images", "40", "--image-size", "32", "--batch-size", "8", "--representatives",
            "2", "--steps", "3", "--warmup", "1", "--repeats", "2", "--no-progress",
            "--compute-ms", "5", "--grad-mb", "0.25", "--device", "cpu", "--out", out]
    script = Path(__file__).resolve().parents[1] / "pipelines" / "profile_global_sampling.py"
    done = launch("torchrun", 2, [script, *tiny], timeout=400,
                  extra_env={"DALI_REHEARSAL_CACHE": tmp_path / "cache"})
    assert done[0].returncode == 0, output(done)
    data = json.loads(out.read_text())
    assert data["launcher"] == "torchrun" and data["world_size"] == 2
    assert set(data["variants"]) == {"global", "local"}
    assert data["headline"]["transport"] == "torch-gloo"
    ex = data["exchange"]["global"]
    assert ex["transport"] == "torch-gloo" and ex["rounds_per_rank"] > 0
    assert ex["mean_round_ms"] > 0 and ex["kib_received_per_round"] > 0
    assert out.with_suffix(".png").exists()
