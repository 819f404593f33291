"""Global sampling on real processes, the same test bodies over both
transports: mpi4py (``mpiexec``) and torch.distributed with gloo
(``torchrun``, or plain processes with torchrun's environment for the failure
tests). CPU backend; every launch is bounded, a hang is a failure.

The programs are in tests/dist_programs/global_sampling.py: each rank feeds
batches whose content names them (image rows repeat an id, label = id % 7,
extras = id / 2) and counts every representative that is not an earlier
sample with its own label and extras.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dist_programs.launching import launch, output, read_results

PROGRAM = Path(__file__).parent / "dist_programs" / "global_sampling.py"
BOUND = 300               # seconds per launch: generous for a loaded 2-core machine

MPI = pytest.param("mpi", marks=pytest.mark.mpi)
TORCH = pytest.param("torch", marks=pytest.mark.torchrun)
TRANSPORTS = [MPI, TORCH]


def run(transport, n, scenario, out_dir, *, launcher=None, bound=BOUND, expect_ok=True,
        timeout=None, mpiexec_args=(), python_args=()):
    """Runs ``scenario`` on ``n`` ranks; returns ``{rank: result}``."""
    if launcher is None:
        launcher = "mpiexec" if transport == "mpi" else "torchrun"
    if launcher == "mpiexec" and shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found")
    extra = {"DR_TEST_TRANSPORT": transport}
    if timeout is not None:
        extra["DR_TEST_TIMEOUT"] = timeout
    done = launch(launcher, n, [PROGRAM, scenario, out_dir], timeout=bound, extra_env=extra,
                  mpiexec_args=mpiexec_args, python_args=python_args)
    results = read_results(out_dir, scenario, n)
    if expect_ok:
        assert all(p.returncode == 0 for p in done) and len(results) == n, output(done)
    return results, done


def no_mispaired_rows(results):
    for r in results.values():
        assert r.get("mispaired", 0) == 0, r
        assert r.get("duplicates", 0) == 0, r


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [2, 4])
def test_representatives_are_earlier_samples_with_their_own_labels(transport, n, tmp_path):
    """Also runs the training's own collective (MPI allreduce, torch
    all_reduce on the default group) after every step: the exchange's
    collectives run on a communicator of their own and never mix with it."""
    results, _ = run(transport, n, "pairing", tmp_path)
    no_mispaired_rows(results)
    for r in results.values():
        assert r["checked"] > 200
        assert r["remote"] > 0.3 * r["checked"], "representatives should come from other ranks"
        assert r["transport_name"] == ("mpi" if transport == "mpi" else "torch-gloo")


@pytest.mark.parametrize("transport, n", [
    pytest.param(t, n, marks=getattr(pytest.mark, "mpi" if t == "mpi" else "torchrun"),
                 id=f"{t}-{n}") for t, n in [("mpi", 2), ("mpi", 4), ("torch", 2), ("torch", 4),
                                             ("mpi", 8), ("mpi", 16)]])
def test_global_sampling_is_uniform_over_rank_and_slot(transport, n, tmp_path):
    """Also every representative keeps its label and extras. At 8 and 16
    processes (more than cores: MPICH oversubscribes) most rounds move rows
    between only a few pairs of processes."""
    from scipy.stats import chisquare
    results, _ = run(transport, n, "uniform", tmp_path,
                     launcher=None if transport == "mpi" else "spawn", bound=BOUND * (n // 4 + 1))
    no_mispaired_rows(results)
    assert all(r["checked"] > 0 for r in results.values())
    capacities = [4 * (k % 4 + 1) ** 2 for k in range(n)]     # every shard full after warm-up
    counts = sum(np.concatenate([np.asarray(c) for c in r["counts"]]) for r in results.values())
    assert len(counts) == sum(capacities)
    steps = results[0]["steps"]
    assert counts.sum() == steps * n * 5
    # one test over every (rank, slot): equal expected counts despite unequal shards
    assert chisquare(counts).pvalue > 1e-3, counts
    # and the share of each rank is proportional to its fill level
    per_rank = np.add.reduceat(counts, np.cumsum([0] + capacities[:-1]))
    expected = np.asarray(capacities) / sum(capacities) * counts.sum()
    assert chisquare(per_rank, expected).pvalue > 1e-3, (per_rank, expected)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_same_seeds_give_the_same_batches(transport, tmp_path):
    first, _ = run(transport, 2, "reproducible", tmp_path)
    second, _ = run(transport, 2, "reproducible", tmp_path)
    no_mispaired_rows(first)
    assert [r["digest"] for r in first.values()] == [r["digest"] for r in second.values()]
    assert first[0]["digest"] != first[1]["digest"]      # ranks differ from each other


@pytest.mark.mpi
@pytest.mark.torchrun
@pytest.mark.parametrize("n", [2, 4])
def test_both_transports_give_the_same_batches(n, tmp_path):
    """The protocol is written once: the same seeds give the same batches over
    mpi4py and over torch.distributed."""
    mpi, _ = run("mpi", n, "reproducible", tmp_path)
    torch, _ = run("torch", n, "reproducible", tmp_path, launcher="spawn")
    assert [mpi[p]["digest"] for p in range(n)] == [torch[p]["digest"] for p in range(n)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [2, 4])
def test_the_transport_counts_what_the_protocol_must_send(transport, n, tmp_path):
    """``exchange_stats()``: one status allgather per round (and one for the
    construction); in every round that draws, one message to each process
    that drew rows of this shard and none to any other, all fields in it;
    bytes = status rows + the rows each process serves to the others."""
    from dali_rehearsal.exchange.protocol import COLUMNS, draws
    results, _ = run(transport, n, "exchange_counts", tmp_path)
    status = 8 * COLUMNS                       # bytes of one status row
    for me, res in results.items():
        assert res["built"] == {"rounds": 0, "collectives": 1, "allgathers": 1, "exchanges": 0,
                                "messages_sent": n - 1, "bytes_sent": status * (n - 1),
                                "bytes_received": status * (n - 1)}, res["built"]
        b, steps, fields, seed = res["b"], res["steps"], res["fields"], res["seed"]
        row = sum(fields)
        rounds = steps + 1                     # the steps', and the one opened for the next
        exchanges = messages = sent = received = 0
        for j in range(rounds):                # round j: every shard holds b * j samples
            total = n * b * j
            k = min(7, total)
            if k == 0:
                continue
            owners = draws(seed, j, n, total, k) // (b * j)      # (process, draw) -> owner
            to = [int((owners[q] == me).sum()) if q != me else 0 for q in range(n)]
            frm = int((owners[me] != me).sum())
            messages += sum(c > 0 for c in to)
            sent += sum(to) * row
            received += frm * row
            exchanges += bool(sum(to) or frm)
        assert res["stats"] == {
            "rounds": rounds, "collectives": 1 + rounds, "allgathers": 1 + rounds,
            "exchanges": exchanges, "messages_sent": (1 + rounds) * (n - 1) + messages,
            "bytes_sent": (1 + rounds) * status * (n - 1) + sent,
            "bytes_received": (1 + rounds) * status * (n - 1) + received}, (me, res["stats"])
        assert sent > 0 and received > 0
        # at most one data message to each other process per round, never one per field
        assert messages <= exchanges * (n - 1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_add_waits_for_the_open_round(transport, tmp_path):
    """``buffer.add()`` while the round for the next step is still reading the
    store in the background: the insert waits for it, nothing is torn."""
    results, _ = run(transport, 2, "add_during_round", tmp_path,
                     launcher=None if transport == "mpi" else "spawn")
    no_mispaired_rows(results)
    for r in results.values():
        assert r["early_inserts"] == 0
        assert r["checked"] > 30


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seeds_that_differ_per_rank_take_the_shared_draws_from_rank_0(transport, tmp_path):
    """``seed=rank``-style seeds (here 7 * rank + 1) are safe: every rank draws
    with rank 0's seed, so representatives keep their labels, and runs repeat."""
    first, _ = run(transport, 2, "seed_per_rank", tmp_path,
                   launcher=None if transport == "mpi" else "spawn")
    second, _ = run(transport, 2, "seed_per_rank", tmp_path,
                    launcher=None if transport == "mpi" else "spawn")
    no_mispaired_rows(first)
    assert all(r["checked"] > 100 and r["remote"] > 0 for r in first.values())
    assert {r["shared_seed"] for r in first.values()} == {1}
    assert [r["digest"] for r in first.values()] == [r["digest"] for r in second.values()]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mix_add_sample_after_close_raise(transport, tmp_path):
    results, _ = run(transport, 2, "use_after_close", tmp_path,
                     launcher=None if transport == "mpi" else "spawn")
    for r in results.values():
        assert r["num_seen"] == 12                    # the three steps before close
        for name, message in r["errors"].items():
            assert message and "closed RehearsalBuffer" in message, (name, message)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_from_another_thread_ends_a_thread_in_mix(transport, tmp_path):
    """Rank 0's main thread closes the buffer while another of its threads is
    taking (collective) steps: no deadlock; that thread stops with an error,
    and rank 1 learns that rank 0 closed its buffer."""
    results, _ = run(transport, 2, "close_from_another_thread", tmp_path,
                     launcher=None if transport == "mpi" else "spawn")
    first, second = results[0], results[1]
    assert first["thread_alive"] is False and first["close_s"] < 30
    assert first["steps"] >= 20 and first["error"] in ("RuntimeError", "RemoteError"), first
    assert second["error"] == "RemoteError", second
    assert "rank 0 closed its buffer" in second["message"], second
    assert abs(first["steps"] - second["steps"]) <= 2


@pytest.fixture
def mnist_dir(tmp_path, mnist):
    (tmp_path / "mnist").symlink_to(Path(mnist[0]).parent)
    return tmp_path


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [2, 4])
def test_uneven_shards_end_epochs_together_without_loss(transport, n, mnist_dir):
    results, _ = run(transport, n, "uneven", mnist_dir)
    steps = [results[p]["steps"] for p in range(n)]
    assert all(s == steps[0] for s in steps), steps          # lockstep every epoch
    for r in results.values():
        assert r["wrong_labels"] == 0
        assert r["in_order"], r                               # nothing lost, nothing repeated
        assert r["remote_representatives"] > 0                # global sampling reached others
    # The shortest shard sets the epoch: it delivers each of its samples once per
    # epoch; longer shards carry what is left into their next epoch.
    shortest = results[0]
    assert shortest["fresh"] == 4 * shortest["shard"]
    assert steps[0] == [-(-shortest["shard"] // 4)] * 4
    for p in range(1, n):
        assert results[p]["fresh"] == 4 * sum(steps[0])       # full batches every step


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_epoch_starts_give_the_same_batches_whatever_the_timing(transport, mnist_dir):
    """The round of an epoch's first step opens at the epoch end: random
    pauses between steps and epochs change nothing in the batches, with the
    stage's worker and without it. (An ``add()`` between epochs would race
    with the worker, which builds the next epoch's first steps as soon as
    DALI asks for them at the reset, as it does within an epoch.)"""
    results, _ = run(transport, 2, "epoch_starts", mnist_dir)
    for r in results.values():
        assert r["steps"] == [[3] * 4] * 4, r["steps"]     # the shorter shard ends each epoch
        assert len(set(r["digests"])) == 1, r["digests"]
    assert results[0]["digests"][0] != results[1]["digests"][0]


# ------------------------------------------------------------------ failures
# kind -> (error on rank 1, text of rank 1's error, text of the others' RemoteError)
REPORTED = {
    "raise_in_mix": ("ValueError", "labels must be non-negative",
                     "rank 1 failed (ValueError: labels must be non-negative"),
    "float_labels": ("TypeError", "labels (field 1) must be integers",
                     "rank 1 failed (TypeError: labels (field 1) must be integers"),
    "big_labels": ("ValueError", "labels must be < 2**63",
                   "rank 1 failed (ValueError: labels must be < 2**63, got [9223372036854775"),
    "object_dtype": ("TypeError", "field 0 has dtype object",
                     "rank 1 failed (TypeError: field 0 has dtype object"),
    "raise_outside": ("ZeroDivisionError", "the training step failed",
                      "rank 1 closed its buffer while handling ZeroDivisionError: the training "
                      "step failed (after 5 steps)"),
    "close_early": (None, None, "rank 1 closed its buffer (after 5 steps)"),
    "one_fewer": (None, None, "rank 1 closed its buffer (after 11 steps)"),
    "uncaught": (None, None, "rank 1 exited with an uncaught exception (ZeroDivisionError: "
                             "uncaught in the training loop) (after 5 steps)"),
    "sys_exit": (None, None, "rank 1 exited without closing its buffer (after 5 steps)"),
    "exit": (None, None, "rank 1 exited without closing its buffer (after 5 steps)"),
    "interrupt": (None, None, "rank 1 exited with an uncaught exception (KeyboardInterrupt)"),
}


def check_reported(kind, results, n):
    """Rank 1 failed in a way it can tell: every other rank raises RemoteError
    naming rank 1 and its reason, well before the timeout (120 s here)."""
    error, text, remote = REPORTED[kind]
    fail = results[1]
    if error is not None:
        assert fail["error"] == error and text in fail["message"], fail
    for p in range(n):
        if p == 1:
            continue
        r = results[p]
        assert r["error"] == "RemoteError", r
        assert remote in r["message"], r
        assert r["ranks"] == [1], r
        assert r["t_error"] - fail["t_fail"] < 60, (r, fail)
        # the others raise at the step rank 1 did not reach (at close, for one_fewer)
        assert r["step"] == (11 if kind == "one_fewer" else 6), r
    no_mispaired_rows(results)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", list(REPORTED))
def test_a_failure_on_one_rank_stops_every_rank(transport, kind, tmp_path):
    results, done = run(transport, 2, f"fail-{kind}", tmp_path, timeout=120, expect_ok=False,
                        launcher=None if transport == "mpi" else "spawn")
    assert set(results) == {0, 1}, output(done)
    check_reported(kind, results, 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["raise_in_mix", "raise_outside", "exit"])
def test_a_failure_stops_every_rank_of_four(transport, kind, tmp_path):
    results, done = run(transport, 4, f"fail-{kind}", tmp_path, timeout=120, expect_ok=False,
                        launcher=None if transport == "mpi" else "spawn")
    assert set(results) == {0, 1, 2, 3}, output(done)
    check_reported(kind, results, 4)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [8, 16])
@pytest.mark.parametrize("kind", ["raise_in_mix", "exit", "close_early", "one_fewer"])
def test_a_failure_stops_every_rank_of_many(n, kind, tmp_path):
    """The sparse exchange at 8 and 16 processes (oversubscribed): a rank
    that fails, exits, closes early or runs one step fewer stops every
    other rank at the same step, though most rounds exchange rows between a
    few pairs only."""
    results, done = run("mpi", n, f"fail-{kind}", tmp_path, timeout=120, expect_ok=False,
                        bound=BOUND * (n // 4 + 1))
    assert set(results) == set(range(n)), output(done)
    check_reported(kind, results, n)


@pytest.mark.torchrun
@pytest.mark.parametrize("kind", ["raise_in_mix", "uncaught"])
def test_a_failure_under_torchrun_stops_every_rank(kind, tmp_path):
    """Through torchrun itself: its agent stops the other workers once one
    exits with an error, but the others have raised RemoteError by then."""
    results, done = run("torch", 2, f"fail-{kind}", tmp_path, timeout=120, expect_ok=False)
    assert set(results) == {0, 1}, output(done)
    check_reported(kind, results, 2)


SILENT = 10      # seconds: the buffers' timeout in the tests of silent failures


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["sigkill", "hang"])
def test_a_rank_that_stops_answering_stops_every_rank_after_the_timeout(transport, kind,
                                                                        tmp_path):
    """A rank killed with SIGKILL, or one that hangs, tells nobody: every
    other rank raises RemoteError once the timeout has passed.

    Under mpiexec: ``-disable-auto-cleanup`` keeps hydra from killing the
    survivors itself, and ``python -m mpi4py`` turns their uncaught
    RemoteError into MPI_Abort, so that MPI_Finalize does not wait for the
    dead rank."""
    mpi = transport == "mpi"
    results, done = run(transport, 2, f"fail-{kind}", tmp_path, timeout=SILENT,
                        expect_ok=False, launcher="mpiexec" if mpi else "spawn",
                        mpiexec_args=("-disable-auto-cleanup",) if mpi else (),
                        python_args=("-m", "mpi4py") if mpi else ())
    if mpi and kind == "sigkill" and 0 not in results:
        # Hydra (MPICH 5) kills every other rank as soon as one dies from a
        # signal, -disable-auto-cleanup or not: the job ends at once (run()
        # bounds it), with the signal as its status, and the exchange's
        # timeout is never reached. The "hang" variant checks that timeout
        # under mpiexec.
        assert any(p.returncode != 0 for p in done), output(done)
        assert "Killed (signal 9)" in output(done), output(done)
        no_mispaired_rows(results)
        return
    r = results[0]
    assert r["error"] == "RemoteError", (r, output(done))
    if mpi or kind == "hang":
        assert f"no answer from the other processes within {SILENT} s" in r["message"], r
        t_fail = results[1]["t_fail"] if 1 in results else None
        if t_fail is not None:
            assert r["t_error"] - t_fail >= SILENT - 1, r
    else:   # gloo sees the closed connection at once
        assert "transport failed" in r["message"] or "no answer" in r["message"], r
    no_mispaired_rows(results)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["capacity", "seed"])
def test_a_rank_that_fails_to_build_its_buffer_stops_every_rank(transport, kind, tmp_path):
    """An argument error on one rank only (``r > capacity x processes``,
    ``seed=1.5``): that rank raises the buffer's message; it never joins the
    exchange, so the others raise RemoteError after the timeout."""
    results, done = run(transport, 2, f"fail-{kind}", tmp_path, timeout=SILENT,
                        expect_ok=False, launcher=None if transport == "mpi" else "spawn")
    fail, other = results[1], results[0]
    expected = {"capacity": ("ValueError", "num_representatives=4 is more than the buffer can "
                             "ever hold (2 samples: capacity=1 x 2 processes)"),
                "seed": ("TypeError", "seed must be None or a non-negative integer, got 1.5")}
    assert (fail["error"], fail["message"][:len(expected[kind][1])]) == expected[kind], fail
    assert other["error"] == "RemoteError", other
    assert f"within {SILENT} s while waiting for the other processes" in other["message"], other


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_failing_dali_stage_stops_every_rank(transport, mnist_dir):
    """Rank 1's source pipeline meets a corrupt PNG: its stage raises the
    decoder's error (a source error is recoverable: global sampling goes on if
    the loop does), the loop lets it out of ``with buffer:``, and every other
    rank's stage raises RemoteError naming rank 1 and the error it handled."""
    (mnist_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    results, done = run(transport, 2, "stage_failure", mnist_dir, timeout=120,
                        expect_ok=False)
    assert set(results) == {0, 1}, output(done)
    assert results[1]["error"] not in (None, "RemoteError"), results[1]
    assert results[0]["error"] == "RemoteError", results[0]
    assert "rank 1 closed its buffer while handling RuntimeError" in results[0]["message"], \
        results[0]
    # Rank 1's loop sees the three good batches before the corrupt file, then the
    # error. Its stage took part in the rounds of the steps DALI and the worker
    # asked for ahead (prefetch_queue_depth 2 + prepare_ahead 2 + the one being
    # built), so rank 0 may step that much further before the close reaches it.
    assert results[1]["steps"] <= 3
    assert results[0]["steps"] <= 3 + 5


# ---------------------------------------------------------------- agreement
MISMATCHES = {
    "r": "num_representatives (rank 0: 4, rank 1: 2)",
    "policy": "policy (rank 0: 'class_balanced', rank 1: 'reservoir')",
    "sampling": "sampling (rank 0: 'global', rank 1: 'local')",
    "label_index": "label_index (rank 0: 1, rank 1: 0)",
    "layout_shape_dtype": "the layout of field 0 (rank 0: (4, 4, 3) uint8, rank 1: (13, 4, 1) "
                          "uint8); the layout of field 1 (the labels) (rank 0: () int64, "
                          "rank 1: () int32)",
    "layout_dtype": "the layout of field 0 (rank 0: (4, 4, 3) uint16, rank 1: (8, 4, 3) uint8)",
    "layout_transposed": "the layout of field 0 (rank 0: (4, 6, 2) uint8, rank 1: (6, 4, 2) "
                         "uint8)",
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_settings_raise_the_same_error_on_every_rank(transport, kind, tmp_path):
    """Settings at construction, layouts (same bytes per sample, another
    shape or dtype) at the first step that stores samples: the same
    MismatchError on every rank, before any row is exchanged."""
    results, done = run(transport, 2, f"mismatch-{kind}", tmp_path, timeout=120,
                        launcher=None if transport == "mpi" else "spawn")
    messages = {r["message"] for r in results.values()}
    assert len(messages) == 1, messages                    # the same on every rank
    for r in results.values():
        assert r["error"] == "MismatchError", r
        assert MISMATCHES[kind] in r["message"], r
        assert r["delivered_representatives"] == 0, r
        if kind.startswith("layout"):
            assert r["step"] == 0, r          # the first step: mix knows the layout
        else:
            assert r["step"] == -1, r         # at construction


# ------------------------------------------------------- mismatched calls
CALLS = {
    # rank 0 calls save(); rank 1 ...: what each rank's message says the other does
    "save_vs_step": ("rank 1 is in a step (mix() or the DALI stage) after 5 steps, while this "
                     "rank (0) is in save() after 4 steps",
                     "rank 0 is in save() after 4 steps, while this rank (1) is in a step "
                     "(mix() or the DALI stage) after 5 steps"),
    "save_vs_load": ("rank 1 is in load(), while this rank (0) is in save() after 0 steps",
                     "rank 0 is in save() after 0 steps, while this rank (1) is in load()"),
    "save_vs_build": ("rank 1 is building a RehearsalBuffer, while this rank (0) is in save()",
                      "rank 0 is in save(), while this rank (1) is building a RehearsalBuffer"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", list(CALLS))
def test_mismatched_collective_calls_raise_at_once_on_every_rank(transport, kind, tmp_path):
    """Rank 0 calls save() while rank 1 takes a step, loads, or builds a buffer
    (buffers that sample locally): both raise CollectiveMismatchError at once
    (not after the timeout, 120 s here), each saying what the other was doing,
    instead of decoding each other's messages; the checkpoint saved before
    still loads on new buffers, which sample globally again."""
    results, done = run(transport, 2, f"calls-{kind}", tmp_path, timeout=120,
                        launcher=None if transport == "mpi" else "spawn")
    assert set(results) == {0, 1}, output(done)
    for rank in (0, 1):
        r = results[rank]
        assert r["error"] == "CollectiveMismatchError", r
        assert CALLS[kind][rank] in r["message"], r
        assert r["ranks"] == [1 - rank], r
        assert r["elapsed"] < 30, r
        assert r["intact"] is True, r


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_call_nothing_pairs_with_ends_at_the_timeout_on_every_rank(transport, tmp_path):
    """Rank 0 calls save() while rank 1 builds a buffer that samples globally:
    the two calls use different channels, so neither can see the other; both
    raise RemoteError at the buffers' timeout (10 s), not the module's default
    (600 s), each saying what it waited for."""
    mpi = transport == "mpi"
    results, done = run(transport, 2, "calls-save_alone", tmp_path, timeout=SILENT,
                        expect_ok=False, launcher="mpiexec" if mpi else "spawn",
                        mpiexec_args=("-disable-auto-cleanup",) if mpi else (),
                        python_args=("-m", "mpi4py") if mpi else ())
    assert set(results) == {0, 1}, output(done)
    for rank, waited in ((0, "waiting for the other processes to join save()"),
                         (1, "waiting for the other processes to create their exchange")):
        r = results[rank]
        assert r["error"] == "RemoteError", r
        assert f"within {SILENT} s while {waited}" in r["message"], r
        assert SILENT - 1 <= r["elapsed"] < SILENT + 30, r


# ---------------------------------------------------------------- transports
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("n", [2, 4])
def test_the_transports_blocking_collectives(transport, n, tmp_path):
    """``make_transport(comm)`` offers barrier and allgather_bytes over both
    libraries (collective checkpoints use them)."""
    results, _ = run(transport, n, "collectives", tmp_path,
                     launcher=None if transport == "mpi" else "spawn")
    expected = [(bytes([p]) * (3 * p)).hex() for p in range(n)]
    for p, r in results.items():
        assert (r["rank_seen"], r["size_seen"]) == (p, n)
        assert r["gathered"] == expected
        assert r["name"] == ("mpi" if transport == "mpi" else "torch-gloo")


def test_a_communicator_of_another_kind_is_refused():
    import dali_rehearsal as dr
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator .* or a "
                                        "torch.distributed process group"):
        dr.RehearsalBuffer(capacity=4, num_representatives=2, device="cpu", comm=object())


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), ("60", TypeError),
                                        (True, TypeError), (float("nan"), ValueError),
                                        (float("-inf"), ValueError),
                                        (np.float64("nan"), ValueError)])
def test_the_timeout_is_checked(bad, error):
    from dali_rehearsal.exchange.transport import check_timeout
    with pytest.raises(error, match="timeout must be None or a number of seconds > 0"):
        check_timeout(bad)
    assert check_timeout(None) is None and check_timeout(5) == 5.0
    # infinity (or an integer no float holds) means no limit, like None; any
    # finite number of seconds is kept
    assert check_timeout(float("inf")) is None and check_timeout(10**400) is None
    assert check_timeout(1e300) == 1e300


def test_the_launchers_environment_says_how_many_processes(monkeypatch):
    from dali_rehearsal.exchange import launch as env
    for name, _ in env.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert env.launched_processes() is None
    monkeypatch.setenv("PMI_SIZE", "1")
    assert env.launched_processes() is None
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert env.launched_processes() == (4, "OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert env.launched_processes() == (2, "WORLD_SIZE")


class _LibraryTimesOut:
    """A transport whose library gives up on its own at ``after`` seconds
    (gloo's group timeout is the transport's, 2 s here: both limits can fire
    together, a polling pause apart)."""

    def __init__(self, after, words):
        from dali_rehearsal.exchange.alone import AloneTransport
        self.transport = AloneTransport()
        self.transport.timeout = 2.0
        self.transport.test = self.test
        self.after, self.words = after, words
        self.start = None

    def test(self, handles):
        import time
        if self.start is None:
            self.start = time.monotonic()
        if time.monotonic() - self.start >= self.after:
            raise RuntimeError(self.words)
        return False


@pytest.mark.parametrize("after, words, expected", [
    (1.5, "[gloo] Timed out waiting 2000ms for send operation to complete", "within 2 s while"),
    (0.2, "[gloo] Timed out waiting 200ms for send operation to complete",
     "transport failed while waiting"),
    (1.5, "Connection closed by peer", "transport failed while waiting"),
], ids=["library-timeout-at-the-limit", "library-timeout-well-before", "other-failure"])
def test_a_library_timeout_at_the_limit_reads_as_the_limit(after, words, expected):
    """One cause, one wording: the library's timeout firing with the
    transport's reads as the transport's timeout (the library's text kept);
    any other failure, or one well before the limit, as a failure."""
    from dali_rehearsal.exchange.errors import RemoteError
    fake = _LibraryTimesOut(after, words)
    with pytest.raises(RemoteError, match=expected) as raised:
        fake.transport.wait([object()], "the other processes to join save()")
    assert words in str(raised.value)
    assert raised.value.broken
