"""What machine a result came from: cores, memory, CPU model, GPU, versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

PACKAGES = ("torch", "lightning", "polars", "faiss-cpu", "faiss-gpu", "feast", "mlflow", "scikit-learn", "duckdb",
            "google-genai", "redis")


def describe() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpu = None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5)
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return {"cores": os.cpu_count(), "memory_gib": mem_gib, "cpu": cpu, "gpu": gpu,
            "python": platform.python_version(), "os": platform.platform(), "packages": versions}


def markdown(m: dict) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return (f"{m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}, GPU: {m['gpu'] or 'none'}; "
            f"Python {m['python']}; {pkgs}")
