"""The install step of the one-command GPU validation (scripts/validate_gpu.py),
on a wheel made here: parts joined in order, checked against SHA256SUMS,
installed offline into a fresh venv; a corrupted part is refused. The
validation is started from a virtual environment, as on most GPU machines:
the venv it makes must see that environment's packages."""

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


def _venv_over_this_python(path: pathlib.Path) -> pathlib.Path:
    """A virtual environment made the usual way (``python -m venv
    --system-site-packages``, no pip: fast) that also sees this Python's
    packages, wherever they live, and holds a module of its own: the kind of
    venv a GPU machine's PyTorch or CuPy lives in."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(path)], check=True, capture_output=True, timeout=300)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True,
                             timeout=120).stdout.strip()
    here = [p for p in sys.path if pathlib.Path(p).name in ("site-packages", "dist-packages")]
    (pathlib.Path(purelib) / "this_python.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in here))
    (pathlib.Path(purelib) / "only_in_the_first_venv.py").write_text("WHERE = 'first venv'\n")
    return python


@pytest.mark.slow
def test_install_step_started_from_a_venv_installs_offline_into_a_venv_that_sees_it(tmp_path):
    """The validation is started from a virtual environment (the usual case on
    GPU machines): the venv it makes sees that venv's packages, not only the
    base interpreter's, installs the missing wheel offline, and DALI imports."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    _split(wheels / "drprobe-1.0-py3-none-any.whl", 100_000)
    first = _venv_over_this_python(tmp_path / "first-venv")
    out = tmp_path / "report"
    proc = subprocess.run([str(first), str(SCRIPT), "--wheels", str(wheels), "--only",
                           "install", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "report.json").read_text())
    step = report["steps"]["install"]
    assert step["figures"]["installed"] == ["drprobe"], step
    assert "only_in_the_first_venv" not in step["figures"]["already_present"]
    venv_python = out / "venv" / "bin" / "python"
    probe = subprocess.run(
        [str(venv_python), "-c",
         "import drprobe, only_in_the_first_venv as m, nvidia.dali; "
         "print(drprobe.VALUE, m.WHERE)"],
        capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "42 first venv", probe.stderr[-3000:]
    # DALI comes from the packages of the Python that started the validation
    assert proc.returncode == 0 and step["verdict"] == "PASS", proc.stdout + proc.stderr
    assert step["figures"]["dali_imports"] is True
    assert "| install | **PASS** |" in (out / "report.md").read_text()
