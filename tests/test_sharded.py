"""One job over several workers (request `workers: k`), on a real server with two real CPU workers
(processes, then Ray actors), and both ends of the shards' exchanges (service/shard.py) alone.

- a `workers: 2` job equals the `workers: 1` job: client rollouts, every number of the result
  within rel 1e-5 (same_numbers says which fields are skipped and why); sampled prompts, the
  same responses (identical batch summary) and the same numbers; two-batch mode too;
- the queue is strict FIFO: a `workers: 2` job is not passed by 1-worker jobs queued after it;
- `workers: 3` on a pool of 2 is a 422 naming the pool size;
- SIGKILL of one shard's worker fails the job with worker_crashed naming it, the other shard
  stops, and the next job succeeds;
- cancel reaches every shard: the job is cancelled and both workers are idle again;
- a deadline reaches every shard: deadline_exceeded, stopped by themselves; a shard waiting on
  an exchange for a peer that reaches no chunk boundary stops at its deadline, and the stuck peer
  is killed a grace period after the job ended and replaced; shards that all reach no boundary
  are all killed a grace period past the deadline and replaced.
"""

from __future__ import annotations

import math
import os
import queue
import signal
import threading
import time

import pytest
import torch

from faults import EVERY_SHARD_SEED, FAULT_SEED
from helpers import (READY_TIMEOUT_S, finished, medium_request, metric, pool_server,
                     quick_request, readyz_workers, slow_request, submit, wait_running)
from probe_core.errors import DeadlineExceeded, ProbeCancelled, ProbeOutOfMemory
from probe_core.probe import PHASES, ProbeHooks
from schemas import ErrorCode, JobStatus
from service import worker as w
from service.shard import ExchangeMismatch, Hub, QueueCollective, ShardAborted

GRACE_S = 5.0           # one torch thread per worker: a chunk of these tiny jobs is ~0.1 s
pytestmark = pytest.mark.timeout(300)

# Parts of a result that legitimately differ between k = 1 and k = 2:
SKIPPED = {
    "timing",           # wall-clock seconds
    "memory",           # rank 0's process: its peak RSS and trace
    "environment",      # environment.workers is k by design
    "log_weight_noise_floor",   # max |S − S'| under another chunking: rounding-level noise,
                                # and the chunks of a shard are not those of the whole batch
}
REL = 1e-5
ABS = 1e-9              # numbers that are zero up to rounding (e.g. a term that cancels)


def same_numbers(a, b, where: str = "result") -> list[str]:
    """Where two result JSONs differ: every float within REL (ABS near zero), everything else
    (ints, strings, bools, nulls, list lengths, keys) equal; the SKIPPED fields not compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())} on one side only"]
        return [d for k in a if k not in SKIPPED for d in same_numbers(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_numbers(x, y, f"{where}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(
                a, bool) and math.isclose(a, b, rel_tol=REL, abs_tol=ABS):
            return []
        return [f"{where}: {a!r} against {b!r}"]
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def count_floats(x) -> int:
    if isinstance(x, dict):
        return sum(count_floats(v) for k, v in x.items() if k not in SKIPPED)
    if isinstance(x, list):
        return sum(count_floats(v) for v in x)
    return isinstance(x, float)


def test_same_numbers_finds_what_differs():
    a = {"delta_h1": {"total": 1.0, "se": None, "units": 4}, "timing": {"total": 1.0},
         "rows": [0.5, 2.0]}
    assert same_numbers(a, {**a, "timing": {"total": 9.0}}) == []
    assert same_numbers(a, {**a, "rows": [0.5, 2.0 * (1 + 1e-6)]}) == []
    assert same_numbers(a, {**a, "rows": [0.5, 2.0 * (1 + 1e-4)]}) == [f"result.rows[1]: 2.0 "
                                                                       f"against {2.0002!r}"]
    assert same_numbers(a, {**a, "delta_h1": {"total": 1.0, "se": 0.1, "units": 4}})
    assert same_numbers(a, {**a, "delta_h1": {"total": 1.0, "se": None, "units": 3}})
    assert same_numbers(a, {**a, "rows": [0.5]})


# -- the exchanges alone: two QueueCollectives and a Hub in one process ------------------------

class _Flag:
    value = b""


def _pair(deadline: float | None = None):
    """Two ranks of job j on their own channels, as the worker loop gives them."""
    chans = [(queue.Queue(), queue.Queue()) for _ in range(2)]
    flags = [_Flag(), _Flag()]
    members = [QueueCollective(w.Job("j", "{}", rank=r, size=2), jobs, events, ProbeHooks(
        should_cancel=lambda f=flags[r]: f.value == b"j", deadline=deadline))
        for r, (jobs, events) in enumerate(chans)]
    return members, chans, flags


def _serve(chans, hub: Hub, stop: threading.Event) -> None:
    """What the supervisor does with Exchange messages: the hub's answer to every rank."""
    while not stop.is_set():
        for _, events in chans:
            try:
                msg = events.get(timeout=0.01)
            except queue.Empty:
                continue
            complete, answer = hub.add(msg)
            if complete:
                for jobs, _ in chans:
                    jobs.put(w.Exchanged(msg.job_id, msg.seq, answer))


def test_shards_get_the_same_answers_in_rank_order():
    members, chans, _ = _pair()
    chans[0][0].put(w.Exchanged("earlier-job", 1, "stale"))      # ignored: another job
    chans[1][0].put(w.Abort("earlier-job", "gone"))
    stop = threading.Event()
    hub = threading.Thread(target=_serve, args=(chans, Hub(2), stop), daemon=True)
    hub.start()
    answers: dict[int, list] = {}

    def shard(r: int) -> None:
        m = members[r]
        got = [m.exchange("gather", f"rows of {r}")]
        got.append(m.exchange("sum", {"x": torch.full((3,), float(r + 1), dtype=torch.float64)}))
        got.append(m.exchange("gather", r * 10))
        answers[r] = got

    threads = [threading.Thread(target=shard, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    stop.set()
    for r in (0, 1):
        gathered, summed, last = answers[r]
        assert gathered == ["rows of 0", "rows of 1"]
        assert torch.equal(summed["x"], torch.full((3,), 3.0, dtype=torch.float64))
        assert last == [0, 10]


def test_a_waiting_shard_stops_on_abort_cancel_deadline():
    members, chans, flags = _pair()
    jobs = chans[0][0]
    jobs.put(w.Abort("j", "worker 1 (cpu, pid 7) died"))
    with pytest.raises(ShardAborted, match="worker 1"):
        members[0].exchange("gather", 1)
    assert isinstance(chans[0][1].get_nowait(), w.Exchange)    # it did send its value
    flags[0].value = b"j"
    with pytest.raises(ProbeCancelled):
        members[0].exchange("gather", 1)
    past, _, _ = _pair(deadline=time.monotonic() - 1.0)
    with pytest.raises(DeadlineExceeded):
        past[0].exchange("gather", 1)
    flags[0].value = b""
    jobs.put(None)                            # the server stops: the loop must still see it
    with pytest.raises(ProbeCancelled, match="shutting down"):
        members[0].exchange("gather", 1)
    assert jobs.get_nowait() is None


def test_a_full_dev_shm_fails_the_shard_instead_of_losing_its_sums(monkeypatch):
    """Local workers: the sums go through /dev/shm. Full, it must raise in the shard (the queue's
    feeder thread would only print it, and the peers would wait forever)."""
    import multiprocessing as mp

    def full(self):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    events = mp.get_context("spawn").Queue()
    member = QueueCollective(w.Job("j", "{}", rank=0, size=2), queue.Queue(), events,
                             ProbeHooks())
    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    with pytest.raises(ProbeOutOfMemory, match="shm-size"):
        member.exchange("sum", {"x": torch.zeros(3)})
    with pytest.raises(queue.Empty):
        events.get(timeout=0.2)                 # nothing half-sent
    events.close()


def test_the_hub_refuses_shards_that_disagree():
    hub = Hub(2)
    assert hub.add(w.Exchange("j", 0, 1, "gather", "a")) == (False, None)
    with pytest.raises(ExchangeMismatch):
        hub.add(w.Exchange("j", 1, 1, "sum", {"x": torch.zeros(1)}))
    with pytest.raises(ExchangeMismatch):
        hub.add(w.Exchange("j", 0, 1, "gather", "again"))
    assert hub.add(w.Exchange("j", 1, 1, "gather", "b")) == (True, ["a", "b"])
    assert hub.pending == {}


# -- the supervisor's routing, with handles that record what they are sent -----------------------

class _Recorder:
    """A worker handle that only records: the test plays the worker's messages."""

    def __init__(self, pid: int):
        self.inbox: list = [w.Ready(pid, "cpu", 1)]
        self.sent: list = []
        self.flag = ""

    def send(self, msg) -> None:
        self.sent.append(msg)

    def poll(self) -> list:
        out, self.inbox = self.inbox, []
        return out

    def cancel(self, job_id: str) -> None:
        self.flag = job_id

    def alive(self) -> bool:
        return True

    def stop(self, timeout: float = 5.0) -> None:
        pass


@pytest.fixture
def routed(tmp_path, tiny_checkpoint):
    """A Supervisor over two recording handles, stepped by hand (its thread never starts)."""
    from probe_core.spec import RuntimeOptions
    from schemas import ProbeRequest
    from service.metrics import Metrics
    from service.pool import Backend
    from service.store import JobStore
    from service.supervisor import Supervisor

    cfg = w.WorkerConfig(RuntimeOptions(device="cpu"), 1 << 20)
    handles = [_Recorder(100), _Recorder(101)]
    store = JobStore(tmp_path / "state", durable=False)
    sup = Supervisor(store, Backend("test", [("cpu", cfg)] * 2, lambda i, _c: handles[i]),
                     Metrics())
    for slot in sup.slots:
        slot.handle = sup.spawn(slot.index, slot.cfg)

    def submit_job(**extra) -> str:
        req = ProbeRequest.model_validate(quick_request(tiny_checkpoint, **extra))
        return store.create(req, None, 10)[0].id

    sup._step()                                 # both Ready
    yield sup, handles, store, submit_job
    store.close()


def _jobs(handle: _Recorder) -> list[w.Job]:
    return [m for m in handle.sent if isinstance(m, w.Job)]


def test_the_supervisor_routes_exchanges_and_aborts_on_a_shard_failure(routed):
    sup, (h0, h1), store, submit_job = routed
    job_id = submit_job(workers=2)
    sup._step()
    assert [(j.rank, j.size) for j in _jobs(h0) + _jobs(h1)] == [(0, 2), (1, 2)]
    h1.inbox.append(w.Exchange(job_id, 1, 1, "sum", {"x": torch.ones(2, dtype=torch.float64)}))
    sup._step()
    assert not [m for m in h0.sent + h1.sent if isinstance(m, w.Exchanged)]   # waits for rank 0
    h0.inbox.append(w.Exchange(job_id, 0, 1, "sum", {"x": torch.ones(2, dtype=torch.float64)}))
    sup._step()
    for h in (h0, h1):
        (answer,) = [m for m in h.sent if isinstance(m, w.Exchanged)]
        assert answer.seq == 1 and torch.equal(answer.value["x"], torch.full((2,), 2.0,
                                                                            dtype=torch.float64))
    h1.inbox.append(w.JobFailed(job_id, "out_of_memory", "rank 1 ran out", "gradients"))
    sup._step()
    job = store.get(job_id)
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.out_of_memory
    assert job.error.message == "rank 1 ran out"
    assert [m.reason for m in h0.sent if isinstance(m, w.Abort)] == [
        "worker 1 (cpu, pid 101) (rank 1) failed: out_of_memory"]
    assert h0.flag == job_id                                   # and its cancel flag
    assert [s.state for s in sup.slots] == ["busy", "idle"]     # rank 0 has not reported yet
    h0.inbox.append(w.JobFailed(job_id, "internal_error", "stopped: aborted", "gradients"))
    sup._step()
    assert [s.state for s in sup.slots] == ["idle", "idle"] and sup.runs == {}
    assert store.get(job_id).error.code == ErrorCode.out_of_memory   # the first failure


def test_the_supervisor_fails_a_job_whose_shards_disagree(routed):
    sup, (h0, h1), store, submit_job = routed
    job_id = submit_job(workers=2)
    sup._step()
    h0.inbox.append(w.Exchange(job_id, 0, 1, "gather", "a"))
    h1.inbox.append(w.Exchange(job_id, 1, 1, "sum", {"x": torch.zeros(1)}))
    sup._step()
    job = store.get(job_id)
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.internal_error
    assert all(any(isinstance(m, w.Abort) for m in h.sent) for h in (h0, h1))   # both stop


def test_a_job_queued_for_a_larger_pool_fails_instead_of_blocking_the_queue(routed):
    sup, (h0, h1), store, submit_job = routed
    big, small = submit_job(workers=3), submit_job()
    sup._step()
    assert store.get(big).status == JobStatus.failed
    assert "pool holds 2 workers" in store.get(big).error.message
    assert [j.id for j in _jobs(h0)] == [small]


# -- a real server with two workers ------------------------------------------------------------

@pytest.fixture(scope="module", params=["local", "ray"])
def pool(request, tmp_path_factory, tiny_checkpoint):
    """Two CPU workers (processes, then Ray actors); in jobs with seed 424242 shard 1 hangs in
    the gradients phase, with seed 424243 every shard does (tests/faults.py); other jobs and
    shards run normally."""
    if request.param == "ray":
        pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    server = pool_server(tmp_path_factory.mktemp(f"sharded-{request.param}"),
                         os.path.dirname(tiny_checkpoint[0]), request.param,
                         fault_hook="hang:gradients@1",
                         deadline_grace_seconds=str(GRACE_S))
    try:
        yield server
    finally:
        server.stop()


def five_rollouts(ck: tuple[str, str]) -> dict:
    """quick_request's rollouts and a fifth prompt: 5 units split 2 + 3 over two shards."""
    body = quick_request(ck, seed=1, report={"per_prompt": True})
    body["rollouts"].append({"prompt": "4+1=", "responses": ["5", "5 ", "1", "##"],
                             "rewards": [1.0, 0.5, 0.0, 0.0]})
    return body


def sampled(ck: tuple[str, str]) -> dict:
    body = medium_request(ck, seed=2)
    body.update(responses_per_prompt=4, generation={"max_new_tokens": 8},
                report={"per_prompt": True})
    return body


def two_batch(ck: tuple[str, str]) -> dict:
    """five_rollouts' step, measured on 6 held-out prompts sampled 2 times each. probe_core
    updates the exchanged E-batch sums in place (entropy_vector): with local workers this
    failed (se_unconditional 0.8 % off) while the tensors crossed as shared memory."""
    body = five_rollouts(ck)
    body["entropy_batch"] = {"prompts": [f"{a}*{b}=" for a in range(2) for b in range(3)],
                             "responses_per_prompt": 2}
    body["generation"] = {"max_new_tokens": 6}
    return body


def batch_level(ck: tuple[str, str]) -> dict:
    """five_rollouts with the objective's batch-level pieces (batch-standardized advantages,
    the token_mean length norm's T_tot, the entropy bonus), the sampled entropy per sequence
    and two lr multipliers."""
    body = five_rollouts(ck)
    body.update(objective={"advantage": "batch_standardized", "length_norm": "token_mean",
                           "entropy_coef": 0.01},
                entropy={"normalization": "sequence", "estimator": "sampled"},
                realized={"lr_multipliers": [1.0, 0.5]})
    return body


def result_of(server, body: dict, workers: int) -> dict:
    job = finished(server, submit(server, {**body, "workers": workers}))
    assert job.status == JobStatus.succeeded, job.error
    return job.model_dump(mode="json")["result"]


def base_uses(server, index: int) -> float:
    """Jobs or shards worker `index` ran (each loads its base model or reuses it)."""
    return sum(metric(server, f"entropy_probe_base_model_{kind}_total", worker=str(index))
               for kind in ("loads", "reuses"))


def idle_again(server, n: int = 2, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = readyz_workers(server)
        if sum(x["state"] == "idle" for x in listed) >= n:
            return listed
        time.sleep(0.1)
    raise AssertionError(f"workers not idle: {readyz_workers(server)}")


@pytest.mark.parametrize("make", [five_rollouts, sampled, two_batch, batch_level],
                         ids=["rollouts", "sampled", "two_batch", "batch_level"])
def test_two_workers_give_the_one_worker_result(pool, tiny_checkpoint, make):
    body = make(tiny_checkpoint)
    one = result_of(pool, body, 1)
    before = [base_uses(pool, i) for i in (0, 1)]
    two = result_of(pool, body, 2)
    idle_again(pool)                              # rank 1 may report after rank 0's result
    assert [base_uses(pool, i) - b for i, b in zip((0, 1), before)] == [1, 1]    # both ran
    assert one["environment"]["workers"] == 1 and two["environment"]["workers"] == 2
    assert one["batch"] == two["batch"]           # the same responses (sampled: per prompt)
    assert count_floats(one) > 40
    assert same_numbers(one, two) == []


def test_a_two_worker_job_is_not_passed_by_later_one_worker_jobs(pool, tiny_checkpoint):
    """Strict FIFO: while one worker runs A, B (workers: 2) waits at the head of the queue, and
    C (workers: 1), queued after B, waits behind it although a worker is idle."""
    idle_again(pool)
    a = submit(pool, medium_request(tiny_checkpoint, seed=5))
    wait_running(pool, a)
    b = submit(pool, quick_request(tiny_checkpoint, seed=6, workers=2))
    c = submit(pool, quick_request(tiny_checkpoint, seed=7))
    ja, jb, jc = (finished(pool, i) for i in (a, b, c))
    assert all(j.status == JobStatus.succeeded for j in (ja, jb, jc))
    assert jb.started_at >= ja.finished_at           # B needed both workers
    assert jc.started_at >= jb.started_at            # C did not pass B


def test_more_workers_than_the_pool_is_a_422(pool, tiny_checkpoint):
    r = pool.http.post("/probes", json={**quick_request(tiny_checkpoint), "workers": 3})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "workers"] and "holds 2 workers" in error["msg"]
    r = pool.http.post("/probes", json={**quick_request(tiny_checkpoint), "workers": 0})
    assert r.status_code == 422


def test_a_killed_shard_fails_its_job_by_name_and_the_next_job_runs(pool, tiny_checkpoint):
    job_id = submit(pool, {**slow_request(tiny_checkpoint), "workers": 2})
    wait_running(pool, job_id)
    listed = readyz_workers(pool)
    assert [x["state"] for x in listed] == ["busy", "busy"]
    victim = listed[1]
    os.kill(victim["pid"], signal.SIGKILL)
    job = finished(pool, job_id)
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.worker_crashed
    assert f"worker 1 (cpu, pid {victim['pid']})" in job.error.message
    pool.wait_workers(2, not_pid=victim["pid"])
    assert idle_again(pool)[0]["pid"] == listed[0]["pid"]        # the other shard stopped
    result = result_of(pool, quick_request(tiny_checkpoint, seed=3), 2)
    assert result["delta_h1"]["units"] == 4


def test_cancel_reaches_every_shard(pool, tiny_checkpoint):
    job_id = submit(pool, {**slow_request(tiny_checkpoint), "workers": 2})
    wait_running(pool, job_id)
    pids = [x["pid"] for x in readyz_workers(pool)]
    r = pool.http.post(f"/probes/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
    job = finished(pool, job_id)
    assert job.status == JobStatus.cancelled and job.error.code == ErrorCode.cancelled
    assert [x["pid"] for x in idle_again(pool)] == pids           # stopped, not killed


def test_a_deadline_reaches_every_shard(pool, tiny_checkpoint):
    pids = [x["pid"] for x in idle_again(pool)]
    body = {**slow_request(tiny_checkpoint), "responses_per_prompt": 4, "timeout_s": 1.0,
            "workers": 2}
    job = finished(pool, submit(pool, body))
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.deadline_exceeded
    assert job.error.phase in PHASES and "chunk boundary" in job.error.message
    assert [x["pid"] for x in idle_again(pool)] == pids           # stopped by themselves


def test_a_shard_waiting_on_a_stuck_peer_stops_at_its_deadline(pool, tiny_checkpoint):
    listed = idle_again(pool)
    t0 = time.monotonic()
    # long enough for rank 0 to reach its first exchange (after its gradients) on a busy CPU
    job = finished(pool, submit(pool, quick_request(tiny_checkpoint, seed=FAULT_SEED,
                                                    timeout_s=5.0, workers=2)))
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.deadline_exceeded
    assert job.error.phase == "gradients"
    assert "waiting on the job's other shards" in job.error.message
    assert time.monotonic() - t0 < 5.0 + GRACE_S        # rank 0 did not wait for the kill
    stuck = listed[1]["pid"]                            # rank 1: the second idle worker
    after = pool.wait_workers(2, not_pid=stuck)         # killed a grace period later, replaced
    assert listed[0]["pid"] in after
    assert result_of(pool, quick_request(tiny_checkpoint, seed=4), 2)["delta_h1"]["units"] == 4


def test_shards_that_all_reach_no_boundary_are_all_killed(pool, tiny_checkpoint):
    pids = {x["pid"] for x in idle_again(pool)}
    job = finished(pool, submit(pool, quick_request(tiny_checkpoint, seed=EVERY_SHARD_SEED,
                                                    timeout_s=1.0, workers=2)))
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.deadline_exceeded
    assert job.error.phase == "gradients" and "killed" in job.error.message
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not pids.isdisjoint(pool.wait_workers(2)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids.isdisjoint(pool.wait_workers(2))                  # both replaced
    assert result_of(pool, quick_request(tiny_checkpoint, seed=8), 2)["delta_h1"]["units"] == 4
