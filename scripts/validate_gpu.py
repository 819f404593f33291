#!/usr/bin/env python3
"""One-command validation of the GPU data path on a machine with a GPU.

    bash scripts/validate_gpu.sh --wheels WHEEL_DIR [--out outputs/gpu-validation]

For a GPU machine with PyTorch (CUDA 13), cupy-cuda13x, mpi4py, nvcc and
compute-sanitizer, and no DALI and no package registry. ``WHEEL_DIR`` holds
what scripts/fetch_gpu_wheels.sh downloaded elsewhere (DALI 2.4 for CUDA 13,
its dependencies, the test tools), large wheels possibly split into
``*.part-aa``, ``*.part-ab``... parts. Steps, each recorded with its command,
exit status, duration, figures and verdict, continuing past failures:

1. ``environment``: GPU, driver, CUDA, PyTorch, CuPy (and its NVRTC), MPI
   library and whether it is CUDA-aware, nvcc, compute-sanitizer;
2. ``install``: joins the parts (checked against SHA256SUMS), creates a venv
   that sees the packages of the Python running this script (a virtual
   environment's included: its PyTorch, CuPy, mpi4py) and installs every wheel
   that Python does not already have, offline (``pip install --no-index
   --no-deps``); checks that DALI imports;
3. ``gpu_tests``: the ``gpu`` test suite (pytest -m gpu);
4. ``stress``: the stage stress test (224x224x3 rows, prepare_ahead 0 and 2,
   a concurrent GPU load, every row checked over many epochs);
5. ``memcheck`` and ``racecheck``: compute-sanitizer over the kernel tests;
6. ``bench_kernels``: pipelines/bench_kernels.py, eager and CUDA-graph modes;
7. ``profile_throughput``: pipelines/profile_throughput.py --device gpu;
8. ``mpi_staged`` and ``mpi_cuda_aware``: the exchange between two ranks
   through pinned host memory, and with device buffers when the MPI library
   is CUDA-aware (otherwise recorded as not run, with the reason).

Writes ``OUT/report.json`` (everything) and ``OUT/report.md`` (a summary),
and exits 0 only when every step that ran passed. ``--only install`` runs
the install step alone (the dry run of the wheel transfer procedure).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = ("environment", "install", "gpu_tests", "stress", "memcheck", "racecheck",
         "bench_kernels", "profile_throughput", "mpi_staged", "mpi_cuda_aware")
PART = re.compile(r"^(?P<wheel>.+\.whl)\.part-(?P<suffix>[a-z]+)$")


class Report:
    def __init__(self, out: pathlib.Path):
        self.out = out
        self.steps: dict[str, dict] = {}
        self.started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    def add(self, name, verdict, *, figures=None, command=None, returncode=None,
            seconds=None, log=None, note=None):
        self.steps[name] = {"verdict": verdict, "figures": figures or {}, "command": command,
                            "returncode": returncode, "seconds": seconds, "note": note,
                            "log_tail": (log or "")[-4000:]}
        print(f"[{name}] {verdict}" + (f": {note}" if note else ""), flush=True)
        self.write()

    def write(self):
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"script": "validate_gpu", "started": self.started,
                "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "steps": self.steps}
        (self.out / "report.json").write_text(json.dumps(data, indent=2, default=str))
        lines = ["# GPU validation report", "",
                 f"Started {self.started}; written {data['finished']}.", "",
                 "| step | verdict | figures | seconds |", "| --- | --- | --- | --- |"]
        for name, step in self.steps.items():
            figures = "; ".join(f"{k}: {_short(v)}" for k, v in step["figures"].items())
            if step["note"]:
                figures = (figures + "; " if figures else "") + step["note"]
            seconds = "" if step["seconds"] is None else f"{step['seconds']:.0f}"
            lines.append(f"| {name} | **{step['verdict']}** | {figures} | {seconds} |")
        lines += ["", "Commands and log tails: report.json next to this file."]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")


def _short(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) < 160 else text[:157] + "..."


def run(command, *, timeout, env=None, cwd=REPO):
    """Runs ``command``; returns (returncode, seconds, combined output)."""
    start = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        code = 124
        output = (out.decode(errors="replace") if isinstance(out, bytes) else out) + \
            f"\n[timed out after {timeout} s]"
    except OSError as e:
        code, output = 127, str(e)
    return code, time.monotonic() - start, output


# ------------------------------------------------------------------- install

def dist_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", wheel.split("-")[0]).lower()


def join_parts(wheel_dir: pathlib.Path, work: pathlib.Path) -> tuple[list[pathlib.Path], dict]:
    """Whole wheels in ``wheel_dir`` plus those joined from parts (into ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    wheels = sorted(p for p in wheel_dir.glob("*.whl") if p.is_file())
    parts: dict[str, list[pathlib.Path]] = {}
    for p in wheel_dir.iterdir():
        m = PART.match(p.name)
        if m:
            parts.setdefault(m["wheel"], []).append(p)
    joined = {}
    for name, pieces in sorted(parts.items()):
        pieces.sort(key=lambda p: PART.match(p.name)["suffix"])
        target = work / name
        with open(target, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        wheels.append(target)
        joined[name] = [p.name for p in pieces]
    sums_file = wheel_dir / "SHA256SUMS"
    checked, bad = 0, []
    if sums_file.is_file():
        expected = {}
        for line in sums_file.read_text().splitlines():
            if line.strip():
                digest, name = line.split(None, 1)
                expected[name.strip().lstrip("*")] = digest
        for wheel in wheels:
            if wheel.name in expected:
                h = hashlib.sha256()
                with open(wheel, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
                checked += 1
                if h.hexdigest() != expected[wheel.name]:
                    bad.append(wheel.name)
    return wheels, {"joined": joined, "checksums_verified": checked, "checksum_mismatch": bad,
                    "have_sha256sums": sums_file.is_file()}


# ------------------------------------------------------------------- the venv

def site_dirs() -> list[str]:
    """The folders the running Python imports installed packages from: its
    site-packages (a virtual environment's own, and those it sees of the
    interpreter it was made from), those that ``.pth`` files added, and the
    user's site-packages."""
    found = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    found += [p for p in sys.path
              if pathlib.Path(p).name in ("site-packages", "dist-packages")]
    found.append(sysconfig.get_paths()["purelib"])
    out = []
    for p in found:
        p = os.path.abspath(p)
        if p not in out and os.path.isdir(p):
            out.append(p)
    return out


def make_venv(venv: pathlib.Path) -> tuple[int, str]:
    """Creates ``venv`` so that it sees the packages of the Python running
    this script, in a virtual environment too.

    ``--system-site-packages`` alone would show the new venv the packages of
    the *base* interpreter: started from a venv, it would miss that venv's
    PyTorch, CuPy or mpi4py. A ``.pth`` file in the new venv adds the running
    Python's site folders after the venv's own (what the venv installs comes
    first), processing their ``.pth`` files as Python does."""
    code, _, log = run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       timeout=600)
    if code != 0:
        return code, log
    python = venv / "bin" / "python"
    code, _, out = run([str(python), "-c",
                        "import json, sys, sysconfig; "
                        "print(json.dumps([sysconfig.get_paths()['purelib'], sys.path]))"],
                       timeout=120)
    if code != 0:
        return code, log + out
    purelib, seen = json.loads(out.strip().splitlines()[-1])
    seen = {os.path.abspath(p) for p in seen if p}
    missing = [d for d in site_dirs() if d not in seen]     # what --system-site-packages misses
    (pathlib.Path(purelib) / "_validate_gpu_parent.pth").write_text(
        f"# the packages of {sys.executable}, which made this venv (scripts/validate_gpu.py)\n"
        + "".join(f"import site; site.addsitedir({d!r})\n" for d in missing))
    return 0, log + (f"added the site folders of {sys.executable}: {', '.join(missing)}\n"
                     if missing else "")


def step_install(args, report) -> str | None:
    """Returns the venv's python, or None when the install failed."""
    wheel_dir = pathlib.Path(args.wheels).resolve()
    if not wheel_dir.is_dir():
        report.add("install", "FAIL", note=f"no wheel folder {wheel_dir}")
        return None
    start = time.monotonic()
    wheels, figures = join_parts(wheel_dir, args.out / "joined-wheels")
    if figures["checksum_mismatch"]:
        report.add("install", "FAIL", figures=figures,
                   note="checksum mismatch after joining: " + ", ".join(
                       figures["checksum_mismatch"]))
        return None
    venv = pathlib.Path(args.venv) if args.venv else args.out / "venv"
    python = venv / "bin" / "python"
    log = ""
    if not python.exists():
        code, out = make_venv(venv)
        log += out
        if code != 0:
            report.add("install", "FAIL", figures=figures, log=log, note="venv creation failed")
            return None
    # skip what the machine already has (its PyTorch, CuPy, NumPy, mpi4py...)
    names = {w: dist_name(w.name) for w in wheels}
    probe = ("import importlib.metadata as m, json, sys\n"
             "have = {}\n"
             "for n in sys.argv[1:]:\n"
             "    try: have[n] = m.version(n)\n"
             "    except m.PackageNotFoundError: pass\n"
             "print(json.dumps(have))\n")
    code, _, out = run([str(python), "-c", probe, *sorted(set(names.values()))], timeout=120)
    present = json.loads(out.strip().splitlines()[-1]) if code == 0 else {}
    to_install = [str(w) for w, n in names.items() if n not in present]
    figures.update(wheels=len(wheels), already_present=present,
                   installed=sorted(names[pathlib.Path(w)] for w in to_install), venv=str(venv))
    command = [str(python), "-m", "pip", "install", "--no-index", "--no-deps",
               "--disable-pip-version-check", *to_install]
    code, _, out = run(command, timeout=1800) if to_install else (0, 0.0, "nothing to install")
    log += out
    if code != 0:
        report.add("install", "FAIL", figures=figures, command=command[:6] + ["..."],
                   returncode=code, seconds=time.monotonic() - start, log=log)
        return None
    code, _, out = run([str(python), "-c", "import nvidia.dali as d; print(d.__version__)"],
                       timeout=300)
    figures["dali_import"] = out.strip().splitlines()[-1] if out.strip() else ""
    figures["dali_imports"] = code == 0
    verdict = "PASS" if code == 0 else ("PASS (install only)" if args.only == ["install"]
                                         else "FAIL")
    report.add("install", verdict, figures=figures, command=command[:6] + ["..."],
               returncode=code, seconds=time.monotonic() - start, log=log + out,
               note=None if code == 0 else "DALI does not import (see the log tail)")
    return str(python) if code == 0 or args.only == ["install"] else None


# ------------------------------------------------------------------- steps

def environment(python) -> dict:
    probe = r"""
import json, os, platform
env = {"python": platform.python_version()}
def attempt(key, fn):
    try: env[key] = fn()
    except Exception as e: env[key] = f"unavailable: {type(e).__name__}: {e}"
def torch_info():
    import torch
    return {"version": torch.__version__, "cuda": torch.version.cuda,
            "available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
def cupy_info():
    import cupy
    from cupy_backends.cuda.libs import nvrtc
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    return {"version": cupy.__version__, "runtime": rt.runtimeGetVersion(),
            "driver": rt.driverGetVersion(), "nvrtc": list(nvrtc.getVersion()),
            "devices": rt.getDeviceCount(), "name": props["name"].decode(),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_GiB": round(props["totalGlobalMem"] / 2**30, 1)}
def mpi_info():
    from mpi4py import MPI
    import mpi4py
    from dali_rehearsal.exchange import cuda_aware_mpi
    return {"mpi4py": mpi4py.__version__, "library": MPI.Get_library_version().strip()[:200],
            "cuda_aware": cuda_aware_mpi()}
def dali_info():
    import nvidia.dali
    return nvidia.dali.__version__
attempt("torch", torch_info); attempt("cupy", cupy_info); attempt("mpi", mpi_info)
attempt("dali", dali_info)
print(json.dumps(env))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code, _, out = run([python, "-c", probe], timeout=300, env=env)
    info = json.loads(out.strip().splitlines()[-1]) if code == 0 else {"probe_error": out[-2000:]}
    for tool, flag in (("nvidia-smi", "-L"), ("nvcc", "--version"),
                       ("compute-sanitizer", "--version")):
        code, _, out = run([tool, flag], timeout=60)
        info[tool] = out.strip().splitlines()[-1] if code == 0 and out.strip() else \
            f"unavailable ({code})"
    info["platform"] = platform.platform()
    return info


def junit_counts(path: pathlib.Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = root.iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('classname')}::{c.get('name')}: {c.find('skipped').get('message', '')}"
               for c in root.iter("testcase") if c.find("skipped") is not None]
    counts["failed_tests"] = failed[:50]
    counts["skipped_tests"] = skipped[:50]
    return counts


def pytest_step(report, name, python, targets, *, marker, timeout, env_extra=None,
                wrapper=(), junit=True):
    xml = report.out / f"{name}.xml"
    command = [*wrapper, python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
               "-m", marker, *targets]
    if junit:
        command += [f"--junitxml={xml}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), DALI_REHEARSAL_NO_SKIPS="0",
               **(env_extra or {}))
    code, seconds, out = run(command, timeout=timeout, env=env)
    figures = junit_counts(xml) if junit else {}
    ok = code == 0 and (not junit or figures.get("passed", 0) > 0)
    report.add(name, "PASS" if ok else "FAIL", figures=figures, command=command,
               returncode=code, seconds=seconds, log=out,
               note=None if ok else ("no test ran" if code == 0 else None))
    return figures


def json_step(report, name, command, json_path, pick, *, timeout, env_extra=None, verdict=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    code, seconds, out = run(command, timeout=timeout, env=env)
    figures = {}
    try:
        figures = pick(json.loads(pathlib.Path(json_path).read_text()))
    except Exception as e:   # noqa: BLE001 - recorded in the report
        figures = {"no_figures": f"{type(e).__name__}: {e}"}
    ok = code == 0 and "no_figures" not in figures
    report.add(name, ("PASS" if ok else "FAIL") if verdict is None else verdict(ok, figures),
               figures=figures, command=command, returncode=code, seconds=seconds, log=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", required=True,
                   help="folder of wheels (and *.part-aa... parts) from "
                        "scripts/fetch_gpu_wheels.sh")
    p.add_argument("--out", default="outputs/gpu-validation",
                   help="report folder (default: outputs/gpu-validation)")
    p.add_argument("--venv", default=None,
                   help="venv to install into (default: OUT/venv, created so that it sees the "
                        "packages of the Python running this script, a venv's included)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated steps to run (default: all of {', '.join(STEPS)})")
    p.add_argument("--stress-epochs", type=int, default=20,
                   help="epochs of the stage stress test per configuration (default: 20)")
    args = p.parse_args(argv)
    args.out = pathlib.Path(args.out).resolve()
    args.only = None if args.only is None else [s.strip() for s in args.only.split(",")]
    wanted = set(STEPS if args.only is None else args.only)
    unknown = wanted - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS)}")
    report = Report(args.out)

    python = sys.executable
    if "install" in wanted:
        installed = step_install(args, report)
        if installed is None:
            for name in STEPS[2:]:
                if name in wanted:
                    report.add(name, "NOT RUN", note="the install step failed")
            return 1
        python = installed
    elif args.venv:
        python = str(pathlib.Path(args.venv) / "bin" / "python")
    if "environment" in wanted:
        info = environment(python)
        report.add("environment", "INFO", figures=info)
    else:
        info = {}

    if "gpu_tests" in wanted:
        pytest_step(report, "gpu_tests", python,
                    ["tests", "--ignore=tests/test_gpu_stress.py", "--ignore=tests/test_mpi.py"],
                    marker="gpu", timeout=3600)
    if "stress" in wanted:
        pytest_step(report, "stress", python, ["tests/test_gpu_stress.py"], marker="gpu",
                    timeout=3600, env_extra={"DR_STRESS_EPOCHS": str(args.stress_epochs),
                                             "DR_STRESS_REPORT": str(args.out / "stress.json")})
        stress = args.out / "stress.json"
        if stress.is_file():
            report.steps["stress"]["figures"]["runs"] = json.loads(stress.read_text())
            report.write()
    sanitizer = shutil.which("compute-sanitizer")
    for tool in ("memcheck", "racecheck"):
        if tool not in wanted:
            continue
        if sanitizer is None:
            report.add(tool, "NOT RUN", note="compute-sanitizer is not on PATH")
            continue
        pytest_step(report, tool, python, ["tests/test_kernels.py"], marker="gpu",
                    timeout=3600, junit=True,
                    wrapper=(sanitizer, "--tool", tool, "--error-exitcode", "99",
                             "--target-processes", "all"),
                    env_extra={"CUPY_CACHE_DIR": str(args.out / "cupy-cache")})
        if tool == "racecheck":
            report.steps[tool]["note"] = ("racecheck checks shared-memory hazards; the kernels "
                                          "use no shared memory")
            report.write()
    if "bench_kernels" in wanted:
        out = args.out / "bench_kernels.json"

        def pick_bench(data):
            rows = [r for r in data["results"] if r["shape"] == [224, 224, 3]
                    and r["dtype"] == "uint8"]
            return {"headline": data["headline"],
                    "pct_of_copy_224x224x3": {f"{r['op']}/{r['mode']}": r["pct_of_copy"]
                                              for r in rows},
                    "modes": sorted({r["mode"] for r in data["results"]})}
        json_step(report, "bench_kernels",
                  [python, "pipelines/bench_kernels.py", "--out", str(out)], out, pick_bench,
                  timeout=3600,
                  verdict=lambda ok, f: ("PASS" if f.get("headline", {}).get("meets_target")
                                         else "RAN (below the 90% target)") if ok else "FAIL")
    if "profile_throughput" in wanted:
        out = args.out / "profile_throughput.json"
        json_step(report, "profile_throughput",
                  [python, "pipelines/profile_throughput.py", "--device", "gpu", "--out",
                   str(out), "--no-progress"], out,
                  lambda d: {"headline": d["headline"], "ratios": d["ratios"]}, timeout=3600)
    cuda_aware = (info.get("mpi") or {}).get("cuda_aware") if isinstance(info.get("mpi"),
                                                                          dict) else None
    if "mpi_staged" in wanted:
        pytest_step(report, "mpi_staged", python,
                    ["tests/test_mpi.py", "-k", "gpu_buffers and staged"], marker="gpu",
                    timeout=1200)
    if "mpi_cuda_aware" in wanted:
        if cuda_aware:
            pytest_step(report, "mpi_cuda_aware", python,
                        ["tests/test_mpi.py", "-k", "gpu_buffers and cuda-aware"],
                        marker="gpu", timeout=1200)
        else:
            report.add("mpi_cuda_aware", "NOT RUN",
                       note="this machine's MPI library is not CUDA-aware"
                       if cuda_aware is False else "could not tell whether MPI is CUDA-aware")
    report.write()
    failed = [n for n, s in report.steps.items() if s["verdict"] == "FAIL"]
    print(f"report: {args.out / 'report.md'} and report.json"
          + (f"; failed: {', '.join(failed)}" if failed else "; no step failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
