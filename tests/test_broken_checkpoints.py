"""Broken and hostile checkpoints: paths and symlinks that leave the roots, a save that would
overwrite a checkpoint, and every way a user can break a checkpoint (bad optimizer state, pickles,
remote code, truncated weights, ...) becoming a failed job with code and phase while the one
worker goes on. Real guarded server (conftest `server`), real broken checkpoints (`broken`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from faults import FAULT_SEED
from helpers import FIGURES, prompts_request, quick_request, request, slow_request, wait_job
from schemas import ErrorCode, JobStatus


pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("report_figures")]


# -- paths: roots, symlinks, the save target ----------------------------------------------------

def test_symlinks_that_leave_the_roots_are_refused(server, tiny_checkpoint, broken):
    base, adapter = tiny_checkpoint
    for field, value, loc in (
            ("adapter", str(broken["root"] / "link_to_outside"), "adapter"),
            ("optimizer", str(broken["root"] / "optimizer_link.pt"), "optimizer"),
            ("adapter", str(broken["root"] / "link_to_outside" / ".." / "x"), "adapter")):
        body = prompts_request(tiny_checkpoint)
        body["checkpoint"][field] = value
        r = request(server, "POST", "/probes", json=body)
        assert r.status_code == 422, (field, value, r.text)
        [err] = r.json()["detail"]
        assert err["loc"] == ["body", "checkpoint", loc] and "outside" in err["msg"]
        assert str(broken["outside"]) not in r.text     # the target is never named


def test_a_symlink_swapped_in_after_submit_is_refused_at_load(server, tiny_checkpoint, broken):
    """Paths are checked at submit and again, resolved, when the worker opens them."""
    swap = broken["root"] / "swapped_adapter"
    shutil.copytree(tiny_checkpoint[1], swap)
    ahead = request(server, "POST", "/probes", json=slow_request(tiny_checkpoint)).json()["id"]
    body = dict(prompts_request(tiny_checkpoint),
                checkpoint={"base_model": tiny_checkpoint[0], "adapter": str(swap)})
    target = request(server, "POST", "/probes", json=body)
    assert target.status_code == 202                  # a real directory inside the roots
    shutil.rmtree(swap)
    os.symlink(broken["outside"] / "adapter", swap)   # now it leads outside
    request(server, "POST", f"/probes/{ahead}/cancel")
    FIGURES["jobs_accepted"] += 2
    FIGURES["faults"] += 1
    job = wait_job(server, target.json()["id"])
    assert job.status == JobStatus.failed and job.error.code == ErrorCode.invalid_request
    assert job.error.phase == "load" and "outside" in job.error.message
    assert wait_job(server, ahead).status == JobStatus.cancelled


def test_save_updated_adapter_never_overwrites_a_checkpoint(server, tiny_checkpoint, broken):
    base, adapter = tiny_checkpoint
    before = {p.name: p.read_bytes() for p in Path(adapter).iterdir() if p.is_file()}
    for target, words in ((adapter, "already holds"), (base, "already holds"),
                          (str(Path(adapter) / "optimizer.pt"), "existing file")):
        body = prompts_request(tiny_checkpoint, save_updated_adapter_to=target)
        r = request(server, "POST", "/probes", json=body)
        assert r.status_code == 422, (target, r.text)
        [err] = r.json()["detail"]
        assert err["loc"] == ["body", "save_updated_adapter_to"] and words in err["msg"]
    fresh = str(broken["root"] / "saved-once")
    body = prompts_request(tiny_checkpoint, save_updated_adapter_to=fresh)
    job = wait_job(server, request(server, "POST", "/probes", json=body).json()["id"])
    FIGURES["jobs_accepted"] += 1
    assert job.status == JobStatus.succeeded, job.error
    assert job.result.updated_adapter and (Path(fresh) / "adapter_config.json").is_file()
    again = request(server, "POST", "/probes", json=body)      # it holds an adapter now
    assert again.status_code == 422 and "already holds" in again.text
    assert {p.name: p.read_bytes() for p in Path(adapter).iterdir() if p.is_file()} == before


# -- broken checkpoints become failed jobs; the service goes on --------------------------------

def _broken_jobs(ck: tuple[str, str], b: dict) -> list[tuple[str, dict, str, str, str]]:
    """(name, checkpoint, expected code, expected phase, words in the message)."""
    base, adapter = ck
    r = b["root"]
    return [
        ("no optimizer state", {"base_model": base, "adapter": str(r / "no_optimizer")},
         "optimizer_state_missing", "load", "optimizer.pt"),
        ("garbage optimizer file", {"base_model": base, "adapter": str(r / "garbage_optimizer")},
         "checkpoint_invalid", "load", "optimizer"),
        ("truncated optimizer file", {"base_model": base,
                                      "adapter": str(r / "truncated_optimizer")},
         "checkpoint_invalid", "load", "optimizer"),
        ("pickle in optimizer.pt", {"base_model": base, "adapter": str(r / "pickle_optimizer")},
         "unsafe_checkpoint", "load", "unpickle"),
        ("another adapter's optimizer state", {"base_model": base, "adapter": adapter,
                                               "optimizer": str(r / "rank8/adapter/optimizer.pt")},
         "optimizer_state_mismatch", "load", "lora_A"),
        ("optimizer with eps=inf", {"base_model": base, "adapter": str(r / "inf_eps_optimizer")},
         "checkpoint_invalid", "load", "eps=inf"),
        ("optimizer state with NaN moments", {"base_model": base,
                                              "adapter": str(r / "nan_moments_optimizer")},
         "checkpoint_invalid", "step", "came out nan"),
        ("adapter of another base", {"base_model": str(r / "wide/base"), "adapter": adapter},
         "adapter_base_mismatch", "load", "adapter"),
        ("no adapter, too many parameters", {"base_model": base},
         "too_many_trainable_params", "load", "allow_full_model"),
        ("unreadable tokenizer", {"base_model": str(r / "garbage_tokenizer"), "adapter": adapter},
         "tokenizer_error", "load", "tokenizer"),
        ("unreadable config.json", {"base_model": str(r / "garbage_config"), "adapter": adapter},
         "checkpoint_invalid", "load", "config.json"),
        ("truncated base weights", {"base_model": str(r / "truncated_weights"),
                                    "adapter": adapter},
         "checkpoint_invalid", "load", "weights"),
        ("garbage adapter weights", {"base_model": base, "adapter": str(r / "garbage_adapter")},
         "checkpoint_invalid", "load", "adapter"),
        ("pickled adapter weights", {"base_model": base, "adapter": str(r / "pickle_adapter")},
         "unsafe_checkpoint", "load", "adapter"),
        ("pickled base weights", {"base_model": str(r / "pickle_base"), "adapter": adapter},
         "unsafe_checkpoint", "load", "base model"),
        ("unreadable adapter_config.json", {"base_model": base,
                                            "adapter": str(r / "garbage_adapter_config")},
         "checkpoint_invalid", "load", "adapter"),
        ("model that needs remote code", {"base_model": str(r / "remote_code"),
                                          "adapter": adapter},
         "checkpoint_invalid", "load", "ENTROPY_PROBE_TRUST_REMOTE_CODE"),
    ]


def test_broken_checkpoints_fail_with_code_and_phase_then_a_good_job_succeeds(
        server, tiny_checkpoint, broken):
    pid = server.wait_ready()
    good = prompts_request(tiny_checkpoint, seed=5)
    first = wait_job(server, request(server, "POST", "/probes", json=good).json()["id"])
    assert first.status == JobStatus.succeeded, first.error
    submitted = []
    for name, checkpoint, code, phase, words in _broken_jobs(tiny_checkpoint, broken):
        body = dict(prompts_request(tiny_checkpoint), checkpoint=checkpoint)
        r = request(server, "POST", "/probes", json=body)
        assert r.status_code == 202, (name, r.text)
        submitted.append((name, r.json()["id"], code, phase, words))
    oom = request(server, "POST", "/probes", json=quick_request(tiny_checkpoint, seed=FAULT_SEED))
    submitted.append(("simulated OOM", oom.json()["id"], "out_of_memory", "teacher_forcing",
                      "microbatch"))
    FIGURES["jobs_accepted"] += len(submitted)
    FIGURES["faults"] += len(submitted)
    wrong = []
    for name, job_id, code, phase, words in submitted:
        job = wait_job(server, job_id)
        got = (job.status, job.error and job.error.code.value, job.error and job.error.phase)
        if got != (JobStatus.failed, code, phase) or words not in job.error.message:
            wrong.append((name, got, job.error and job.error.message))
    assert not wrong, "\n".join(map(str, wrong))
    assert not broken["marker"].exists(), "unpickling optimizer.pt ran code"
    assert not broken["remote_marker"].exists(), "the model's own code ran"
    FIGURES["jobs_accepted"] += 2
    again = wait_job(server, request(server, "POST", "/probes", json=good).json()["id"])
    assert again.status == JobStatus.succeeded, again.error
    # The same job gives the same numbers: no failure left anything behind in the worker
    # (e.g. adapter layers in the cached base).
    for part in ("delta_h1", "batch", "proxies"):
        assert getattr(again.result, part) == getattr(first.result, part), part
    assert again.result.realized.delta_h == first.result.realized.delta_h
    assert server.wait_ready() == pid                   # one worker survived all of it

