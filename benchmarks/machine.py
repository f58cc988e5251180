"""The machine a benchmark ran on, for its results file."""

import os
import platform


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def has_amx() -> bool:
    """Whether the CPU multiplies bf16 matrices in AMX tiles (a VM may hide
    them even on a CPU that has them)."""
    try:
        return "amx_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False
