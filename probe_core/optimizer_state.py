"""Reading a saved torch.optim.AdamW state_dict and mapping it onto the trainable parameters."""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass

import torch

from probe_core.errors import (CheckpointInvalid, OptimizerStateMismatch, OptimizerStateMissing,
                               UnsafeCheckpoint, UnsupportedOptimizer)


@dataclass
class ParamState:
    """AdamW state and hyper-parameters of one trainable parameter (host, fp32)."""

    name: str
    exp_avg: torch.Tensor       # m, same shape as the parameter
    exp_avg_sq: torch.Tensor    # v
    step: float                 # t (steps taken so far)
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    group: int


def load_state_dict(path: str) -> dict:
    """torch.load with weights_only=True; arbitrary pickles are refused, never executed."""
    if not os.path.isfile(path):
        raise OptimizerStateMissing(
            f"optimizer state {os.path.basename(path)!r} not found next to the adapter; pass "
            "checkpoint.optimizer or save torch.optim.AdamW.state_dict() as <adapter>/optimizer.pt")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise UnsafeCheckpoint(
                "the optimizer state contains pickled objects other than tensors and plain "
                "containers; refusing to unpickle it (save optimizer.state_dict() itself)") from exc
        raise CheckpointInvalid(f"optimizer state is not a readable torch file: {exc}") from exc
    except Exception as exc:  # corrupt zip, truncated file, ...
        raise CheckpointInvalid(f"optimizer state is not a readable torch file "
                                f"({type(exc).__name__})") from exc
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointInvalid("optimizer file is not an optimizer state_dict (needs 'state' "
                                "and 'param_groups')")
    return sd


def _check_group(k: int, group: dict) -> None:
    for key in ("lr", "betas", "eps", "weight_decay", "params"):
        if key not in group:
            raise UnsupportedOptimizer(f"param_groups[{k}] has no {key!r}: not an AdamW state")
    if group.get("amsgrad"):
        raise UnsupportedOptimizer("AMSGrad AdamW is not supported (amsgrad=True)")
    if group.get("maximize"):
        raise UnsupportedOptimizer("maximize=True is not supported")
    if group.get("decoupled_weight_decay") is False and group["weight_decay"] != 0:
        raise UnsupportedOptimizer("this is torch.optim.Adam with L2 weight decay, not AdamW")
    try:
        betas = [float(b) for b in group["betas"]]
        scalars = [float(group[key]) for key in ("lr", "eps", "weight_decay")]
    except (TypeError, ValueError) as exc:
        raise CheckpointInvalid(f"param_groups[{k}] has a non-numeric lr, betas, eps or "
                                "weight_decay") from exc
    if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)
            and all(math.isfinite(x) and x >= 0.0 for x in scalars)):
        raise CheckpointInvalid(f"param_groups[{k}] has lr={group['lr']}, betas={group['betas']}, "
                                f"eps={group['eps']}, weight_decay={group['weight_decay']}: AdamW "
                                "needs finite non-negative lr, eps and weight_decay and betas in "
                                "[0, 1)")


# Trainer.get_decay_parameter_names: transformers >= 4.50 keeps biases and norms (by name or
# nn.LayerNorm type) out of weight decay; older releases only biases and nn.LayerNorm.
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
_NO_DECAY_NAMES_LEGACY = re.compile(r"bias")


def hf_trainer_layouts(model: torch.nn.Module, names: list[str]
                       ) -> list[tuple[int, list[int]]]:
    """Candidate orders in which an HF Trainer lists these trainable parameters (by name, in
    named_parameters() order): its group 0 holds the decayed ones, group 1 the rest, each in
    named_parameters() order. Where the two kinds interleave (say modules_to_save on norm
    layers), the concatenated group order is NOT named_parameters() order. Each layout is
    (size of group 0, for each position in group order the index into `names`)."""
    in_layernorm = {f"{m}.{n}" if m else n for m, mod in model.named_modules()
                    if isinstance(mod, torch.nn.LayerNorm)
                    for n, _ in mod.named_parameters()}
    layouts = []
    for rule in (_NO_DECAY_NAMES, _NO_DECAY_NAMES_LEGACY):
        no_decay = [n in in_layernorm or bool(rule.search(n.lower())) for n in names]
        decay = [i for i, nd in enumerate(no_decay) if not nd]
        layout = (len(decay), decay + [i for i, nd in enumerate(no_decay) if nd])
        if layout not in layouts:
            layouts.append(layout)
    return layouts


def map_state(sd: dict, named_params: list[tuple[str, torch.nn.Parameter]],
              trainer_layouts: list[tuple[int, list[int]]] = ()) -> list[ParamState]:
    """Pair the state's indices, in param-group order, with the trainable parameters in
    named_parameters() order, checking count and shapes (the first bad parameter is named).

    A state laid out as the HF Trainer does it (two groups, the second without weight decay)
    is first tried against `trainer_layouts` (see hf_trainer_layouts) whose group-0 size fits;
    the first whose shapes all match is used."""
    groups = sd["param_groups"]
    order: list[tuple[int, int]] = []  # (state index, group)
    for k, group in enumerate(groups):
        _check_group(k, group)
        order += [(int(i), k) for i in group["params"]]
    if len(order) != len(named_params):
        raise OptimizerStateMismatch(
            f"optimizer state covers {len(order)} parameters but the model has "
            f"{len(named_params)} trainable ones: it belongs to another adapter or model")
    if len(groups) == 2 and float(groups[1]["weight_decay"]) == 0.0:
        for n_decay, layout in trainer_layouts:
            if n_decay != len(groups[0]["params"]) or layout == sorted(layout):
                continue  # another split, or the same as named_parameters() order
            try:
                return _map(sd, order, named_params, layout)
            except OptimizerStateMismatch:
                continue
    return _map(sd, order, named_params, list(range(len(order))))


def _map(sd: dict, order: list[tuple[int, int]],
         named_params: list[tuple[str, torch.nn.Parameter]], layout: list[int]
         ) -> list[ParamState]:
    """`layout[j]` is the index in named_params of the j-th parameter in group order."""
    groups = sd["param_groups"]
    states: list[ParamState | None] = [None] * len(named_params)
    for (idx, k), j in zip(order, layout):
        name, p = named_params[j]
        g = groups[k]
        st = sd["state"].get(idx, sd["state"].get(str(idx), {}))
        if st:
            m, v = st.get("exp_avg"), st.get("exp_avg_sq")
            if m is None or v is None:
                raise UnsupportedOptimizer(f"state of {name} has no exp_avg/exp_avg_sq")
            if tuple(m.shape) != tuple(p.shape) or tuple(v.shape) != tuple(p.shape):
                raise OptimizerStateMismatch(
                    f"optimizer state for parameter {name} has shape {tuple(m.shape)} but the "
                    f"parameter has shape {tuple(p.shape)}: the state belongs to another "
                    "adapter (different rank or target modules)")
            step = float(st.get("step", 0))
            m, v = m.float(), v.float()
        else:  # never stepped: AdamW would start from zeros
            m = torch.zeros(p.shape, dtype=torch.float32)
            v = torch.zeros(p.shape, dtype=torch.float32)
            step = 0.0
        states[j] = ParamState(name, m, v, step, float(g["lr"]), float(g["betas"][0]),
                               float(g["betas"][1]), float(g["eps"]),
                               float(g["weight_decay"]), k)
    return states
