"""Typed errors a user can cause. Each carries a contract error code and the phase it hit."""

from __future__ import annotations


class ProbeError(Exception):
    """A failure the user can act on; becomes a failed job with error.code/message/phase."""

    code = "internal_error"

    def __init__(self, message: str, *, phase: str | None = None, trace: list | None = None):
        super().__init__(message)
        self.message = message
        self.phase = phase
        self.trace = trace or []            # the memory trace up to the failure, when known


class CheckpointNotFound(ProbeError):
    code = "checkpoint_not_found"


class CheckpointInvalid(ProbeError):
    code = "checkpoint_invalid"


class AdapterBaseMismatch(ProbeError):
    code = "adapter_base_mismatch"


class OptimizerStateMissing(ProbeError):
    code = "optimizer_state_missing"


class OptimizerStateMismatch(ProbeError):
    code = "optimizer_state_mismatch"


class UnsupportedOptimizer(ProbeError):
    code = "unsupported_optimizer"


class UnsafeCheckpoint(ProbeError):
    code = "unsafe_checkpoint"


class TooManyTrainableParams(ProbeError):
    code = "too_many_trainable_params"


class TokenizerError(ProbeError):
    code = "tokenizer_error"


class InvalidRequest(ProbeError):
    code = "invalid_request"


class DegenerateBatch(ProbeError):
    code = "degenerate_batch"


class ProbeOutOfMemory(ProbeError):
    code = "out_of_memory"


class DeadlineExceeded(ProbeError):
    """The job ran past ProbeHooks.deadline (checked at every chunk boundary)."""

    code = "deadline_exceeded"


class ProbeCancelled(ProbeError):
    code = "cancelled"
