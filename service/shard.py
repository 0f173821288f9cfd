"""A job over several workers (request `workers: k`): both ends of its shards' exchanges.

Worker side, QueueCollective: a shard's probe_core Collective. `exchange` sends an Exchange to
the server on the worker's events channel and waits on its jobs channel for the matching
Exchanged, while checking what a chunk boundary checks (the cancel flag, the deadline, that the
server is alive), so a shard blocked on a slow or dead peer still stops.

Server side, Hub: the pending exchanges of one run. When all k ranks sent exchange `seq`, it
combines them (probe_core.collective.combine: a gather or an element-wise sum, in rank order) and
the supervisor sends the same answer to every shard. The hub never needs the model or the
optimizer state: every shard computes D, Δθ and the estimates itself from the same sums.
"""

from __future__ import annotations

import copy
import multiprocessing.queues
import queue
import time
from dataclasses import dataclass, field

import torch

from probe_core.collective import Op, combine
from probe_core.errors import DeadlineExceeded, ProbeCancelled, ProbeError, ProbeOutOfMemory
from probe_core.probe import ProbeHooks
from service import worker as w

WAIT_POLL_S = 0.1           # how often a waiting shard checks cancel, deadline and its parent


SHM_HINT = ("local workers exchange the P-vector sums through shared memory (/dev/shm): give "
            "the container more (docker --shm-size) or ask for fewer workers")


def share_tensors(value) -> None:
    """Move the tensors of a `sum` exchange to shared memory now. A multiprocessing queue would
    do it in its feeder thread, where a full /dev/shm only prints an error and loses the
    message; here it raises RuntimeError, and the job fails instead of waiting forever."""
    if isinstance(value, dict):
        for t in value.values():
            if isinstance(t, torch.Tensor):
                t.share_memory_()


class ShardAborted(ProbeError):
    """Another shard of the job failed or died (or the job was cancelled): this one stops.
    Its report is never the job's error: the server recorded the first failure already."""


class QueueCollective:
    """Rank `job.rank` of `job.size`, talking to the server through the worker's channels. While
    it waits it checks what the job's chunk boundaries check: `hooks.should_cancel` (the cancel
    flag; it exits when the server died) and `hooks.deadline`."""

    def __init__(self, job: w.Job, jobs, events, hooks: ProbeHooks):
        self.rank, self.size = job.rank, job.size
        self.job_id = job.id
        self._jobs, self._events, self._hooks = jobs, events, hooks
        self._seq = 0
        self._through_shm = isinstance(events, multiprocessing.queues.Queue)  # not Ray's

    def exchange(self, op: Op, value):
        self._seq += 1
        if self._through_shm:
            # torch sends a tensor through a multiprocessing queue as its shared memory: the
            # hub and every rank would map the same storage, and one rank's in-place update
            # would change the others' numbers. What crosses is a copy nobody else holds, and
            # what arrives is copied before use (as ThreadGroup's answers are).
            value = copy.deepcopy(value)
            try:
                share_tensors(value)
            except RuntimeError as exc:
                raise ProbeOutOfMemory(f"could not share this shard's sums: "
                                       f"{w.scrub(str(exc))}; {SHM_HINT}") from exc
        self._events.put(w.Exchange(self.job_id, self.rank, self._seq, op, value))
        answer = self._wait()
        return copy.deepcopy(answer) if self._through_shm else answer

    def _wait(self):
        """The Exchanged of this exchange (raises when the shard must stop instead)."""
        while True:
            self._check()
            try:
                msg = self._jobs.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                continue
            if msg is None:                 # the server stops: leave the stop for the loop
                self._jobs.put(None)
                raise ProbeCancelled("the server is shutting down")
            if getattr(msg, "job_id", None) != self.job_id:
                continue                    # a late message of an earlier job
            if isinstance(msg, w.Abort):
                raise ShardAborted(f"stopped: {msg.reason}")
            if isinstance(msg, w.Exchanged) and msg.seq == self._seq:
                return msg.value

    def _check(self) -> None:
        hooks = self._hooks
        if hooks.should_cancel is not None and hooks.should_cancel():
            raise ProbeCancelled("the job was cancelled")
        if hooks.deadline is not None and time.monotonic() > hooks.deadline:
            raise DeadlineExceeded("the job ran past its deadline")


class ExchangeMismatch(Exception):
    """The shards of one exchange disagree (op, or a rank sent twice): a bug, not the user's."""


@dataclass
class Hub:
    """The exchanges of one run in flight, keyed by their sequence number."""

    size: int
    pending: dict[int, tuple[str, dict[int, object]]] = field(default_factory=dict)

    def add(self, msg: w.Exchange) -> tuple[bool, object]:
        """Record rank msg.rank's value; (True, the answer) once every rank sent this seq."""
        op, values = self.pending.setdefault(msg.seq, (msg.op, {}))
        if op != msg.op or msg.rank in values or not 0 <= msg.rank < self.size:
            raise ExchangeMismatch(f"exchange {msg.seq}: rank {msg.rank} sent {msg.op!r} "
                                   f"(expected {op!r}, ranks so far {sorted(values)})")
        values[msg.rank] = msg.value
        if len(values) < self.size:
            return False, None
        del self.pending[msg.seq]
        return True, combine(op, [values[r] for r in range(self.size)])
