"""What machine a benchmark ran on, for its JSON: CPU model and the flags that decide which
engines gain (AVX512_BF16, AMX), cores, memory and load. Reads /proc; no TensorFlow."""

import os
import platform
from pathlib import Path

FLAGS_OF_INTEREST = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile",
                     "avx512_vnni"}


def _proc(name):
    """The text of /proc/<name>, or "" where there is no /proc (the facts then stay None)."""
    path = Path("/proc") / name
    return path.read_text() if path.is_file() else ""


def machine_info():
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": None,
        "cpu_flags_of_interest": [],
        "load_average_at_start": list(os.getloadavg()),
    }
    for line in _proc("cpuinfo").splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            info["cpu_flags_of_interest"] = sorted(set(line.split(":", 1)[1].split()) & FLAGS_OF_INTEREST)
    for line in _proc("meminfo").splitlines():
        if line.startswith("MemTotal"):
            info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    return info
