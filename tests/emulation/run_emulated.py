"""Runs a program with the CUDA emulation in place of CuPy.

    python tests/emulation/run_emulated.py PROGRAM [ARGS...]

The program runs as ``__main__`` with ``sys.argv = [PROGRAM, ARGS...]`` and its
own folder first on ``sys.path``, as ``python PROGRAM ARGS...`` would run it;
``import cupy`` gives it the emulation (tests/emulation). This runs the
multi-process programs of the ``gpu`` tests (what the GPU validation runs)
on a machine without a GPU.

``DR_EMU_TORCH_CUDA=1`` also answers PyTorch's two device questions such a
program asks before it uses CuPy (``torch.cuda.device_count()``, the emulated
device count, and ``torch.cuda.set_device``, which does nothing): enough for
the gloo-staged path, which gives PyTorch host tensors only. NCCL cannot run
on the emulation.
"""

import os
import pathlib
import runpy
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))            # tests/
sys.path.insert(0, str(HERE.parents[1]))        # the checkout

from emulation import install  # noqa: E402

DEVICES = 1
install(DEVICES)

if os.environ.get("DR_EMU_TORCH_CUDA") == "1":
    import torch
    torch.cuda.device_count = lambda: DEVICES
    torch.cuda.set_device = lambda device: None

if __name__ == "__main__":
    program = pathlib.Path(sys.argv[1]).resolve()
    sys.argv = [str(program), *sys.argv[2:]]
    sys.path.insert(0, str(program.parent))
    runpy.run_path(str(program), run_name="__main__")
