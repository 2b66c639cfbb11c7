"""Memory and time measurement helpers for tests and benchmarks.

* :func:`saved_tensor_bytes` — bytes of the tensors autograd saves for backward while ``fn`` runs
  (deterministic; the activation memory of a training step).
* :func:`peak_memory_bytes` — peak memory of ``fn`` above the level before it: CUDA peak allocated on a
  GPU; on CPU the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), which
  includes allocator noise of a few MB.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, bytes)`` of all tensors saved for backward meanwhile.

    Tensors saved twice (same storage) are counted once.

    Example:
        >>> x = torch.ones(10, requires_grad=True)
        >>> saved_tensor_bytes(lambda: (x * x).sum())[1]
        40
    """
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, total


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_peak_supported() -> bool:
    """Whether the CPU peak (Linux VmHWM with a resettable high-water mark) can be measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _read_status("VmHWM")
    except OSError:
        return False
    return True


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak bytes above the starting level)``.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset. On CPU: peak resident set size
    (needs Linux; raises ``RuntimeError`` elsewhere — check :func:`cpu_peak_supported`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    if not cpu_peak_supported():
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs; not available here")
    start = _read_status("VmRSS")
    result = fn()
    return result, max(0, _read_status("VmHWM") - start)


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
