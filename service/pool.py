"""The workers of the pool: which devices (ENTROPY_PROBE_DEVICES), how each is pinned to its
device, and the handle the supervisor drives a local worker process through.

A handle is anything with the WorkerHandle methods; the local backend's is a WorkerProcess
(multiprocessing 'spawn', its own queues), the Ray backend's an actor (service/ray_backend.py).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue
import signal
from dataclasses import dataclass, field
from typing import Callable, Protocol

from schemas import ProbeRequest
from service import worker as w

MAX_MESSAGES_PER_POLL = 256


class WorkerHandle(Protocol):
    def send(self, msg: w.Job | w.Exchanged | w.Abort | None) -> None: ...
    def poll(self) -> list:
        """The worker's messages so far, without waiting; raises OSError or EOFError when the
        channel broke (the worker died)."""
    def cancel(self, job_id: str) -> None:
        """Stop `job_id` at its next chunk boundary ('' clears the flag)."""
    def alive(self) -> bool: ...
    def exit_reason(self) -> str: ...
    def kill(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker and release its resources; a second call does nothing."""


# (slot index, its worker config) → a started worker
Spawner = Callable[[int, w.WorkerConfig], WorkerHandle]


@dataclass
class Backend:
    """Where the workers run: one (entry, config) per worker slot and how to start one."""

    name: str                                   # local | ray
    slots: list[tuple[str, w.WorkerConfig]]
    spawn: Spawner
    close: Callable[[], None] = field(default=lambda: None)


def local_backend(cfg: w.WorkerConfig, entries: list[str],
                  target: Callable[..., None] = w.main) -> Backend:
    """One local process per entry, pinned to its device."""
    return Backend("local", slot_configs(cfg, entries), lambda _i, c: WorkerProcess(c, target))


def visible_gpus() -> int:
    """CUDA devices this process sees (no CUDA context is created)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_devices(devices: str | None, device: str,
                   count_gpus: Callable[[], int] = visible_gpus) -> list[str]:
    """One entry per worker: ENTROPY_PROBE_DEVICES (`auto`: every visible GPU, else one CPU
    worker), or the one-entry form ENTROPY_PROBE_DEVICE (whose `auto` is one worker on the first
    GPU, else the CPU)."""
    if devices is None:
        return [device]
    entries = [e.strip() for e in devices.split(",") if e.strip()]
    if entries == ["auto"]:
        return [f"cuda:{i}" for i in range(count_gpus())] or ["cpu"]
    return entries


def pin(entry: str, parent_visible: str | None) -> tuple[str, str | None]:
    """(the worker's torch device, its CUDA_VISIBLE_DEVICES) for an entry: `cuda:N` sees only
    the parent's N-th visible GPU, as its cuda:0; `cpu` sees none; `auto`/`cuda` are not pinned."""
    if entry.startswith("cuda:"):
        n = int(entry.split(":", 1)[1])
        ids = [i.strip() for i in parent_visible.split(",")] if parent_visible else None
        if ids is not None and n >= len(ids):
            raise ValueError(f"ENTROPY_PROBE_DEVICES names {entry} but CUDA_VISIBLE_DEVICES "
                             f"lists {len(ids)} GPUs")
        return "cuda:0", ids[n] if ids is not None else str(n)
    if entry == "cpu":
        return "cpu", ""
    return entry, None


def slot_configs(cfg: w.WorkerConfig, entries: list[str], pinned: bool = True
                 ) -> list[tuple[str, w.WorkerConfig]]:
    """(entry, that worker's config) for each entry; unpinned (Ray pins its actors itself), a
    GPU entry is the worker's cuda:0 and CUDA_VISIBLE_DEVICES is left alone."""
    out = []
    for entry in entries:
        device, visible = pin(entry, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if not pinned and entry.startswith("cuda"):
            visible = None
        options = dataclasses.replace(cfg.options, device=device)
        out.append((entry, dataclasses.replace(cfg, options=options,
                                               cuda_visible_devices=visible)))
    return out


def base_model_of(req: ProbeRequest) -> str | None:
    """The resolved base model path a request will load, as the worker's cache names it: the
    request's base_model, else the adapter config's base_model_name_or_path; None when unknown
    (the worker reports the error)."""
    ck = req.checkpoint
    path = ck.base_model
    if path is None and ck.adapter is not None:
        try:
            with open(os.path.join(ck.adapter, "adapter_config.json")) as f:
                path = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            return None
    return os.path.realpath(path) if isinstance(path, str) and path else None


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerProcess:
    """One local worker process with its own queues (a killed process can leave a queue
    unusable)."""

    def __init__(self, cfg: w.WorkerConfig, target: Callable[..., None] = w.main):
        ctx = mp.get_context("spawn")
        self.jobs, self.events = ctx.Queue(), ctx.Queue()
        self.cancel_id = ctx.Array("c", w.CANCEL_ID_BYTES)
        self.process = ctx.Process(target=target, name="entropy-probe-worker", daemon=True,
                                   args=(cfg, self.jobs, self.events, self.cancel_id))
        self.process.start()
        self.stopped = False

    def send(self, msg) -> None:
        if isinstance(msg, w.Exchanged):        # raises here, not in the queue's thread
            from service.shard import share_tensors
            share_tensors(msg.value)
        self.jobs.put(msg)

    def poll(self) -> list:
        out = []
        while len(out) < MAX_MESSAGES_PER_POLL:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        return out

    def cancel(self, job_id: str) -> None:
        self.cancel_id.value = job_id.encode()

    def alive(self) -> bool:
        return self.process.is_alive()

    def exit_reason(self) -> str:
        self.process.join(1.0)
        return exit_reason(self.process.exitcode)

    def kill(self) -> None:
        self.process.kill()

    def stop(self, timeout: float = 5.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.process.is_alive():
            try:
                self.jobs.put(None)
            except (OSError, ValueError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        for q in (self.jobs, self.events):
            q.cancel_join_thread()
            q.close()
        # Drop the semaphores now, not at interpreter exit (the resource tracker warns).
        del self.jobs, self.events, self.cancel_id
