"""Shared pieces of the benchmarks: what machine this is, and how results are written."""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from digfast.ops import _backend


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "hostname": platform.node()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    C = _backend.compiled()
    env["digfast_C"] = C.build_info() if C is not None else None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path, env: dict, rows: list[dict]) -> None:
    """One file per run: the environment once, one row per measurement."""
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


def timed(fn, device, warmup: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of fn after `warmup` calls (GPU work synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times
