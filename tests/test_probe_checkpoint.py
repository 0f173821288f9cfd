"""Bad checkpoints fail with typed errors that name the problem (issue 2, issue 8)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from probe_core import errors
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, GenerationSpec, ProbeSpec, RealizedSpec,
                             RuntimeOptions)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_tiny_checkpoint(str(root / "a"), TinyConfig())
    write_tiny_checkpoint(str(root / "rank8"), TinyConfig(lora_rank=8))
    write_tiny_checkpoint(str(root / "wide"), TinyConfig(hidden_size=48))
    return root


def _run(base, adapter, optimizer=None, **opts):
    spec = ProbeSpec(checkpoint=CheckpointSpec(str(base), adapter and str(adapter),
                                               optimizer and str(optimizer)),
                     prompts=["1+1=", "2+2="], answers=["2", "4"], responses_per_prompt=2,
                     generation=GenerationSpec(max_new_tokens=3),
                     realized=RealizedSpec(enabled=False))
    return run_probe(spec, RuntimeOptions(**opts))


def test_missing_paths(root):
    with pytest.raises(errors.CheckpointNotFound, match="does not exist"):
        _run(root / "a/base", root / "nope")
    with pytest.raises(errors.CheckpointNotFound, match="adapter_config.json"):
        _run(root / "a/base", root / "a/base")
    os.makedirs(root / "empty", exist_ok=True)
    with pytest.raises(errors.CheckpointNotFound, match="config.json"):
        _run(root / "empty", root / "a/adapter")


def test_missing_optimizer_state(root, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "a/adapter", adapter)
    os.remove(adapter / "optimizer.pt")
    with pytest.raises(errors.OptimizerStateMissing, match="optimizer.pt"):
        _run(root / "a/base", adapter)


def test_optimizer_state_of_another_adapter_names_the_parameter(root):
    with pytest.raises(errors.OptimizerStateMismatch, match=r"lora_A.*shape"):
        _run(root / "a/base", root / "a/adapter", optimizer=root / "rank8/adapter/optimizer.pt")


def test_optimizer_state_with_another_parameter_count(root, tmp_path):
    sd = torch.load(root / "a/adapter/optimizer.pt", weights_only=True)
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-2]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(errors.OptimizerStateMismatch, match="trainable"):
        _run(root / "a/base", root / "a/adapter", optimizer=tmp_path / "short.pt")


def test_adapter_for_another_base(root):
    with pytest.raises(errors.AdapterBaseMismatch):
        _run(root / "wide/base", root / "a/adapter")


def test_lora_only_guard(root):
    with pytest.raises(errors.TooManyTrainableParams, match="allow_full_model"):
        _run(root / "a/base", None, optimizer=root / "a/adapter/optimizer.pt",
             max_trainable_params=1000)
    with pytest.raises(errors.TooManyTrainableParams, match="limit of 10"):
        _run(root / "a/base", root / "a/adapter", max_trainable_params=10)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/entropy_probe_pwned",))


def test_unsafe_and_corrupt_optimizer_files(root, tmp_path):
    torch.save({"state": {}, "param_groups": [], "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(errors.UnsafeCheckpoint):
        _run(root / "a/base", root / "a/adapter", optimizer=tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/entropy_probe_pwned")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(errors.CheckpointInvalid):
        _run(root / "a/base", root / "a/adapter", optimizer=tmp_path / "corrupt.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(errors.CheckpointInvalid, match="state_dict"):
        _run(root / "a/base", root / "a/adapter", optimizer=tmp_path / "list.pt")


def test_adam_with_l2_or_amsgrad_is_refused(root, tmp_path):
    sd = torch.load(root / "a/adapter/optimizer.pt", weights_only=True)
    sd["param_groups"][0]["amsgrad"] = True
    torch.save(sd, tmp_path / "ams.pt")
    with pytest.raises(errors.UnsupportedOptimizer, match="AMSGrad"):
        _run(root / "a/base", root / "a/adapter", optimizer=tmp_path / "ams.pt")
    sd["param_groups"][0]["amsgrad"] = False
    sd["param_groups"][0]["decoupled_weight_decay"] = False
    torch.save(sd, tmp_path / "adam.pt")
    with pytest.raises(errors.UnsupportedOptimizer, match="L2"):
        _run(root / "a/base", root / "a/adapter", optimizer=tmp_path / "adam.pt")


def test_paths_outside_roots_and_symlinks(root, tmp_path):
    roots = [str(tmp_path)]
    with pytest.raises(errors.InvalidRequest, match="outside"):
        _run(root / "a/base", root / "a/adapter", checkpoint_roots=roots)
    os.symlink(root / "a", tmp_path / "link")   # inside by name, outside once resolved
    with pytest.raises(errors.InvalidRequest, match="outside"):
        _run(tmp_path / "link/base", tmp_path / "link/adapter", checkpoint_roots=roots)


def test_unreadable_tokenizer(root, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(root / "a/base", base)
    (base / "tokenizer.json").write_text("{not json")
    with pytest.raises(errors.TokenizerError):
        _run(base, root / "a/adapter")


def test_base_defaults_to_adapter_config(root):
    spec = ProbeSpec(checkpoint=CheckpointSpec(None, str(root / "a/adapter")),
                     prompts=["1+1=", "2+2="], answers=["2", "4"], responses_per_prompt=2,
                     generation=GenerationSpec(max_new_tokens=3),
                     realized=RealizedSpec(enabled=False))
    out = run_probe(spec)
    assert out.units == 2


def test_sequences_beyond_the_model_context_are_refused_before_compute(root):
    """The tiny model's context is 512 positions."""
    spec = ProbeSpec(checkpoint=CheckpointSpec(str(root / "a/base"), str(root / "a/adapter")),
                     prompts=["1+1=" * 100, "2+2="], answers=["2", "4"], responses_per_prompt=2,
                     generation=GenerationSpec(max_new_tokens=200),
                     realized=RealizedSpec(enabled=False))
    with pytest.raises(errors.InvalidRequest, match="context of 512") as info:
        run_probe(spec)
    assert info.value.phase == "rollouts"
