"""The optimizer (AdamW, or Muon for the blocks' matrices), gradient clipping over device
meshes, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from olmo.config import OptimizerConfig, SchedulerConfig
from olmo.muon import MuonWithAdamW, muon_layouts


def adamw_groups(
    model: nn.Module, cfg: OptimizerConfig, skip: set[int] = frozenset()
) -> list[dict]:
    """AdamW's parameter groups (those in ``skip`` left out): activation coefficients (and
    optionally norms, embeddings) excluded from decay."""
    no_decay: set[int] = set()
    for module in model.modules():
        if getattr(module, "has_coefficients", False):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, nn.RMSNorm | nn.LayerNorm) and not cfg.decay_norm_and_bias:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, nn.Embedding) and not cfg.decay_embeddings:
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    params = [p for p in model.parameters() if id(p) not in skip]
    decay = [p for p in params if id(p) not in no_decay]
    other = [p for p in params if id(p) in no_decay]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        adamw_groups(model, cfg), lr=cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.eps,
        foreach=True,
    )  # fmt: skip


def build_muon(model: nn.Module, cfg: OptimizerConfig) -> MuonWithAdamW:
    """Muon for the blocks' matrices (olmo/muon.py), AdamW as :func:`build_adamw` for the rest."""
    named = dict(model.named_parameters())
    layouts = {named[n]: layout for n, layout in muon_layouts(model).items()}
    # The schedule sets every group's lr to peak_lr(step) x its lr_ratio.
    muon = {
        "params": list(layouts), "use_muon": True,
        "lr_ratio": (cfg.muon_learning_rate or cfg.learning_rate) / cfg.learning_rate,
        "lr": cfg.muon_learning_rate or cfg.learning_rate, "weight_decay": cfg.weight_decay,
        "momentum": 0.95 if cfg.muon_momentum is None else cfg.muon_momentum,
        "lr_scale": cfg.muon_lr_scale or "match_rms_adamw", "ns_steps": cfg.muon_ns_steps or 5,
        # bf16 as torch.optim.Muon on GPUs; fp32 on CPUs, where bf16 matmuls ran 10x slower.
        "ns_dtype": cfg.muon_ns_dtype or ("bf16" if _on_gpu(model) else "fp32"),
    }  # fmt: skip
    adamw = [
        {**g, "use_muon": False, "lr": cfg.learning_rate, "betas": tuple(cfg.betas), "eps": cfg.eps}
        for g in adamw_groups(model, cfg, skip={id(p) for p in layouts})
    ]
    return MuonWithAdamW([muon, *adamw], layouts)


def _on_gpu(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}
"""Optimizer builders by ``optimizer.name`` (olmo.config.OPTIMIZER_NAMES)."""


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](model, cfg)


def clip_grad_norm_over_meshes_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for gradients sharded over different device meshes (expert and
    non-expert parameters under expert parallelism), which one foreach norm cannot mix.

    Each mesh's norm is reduced over its ranks, the global norm combines them, and every
    gradient is scaled by the same factor. Returns the global norm (before clipping).
    """
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        norm = nn.utils.get_total_norm(grads, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grads in by_mesh.values():
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], scale)
    return total


def lr_at(cfg: SchedulerConfig, peak_lr: float, step: int, max_steps: int) -> float:
    """Learning rate for a 1-based step: linear warmup from 0, then the named decay."""
    if step < cfg.t_warmup:
        return peak_lr * step / cfg.t_warmup
    final = peak_lr * cfg.alpha_f
    if cfg.name == "constant_with_warmup":
        return peak_lr
    if step >= max_steps:
        return final
    progress = (step - cfg.t_warmup) / max(1, max_steps - cfg.t_warmup)
    if cfg.name == "linear_with_warmup":
        return peak_lr - (peak_lr - final) * progress
    return final + (peak_lr - final) * (1 + math.cos(math.pi * progress)) / 2
