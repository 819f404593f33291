"""The install step of the one-command GPU validation (scripts/validate_gpu.py),
on a wheel made here: parts joined in order, checked against SHA256SUMS,
installed offline into a fresh venv; a corrupted part is refused."""

import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "validate_gpu.py"


@pytest.fixture(scope="module")
def validate():
    spec = importlib.util.spec_from_file_location("validate_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder: pathlib.Path, name="drprobe", version="1.0") -> pathlib.Path:
    """A minimal pure-Python wheel, padded so that it splits into several parts."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n" + "#" * 300_000 + "\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, text in files.items():
            z.writestr(n, text)
        z.writestr(f"{info}/RECORD", record)
    return path


def _split(path: pathlib.Path, size: int):
    data = path.read_bytes()
    (path.parent / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    for i in range(0, len(data), size):
        suffix = "a" + "abcdefghijklmnopqrstuvwxyz"[i // size]
        (path.parent / f"{path.name}.part-{suffix}").write_bytes(data[i:i + size])
    path.unlink()


def test_parts_are_joined_in_order_and_checked(validate, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    original = _wheel(wheels).read_bytes()
    _split(wheels / "drprobe-1.0-py3-none-any.whl", 100_000)
    assert len(list(wheels.glob("*.part-*"))) == 4
    joined, figures = validate.join_parts(wheels, tmp_path / "joined")
    assert [w.read_bytes() for w in joined] == [original]
    assert figures["checksums_verified"] == 1 and figures["checksum_mismatch"] == []
    part = wheels / "drprobe-1.0-py3-none-any.whl.part-ab"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    _, figures = validate.join_parts(wheels, tmp_path / "joined2")
    assert figures["checksum_mismatch"] == ["drprobe-1.0-py3-none-any.whl"]


@pytest.mark.slow
def test_install_step_installs_offline_into_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    _split(wheels / "drprobe-1.0-py3-none-any.whl", 100_000)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--wheels", str(wheels), "--only",
                           "install", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "report.json").read_text())
    step = report["steps"]["install"]
    assert step["figures"]["installed"] == ["drprobe"], step
    venv_python = out / "venv" / "bin" / "python"
    probe = subprocess.run([str(venv_python), "-c", "import drprobe; print(drprobe.VALUE)"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "42", probe.stderr
    # DALI comes from this machine's own packages here (the venv sees them)
    assert proc.returncode == 0 and step["verdict"] == "PASS", proc.stdout + proc.stderr
    assert "| install | **PASS** |" in (out / "report.md").read_text()
