"""The wheel ships the CUDA sources (``dali_rehearsal.kernels`` with
``movement.cu``), and the wheel and the sdist ship the license."""

from __future__ import annotations

import email.parser
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The wheel and the sdist, built from a copy of the checkout."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed")
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the
    # sources, and a stale build/lib would leak into later wheels.
    src = tmp_path_factory.mktemp("src") / "dali-rehearsal"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".benchmarks"))
    proc = None
    for isolation in (["--no-isolation"], []):   # no network needed when setuptools is here
        proc = subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--sdist", *isolation, "--outdir",
             str(out), str(src)],
            capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("dali_rehearsal-*.whl"))
    sdists = list(out.glob("dali_rehearsal-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def wheel(dists):
    return dists[0]


def test_the_wheel_and_the_sdist_ship_the_license(dists):
    wheel, sdist = dists
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        shipped = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert len(shipped) == 1, names
        assert z.read(shipped[0]).decode() == license_text
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(metadata).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    with tarfile.open(sdist) as t:
        member = next(m for m in t.getmembers() if m.name.count("/") == 1
                      and m.name.endswith("/LICENSE"))
        assert t.extractfile(member).read().decode() == license_text


def test_wheel_contains_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dali_rehearsal/kernels/movement.cu" in names
    assert "dali_rehearsal/kernels/__init__.py" in names
    assert "dali_rehearsal/kernels/movement.py" in names
    assert "dali_rehearsal/buffer.py" in names
    # one home: the kernels are a plain subpackage, nothing at the top level
    assert not any(n.startswith("kernels/") for n in names)


def test_wheel_ships_every_module_of_the_package(wheel):
    """Every module of the source tree (subpackages included) is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "dali_rehearsal").rglob("*.py")}
    assert {"dali_rehearsal/checkpoint/__init__.py", "dali_rehearsal/policies/__init__.py"} \
        <= sources
    assert not sorted(sources - names), sorted(sources - names)


def test_installed_wheel_finds_its_cuda_source(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
         "--disable-pip-version-check", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    code = (
        "import pathlib, dali_rehearsal, dali_rehearsal.kernels as k\n"
        "p = k.source_path('movement')\n"
        "print(pathlib.Path(dali_rehearsal.__file__).resolve())\n"
        "print(p.is_file())\n"
        "print(p.resolve())\n"
    )
    env = {key: v for key, v in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, is_file, source = proc.stdout.splitlines()[-3:]
    assert pathlib.Path(package).is_relative_to(site.resolve())   # not the source tree
    assert is_file == "True"
    assert pathlib.Path(source).is_relative_to(site.resolve())
    assert pathlib.Path(source).read_text() == (REPO / "dali_rehearsal" / "kernels" / "movement.cu").read_text()
    assert "gather_rows" in pathlib.Path(source).read_text()
