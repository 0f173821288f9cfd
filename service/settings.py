"""Server configuration from the environment (ENTROPY_PROBE_*), read once at start-up, and the one
path from it to what a probe runs with (`runtime_options`), shared by the server's worker and
`entropy-probe run`. Defaults that probe_core also knows are taken from probe_core's dataclasses,
so each is written once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from probe_core.spec import ProbeSpec, RuntimeOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENTROPY_PROBE_", env_ignore_empty=True)

    state_dir: Path = Field(Path("state"), description="Holds the job database (jobs.sqlite3).")
    checkpoint_roots: str = Field(
        default_factory=os.getcwd,
        description="os.pathsep-separated directories; every checkpoint path must lie inside one "
        "(default: the working directory).")
    device: str = Field(RuntimeOptions.device, pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="Where the worker runs probes: auto, cpu or cuda[:N].")
    devices: str | None = Field(
        None, pattern=r"^\s*(auto|(cpu|cuda:\d+)(\s*,\s*(cpu|cuda:\d+))*)\s*$",
        description="One worker per comma-separated entry (cuda:0,cuda:1; cpu,cpu); auto: every "
        "visible GPU, else one CPU worker. Unset: one worker on ENTROPY_PROBE_DEVICE.")
    api_token: SecretStr | None = Field(
        None, description="When set, every route but /healthz needs 'Authorization: Bearer'.")
    max_queue: int = Field(64, ge=1, description="Queued (not yet running) jobs before 429.")
    trust_remote_code: bool = Field(
        RuntimeOptions.trust_remote_code,
        description="Let checkpoints run their own Python code (transformers auto_map).")
    host_budget_bytes: int = Field(
        ProbeSpec.host_budget_bytes, ge=0,
        description="Default host memory for per-unit gradient vectors (a request's "
        "memory.host_budget_bytes overrides it).")
    max_trainable_params: int = Field(
        RuntimeOptions.max_trainable_params, ge=0,
        description="Without an adapter, more trainable parameters than this are refused unless "
        "the request sets allow_full_model.")
    max_body_bytes: int = Field(32 << 20, ge=1024, description="Request bodies above get 413.")
    backend: Literal["local", "ray"] = Field(
        "local", description="local: one worker process per device on this host; ray: one Ray "
        "actor per device anywhere in the cluster (the optional extra 'ray').")
    ray_address: str | None = Field(
        None, description="The Ray cluster to join (ray://host:10001, or auto); unset: start a "
        "local Ray.")
    max_job_seconds: float | None = Field(
        None, gt=0, description="Default deadline of a job and the ceiling of its timeout_s "
        "(seconds from its start); unset: no deadline.")
    deadline_grace_seconds: float = Field(
        30.0, gt=0, description="A worker that reaches no chunk boundary this long after its "
        "job's deadline is killed and replaced.")
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="torch.set_num_threads in each worker; unset: torch's "
        "choice (all cores).")

    @property
    def roots(self) -> list[str]:
        return [os.path.abspath(r) for r in self.checkpoint_roots.split(os.pathsep) if r]


def runtime_options(settings: Settings, device: str | None = None) -> RuntimeOptions:
    """What a probe accepts and runs with under these settings: the server's worker and
    `entropy-probe run` both build their options here (`device` overrides settings.device)."""
    return RuntimeOptions(device=device or settings.device, checkpoint_roots=settings.roots,
                          trust_remote_code=settings.trust_remote_code,
                          max_trainable_params=settings.max_trainable_params)


def worker_config(settings: Settings):
    """The device worker's configuration (picklable: it crosses into the worker process)."""
    from service.worker import WorkerConfig
    return WorkerConfig(runtime_options(settings), settings.host_budget_bytes,
                        settings.cpu_threads)
