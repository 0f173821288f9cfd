"""TRL / HF Trainer checkpoints as they are: a real tiny GRPOTrainer run on CPU writes
checkpoint-N folders; the real HTTP service probes them, and EntropyProbeCallback brings the
results back into the trainer's logs.

One training run (with the callback, against a real `entropy-probe serve` subprocess) is shared
by the module; the unreachable-service test trains a second, shorter run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from helpers import Server  # noqa: E402
from probe_core.checkpoint import ModelCache, open_checkpoint  # noqa: E402
from probe_core.spec import CheckpointSpec, RuntimeOptions  # noqa: E402
from probe_core.tiny import TinyConfig, build_tokenizer, write_tiny_base  # noqa: E402
from service.client import ProbeClient  # noqa: E402
from service.demo import free_port  # noqa: E402
from service.integrations.trl import EntropyProbeCallback  # noqa: E402

PROMPTS = ["1+2=", "3+1=", "2+2=", "0+4="]
ANSWERS = ["3", "4", "4", "4"]
MAX_STEPS = 3       # a linear schedule from 1e-2: the lr saved at step 3 (of the next step) is 0
LR = 1e-2
SERVER_START_S = 120.0


def _reward(completions, **kwargs) -> list[float]:
    # Length-dependent so GRPO's advantages (and the optimizer's moments) are not all zero.
    return [float(c.strip().startswith("4")) + 0.1 * len(c) for c in completions]


def _train(base: str, out: str, *, callbacks=(), attach=None, modules_to_save=None,
           max_steps=MAX_STEPS, weight_decay=0.01) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=out, max_steps=max_steps, save_steps=1, learning_rate=LR,
        lr_scheduler_type="linear", weight_decay=weight_decay, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=8, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, fp16=False, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=base, reward_funcs=_reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                          processing_class=build_tokenizer(TinyConfig()), peft_config=lora,
                          callbacks=list(callbacks))
    if attach is not None:
        attach.attach(trainer)
    trainer.train()
    return trainer


class _Tracker(TrainerCallback):
    """Stands for a report_to integration: it logs whatever reaches its on_log."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def _rollouts(step: int) -> dict:
    """What a training loop would send: its own batch with its rewards (the callable form)."""
    return {"rollouts": [
        {"prompt": "1+2=", "responses": ["3", "4", "33", "1+"], "rewards": [1.0, 0.0, 0.2, 0.5]},
        {"prompt": "2+2=", "responses": ["4", "5", "44", "b"], "rewards": [1.0, 0.0, 0.3, 0.5]},
        {"prompt": "3+1=", "responses": ["4", "2", "4 ", "c"], "rewards": [1.0, 0.0, 0.8, 0.1]}],
        "reward": {"kind": "provided"}, "seed": step}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("trl"))
    write_tiny_base(os.path.join(path, "base"))
    return path


@pytest.fixture(scope="module")
def server(root):
    """`entropy-probe serve` on 127.0.0.1, confined to `root`; stopped at the end."""
    srv = Server(Path(root), Path(root) / "state", root)
    try:
        srv.wait_ready(SERVER_START_S)
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def run(root, server):
    """One GRPOTrainer run: LoRA on q/v plus modules_to_save on every input_layernorm, so the
    Trainer's no-decay group (the norms) interleaves with its decay group (LoRA) in
    named_parameters() order. The callback probes every save through the server; attached, it
    comes before the tracker in the callback list."""
    callback = EntropyProbeCallback(server, _rollouts, wait_at_end=True, end_timeout=150.0,
                                    poll=0.2)
    tracker = _Tracker()
    out = os.path.join(root, "run")
    trainer = _train(os.path.join(root, "base"), out, callbacks=[tracker], attach=callback,
                     modules_to_save=["input_layernorm"])
    return trainer, out, tracker


def _optimizer(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True)


def _assert_maps_like_trainer(ckpt: str) -> list[int]:
    """probe_core's (parameter → state, hyper-parameters) pairing equals what the Trainer itself
    restores on resume: its own param groups built from the model, then load_state_dict."""
    with open_checkpoint(CheckpointSpec(None, ckpt), RuntimeOptions(device="cpu"),
                         torch.device("cpu"), ModelCache()) as loaded:
        decay = set(Trainer.get_decay_parameter_names(None, loaded.model))
        named = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1.0)
        opt.load_state_dict(_optimizer(ckpt))
        assert [n for n, _ in loaded.params] == [n for n, _ in named]
        for (name, p), st in zip(loaded.params, loaded.states):
            group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
            assert st.name == name
            assert torch.equal(st.exp_avg, opt.state[p]["exp_avg"].float()), name
            assert torch.equal(st.exp_avg_sq, opt.state[p]["exp_avg_sq"].float()), name
            assert st.step == float(opt.state[p]["step"]), name
            assert (st.lr, st.weight_decay) == (group["lr"], group["weight_decay"]), name
            assert (st.beta1, st.beta2, st.eps) == (*group["betas"], group["eps"]), name
        return [st.group for st in loaded.states]


def test_trainer_checkpoint_layout(run):
    _, out, _ = run
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert ckpts == [f"checkpoint-{n}" for n in range(1, MAX_STEPS + 1)]
    ckpt = os.path.join(out, "checkpoint-1")
    for f in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
              "scheduler.pt", "trainer_state.json"):
        assert os.path.isfile(os.path.join(ckpt, f)), f
    sd = _optimizer(ckpt)    # weights_only=True must accept what transformers saves
    decay, no_decay = sd["param_groups"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert len(decay["params"]) == 8 and len(no_decay["params"]) == 2   # LoRA A/B; 2 norms
    # Saved after step 1 of a linear decay over 3 steps: the lr of the next step.
    assert decay["lr"] == pytest.approx(LR * 2 / 3)
    assert all(float(s["step"]) == 1.0 for s in sd["state"].values())
    groups = _assert_maps_like_trainer(ckpt)
    assert groups != sorted(groups), "the layout should interleave the two groups"


def test_probe_checkpoint_folder_over_http(run, server):
    _, out, _ = run
    client = ProbeClient(server)
    body = {"prompts": PROMPTS, "answers": ANSWERS, "responses_per_prompt": 4,
            "generation": {"max_new_tokens": 8}, "seed": 1}

    ckpt1 = os.path.join(out, "checkpoint-1")       # no base_model: from the adapter config
    with open(os.path.join(ckpt1, "adapter_config.json")) as f:
        assert os.path.isdir(json.load(f)["base_model_name_or_path"])
    res = client.wait(client.submit({**body, "checkpoint": {"adapter": ckpt1}}), timeout=120)
    sd = _optimizer(ckpt1)
    assert res.optimizer.lr == pytest.approx(sd["param_groups"][0]["lr"], rel=1e-12)
    assert res.optimizer.step == 1
    assert res.checkpoint_step == 1                  # the Trainer's trainer_state.json
    assert res.optimizer.weight_decay == 0.01
    assert math.isfinite(res.delta_h1.total) and res.delta_h1.total != 0.0

    last = os.path.join(out, f"checkpoint-{MAX_STEPS}")   # end of the linear schedule
    assert _optimizer(last)["param_groups"][0]["lr"] == 0.0
    res = client.wait(client.submit({**body, "checkpoint": {"adapter": last}}), timeout=120)
    assert res.optimizer.lr == 0.0
    assert res.checkpoint_step == MAX_STEPS
    d = res.delta_h1
    assert (d.total, d.gradient_term, d.momentum_term, d.weight_decay_term) == (0, 0, 0, 0)
    assert res.realized.delta_h == 0.0
    assert any(w.startswith("lr is 0") for w in res.warnings), res.warnings

    res = client.wait(client.submit({**body, "checkpoint": {"adapter": last},
                                     "optimizer_overrides": {"lr": 0.005}}), timeout=120)
    assert res.optimizer.lr == 0.005
    assert res.delta_h1.total != 0.0 and res.realized.delta_h != 0.0


def test_callback_logs_probe_results(run):
    trainer, _, tracker = run
    logged = [e for e in trainer.state.log_history if "entropy_probe/delta_h1" in e]
    steps = sorted(int(e["entropy_probe/checkpoint_step"]) for e in logged)
    assert steps == list(range(1, MAX_STEPS + 1)), trainer.state.log_history
    seen = [e for e in tracker.seen if "entropy_probe/delta_h1" in e]
    assert sorted(int(e["entropy_probe/checkpoint_step"]) for e in seen) == steps
    for e in logged:
        for key in ("delta_h1", "delta_h1_se", "delta_h", "ess_fraction", "entropy",
                    "delta_j1", "delta_j1_se"):
            assert math.isfinite(e[f"entropy_probe/{key}"]), (key, e)
        assert 0.0 < e["entropy_probe/ess_fraction"] <= 1.0
        assert 0.0 < e["entropy_probe/entropy"] <= math.log(len(build_tokenizer(TinyConfig())))
    by_step = {int(e["entropy_probe/checkpoint_step"]): e for e in logged}
    trl_entropy = {int(e["step"]): e["entropy"] for e in trainer.state.log_history
                   if "entropy" in e and "step" in e}
    # TRL's step k+1 logs the entropy of rollouts from checkpoint-k's policy
    print("\n[measured] checkpoint k: TRL `entropy` at step k+1 | entropy_probe/entropy of "
          "checkpoint-k: " + ", ".join(
              f"{k}: {trl_entropy.get(k + 1, float('nan')):.3f} | "
              f"{by_step[k]['entropy_probe/entropy']:.3f}" for k in sorted(by_step)))
    assert by_step[MAX_STEPS]["entropy_probe/delta_h1"] == 0.0       # lr 0 at the end
    assert by_step[1]["entropy_probe/delta_h1"] != 0.0
    assert by_step[MAX_STEPS]["entropy_probe/delta_j1"] == 0.0
    # the exchange rate is logged exactly when δJ₁ is clear of zero by one SE
    for e in logged:
        clear = abs(e["entropy_probe/delta_j1"]) > e["entropy_probe/delta_j1_se"]
        assert ("entropy_probe/exchange_rate" in e) == clear, e


def test_plain_lora_layout_and_unreachable_service(root, caplog):
    """Plain LoRA (the no-decay group is empty); the callback points at a port nobody listens
    on: training finishes, each probe is skipped with a warning, nothing is logged."""
    url = f"http://127.0.0.1:{free_port()}"
    callback = EntropyProbeCallback(url, {"prompts": PROMPTS, "answers": ANSWERS},
                                    wait_at_end=True, end_timeout=60.0)
    with caplog.at_level(logging.WARNING, logger="service.integrations.trl"):
        trainer = _train(os.path.join(root, "base"), os.path.join(root, "unreachable"),
                         callbacks=[callback], max_steps=2)
    assert trainer.state.global_step == 2
    assert callback.outstanding == 0
    assert not any(k.startswith("entropy_probe/") for e in trainer.state.log_history for k in e)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2, [r.getMessage() for r in caplog.records]

    ckpt = os.path.join(root, "unreachable", "checkpoint-2")
    sd = _optimizer(ckpt)
    assert [len(g["params"]) for g in sd["param_groups"]] == [8, 0]
    assert _assert_maps_like_trainer(ckpt) == [0] * 8
