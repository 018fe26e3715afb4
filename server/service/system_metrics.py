"""Server-wide gauges: CPU utilization and memory (Triton's nv_cpu_*), and GPUs through NVML when present.

Read from /proc directly (two small files) rather than through psutil: the server runs on
Linux, and these two reads are all Triton's CPU families need. GPU families come from NVML
(the `nvidia-ml-py` package, imported only if installed) and only while a model runs on CUDA.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from server.service.metrics import Family

logger = logging.getLogger(__name__)


def _cpu_times(stat: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    try:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _meminfo(path: Path) -> dict[str, int]:
    """/proc/meminfo's values in bytes."""
    values = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError):
        return {}
    return values


class SystemGauges:
    """nv_cpu_utilization (over the time since the previous scrape), nv_cpu_memory_*_bytes, nv_gpu_*."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._last = _cpu_times(proc / "stat")
        self._nvml: Any = None
        self._nvml_tried = False

    def families(self, gpu: bool) -> list[Family]:
        utilization = Family("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]")
        now = _cpu_times(self._proc / "stat")
        with self._lock:
            last, self._last = self._last, now or self._last
        if now is not None and last is not None and now[1] > last[1]:
            utilization.add((), (now[0] - last[0]) / (now[1] - last[1]))
        else:
            utilization.add((), 0.0)
        memory = _meminfo(self._proc / "meminfo")
        total = Family("nv_cpu_memory_total_bytes", "gauge", "CPU total memory (RAM), in bytes")
        used = Family("nv_cpu_memory_used_bytes", "gauge", "CPU used memory (RAM), in bytes")
        total.add((), float(memory.get("MemTotal", 0)))
        used.add((), float(memory.get("MemTotal", 0) - memory.get("MemAvailable", memory.get("MemFree", 0))))
        return [utilization, total, used, *(self._gpu_families() if gpu else [])]

    def _gpu_families(self) -> list[Family]:
        nvml = self._load_nvml()
        if nvml is None:
            return []
        labels = ("gpu_uuid",)
        utilization = Family("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)", labels)
        used = Family("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes", labels)
        total = Family("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes", labels)
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization.add((uuid,), nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                used.add((uuid,), float(memory.used))
                total.add((uuid,), float(memory.total))
        except Exception as exc:  # a GPU that went away must not break the scrape
            logger.warning("NVML query failed: %s", exc)
            return []
        return [utilization, used, total]

    def _load_nvml(self) -> Any:
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # not installed, or no driver
                logger.info("GPU metrics off: NVML is not available (%s)", exc)
        return self._nvml
