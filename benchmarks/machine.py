"""What machine a benchmark ran on, and how to run it as another CPU kind.

`describe()` names the CPU (lscpu's model name), its vector extensions, whether PyTorch runs its
AVX-512 or AVX2 kernels and whether palikit computes in bfloat16 natively there; every results
file records it. `--emulate-avx2` (AVX2_ENV) makes an AVX-512 machine run PyTorch's AVX2 kernels,
oneDNN's and MKL's as an AVX2-only CPU (Zen 3, most laptops) does: the same switches PyTorch,
oneDNN and MKL read (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), so that
both kinds are measured on one machine. An emulation is not the other CPU: its memory and clocks
stay this one's, and results files say which it was.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
RESULTS = Path(__file__).resolve().parent / "results"


def describe() -> dict:
    """The CPU as lscpu names it, its AVX flags, and the kernels PyTorch and palikit pick here."""
    import torch

    from palikit import kernels

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    model = re.search(r"Model name:\s*(.+)", lscpu)
    flags = set(re.search(r"Flags:\s*(.+)", lscpu).group(1).split()) if "Flags:" in lscpu else set()
    return {"date": datetime.date.today().isoformat(), "cpu": model.group(1).strip() if model else platform.processor(),
            "cores": os.cpu_count(), "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "avx2": "avx2" in flags, "torch": torch.__version__,
            "torch_kernels": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": kernels.native_16bit(torch.bfloat16),
            "emulated_avx2": os.environ.get("ATEN_CPU_CAPABILITY") == "avx2"}


def kind(machine: dict) -> str:
    """A short name of the CPU kind measured: avx512-bf16, avx2 (or avx2-emulated), ..."""
    if machine["emulated_avx2"]:
        return "avx2-emulated"
    return "avx512-bf16" if machine["native_bf16"] else machine["torch_kernels"].lower()


def results_file(benchmark: str, machine: dict) -> Path:
    return RESULTS / f"{machine['date']}-{benchmark}-{kind(machine)}.json"
