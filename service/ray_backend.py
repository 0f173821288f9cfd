"""ENTROPY_PROBE_BACKEND=ray: each worker is a Ray actor (num_gpus=1 for a GPU entry, num_cpus=1
for a CPU one) anywhere in the cluster, running the same worker loop (service.worker.main) in a
thread; the supervisor drives it through the WorkerHandle methods, as it drives a local process.

The FastAPI front, the job store and the HTTP contract do not change. Checkpoint paths are
opened by the actors, on whichever node Ray placed them: every node must see them at the same
path (shared storage), or the job fails with checkpoint_not_found naming the worker's host.
Needs the optional extra: pip install 'entropy-probe[ray]'.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading

from service import worker as w
from service.pool import Backend, slot_configs, worker_devices

log = logging.getLogger("entropy_probe.ray")
POLL_TIMEOUT_S = 10.0           # an actor that cannot answer this long is treated as dead
SHARED_STORAGE_HINT = ("with the Ray backend every node must see the checkpoint paths at the "
                       "same path: put them on shared storage")


def _ray():
    try:
        import ray
    except ImportError as exc:          # the optional extra is not installed
        raise RuntimeError("ENTROPY_PROBE_BACKEND=ray needs Ray: pip install "
                           "'entropy-probe[ray]'") from exc
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at `address` (ENTROPY_PROBE_RAY_ADDRESS), or start a local Ray."""
    ray = _ray()
    if ray.is_initialized():
        return
    kwargs = {"address": address} if address else {"include_dashboard": False}
    # ray.init replaces the server's SIGTERM/SIGINT handlers with ones that exit at once: keep
    # uvicorn's, so a stop still fails the running jobs as interrupted and stops the actors.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(**kwargs, logging_level=logging.WARNING, log_to_driver=False)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def cluster_gpus() -> int:
    return int(_ray().cluster_resources().get("GPU", 0))


def shutdown() -> None:
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


class _Flag:
    """The cancel flag, as the worker loop reads it (`.value`, bytes)."""

    def __init__(self) -> None:
        self.value = b""


class WorkerActor:
    """A worker inside a Ray actor: the loop runs in a thread; the methods are quick."""

    def __init__(self, cfg: w.WorkerConfig, target=w.main):
        self.jobs, self.events, self.flag = queue.Queue(), queue.Queue(), _Flag()
        self.thread = threading.Thread(target=target, name="entropy-probe-worker", daemon=True,
                                       args=(cfg, self.jobs, self.events, self.flag))
        self.thread.start()

    def send(self, msg) -> None:
        self.jobs.put(msg)

    def poll(self) -> list:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def cancel(self, job_id: str) -> None:
        self.flag.value = job_id.encode()

    def alive(self) -> bool:
        return self.thread.is_alive()


class RayWorker:
    """The supervisor's handle on one actor."""

    def __init__(self, cfg: w.WorkerConfig, target=w.main):
        ray = _ray()
        gpu = cfg.options.device.startswith("cuda")
        actor = ray.remote(WorkerActor).options(
            num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1, max_restarts=0)
        self.actor = actor.remote(cfg, target)
        self.dead: str | None = None
        self.stopped = False

    def send(self, msg) -> None:
        self.actor.send.remote(msg)

    def poll(self) -> list:
        ray = _ray()
        try:
            return ray.get(self.actor.poll.remote(), timeout=POLL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self.dead = str(exc).strip().splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise OSError(self.dead) from exc

    def cancel(self, job_id: str) -> None:
        self.actor.cancel.remote(job_id)

    def alive(self) -> bool:
        return self.dead is None

    def exit_reason(self) -> str:
        return f"the Ray actor died: {self.dead or 'unknown reason'}"

    def kill(self) -> None:
        _ray().kill(self.actor, no_restart=True)

    def stop(self, timeout: float = 5.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self.actor.send.remote(None)
        finally:
            _ray().kill(self.actor, no_restart=True)


def spawner(target=w.main):
    """The supervisor's Spawner for this backend."""
    return lambda _index, cfg: RayWorker(cfg, target)


def ray_backend(cfg: w.WorkerConfig, devices: str | None, device: str, target,
                address: str | None) -> Backend:
    """One actor per entry. Ray decides which GPU an actor gets: ENTROPY_PROBE_DEVICES=auto is
    one actor per GPU in the cluster (else one CPU actor), `cuda:N` one GPU actor each, `cpu`
    one CPU actor each; ENTROPY_PROBE_DEVICE=auto is one actor, on a GPU when there is one."""
    connect(address)
    entries = worker_devices(devices, device, count_gpus=cluster_gpus)
    if entries == ["auto"]:
        entries = ["cuda:0" if cluster_gpus() else "cpu"]
    slots = [(e, dataclasses.replace(c, remote=True))
             for e, c in slot_configs(cfg, entries, pinned=False)]
    return Backend("ray", slots, spawner(target), shutdown)
