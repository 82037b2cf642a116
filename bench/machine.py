"""The machine a benchmark ran on, recorded in its JSON so a number is never read without its hardware.

    python -m bench.machine       # prints this machine's dict
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _cpuinfo() -> tuple[str, int | None]:
    """CPU model name and physical core count (distinct physical id/core id pairs) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", None
    model, cores, physical = "unknown", set(), "0"
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and model == "unknown":
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return model, len(cores) or None


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB
    except OSError:
        pass
    return None


def machine() -> dict:
    """CPU model, physical cores, hardware threads, RAM in GiB, torch version and GPU name (None without CUDA)."""
    import torch

    cpu, cores = _cpuinfo()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores or os.cpu_count(), "threads": os.cpu_count(), "ram_gib": _ram_gib(),
            "torch": torch.__version__, "gpu": gpu}


if __name__ == "__main__":
    print(json.dumps(machine(), indent=1))
