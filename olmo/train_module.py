"""The train module: our MoE model on olmo-core's Trainer.

olmo-core's Trainer owns the loop, checkpoint files, cancellation and metric reduction; this
module owns what is specific to our model: parallelism (FSDP2 per block, expert parallelism),
the optimizer and learning-rate schedule, micro-batching, and the objective

    loss = cross_entropy + load_balancing + router_z_loss

with the two auxiliary losses (already weighted by the model) divided by the number of
micro-batches in a step, as OLMoE trained (megablocks' formulas). The paper's released trainer
dropped them from the objective; here they always reach the gradients. With auxiliary-loss-free
balancing (model.moe_bias_update_rate), every optimizer step is followed by the expert-bias
update from the step's routed rows, summed over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dist_cp_sd
import torch.nn as nn
import torch.nn.functional as F
from olmo_core.data.utils import get_labels, split_batch
from olmo_core.train.common import ReduceType
from olmo_core.train.train_module import EvalBatchSizeUnit, EvalBatchSpec, TrainModule
from olmo_core.utils import move_to_device
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moe_model.config import ModelConfig
from moe_model.errors import NonFiniteError
from moe_model.expert_parallel import EXPERT_WEIGHTS
from moe_model.init import draw_on
from moe_model.moe import MoELayer
from moe_model.transformer import MoETransformer
from olmo.config import OptimizerConfig, SchedulerConfig, TrainConfig
from olmo.metric_names import (
    CE_LOSS,
    GRAD_NORM,
    LB_LOSS,
    LR,
    SKIPPED_STEPS,
    SOURCE_SUM_KINDS,
    TOTAL_LOSS,
    Z_LOSS,
    dropped_count,
    expert_count,
    layer_bias_range,
    layer_router_entropy,
    source_sum,
)
from olmo.muon import MuonWithAdamW, muon_layouts
from olmo.objective import objective
from olmo.routing_trace import RoutingRecorder
from olmo.run_files import local_run_dir

log = logging.getLogger(__name__)

LABEL_IGNORE_INDEX = -100


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def parallelize_model(
    model: MoETransformer,
    *,
    device: torch.device,
    param_dtype: torch.dtype,
    activation_checkpointing: bool,
    compile_blocks: bool,
    expert_parallel_degree: int = 1,
    planned_device_type: str | None = None,
) -> tuple[nn.Module, bool]:
    """Apply activation checkpointing, torch.compile, expert parallelism and FSDP2 to each block,
    in that order.

    Returns the model and whether it is sharded. FSDP is used whenever more than one process
    runs, and on a single GPU too (it then only handles bf16 params with fp32 reduction).
    ``planned_device_type``: the device a planned run targets when the tensors live elsewhere
    (olmo/plan.py runs a GPU run's step on fake CPU tensors); None = ``device.type``.
    """
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile_blocks:
        config = getattr(model, "config", None)
        if param_dtype != torch.bfloat16 and config is not None and config.moe_layer_ids:
            # grouped_mm's fake-tensor rule (what torch.compile traces with) takes only bf16.
            log.warning(
                "compile with fp32 MoE experts: they run the per-expert loop, which reads split "
                "sizes on the host, so each MoE block has a graph break (and runs eagerly under "
                "activation checkpointing); precision bf16 compiles them"
            )
        for block in model.blocks:
            block.compile(dynamic=False)

    distributed = dist.is_available() and dist.is_initialized()
    on_gpu = (planned_device_type or device.type) == "cuda"
    if not distributed or (dist.get_world_size() == 1 and not on_gpu):
        return model, False

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Gradients are reduced in fp32 whatever the param dtype: bf16 reduce-scatter loses
    # precision across many ranks.
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # PolyNorm/PolyReLU coefficients join no block's group: under a bf16 param_dtype they would
    # reach the fp32 math already rounded (1/3 -> 0.333984). Each block's coefficient sets form
    # one small group of their own that stays fp32 and leaves the activation's input in the
    # compute dtype (cast_forward_inputs=False); kept unsharded until backward (a few floats),
    # so backward needs no second all-gather for them.
    coefficient_policy = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    # The activation and MoE-layer units return views (a reshape); nothing modifies them in
    # place (the block adds the layer's output out of place), so FSDP's warning is noise.
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDP(MoELayer|Poly)", category=UserWarning
    )
    expert_mesh = None
    if expert_parallel_degree > 1:
        expert_mesh = expert_parallel_mesh(mesh, expert_parallel_degree)
    for layer in model.moe_layers():
        ep_mesh = None if expert_mesh is None else expert_mesh["ep"]
        layer.parallelize(ep_mesh, lb_group=mesh.get_group())
    for block in model.blocks:
        coefficient_sets = activation_modules_with_params(block)
        if coefficient_sets:
            fully_shard(
                coefficient_sets,
                mesh=mesh,
                mp_policy=coefficient_policy,
                reshard_after_forward=False,
            )
        if expert_mesh is not None:
            fully_shard_expert_parallel(block, mesh=mesh, expert_mesh=expert_mesh,
                                        mp_policy=mp_policy)  # fmt: skip
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model, True


def expert_parallel_mesh(mesh: DeviceMesh, degree: int) -> DeviceMesh:
    """The mesh of EP groups of ``degree`` ranks, over which each MoE layer's experts shard.

    The processes form a (world/degree, degree) mesh ("efsdp", "ep"): an EP group is a row of
    consecutive ranks, each holding E/degree experts of every layer, which
    :func:`fully_shard_expert_parallel` shards again over its column ("efsdp": the ranks holding
    the same experts).
    """
    world = mesh.size()
    expert_mesh = init_device_mesh(
        mesh.device_type, (world // degree, degree), mesh_dim_names=("efsdp", "ep")
    )
    return expert_mesh


def fully_shard_expert_parallel(
    block: nn.Module, *, mesh: DeviceMesh, expert_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy
) -> None:
    """FSDP units for the MoE layers of ``block`` under expert parallelism.

    The layer's unit holds only its expert weights, on the column mesh. The router (and any
    other submodule with parameters, such as shared experts), like every non-expert parameter,
    stays sharded over all ranks (``mesh``): each becomes a unit of its own, since the layer's
    unit is on another mesh (the coefficient sets already are units).

    Gradients: the rows an expert computes came from every rank of its EP group, so its
    gradient summed over the column already sums all ranks' tokens; dividing by the world size
    (not the column size) gives the same average as plain FSDP.
    """
    for layer in block.modules():
        if not isinstance(layer, MoELayer):
            continue
        others = [n for n, _ in layer.named_parameters(recurse=False) if n not in EXPERT_WEIGHTS]
        if others:
            # They would land in the expert unit, sharded and averaged over the column only.
            raise ValueError(
                f"MoELayer parameters {others} are neither expert weights {EXPERT_WEIGHTS} nor "
                "in a submodule; expert parallelism cannot place them"
            )
        for module in unsharded_submodules(layer):
            fully_shard(module, mesh=mesh, mp_policy=mp_policy)
        fully_shard(layer, mesh=expert_mesh["efsdp"], mp_policy=mp_policy)
        layer.set_gradient_divide_factor(float(mesh.size()))
        if mesh.device_type == "cpu" and expert_mesh["efsdp"].size() > 1:
            # A divide factor other than the group size becomes NCCL's PREMUL_SUM, which gloo
            # lacks: sum, then divide. (Not on a one-rank column: FSDP divides there without a
            # collective, and forcing the sum would divide twice.)
            layer.set_force_sum_reduction_for_comms(True)


def unsharded_submodules(module: nn.Module) -> list[nn.Module]:
    """The children of ``module`` (looking inside ModuleLists and ModuleDicts, which are never
    called and so cannot be FSDP units) that hold parameters no FSDP unit manages yet."""
    found = []
    for child in module.children():
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            found += unsharded_submodules(child)
        elif any(not isinstance(p, DTensor) for p in child.parameters()):
            found.append(child)
    return found


def activation_modules_with_params(module: nn.Module) -> list[nn.Module]:
    """The activation modules under ``module`` that own parameters (PolyNorm/PolyReLU sets)."""
    return [m for m in module.modules() if getattr(m, "has_coefficients", False)]


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


@dataclass(frozen=True)
class TrainModuleConfig:
    """What the train module reads, and nothing else (:func:`train_module_config` builds it
    from a TrainConfig)."""

    model: ModelConfig
    """The model's config: FLOPs per token, MoE layers, document masking, expert-bias rate."""
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    seed: int
    """Seed of the weights drawn for a model built on the meta device."""
    microbatch_size: int
    """Sequences per forward/backward (device_train_microbatch_size)."""
    eval_batch_size: int
    """Sequences per eval batch per rank (eval_batch_size, else the micro-batch size)."""
    precision: str = "auto"
    """'auto' (bf16 on GPUs, fp32 on CPUs), 'fp32' or 'bf16'."""
    init_on_device: bool = False
    """Draw the initial weights on the training device instead of the CPU."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile each block."""
    expert_parallel_degree: int = 1
    reduce_grads_every_microbatch: bool = False
    """Reduce-scatter gradients after every micro-batch instead of once per step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (<= 0: no clipping)."""
    nonfinite_policy: str = "stop"
    """On a non-finite loss or gradient norm: 'stop' or 'skip' the update."""
    source_names: tuple[str, ...] = ()
    """Mixture source names in config order: a batch's "source" indexes them."""
    routing_metrics_interval: int = 1
    """Steps between records of the routing diagnostics (the console interval)."""
    routing_trace_steps: tuple[int, ...] = ()
    """Steps whose routing is written to the run folder (trace.routing_steps)."""


def train_module_config(cfg: TrainConfig) -> TrainModuleConfig:
    """The train module's settings from a run's config."""
    return TrainModuleConfig(
        model=cfg.model,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        seed=cfg.seed,
        microbatch_size=cfg.device_train_microbatch_size,
        eval_batch_size=cfg.eval_batch_size or cfg.device_train_microbatch_size,
        precision=cfg.precision,
        init_on_device=cfg.init_on_device,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=cfg.compile,
        expert_parallel_degree=cfg.parallel.expert_parallel_degree,
        reduce_grads_every_microbatch=cfg.reduce_grads_every_microbatch,
        max_grad_norm=cfg.max_grad_norm,
        nonfinite_policy=cfg.nonfinite_policy,
        source_names=tuple(cfg.data.sources),
        routing_metrics_interval=cfg.console_log_interval,
        routing_trace_steps=tuple(cfg.trace.routing_steps),
    )


class MoETrainModule(TrainModule):
    def __init__(
        self,
        model: MoETransformer,
        config: TrainModuleConfig,
        device: torch.device,
        planned_device_type: str | None = None,
    ):
        """``planned_device_type``: the device type whose settings (precision, single-process
        FSDP) apply when it is not ``device``'s: olmo/plan.py simulates a CUDA run on fake CPU
        tensors, since a CPU-only torch cannot index fake CUDA tensors."""
        super().__init__()
        self.config = config
        self.device = device
        planned = torch.device(planned_device_type) if planned_device_type else device
        self.param_dtype = resolve_precision(config.precision, planned)
        on_meta = any(p.is_meta for p in model.parameters())
        if not on_meta:
            model.to(device)
        self.model, self.sharded = parallelize_model(
            model,
            device=device,
            param_dtype=self.param_dtype,
            activation_checkpointing=config.activation_checkpointing,
            compile_blocks=config.compile,
            expert_parallel_degree=config.expert_parallel_degree,
            planned_device_type=planned_device_type,
        )
        if on_meta:
            # After sharding: each rank allocates and fills only its own shards (moe_model/init.py
            # draws every tensor whole from this seed, one parameter at a time).
            self.model.to_empty(device=device)
            torch.manual_seed(config.seed)
            with draw_on(device if config.init_on_device else "cpu"):
                self.model.init_weights()
        self.optim = build_optimizer(self.model, config.optimizer)
        self.microbatch_size = config.microbatch_size
        self.skipped_steps = 0
        self._step_loss_sum: torch.Tensor | None = None
        self._step_load_LE: torch.Tensor | None = None
        self.moe_layer_ids = config.model.moe_layer_ids
        # Mixture batches carry each row's source index into these names (config order).
        self.source_names = list(config.source_names)
        self._source_sums: torch.Tensor | None = None
        # Without FSDP, bf16 runs use autocast; FSDP casts params itself.
        self._autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if self.param_dtype == torch.bfloat16 and not self.sharded
            else None
        )

    # ---- olmo-core TrainModule interface -------------------------------------------------

    @property
    def eval_batch_spec(self) -> EvalBatchSpec:
        seq_len = self.config.model.max_sequence_length
        return EvalBatchSpec(
            rank_batch_size=self.config.eval_batch_size,
            batch_size_unit=EvalBatchSizeUnit.instances,
            max_sequence_length=seq_len,
        )

    def state_dict(self, *, optim: bool | None = None) -> dict[str, Any]:
        options = dist_cp_sd.StateDictOptions(full_state_dict=False, cpu_offload=True)
        state: dict[str, Any] = {
            "model": dist_cp_sd.get_model_state_dict(self.model, options=options),
            "train_module": {"skipped_steps": self.skipped_steps},
        }
        if optim is not False:
            state["optim"] = dist_cp_sd.get_optimizer_state_dict(
                self.model, self.optim, options=options
            )
        return state

    def state_dict_to_load(self, metadata, *, optim: bool | None = None) -> dict[str, Any]:
        # A model-only checkpoint (scripts/convert_from_hf.py) has no optimizer state: AdamW
        # then starts fresh and the configured warm-up protects the first steps.
        if optim is None and not any(k.startswith("optim.") for k in metadata.state_dict_metadata):
            optim = False
        return self.state_dict(optim=optim)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        strict = dist_cp_sd.StateDictOptions(strict=True)
        dist_cp_sd.set_model_state_dict(self.model, state_dict["model"], options=strict)
        if "optim" in state_dict:
            dist_cp_sd.set_optimizer_state_dict(
                self.model, self.optim, state_dict["optim"], options=strict
            )
        self.skipped_steps = int(state_dict.get("train_module", {}).get("skipped_steps", 0))

    def zero_grads(self) -> None:
        self.optim.zero_grad(set_to_none=True)

    @lru_cache  # noqa: B019 - one model config per module; mirrors olmo-core's signature
    def num_flops_per_token(self, seq_len: int) -> int:
        return self.config.model.num_flops_per_token(seq_len)

    def global_num_flops_in_batch(self, batch: dict[str, Any]) -> int | None:
        input_ids = batch["input_ids"]
        seq_len = input_ids.shape[1]
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.num_flops_per_token(seq_len) * input_ids.numel() * world

    # ---- training ---------------------------------------------------------------------------

    def _forward(self, batch: dict[str, Any]):
        """The model on a (micro-)batch; with document masking, attention stays inside the
        documents the data layer marked ("doc_ids", olmo.data.BatchCollator)."""
        doc_ids = None
        if self.config.model.document_masking:
            doc_ids = batch.get("doc_ids")
            if doc_ids is None:
                raise ValueError(
                    "model.document_masking is on but the batch has no 'doc_ids'; expected "
                    "batches from olmo.data's loaders built with document_ids=True"
                )
        ctx = self._autocast if self._autocast is not None else nullcontext()
        with ctx:
            return self.model(batch["input_ids"], doc_ids)

    def _micro_ce(
        self, logits: torch.Tensor, micro: dict[str, Any], num_loss_tokens: torch.Tensor
    ) -> torch.Tensor:
        """The micro-batch's summed cross-entropy over the rank batch's loss tokens; with a
        "source" per row, also adds (CE, loss tokens, tokens) per source to _source_sums."""
        logits_TV, labels_T = logits.reshape(-1, logits.shape[-1]).float(), micro["labels"].reshape(-1)
        if "source" not in micro or not self.source_names:
            return F.cross_entropy(
                logits_TV, labels_T, ignore_index=LABEL_IGNORE_INDEX, reduction="sum"
            ) / num_loss_tokens
        ce_T = F.cross_entropy(logits_TV, labels_T, ignore_index=LABEL_IGNORE_INDEX, reduction="none")
        n = len(self.source_names)
        seq_len = micro["labels"].shape[1]
        source_T = micro["source"].to(logits.device).repeat_interleave(seq_len)
        valid_T = (labels_T != LABEL_IGNORE_INDEX).float()
        sums = torch.stack([
            torch.zeros(n, device=logits.device).index_add_(0, source_T, ce_T.detach()),
            torch.zeros(n, device=logits.device).index_add_(0, source_T, valid_T),
            # Not bincount: on CUDA it reads the input's min and max back to the host.
            torch.zeros(n, device=logits.device).index_add_(0, source_T, torch.ones_like(valid_T)),
        ], dim=1)  # fmt: skip
        self._source_sums = sums if self._source_sums is None else self._source_sums + sums
        return ce_T.sum() / num_loss_tokens

    def _record_source_metrics(self) -> None:
        if self._source_sums is None:
            return
        # Device tensors: olmo-core reduces metrics on the device at its log interval, so
        # nothing here waits for the device (no host copy in the step).
        for name, row in zip(self.source_names, self._source_sums):
            for kind, value in zip(SOURCE_SUM_KINDS, row):
                self.record_metric(source_sum(name, kind), value, ReduceType.sum)
        self._source_sums = None

    def train_batch(self, batch: dict[str, Any], dry_run: bool = False) -> None:
        self.model.train()
        batch = move_to_device(batch, self.device)
        input_ids = batch["input_ids"]
        if "labels" not in batch:
            batch["labels"] = get_labels(batch, label_ignore_index=LABEL_IGNORE_INDEX)
        # Normalise CE by the tokens of the whole rank batch, not the micro-batch, so that
        # accumulation over micro-batches equals one big batch.
        num_loss_tokens = (batch["labels"] != LABEL_IGNORE_INDEX).sum().clamp_min(1)
        micro_batches = split_batch(batch, self.microbatch_size)
        num_micro = len(micro_batches)

        ce_total = torch.zeros((), device=self.device)
        lb_total = torch.zeros((), device=self.device)
        z_total = torch.zeros((), device=self.device)
        load_LE: torch.Tensor | None = None
        entropy_L: torch.Tensor | None = None
        dropped_L: torch.Tensor | None = None
        recorder = self._routing_recorder(dry_run)
        for index, micro in enumerate(micro_batches):
            if self.sharded and not self.config.reduce_grads_every_microbatch:
                # Accumulate unsharded gradients locally and reduce-scatter once, after the last
                # micro-batch's backward: one collective per step instead of one per micro-batch.
                self.model.set_requires_gradient_sync(index == num_micro - 1)
            out = self._forward(micro)
            if recorder is not None:
                doc_ids = micro.get("doc_ids") if self.config.model.document_masking else None
                recorder.add(micro["input_ids"], doc_ids, out.routes)
            logits = out.logits
            ce = self._micro_ce(logits, micro, num_loss_tokens)
            loss = objective(ce, out.lb_loss, out.z_loss, num_micro)
            loss.total.backward()
            ce_total += loss.ce.detach()
            lb_total += loss.lb.detach()
            z_total += loss.z.detach()
            counts = out.tokens_per_expert_LE
            if counts is not None and counts.numel() > 0:
                load_LE = counts if load_LE is None else load_LE + counts
            if out.router_entropy_L is not None:
                part = out.router_entropy_L / num_micro
                entropy_L = part if entropy_L is None else entropy_L + part
            if out.dropped_rows_L is not None:
                dropped = out.dropped_rows_L
                dropped_L = dropped if dropped_L is None else dropped_L + dropped
            del out, logits, ce, loss

        if dry_run:
            self.zero_grads()
            self._source_sums = None
            return

        self._step_loss_sum = (ce_total + lb_total + z_total).detach()
        self.record_metric(CE_LOSS, ce_total, ReduceType.mean)
        self.record_metric(LB_LOSS, lb_total, ReduceType.mean)
        self.record_metric(Z_LOSS, z_total, ReduceType.mean)
        self.record_metric(TOTAL_LOSS, self._step_loss_sum, ReduceType.mean)
        self._step_load_LE = load_LE
        self._record_source_metrics()
        if recorder is not None:
            distributed = dist.is_initialized()
            rank = dist.get_rank() if distributed else 0
            world = dist.get_world_size() if distributed else 1
            recorder.save(local_run_dir(self.trainer.save_folder), self.trainer.global_step,
                          rank, world)  # fmt: skip
        if load_LE is not None:
            # Raw counts, summed over ranks; MetricsCallback turns them into fractions. Views of
            # one device tensor: no host copy in the step (olmo-core reduces them on the device
            # at its log interval).
            for layer, counts_E in zip(self.moe_layer_ids, load_LE.float(), strict=True):
                for expert, count in enumerate(counts_E):
                    self.record_metric(expert_count(layer, expert), count, ReduceType.sum)
        if self._routing_metrics_due():
            # Entropy (mean over ranks) and dropped rows (summed; MetricsCallback divides by
            # the routed rows): more metrics, at the console interval only; device views too.
            if entropy_L is not None:
                for layer, value in zip(self.moe_layer_ids, entropy_L, strict=True):
                    self.record_metric(layer_router_entropy(layer), value, ReduceType.mean)
            if dropped_L is not None:
                for layer, value in zip(self.moe_layer_ids, dropped_L.float(), strict=True):
                    self.record_metric(dropped_count(layer), value, ReduceType.sum)
        del batch, input_ids

    def _routing_recorder(self, dry_run: bool) -> RoutingRecorder | None:
        """A recorder on the steps trace.routing_steps names (never on a dry run)."""
        steps = self.config.routing_trace_steps
        if dry_run or not steps or self.trainer.global_step not in steps:
            return None
        return RoutingRecorder(self.config.model)

    def _routing_metrics_due(self) -> bool:
        """Whether this step records the routing diagnostics: at the console interval."""
        step, max_steps = self.trainer.global_step, self.trainer.max_steps
        return step % self.config.routing_metrics_interval == 0 or step == max_steps

    def _update_expert_bias(self) -> None:
        """Auxiliary-loss-free balancing: the step's routed rows summed over data-parallel ranks
        (so every rank applies the same update), then one bias step in every MoE layer."""
        if self.config.model.moe_bias_update_rate is None or self._step_load_LE is None:
            return
        load_LE = self._step_load_LE.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load_LE)
        self.model.update_expert_bias(load_LE)
        if self._routing_metrics_due():
            bias_LE = torch.stack([m.expert_bias_E for m in self.model.moe_layers()])
            for layer, bias_E in zip(self.moe_layer_ids, bias_LE, strict=True):
                self.record_metric(layer_bias_range(layer), bias_E.max() - bias_E.min(), None)

    def _grad_norm(self) -> torch.Tensor:
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        if self.config.expert_parallel_degree > 1:
            return clip_grad_norm_over_meshes_(list(self.model.parameters()), max_norm)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm

    def optim_step(self) -> None:
        step = self.trainer.global_step
        grad_norm = self._grad_norm()
        loss = self._step_loss_sum if self._step_loss_sum is not None else torch.zeros(())
        # One flag for all ranks: a NaN on one rank must stop (or skip on) every rank at the
        # same step, otherwise the ranks' collectives fall out of step and hang.
        bad = torch.stack(
            [(~torch.isfinite(loss)).float().to(self.device), (~torch.isfinite(grad_norm)).float()]
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        # The step's one host sync (tests/olmo/test_cuda_syncs.py allows it): stop or skip is
        # decided before the update. By then forward and backward are queued, so it costs the
        # optimizer's launch latency once per step, not a stall inside the model.
        bad_loss, bad_grad = (bool(v) for v in bad.tolist())
        if bad_loss or bad_grad:
            what = " and ".join(
                name
                for name, flag in (("loss", bad_loss), ("gradient norm", bad_grad))
                if flag
            )
            if self.config.nonfinite_policy == "stop":
                raise NonFiniteError(
                    f"step {step}: non-finite {what} on at least one rank; stopped before the "
                    "optimizer update (the last saved checkpoint is intact)"
                )
            self.skipped_steps += 1
            log.warning(f"step {step}: non-finite {what}; skipping this step's update")
            self.zero_grads()
        else:
            lr = lr_at(
                self.config.scheduler, self.config.optimizer.learning_rate, step,
                self.trainer.max_steps,
            )
            for group in self.optim.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)
            self.optim.step()
            self._update_expert_bias()
            self.record_metric(LR, lr, ReduceType.mean)
        self.record_metric(GRAD_NORM, grad_norm.detach(), None)
        self.record_metric(SKIPPED_STEPS, float(self.skipped_steps), None)
        self._step_loss_sum = None
        self._step_load_LE = None

    # ---- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def eval_batch(
        self, batch: dict[str, Any], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and number of predicted tokens of a batch (no aux losses)."""
        self.model.eval()
        batch = move_to_device(batch, self.device)
        if labels is None:
            labels = get_labels(batch, label_ignore_index=LABEL_IGNORE_INDEX)
        out = self._forward(batch)
        ce_sum = F.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=LABEL_IGNORE_INDEX,
            reduction="sum",
        )
        return ce_sum, (labels != LABEL_IGNORE_INDEX).sum()
