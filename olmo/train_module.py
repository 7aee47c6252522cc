"""The train module: our MoE model on olmo-core's Trainer.

olmo-core's Trainer owns the loop, checkpoint files, cancellation and metric reduction; this
module owns what is specific to our model: parallelism (FSDP2 per block, expert parallelism:
olmo/parallelism.py), the optimizer and learning-rate schedule (olmo/optim.py), micro-batching,
and the objective

    loss = cross_entropy + load_balancing + router_z_loss

with the two auxiliary losses (already weighted by the model) divided by the number of
micro-batches in a step, as OLMoE trained (megablocks' formulas). The paper's released trainer
dropped them from the objective; here they always reach the gradients. With auxiliary-loss-free
balancing (model.moe_bias_update_rate), every optimizer step is followed by the expert-bias
update (``post_optim_step``) from the step's routed rows, summed over micro-batches and
data-parallel ranks. The step's sums live in one :class:`olmo.step_statistics.StepStatistics`
(the model is stateless); the module reads only its :class:`TrainModuleConfig`.
"""

from __future__ import annotations

import logging
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
from torch.distributed.tensor import DTensor

from moe_model.config import ModelConfig
from moe_model.errors import NonFiniteError
from moe_model.init import draw_on
from moe_model.precision import upcast
from moe_model.transformer import MoETransformer
from olmo.config import OptimizerConfig, SchedulerConfig, TrainConfig
from olmo.metric_names import (
    GRAD_NORM,
    LR,
    SKIPPED_STEPS,
    layer_bias_range,
)
from olmo.objective import objective
from olmo.optim import build_optimizer, clip_grad_norm_over_meshes_, lr_at
from olmo.parallelism import parallelize_model
from olmo.routing_trace import RoutingRecorder
from olmo.run_files import local_run_dir
from olmo.step_statistics import StepStatistics

log = logging.getLogger(__name__)

LABEL_IGNORE_INDEX = -100


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


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
    activation_checkpointing: bool | str = False
    """A mode of olmo/activation_checkpointing.py, or true (whole blocks) / false."""
    compile: bool = False
    """torch.compile each block."""
    expert_parallel_degree: int = 1
    fused_lm_loss: bool = False
    """LM head and cross-entropy fused (moe_model/lm_loss.py): no (tokens, vocab) logits."""
    reduce_grads_every_microbatch: bool = False
    """Reduce-scatter gradients after every micro-batch instead of once per step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (<= 0: no clipping)."""
    nonfinite_policy: str = "stop"
    """On a non-finite loss or gradient norm: 'stop' or 'skip' the update."""
    source_names: tuple[str, ...] = ()
    """Mixture source names in config order: a batch's "source" indexes them."""
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
        fused_lm_loss=cfg.fused_lm_loss,
        # "auto" that no plan decided (a CPU run, no preflight): once per step, as before.
        reduce_grads_every_microbatch=cfg.reduce_grads_every_microbatch is True,
        max_grad_norm=cfg.max_grad_norm,
        nonfinite_policy=cfg.nonfinite_policy,
        source_names=tuple(cfg.data.sources),
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
        # The last train_batch's sums, for optim_step and its post-step hook.
        self._step_stats: StepStatistics | None = None
        self.moe_layer_ids = config.model.moe_layer_ids
        # Mixture batches carry each row's source index into these names (config order).
        self.source_names = list(config.source_names)
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

    def _forward(self, batch: dict[str, Any], labels: torch.Tensor | None = None):
        """The model on a (micro-)batch; with document masking, attention stays inside the
        documents the data layer marked ("doc_ids", olmo.data.BatchCollator). With ``labels``
        the output holds per-token losses instead of logits (fused_lm_loss)."""
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
            if labels is None:
                return self.model(batch["input_ids"], doc_ids)
            return self.model(batch["input_ids"], doc_ids, labels_BS=labels)

    def _micro_ce(
        self, out, micro: dict[str, Any], num_loss_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's summed cross-entropy over the rank batch's loss tokens; with a
        "source" per row, also (CE, loss tokens, tokens) per source (else None). From the
        model's per-token losses (fused_lm_loss) or from its logits."""
        labels_T = micro["labels"].reshape(-1)
        by_source = "source" in micro and bool(self.source_names)
        if out.ce_T is not None:
            ce_T = out.ce_T
        else:
            logits_TV = upcast(out.logits.reshape(-1, out.logits.shape[-1]))
            if not by_source:
                return F.cross_entropy(
                    logits_TV, labels_T, ignore_index=LABEL_IGNORE_INDEX, reduction="sum"
                ) / num_loss_tokens, None
            ce_T = F.cross_entropy(logits_TV, labels_T, ignore_index=LABEL_IGNORE_INDEX, reduction="none")
        if not by_source:
            return ce_T.sum() / num_loss_tokens, None
        n = len(self.source_names)
        seq_len = micro["labels"].shape[1]
        device = ce_T.device
        source_T = micro["source"].to(device).repeat_interleave(seq_len)
        valid_T = (labels_T != LABEL_IGNORE_INDEX).float()
        sums_N3 = torch.stack([
            torch.zeros(n, device=device).index_add_(0, source_T, ce_T.detach().float()),
            torch.zeros(n, device=device).index_add_(0, source_T, valid_T),
            # Not bincount: on CUDA it reads the input's min and max back to the host.
            torch.zeros(n, device=device).index_add_(0, source_T, torch.ones_like(valid_T)),
        ], dim=1)  # fmt: skip
        return ce_T.sum() / num_loss_tokens, sums_N3

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

        stats = StepStatistics.zeros(self.device)
        recorder = self._routing_recorder(dry_run)
        for index, micro in enumerate(micro_batches):
            if self.sharded and not self.config.reduce_grads_every_microbatch:
                # Accumulate unsharded gradients locally and reduce-scatter once, after the last
                # micro-batch's backward: one collective per step instead of one per micro-batch.
                self.model.set_requires_gradient_sync(index == num_micro - 1)
            out = self._forward(micro, micro["labels"] if self.config.fused_lm_loss else None)
            if recorder is not None:
                doc_ids = micro.get("doc_ids") if self.config.model.document_masking else None
                recorder.add(micro["input_ids"], doc_ids, out.routes)
            ce, source_sums_N3 = self._micro_ce(out, micro, num_loss_tokens)
            loss = objective(ce, out.lb_loss, out.z_loss, num_micro)
            loss.total.backward()
            stats.add(out, ce=loss.ce, lb=loss.lb, z=loss.z, num_micro=num_micro,
                      source_sums_N3=source_sums_N3)  # fmt: skip
            del out, ce, loss

        if dry_run:
            self.zero_grads()
            return

        self._step_stats = stats
        stats.record(self.record_metric, moe_layer_ids=self.moe_layer_ids, source_names=self.source_names)
        if recorder is not None:
            distributed = dist.is_initialized()
            rank = dist.get_rank() if distributed else 0
            world = dist.get_world_size() if distributed else 1
            recorder.save(local_run_dir(self.trainer.save_folder), self.trainer.global_step,
                          rank, world)  # fmt: skip
        del batch, input_ids

    def _routing_recorder(self, dry_run: bool) -> RoutingRecorder | None:
        """A recorder on the steps trace.routing_steps names (never on a dry run)."""
        steps = self.config.routing_trace_steps
        if dry_run or not steps or self.trainer.global_step not in steps:
            return None
        return RoutingRecorder(self.config.model)

    def post_optim_step(self) -> None:
        """After the optimizer's update (OLMo-core's hook of that name): auxiliary-loss-free
        balancing's expert-bias step, from the step's routed rows summed over data-parallel
        ranks (so every rank applies the same update), in every MoE layer."""
        stats = self._step_stats
        if self.config.model.moe_bias_update_rate is None or stats is None or stats.load_LE is None:
            return
        load_LE = stats.load_LE.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load_LE)
        self.model.update_expert_bias(load_LE)
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
        loss = self._step_stats.total if self._step_stats is not None else torch.zeros(())
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
            self.post_optim_step()
            self.record_metric(LR, lr, ReduceType.mean)
        self.record_metric(GRAD_NORM, grad_norm.detach(), None)
        self.record_metric(SKIPPED_STEPS, float(self.skipped_steps), None)
        self._step_stats = None

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
