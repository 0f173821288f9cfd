"""GET /metrics: Prometheus metrics with prometheus_client, one registry per server.

Per-worker series carry `worker` (its index in ENTROPY_PROBE_DEVICES, stable across restarts) and
`device` labels. Store-derived gauges (jobs by status, queue depth) and the workers' states are
set when /metrics is scraped, so they always agree with the store and /readyz.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from schemas import JobStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
WORKER_LABELS = ("worker", "device")
# Probe jobs take seconds (tiny models) to an hour (a 7B model, B·G in the thousands).
DURATION_BUCKETS_S = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
WORKER_STATES = ("starting", "idle", "busy", "dead")
# attribute → (kind, name without the prefix, help) of the plain per-worker series
PER_WORKER = {
    "restarts": (Counter, "worker_restarts", "Workers started after one died."),
    "base_loads": (Counter, "base_model_loads", "Succeeded jobs that loaded their base model."),
    "base_reuses": (Counter, "base_model_reuses",
                    "Succeeded jobs that reused the loaded base model."),
    "last_host_rss": (Gauge, "last_job_peak_host_rss_bytes",
                      "Peak worker RSS of its last succeeded job."),
    "peak_host_rss": (Gauge, "peak_host_rss_bytes", "Peak worker RSS over its succeeded jobs."),
    "last_device": (Gauge, "last_job_peak_device_bytes",
                    "Peak device memory of its last succeeded job (CUDA)."),
    "peak_device": (Gauge, "peak_device_bytes",
                    "Peak device memory over its succeeded jobs (CUDA)."),
}
disable_created_metrics()       # no *_created series: scrapers compute rates from the counters


class WorkerView(Protocol):
    """What the metrics read of a worker slot (service.supervisor.WorkerInfo)."""

    index: int
    device: str
    state: str


def labels(index: int, device: str) -> dict[str, str]:
    return {"worker": str(index), "device": device}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "entropy_probe_"
        self.jobs = Gauge(p + "jobs", "Jobs in the store by status.", ["status"], registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Jobs waiting for a worker.", registry=r)
        self.worker_up = Gauge(p + "worker_up", "1 when the worker is alive and ready (idle or "
                               "busy).", WORKER_LABELS, registry=r)
        self.worker_state = Gauge(p + "worker_state", "1 for the worker's current state.",
                                  [*WORKER_LABELS, "state"], registry=r)
        self.duration = Histogram(p + "job_duration_seconds", "Wall time of jobs from start to "
                                  "end, by the worker that ran them (rank 0 of a job over "
                                  "several) and how they ended.",
                                  [*WORKER_LABELS, "status"], buckets=DURATION_BUCKETS_S,
                                  registry=r)
        for attr, (kind, name, help_) in PER_WORKER.items():
            setattr(self, attr, kind(p + name, help_, WORKER_LABELS, registry=r))
        self._peaks: dict[tuple[int, int, str], float] = {}

    # -- events from the supervisor ----------------------------------------------------------------
    def job_ended(self, index: int, device: str, status: JobStatus, seconds: float) -> None:
        self.duration.labels(**labels(index, device), status=status.value).observe(seconds)

    def base_used(self, index: int, device: str, reused: bool) -> None:
        """A job (or a shard of one) on this worker loaded its base model, or reused it."""
        (self.base_reuses if reused else self.base_loads).labels(**labels(index, device)).inc()

    def job_memory(self, index: int, device: str, host_rss: int, device_bytes: int | None
                   ) -> None:
        lab = labels(index, device)
        self.last_host_rss.labels(**lab).set(host_rss)
        self._raise(self.peak_host_rss, index, device, host_rss)
        if device_bytes is not None:
            self.last_device.labels(**lab).set(device_bytes)
            self._raise(self.peak_device, index, device, device_bytes)

    def _raise(self, gauge: Gauge, index: int, device: str, value: float) -> None:
        key = (id(gauge), index, device)
        self._peaks[key] = max(self._peaks.get(key, value), value)
        gauge.labels(**labels(index, device)).set(self._peaks[key])

    def worker_restarted(self, index: int, device: str) -> None:
        self.restarts.labels(**labels(index, device)).inc()

    # -- a scrape ----------------------------------------------------------------------------------
    def render(self, counts: dict[JobStatus, int], queue_depth: int,
               workers: Iterable[WorkerView]) -> bytes:
        for status, n in counts.items():
            self.jobs.labels(status=status.value).set(n)
        self.queue_depth.set(queue_depth)
        for w in workers:
            lab = labels(w.index, w.device)
            self.worker_up.labels(**lab).set(int(w.state in ("idle", "busy")))
            for counter in (self.restarts, self.base_loads, self.base_reuses):
                counter.labels(**lab)             # a worker that never did it reads 0
            for state in WORKER_STATES:
                self.worker_state.labels(**lab, state=state).set(int(w.state == state))
        return generate_latest(self.registry)
