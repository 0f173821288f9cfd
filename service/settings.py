"""Server configuration from the environment (ENTROPY_PROBE_*), read once at start-up."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENTROPY_PROBE_", env_ignore_empty=True)

    state_dir: Path = Field(Path("state"), description="Jobs and results, one JSON file each.")
    checkpoint_roots: str = Field(
        default_factory=os.getcwd,
        description="os.pathsep-separated directories; every checkpoint path must lie inside one.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    api_token: SecretStr | None = Field(
        None, description="When set, every route but /healthz needs 'Authorization: Bearer'.")
    max_queue: int = Field(64, ge=1, description="Queued (not yet running) jobs before 429.")
    trust_remote_code: bool = False
    host_budget_bytes: int = Field(
        8 << 30, ge=0, description="Default host memory for per-unit gradient vectors.")
    max_trainable_params: int = Field(
        50_000_000, ge=0, description="Without an adapter, more trainable parameters than this "
        "are refused unless the request sets allow_full_model.")
    max_body_bytes: int = Field(32 << 20, ge=1024, description="Request bodies above get 413.")
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
