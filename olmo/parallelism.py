"""Parallelism for the model: activation checkpointing, torch.compile, expert parallelism and
FSDP2 per block (the wiring the train module applies once, before training)."""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moe_model.expert_parallel import EXPERT_WEIGHTS
from moe_model.moe import MoELayer
from moe_model.transformer import MoETransformer
from olmo.activation_checkpointing import apply_activation_checkpointing

log = logging.getLogger(__name__)


def parallelize_model(
    model: MoETransformer,
    *,
    device: torch.device,
    param_dtype: torch.dtype,
    activation_checkpointing: bool | str,
    compile_blocks: bool,
    expert_parallel_degree: int = 1,
    planned_device_type: str | None = None,
) -> tuple[nn.Module, bool]:
    """Apply activation checkpointing (olmo/activation_checkpointing.py: a mode or a bool),
    torch.compile, expert parallelism and FSDP2 to each block,
    in that order.

    Returns the model and whether it is sharded. FSDP is used whenever more than one process
    runs, and on a single GPU too (it then only handles bf16 params with fp32 reduction).
    ``planned_device_type``: the device a planned run targets when the tensors live elsewhere
    (olmo/plan.py runs a GPU run's step on fake CPU tensors); None = ``device.type``.
    """
    apply_activation_checkpointing(model.blocks, activation_checkpointing)
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
