"""Loading base model + PEFT adapter + AdamW state safely, with the base kept between jobs."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from probe_core.errors import (AdapterBaseMismatch, CheckpointInvalid, CheckpointNotFound,
                               TokenizerError, TooManyTrainableParams, UnsafeCheckpoint)
from probe_core.optimizer_state import ParamState, hf_trainer_layouts, load_state_dict, map_state
from probe_core.paths import confine
from probe_core.spec import CheckpointSpec, RuntimeOptions

ADAPTER_CONFIG = "adapter_config.json"


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module                 # PeftModel (or the base for full-model probes)
    tokenizer: object
    params: list[tuple[str, torch.nn.Parameter]]  # trainable, named_parameters() order
    states: list[ParamState]
    base_path: str
    adapter_path: str | None
    base_reused: bool


@dataclass
class ModelCache:
    """Keeps the last base model loaded; a job on the same base only swaps the adapter."""

    key: tuple | None = None
    model: torch.nn.Module | None = None
    loads: int = field(default=0)

    def get(self, base_path: str, device: torch.device, opts: RuntimeOptions
            ) -> tuple[torch.nn.Module, bool]:
        key = (base_path, str(device), opts.trust_remote_code)
        if self.key == key and self.model is not None:
            return self.model, True
        self.clear()
        self.model = _load_base(base_path, device, opts)
        self.key, self.loads = key, self.loads + 1
        return self.model, False

    def clear(self) -> None:
        self.key, self.model = None, None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _load_base(path: str, device: torch.device, opts: RuntimeOptions) -> torch.nn.Module:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointNotFound("base_model is not a Hugging Face model directory "
                                 "(no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", trust_remote_code=opts.trust_remote_code, local_files_only=True)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise CheckpointInvalid("this model needs custom code; the server operator must set "
                                    "ENTROPY_PROBE_TRUST_REMOTE_CODE=1") from exc
        raise CheckpointInvalid(f"could not load the base model: {exc}") from exc
    except pickle.UnpicklingError as exc:      # weights_only=True refused a .bin pickle
        raise UnsafeCheckpoint("the base model weights are a pickle holding more than tensors; "
                               "refusing to unpickle it (save them as safetensors)") from exc
    except (OSError, SafetensorError) as exc:
        raise CheckpointInvalid(f"could not load the base model weights: {exc}") from exc
    # CPU half precision is slow and imprecise; the GPU keeps the checkpoint dtype.
    if device.type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
        model = model.float()
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _read_config(path: str, what: str) -> dict:
    """A checkpoint's JSON config; a damaged one is CheckpointInvalid (before anything else
    reads it and reports a misleading error)."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointInvalid(f"{what} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointInvalid(f"{what} is not a JSON object")
    return config


def _resolve_paths(spec: CheckpointSpec, opts: RuntimeOptions) -> tuple[str, str | None]:
    roots = opts.checkpoint_roots
    adapter = confine(spec.adapter, roots, what="adapter") if spec.adapter else None
    if adapter is not None and not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
        raise CheckpointNotFound(f"adapter {spec.adapter!r} has no {ADAPTER_CONFIG}: pass a PEFT "
                                 "adapter directory or a Trainer checkpoint-N folder")
    adapter_config = (_read_config(os.path.join(adapter, ADAPTER_CONFIG),
                                   f"the adapter's {ADAPTER_CONFIG}") if adapter else {})
    if spec.base_model:
        base = confine(spec.base_model, roots, what="base_model")
    else:
        named = adapter_config.get("base_model_name_or_path")
        if not isinstance(named, str) or not named or not os.path.isdir(named):
            raise CheckpointNotFound("checkpoint.base_model is not given and the adapter "
                                     "config's base_model_name_or_path is not a local "
                                     "directory; pass checkpoint.base_model")
        base = confine(named, roots, what="base_model")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise CheckpointNotFound("base_model is not a Hugging Face model directory "
                                 "(no config.json)")
    _read_config(os.path.join(base, "config.json"), "the base model's config.json")
    return base, adapter


def _load_tokenizer(base: str, adapter: str | None, opts: RuntimeOptions):
    # A Trainer checkpoint saves the tokenizer it trained with (chat template included).
    src = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) \
        else base
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=opts.trust_remote_code,
                                            local_files_only=True)
    except Exception as exc:
        raise TokenizerError(f"could not load the tokenizer: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from exc
    if tok.eos_token_id is None:
        raise TokenizerError("the tokenizer has no EOS token; responses cannot be delimited")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _attach_adapter(base: torch.nn.Module, adapter: str) -> torch.nn.Module:
    from peft import PeftModel
    from safetensors import safe_open

    try:
        model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    except SafetensorError as exc:
        raise CheckpointInvalid(f"could not read the adapter weights: {exc}") from exc
    except pickle.UnpicklingError as exc:      # weights_only=True refused a .bin pickle
        raise UnsafeCheckpoint("the adapter weights are a pickle holding more than tensors; "
                               "refusing to unpickle it (save them as safetensors)") from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterBaseMismatch(f"the adapter does not fit this base model: "
                                  f"{str(exc).splitlines()[0][:300]}") from exc
    weights = os.path.join(adapter, "adapter_model.safetensors")
    if os.path.isfile(weights):
        with safe_open(weights, "pt") as f:
            n_saved = len(list(f.keys()))
        n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
        if n_saved != n_trainable:
            model.unload()
            raise AdapterBaseMismatch(
                f"the adapter file holds {n_saved} tensors but {n_trainable} adapter "
                "parameters were created on this base: it was trained on another base model")
    return model


@contextlib.contextmanager
def open_checkpoint(spec: CheckpointSpec, opts: RuntimeOptions, device: torch.device,
                    cache: ModelCache) -> Iterator[LoadedCheckpoint]:
    """Load (or reuse) the base, attach the adapter, map the optimizer state; on exit remove
    the adapter so the cached base is clean for the next job."""
    base_path, adapter_path = _resolve_paths(spec, opts)
    tokenizer = _load_tokenizer(base_path, adapter_path, opts)
    base, reused = cache.get(base_path, device, opts)
    try:
        model = _attach_adapter(base, adapter_path) if adapter_path else base
    except Exception:
        cache.clear()        # a failed attach can leave adapter layers in the cached base
        raise
    try:
        if adapter_path is None:
            for p in model.parameters():
                p.requires_grad_(True)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_params = sum(p.numel() for _, p in params)
        if n_params > opts.max_trainable_params and not spec.allow_full_model:
            raise TooManyTrainableParams(
                f"{n_params:,} trainable parameters exceed the limit of "
                f"{opts.max_trainable_params:,}: pass a LoRA adapter as checkpoint.adapter, or "
                "set checkpoint.allow_full_model=true if you really mean a full-model probe")
        opt_path = spec.optimizer or os.path.join(adapter_path or base_path, "optimizer.pt")
        opt_path = confine(opt_path, opts.checkpoint_roots, what="optimizer", must_exist=False)
        layouts = hf_trainer_layouts(model, [n for n, _ in params])
        states = map_state(load_state_dict(opt_path), params, layouts)
        yield LoadedCheckpoint(model=model, tokenizer=tokenizer, params=params, states=states,
                               base_path=base_path, adapter_path=adapter_path,
                               base_reused=reused)
    finally:
        if adapter_path is not None:
            model.unload()
        else:
            for p in base.parameters():
                p.requires_grad_(False)
