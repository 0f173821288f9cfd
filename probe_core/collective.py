"""One probe job over k workers (issue 16): the exchanges between its shards.

Every shard runs the same run_probe with its own rank and makes the same exchanges in the same
order (SPMD, as torch.distributed does). An exchange is one of
    gather   any picklable value  → [rank 0's value, …, rank k−1's]        (on every rank)
    sum      dict[str, Tensor]    → the element-wise sum over ranks, in rank order
The hub (the service's supervisor, or ThreadGroup here) waits for all k values of an exchange,
calls `combine` and hands the same answer to every rank. So every rank reduces the same numbers
in the same order, and D, Δθ and every estimate come out identical on each (the hub sums, it
never needs the model or the optimizer state). Rank 0's outcome is the job's result.

What crosses per job (P = trainable parameters, K = summary rows: entropy, length for
token_mean, update, reward, bonus when the objective has one):
    the responses (token ids) of each shard's prompts               gather, once (sampled prompts)
    each sequence's statistics (S, T, f, m, length)                 gather, once
    the K P-vector sums of the shard's units                        sum: K·P float64 each way
    the shard's unit dots (a few numbers per unit)                  gather, once (twice in
                                                                    two-batch mode, with the
                                                                    E rows and the U spread)
    S⁺ (and f⁺) per sequence for each lr multiplier                  sum of the shards' disjoint
                                                                    rows, per multiplier
    the pass counts and warnings                                    gather, at the end
A shard takes a contiguous block of units (`shard_units`), so gathered per-unit values
concatenate in unit order.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Literal, Protocol, TypeVar


Op = Literal["gather", "sum"]
T = TypeVar("T")

__all__ = ["Collective", "Op", "SOLO", "Solo", "ThreadGroup", "combine", "shard_units"]


class Collective(Protocol):
    """A shard's view of its job's group. `exchange` blocks until every rank made it, and
    returns the rank its own copy of the answer: probe_core updates some answers in place
    (EntropyScalars.entropy_vector), so ranks must never share one storage (as torch's
    multiprocessing queues would by default: service/shard.py sends copies)."""

    rank: int
    size: int

    def exchange(self, op: Op, value: Any) -> Any: ...


def combine(op: Op, values: list[Any]) -> Any:
    """The answer of one exchange, from the ranks' values in rank order."""
    if op == "gather":
        return list(values)
    if op == "sum":
        first = values[0]
        return {k: sum((v[k] for v in values[1:]), first[k].clone()) for k in first}
    raise ValueError(f"unknown exchange {op!r}")


def shard_units(num_units: int, rank: int, size: int) -> range:
    """The contiguous block of units rank `rank` of `size` computes (sizes differ by ≤ 1)."""
    start = rank * num_units // size
    return range(start, (rank + 1) * num_units // size)


class Solo:
    """The group of one: a job on one worker (every exchange returns its own value)."""

    rank, size = 0, 1

    def exchange(self, op: Op, value: Any) -> Any:
        return [value] if op == "gather" else value     # no copy of the P-vectors


SOLO = Solo()


class ThreadGroup:
    """k shards in threads of one process (tests, and a library user with several devices in
    one process). `member(r)` is rank r's Collective; `abort()` wakes every waiting rank with
    RuntimeError (a shard failed)."""

    def __init__(self, size: int):
        self.size = size
        self._cond = threading.Condition()
        self._values: dict[int, list[Any]] = {}   # exchange number → values by rank
        self._answers: dict[int, Any] = {}
        self._taken: dict[int, int] = {}
        self._aborted: str | None = None

    def member(self, rank: int) -> "_ThreadMember":
        return _ThreadMember(self, rank)

    def run(self, fn: Callable[[Collective], T]) -> list[T]:
        """fn(rank r's Collective) on one thread per rank; the results in rank order. The first
        rank to raise aborts the others' exchanges, and its exception is raised here."""
        results: list = [None] * self.size
        errors: list[BaseException] = []

        def shard(rank: int) -> None:
            try:
                results[rank] = fn(self.member(rank))
            except BaseException as exc:    # noqa: BLE001 - re-raised in the caller
                errors.append(exc)
                self.abort(f"rank {rank}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=shard, args=(r,), name=f"shard-{r}")
                   for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def abort(self, reason: str) -> None:
        with self._cond:
            self._aborted = reason
            self._cond.notify_all()

    def _exchange(self, seq: int, rank: int, op: Op, value: Any) -> Any:
        with self._cond:
            slot = self._values.setdefault(seq, [None] * self.size)
            slot[rank] = (value,)
            if all(v is not None for v in slot):
                self._answers[seq] = combine(op, [v[0] for v in slot])
                del self._values[seq]
                self._cond.notify_all()
            while seq not in self._answers:
                if self._aborted is not None:
                    raise RuntimeError(f"another shard failed: {self._aborted}")
                self._cond.wait(0.1)
            answer = self._answers[seq]
            self._taken[seq] = self._taken.get(seq, 0) + 1
            if self._taken[seq] == self.size:
                del self._answers[seq], self._taken[seq]
            return copy.deepcopy(answer)   # as if it crossed a process boundary


class _ThreadMember:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size, self._seq = group, rank, group.size, 0

    def exchange(self, op: Op, value: Any) -> Any:
        self._seq += 1
        return self.group._exchange(self._seq, self.rank, op, value)

