"""FLOPs and bytes of one training step by kind, and the roofline bound on its time (estimates).

Counted per rank for the step's tokens on that rank, forward + backward (matmuls: backward twice
the forward), with activation checkpointing's recomputed forward when it is on. Each kind's time
is bounded below by max(FLOPs / bf16 peak, bytes / HBM bandwidth); the kinds run one after
another, as do expert parallelism's all-to-all row exchanges (the next op waits for its rows);
FSDP's communication overlaps them (FSDP2 prefetches), so the step takes at least
max(sum over compute kinds + all-to-all, FSDP communication). Every number here is a lower
bound from datasheet peaks: real kernels reach a fraction of them (benchmarks/README.md has
measured figures).

The model FLOPs per token for MFU are olmo/flops.py's convention (``ModelConfig
.num_flops_per_token``), the same the trainer's MFU uses; the per-kind counts below split the
same matmuls by kind and add the non-matmul work that convention leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

from olmo.activation_checkpointing import checkpoint_mode
from olmo.config import TrainConfig
from olmo.gpus import GpuSpec

BF16 = 2
FP32 = 4

BLOCK_KINDS = ("attention_proj", "attention", "router", "expert_gemm", "activation", "combine")
RECOMPUTED_KINDS: dict[str | None, tuple[str, ...]] = {
    None: (),
    "full": BLOCK_KINDS,
    "moe": ("router", "expert_gemm", "activation", "combine"),
    "attention": ("attention_proj", "attention"),
}
"""Activation checkpointing mode -> the kinds of work whose forward runs again in backward."""


@dataclass(frozen=True)
class Work:
    """FLOPs and HBM (or link) bytes of one kind of work in one step on one rank."""

    flops: float
    bytes: float


@dataclass
class SpeedPlan:
    """One rank's step by kind, and the bound on its time."""

    work: dict[str, Work]
    """Kind -> work: attention, attention_proj, expert_gemm, router, activation, combine,
    lm_head_loss, all_to_all (expert parallelism's row exchanges), communication (FSDP)."""
    step_seconds: float
    """Roofline lower bound on the step time."""
    compute_seconds: float
    """The compute kinds one after another, plus the all-to-all row exchanges they wait for."""
    communication_seconds: float
    """FSDP's collectives (overlapped with the compute)."""
    tokens_per_second: float
    """All ranks together, at the bound."""
    mfu: float
    """Model FLOPs (olmo/flops.py) at the bound over the dense bf16 peak."""


def step_work(cfg: TrainConfig, world_size: int) -> dict[str, Work]:
    """FLOPs and bytes by kind of one step on one rank (see the module docstring)."""
    m = cfg.model
    seq = m.max_sequence_length
    seqs = cfg.global_train_batch_size // world_size
    T = seqs * seq  # tokens on this rank per step
    micro = seqs // cfg.device_train_microbatch_size
    D, L, V = m.d_model, m.n_layers, m.embedding_size
    moe = len(m.moe_layer_ids)
    dense = L - moe
    E, K, H = m.moe_num_experts, m.moe_top_k, m.mlp_hidden_size
    H_in = m.mlp_in_size
    # Forward passes of each kind: 2 where activation checkpointing recomputes it in backward.
    recomputed = RECOMPUTED_KINDS[checkpoint_mode(cfg.activation_checkpointing)]

    def passes(kind: str) -> int:
        return 2 if kind in recomputed else 1

    def matmul(kind: str, flops_fwd: float, weight_elems: float, act_bytes_fwd: float) -> Work:
        # Matmul passes: forward(s) + two in backward (input and weight gradients). Weights
        # read once per pass per micro-batch (bf16), weight gradients written once per
        # micro-batch (fp32 accumulation); activations read/written per pass.
        train = passes(kind) + 2
        weight_bytes = weight_elems * micro * (train * BF16 + FP32)
        return Work(train * flops_fwd, weight_bytes + train * act_bytes_fwd)

    rows = T * K  # routed rows per MoE layer
    work = {
        "attention_proj": matmul("attention_proj", 2 * T * L * 4 * D * D, L * 4 * D * D, L * T * 8 * D * BF16),
        # QK^T and AV as olmo/flops.py counts them (12 L D S per token, forward + backward);
        # flash attention reads q, k, v and writes o (and reads them again in backward).
        "attention": Work(
            L * D * seq * T * (4 * passes("attention") + 8),
            L * T * D * BF16 * (4 * passes("attention") + 8),
        ),
        "router": matmul("router", 2 * T * moe * D * E, moe * D * E, moe * T * (D * BF16 + E * FP32)),
        "expert_gemm": matmul(
            "expert_gemm",
            2 * rows * moe * D * (H_in + H) + 2 * T * dense * D * (H_in + H),
            routed_expert_params(cfg) + dense * D * (H_in + H),
            moe * rows * (2 * D + H_in + H) * BF16,
        ),
        # Elementwise: forward reads the pre-activation and writes the activation (bf16);
        # backward reads both inputs and the output gradient, writes the input gradient.
        "activation": Work(
            10 * (passes("activation") + 2) * rows * moe * H,
            moe * rows * BF16 * (passes("activation") * (H_in + H) + (H_in + H + H_in)),
        ),
        # Gather rows by expert, weight and scatter-add them back: each routed row read and
        # written once in forward, its gradient once in backward.
        "combine": Work(
            2 * rows * moe * D * (passes("combine") + 1),
            moe * BF16 * (rows * D * 2 + T * D) * (passes("combine") + 2),
        ),
        "lm_head_loss": lm_head_loss_work(cfg.fused_lm_loss, T, D, V, micro),
    }
    work["all_to_all"] = Work(0.0, all_to_all_bytes(cfg, T))
    work["communication"] = Work(0.0, communication_bytes(cfg, world_size, micro))
    return work


def routed_expert_params(cfg: TrainConfig) -> int:
    """Parameters of the routed experts (w_in_EDH, w_out_EHD of every MoE layer): what expert
    parallelism splits over its EP group."""
    m = cfg.model
    return len(m.moe_layer_ids) * m.moe_num_experts * m.d_model * (m.mlp_in_size + m.mlp_hidden_size)


def all_to_all_bytes(cfg: TrainConfig, tokens: int) -> float:
    """Bytes each rank sends in expert parallelism's row exchanges per step (bf16 rows, balanced
    routing: (P-1)/P of a rank's T*K rows leave it). Forward sends the rows out and back, backward
    their gradients, and activation checkpointing of the MoE layers repeats the forward's two."""
    m, ep = cfg.model, cfg.parallel.expert_parallel_degree
    if ep == 1:
        return 0.0
    recomputed = "expert_gemm" in RECOMPUTED_KINDS[checkpoint_mode(cfg.activation_checkpointing)]
    exchanges = 2 * (2 if recomputed else 1) + 2
    rows = tokens * m.moe_top_k
    return exchanges * len(m.moe_layer_ids) * rows * m.d_model * BF16 * (ep - 1) / ep


def lm_head_loss_work(fused: bool, T: int, D: int, V: int, micro: int) -> Work:
    """The LM head matmul and the loss over V logits. Unfused: three GEMM passes, the bf16
    logits written, their fp32 softmax written and read. Fused (moe_model/lm_loss.py): the
    forward GEMM runs again in backward (four passes), and each pass writes and reads its chunk's
    fp32 logits (chunks larger than the caches)."""
    if fused:
        return Work(4 * 2 * T * D * V + 2 * 10 * T * V,
                    micro * D * V * (4 * BF16 + FP32) + 2 * T * V * 2 * FP32)  # fmt: skip
    return Work(
        3 * 2 * T * D * V + 10 * T * V,
        micro * D * V * (3 * BF16 + FP32) + T * V * (BF16 + 3 * FP32),
    )


def communication_bytes(cfg: TrainConfig, world_size: int, micro: int) -> float:
    """Bytes each rank sends per step in FSDP's collectives: all-gathers (bf16, forward and
    backward of every micro-batch) and reduce-scatters (fp32, per micro-batch or once per step).
    Under expert parallelism of degree P a rank gathers only its E/P experts, over the W/P ranks
    holding the same ones (olmo/parallelism.py); the other parameters over all W ranks."""
    ep = cfg.parallel.expert_parallel_degree
    experts = routed_expert_params(cfg) if ep > 1 else 0
    every = cfg.reduce_grads_every_microbatch is True  # plan_run decides "auto" first
    per_element = 2 * micro * BF16 + (micro if every else 1) * FP32

    def sent(params: float, ranks: int) -> float:
        return per_element * params * (ranks - 1) / ranks

    return sent(cfg.model.num_params() - experts, world_size) + sent(experts / ep, world_size // ep)


def roofline(cfg: TrainConfig, world_size: int, gpu: GpuSpec) -> SpeedPlan:
    """The step's work and its time bound on ``world_size`` GPUs of kind ``gpu``."""
    work = step_work(cfg, world_size)
    compute = sum(
        max(w.flops / gpu.bf16_flops, w.bytes / gpu.hbm_bytes_per_s)
        for kind, w in work.items()
        if kind not in ("communication", "all_to_all")
    )
    # The row exchanges block the layer that waits for its rows (same stream), so they add to
    # the compute; an EP group is one node's GPUs at most (NVLink).
    ep = cfg.parallel.expert_parallel_degree
    compute += work["all_to_all"].bytes / gpu.link_bytes_per_s(ep)
    comm = work["communication"].bytes / gpu.link_bytes_per_s(world_size)
    step = max(compute, comm)
    seq = cfg.model.max_sequence_length
    tokens = cfg.global_train_batch_size * seq
    model_flops = cfg.model.num_flops_per_token(seq) * tokens / world_size
    return SpeedPlan(
        work=work,
        step_seconds=step,
        compute_seconds=compute,
        communication_seconds=comm,
        tokens_per_second=tokens / step,
        mfu=model_flops / (step * gpu.bf16_flops),
    )
