"""Counters for GET /metrics, rendered by hand in the Prometheus text format (0.0.4)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from schemas import JobStatus


@dataclass
class Metrics:
    job_duration_sum: float = 0.0
    job_duration_count: int = 0
    worker_restarts: int = 0
    base_loads: int = 0
    base_reuses: int = 0
    last_peak_host_rss_bytes: int | None = None
    peak_host_rss_bytes: int | None = None
    last_peak_device_bytes: int | None = None
    peak_device_bytes: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def job_ran(self, seconds: float) -> None:
        with self._lock:
            self.job_duration_sum += seconds
            self.job_duration_count += 1

    def job_memory(self, host_rss: int, device: int | None, base_reused: bool) -> None:
        with self._lock:
            self.last_peak_host_rss_bytes = host_rss
            self.peak_host_rss_bytes = max(self.peak_host_rss_bytes or 0, host_rss)
            self.last_peak_device_bytes = device
            if device is not None:
                self.peak_device_bytes = max(self.peak_device_bytes or 0, device)
            if base_reused:
                self.base_reuses += 1
            else:
                self.base_loads += 1

    def render(self, counts: dict[JobStatus, int], queue_length: int, worker_up: bool) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float | None]]):
            lines.append(f"# HELP entropy_probe_{name} {help_}")
            lines.append(f"# TYPE entropy_probe_{name} {kind}")
            for suffix, value in samples:
                if value is not None:
                    lines.append(f"entropy_probe_{name}{suffix} {value}")

        with self._lock:
            metric("jobs", "gauge", "Jobs in the store by status.",
                   [(f'{{status="{s.value}"}}', n) for s, n in counts.items()])
            metric("queue_length", "gauge", "Jobs waiting for the worker.",
                   [("", queue_length)])
            metric("worker_up", "gauge", "1 when the device worker is alive and ready.",
                   [("", int(worker_up))])
            metric("worker_restarts_total", "counter", "Device workers started after a crash.",
                   [("", self.worker_restarts)])
            metric("job_duration_seconds", "summary", "Wall time of jobs from start to end.",
                   [("_sum", self.job_duration_sum), ("_count", self.job_duration_count)])
            metric("base_model_loads_total", "counter",
                   "Succeeded jobs that loaded their base model.", [("", self.base_loads)])
            metric("base_model_reuses_total", "counter",
                   "Succeeded jobs that reused the loaded base model.", [("", self.base_reuses)])
            metric("last_job_peak_host_rss_bytes", "gauge",
                   "Peak worker RSS of the last succeeded job.",
                   [("", self.last_peak_host_rss_bytes)])
            metric("peak_host_rss_bytes", "gauge", "Peak worker RSS over succeeded jobs.",
                   [("", self.peak_host_rss_bytes)])
            metric("last_job_peak_device_bytes", "gauge",
                   "Peak device memory of the last succeeded job (CUDA).",
                   [("", self.last_peak_device_bytes)])
            metric("peak_device_bytes", "gauge", "Peak device memory over succeeded jobs (CUDA).",
                   [("", self.peak_device_bytes)])
        return "\n".join(lines) + "\n"
