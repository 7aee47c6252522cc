"""Memory of one training step, per rank: the project's own train module run once, tracked.

:func:`simulate_step` builds :class:`olmo.train_module.MoETrainModule` from a config (FSDP2,
precision, activation checkpointing as the run would have them), fills the optimizer state (a
run's steady state: AdamW's moments exist from the first step on), then runs one step -- every
micro-batch's forward and backward through ``train_batch``, gradient clipping and the optimizer
update -- under torch's memory tracker (``torch.distributed._tools``: FSDPMemTracker for a
sharded model, MemTracker otherwise), which sorts every live tensor into parameters, gradients,
optimizer state, activations and temporaries, and records the peak.

With ``fake=True`` every tensor is a FakeTensor (shapes and dtypes, no data, no memory) and the
process group is torch's fake backend of any world size: one process simulates rank 0 of an
N-GPU run on a CPU. The tensors are fake *CPU* tensors: a CPU-only torch build cannot index a
fake CUDA tensor (every Python ``x[...]`` takes a CUDA device guard), so the GPU run's choices
are made explicitly instead (``planned_device_type="cuda"``): bf16 parameters with fp32
reduction, FSDP also on one process, grouped_mm experts (bf16 takes it on every device), the
PolyNorm ``fused`` backend on CPU saving exactly what the Triton kernels save on CUDA (x, the
weights and one fp32 per row), and flash attention (SDPA's fused CPU kernel saves the output and
the log-sum-exp, as CUDA's flash kernel does). FSDP2's CUDA streams are CPU no-ops here: the
tensors and their lifetimes are the same Python code path.

Expert parallelism and per-expert activation sets split rows by the router's counts on the
host, which fake tensors lack: their plans route with forced balance (counts known from the
shapes). ``compile: true`` compiles the blocks with PLAN_COMPILE_BACKEND (Inductor's partition,
run op by op) so the tracker sees what the compiled blocks save.

With ``fake=False`` the same step runs on real tensors, in the process group already set up (the
tests compare the two on CPU with gloo).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import _disable_current_modes

import olmo.parallelism as parallelism_lib
import olmo.train_module as train_module_lib
from moe_model import attention
from moe_model.errors import ConfigError
from olmo.config import TrainConfig

CATEGORIES: dict[str, str] = {
    _FSDPRefType.SHARDED_PARAM.value: "params_sharded",
    _FSDPRefType.UNSHARDED_PARAM.value: "params_unsharded",
    _FSDPRefType.BUFFER.value: "buffers",
    _FSDPRefType.SHARDED_GRAD.value: "grads_sharded",
    _FSDPRefType.UNSHARDED_GRAD.value: "grads_unsharded",
    _FSDPRefType.ACT.value: "activations",
    _FSDPRefType.TEMP.value: "temporaries",
    _FSDPRefType.ALL_GATHER.value: "comm_buffers",
    _FSDPRefType.REDUCE_SCATTER.value: "comm_buffers",
    _FSDPRefType.OPT.value: "optimizer_state",
    _FSDPRefType.INP.value: "inputs",
    _MemRefType.PARAM.value: "params_sharded",
    _MemRefType.GRAD.value: "grads_sharded",
    _MemRefType.OPT.value: "optimizer_state",
    _MemRefType.OTH.value: "inputs",
}
"""The trackers' categories -> the plan's (a model without FSDP has only "sharded" ones: each
rank holds its whole parameters and gradients)."""

BREAKDOWN_KEYS = tuple(dict.fromkeys(CATEGORIES.values()))


@dataclass(frozen=True)
class PeakMoment:
    """When the peak happened."""

    module: str
    """Innermost module running (ModTracker's name, e.g. ``MoETransformer.blocks.3.moe``)."""
    phase: str
    """``forward``, ``backward`` or ``optimizer``."""
    micro_batch: int
    """0-based micro-batch of the step (the last one's for the optimizer)."""


@dataclass
class MemoryPlan:
    """One rank's memory over one training step."""

    peak_bytes: int
    """Most bytes live at once (tensors only: no allocator rounding, NCCL or cuBLAS buffers)."""
    breakdown: dict[str, int]
    """Category -> bytes at the peak (BREAKDOWN_KEYS)."""
    moment: PeakMoment
    """Where the peak happened."""
    micro_batches: int
    """Forward/backward passes per step on this rank."""
    simulated_micro_batches: int
    """How many of them the simulation ran (SIMULATED_MICRO_BATCHES, or all)."""
    sharded: bool
    """Whether FSDP shards the model."""
    param_dtype: str
    """Dtype the blocks compute in."""
    notes: list[str] = field(default_factory=list)
    """Settings the simulation chose for the planned device."""


class _PeakMomentMixin:
    """Records the module, phase and micro-batch at every new peak of a torch memory tracker."""

    micro_batch = 0
    moment = PeakMoment("(before the step)", "forward", 0)

    compiled_step = False
    """Whether the tracked step compiles its blocks (``compile: true``)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Dynamo compiles nothing while a dispatch mode that wants to see compilation's own ops
        # is active. For a compiled step the tracker says it does not, so the blocks stay
        # compiled (PLAN_COMPILE_BACKEND then runs their graphs op by op, tracked). Otherwise
        # dynamo must keep skipping: a function compiled with Inductor on its own (the
        # 'compiled' activation backend) would run its kernels on fake tensors.
        return cls.compiled_step

    def _update_peak_stats(self, peak_state) -> None:
        # Only the step's peak: the trackers' per-module peaks (a loop over every module and a
        # deep copy at each op) took most of the simulation's time and are not reported.
        new_peak = False
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)
                new_peak = True
        if new_peak:
            names = [n for n in self._mod_tracker.parents if n != "Global"]
            if self._in_opt:
                phase = "optimizer"
            else:
                phase = "backward" if self._mod_tracker.is_bw else "forward"
            module = max(names, key=len) if names else "(no module: the loss or the optimizer)"
            self.moment = PeakMoment(module, phase, self.micro_batch)


class _FSDPTracker(_PeakMomentMixin, FSDPMemTracker):
    # FSDP's own forward hooks are skipped by dynamo (torch._dynamo.config.skip_fsdp_hooks):
    # the tracker's wrappers of them are too, so a compiled block keeps the graphs it has in a
    # real run instead of breaking at the tracker's bookkeeping.
    def _fsdp_state_pre_forward(self, fsdp_mod, orig_pre_forward):
        return torch._dynamo.disable(super()._fsdp_state_pre_forward(fsdp_mod, orig_pre_forward))

    def _fsdp_state_post_forward(self, fsdp_mod, orig_post_forward):
        return torch._dynamo.disable(super()._fsdp_state_post_forward(fsdp_mod, orig_post_forward))


class _PlainTracker(_PeakMomentMixin, MemTracker):
    pass


class _StepTrainer:
    """What the train module asks of olmo-core's Trainer in one step (step counters; metrics
    are recorded as device tensors and not needed for the plan)."""

    global_step = 1
    max_steps = 2

    def record_metric(self, *args, **kwargs) -> None:
        return None


def _outside_fake_mode(function):
    """``function`` run with real tensors: device meshes keep their rank tables in (a few ints
    of) tensors and read them back (``tolist``, ``nonzero``), which a FakeTensor cannot answer."""

    def run(*args, **kwargs):
        with unset_fake_temporarily():
            return function(*args, **kwargs)

    return run


@contextlib.contextmanager
def _meshes_outside_fake_mode() -> Iterator[None]:
    """Building a mesh (parallelism's init_device_mesh, FSDP's and DTensor's own), and slicing
    one (the expert-parallel "ep" and "efsdp" dims), run with real tensors."""
    with (
        mock.patch.object(parallelism_lib, "init_device_mesh",
                          _outside_fake_mode(parallelism_lib.init_device_mesh)),
        mock.patch.object(DeviceMesh, "__init__", _outside_fake_mode(DeviceMesh.__init__)),
        mock.patch.object(DeviceMesh, "__getitem__", _outside_fake_mode(DeviceMesh.__getitem__)),
    ):  # fmt: skip
        yield


PLAN_COMPILE_BACKEND = "aot_eager_decomp_partition"
"""How a ``compile: true`` step is simulated: torch's debug backend that captures the same graphs
as Inductor, applies Inductor's decompositions and its min-cut partitioner (what each block saves
for backward and what its backward recomputes), then runs the graphs op by op, where the memory
tracker sees every tensor. Inductor's generated kernels would need a C++ or GPU compiler (minutes
here) and allocate inside fused kernels, invisible to a dispatch-mode tracker."""


@contextlib.contextmanager
def _compiled_as_inductor_partitions() -> Iterator[None]:
    """``Module.compile`` (what ``compile: true`` calls on each block) with PLAN_COMPILE_BACKEND;
    a fresh dynamo cache so no graph of an earlier plan (other shapes) is reused."""
    compile_module = torch.nn.Module.compile

    def compile_for_plan(module, *args, **kwargs):
        return compile_module(module, *args, **{**kwargs, "backend": PLAN_COMPILE_BACKEND})

    torch._dynamo.reset()
    try:
        with mock.patch.object(torch.nn.Module, "compile", compile_for_plan):
            yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def _simulation_patches(*, meshes: bool, compiled: bool, on_cpu: bool) -> Iterator[None]:
    """Meshes built with real tensors (a fake step); for a ``compile: true`` step, trackers that
    let dynamo compile, and on CPU (fake or real tensors) blocks compiled with
    PLAN_COMPILE_BACKEND (on a GPU: Inductor, as the run compiles them)."""
    with contextlib.ExitStack() as stack:
        if meshes:
            stack.enter_context(_meshes_outside_fake_mode())
        if compiled:
            stack.enter_context(mock.patch.object(_PeakMomentMixin, "compiled_step", True))
        if compiled and on_cpu:
            stack.enter_context(_compiled_as_inductor_partitions())
        yield


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """torch's fake backend (no communication) for this process as rank 0 of ``world_size``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; plan in a fresh process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_plannable(cfg: TrainConfig, world_size: int) -> None:
    """Errors the real launch would raise for ``world_size`` processes, before any work."""
    cfg.validate_parallel(world_size)
    cfg.validate_batch_sizes(world_size)


def _mark_gradient_accumulators(model, tracker: FSDPMemTracker) -> None:
    """FSDP2 keeps the fp32 sums of unsharded gradients between micro-batches (no gradient sync)
    in ``unsharded_accumulated_grad``, which the tracker, seeing them made in backward, counts as
    temporaries: name them what they are (before the next micro-batch, where the peak falls)."""
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            if fsdp_param.unsharded_accumulated_grad is not None:
                tracker._update_and_maybe_create_winfos(
                    fsdp_param.unsharded_accumulated_grad, _FSDPRefType.UNSHARDED_GRAD
                )


def _fill_optimizer_state(train_module) -> None:
    """One update from zero gradients: the optimizer allocates its state as it does at step 1."""
    for p in train_module.model.parameters():
        p.grad = torch.zeros_like(p)
    train_module.optim.step()
    train_module.zero_grads()


def _one_step(train_module, batch: dict) -> None:
    """The trainer's step: train_batch (all micro-batches), clipping, the optimizer update.
    (optim_step's non-finite check reads two flags on the host, which fake tensors cannot.)

    Clipping runs untracked: it makes only scalars and scales the gradients in place, but on
    fake tensors DTensor's sharding propagation of its foreach ops runs in the tracked fake mode
    on whole-gradient shapes (a full fp32 gradient that no real run allocates: measured on
    gloo, the real clipping never set the peak)."""
    train_module.train_batch(batch)
    with _disable_current_modes():
        train_module._grad_norm()
    train_module.optim.step()
    train_module.zero_grads()


def _with_model(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of ``cfg`` whose model config has ``changes``, set on the built configs (no
    validation: the planner's own substitutions, which a training config may refuse)."""
    planned = dataclasses.replace(cfg)
    planned.model = dataclasses.replace(cfg.model, **changes)
    return planned


def force_balance(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the MoE layers' forced balance on (model.moe_force_balance), which its
    validation refuses for training: for planning only."""
    return _with_model(cfg, moe_force_balance=True)


def build_meta_model(cfg: TrainConfig):
    """The model on the meta device (outside any fake mode: module.to() cannot swap a meta
    parameter for a fake one); ConfigError when the config does not describe a buildable one."""
    try:
        return cfg.model.build(init_device="meta")
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"the model cannot be built: {str(err).splitlines()[0]}") from None


def _build_train_module(cfg: TrainConfig, model, device: torch.device, planned: str | None,
                        fake: bool):  # fmt: skip
    if fake:
        # Initial values do not change memory; the init draws read values back (rejection
        # sampling), which fake tensors cannot.
        model.init_weights = lambda: None
    train_module = train_module_lib.MoETrainModule(
        model, train_module_lib.train_module_config(cfg), device, planned_device_type=planned
    )
    train_module._attach_trainer(_StepTrainer())
    return train_module


SIMULATED_MICRO_BATCHES = 3
"""Micro-batches a plan runs: the first (it creates the gradient accumulators), the second (the
state every later one but the last repeats exactly: same tensors, same sizes) and the last (it
reduces the gradients). Planning OLMoE-1B-7B on 8 GPUs then takes 3 passes instead of 32."""


def _rank_batch(cfg: TrainConfig, sequences: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (sequences, cfg.model.max_sequence_length)
    ids = torch.randint(0, cfg.model.vocab_size, shape, generator=generator)
    batch = {"input_ids": ids.to(device)}
    if cfg.model.document_masking:
        # As the loaders mark them (moe_model.attention.document_ids); the masks' sizes depend
        # on the shapes only. eos_token_id appears in random ids at its rate in the vocabulary.
        eos = cfg.data.eos_token_id if cfg.data.eos_token_id is not None else 0
        batch["doc_ids"] = attention.document_ids(ids, eos).to(device)
    return batch


def simulate_step(
    cfg: TrainConfig,
    world_size: int,
    *,
    fake: bool = True,
    planned_device_type: str = "cuda",
    all_micro_batches: bool = False,
) -> MemoryPlan:
    """Track one training step of ``cfg`` on rank 0 of ``world_size`` processes (see the module
    docstring). ``fake=False`` runs real tensors in the current process group (or none).
    Runs SIMULATED_MICRO_BATCHES of the step's micro-batches unless ``all_micro_batches``."""
    check_plannable(cfg, world_size)
    notes = []
    splits_by_count = {
        "expert parallelism": cfg.parallel.expert_parallel_degree > 1,
        "per-expert activation sets": cfg.model.moe_activation_per_expert,
    }
    if any(splits_by_count.values()) and not cfg.model.moe_force_balance:
        # These split rows by the router's counts on the host, values a FakeTensor lacks; under
        # forced balance the counts follow from the shapes (T*K/E rows per expert, T*K/P to each
        # rank) and the router's matmul, softmax and losses still run.
        cfg = force_balance(cfg)
        what = " and ".join(name for name, on in splits_by_count.items() if on)
        notes.append(
            f"{what} planned with balanced routing (every expert T*K/E rows): an expert, or a "
            "rank, that receives more rows holds more activations"
        )
    if cfg.compile and cfg.model.document_masking and cfg.model.document_masking_backend == "flex":
        # flex compiles its block-mask builder with Inductor on its own, whose kernels cannot run
        # on fake tensors once the tracker lets dynamo compile the blocks.
        cfg = _with_model(cfg, document_masking_backend="sdpa")
        notes.append(
            "document masking planned with sdpa's boolean mask (flex's mask builder is an "
            "Inductor kernel): an upper bound on flex's memory"
        )
    # Real tensors of a planned CUDA run (the GPU round's comparison) live on the GPU.
    on_gpu = not fake and planned_device_type == "cuda" and torch.cuda.is_available()
    micro_size = cfg.device_train_microbatch_size
    micro_batches = cfg.global_train_batch_size // world_size // micro_size
    simulated = micro_batches if all_micro_batches else min(micro_batches, SIMULATED_MICRO_BATCHES)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    planned = planned_device_type if planned_device_type != device.type else None
    needs_group = fake and (world_size > 1 or planned == "cuda")
    group = fake_process_group(world_size) if needs_group else contextlib.nullcontext()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    on_cpu = device.type == "cpu"
    patches = _simulation_patches(meshes=fake, compiled=cfg.compile, on_cpu=on_cpu)
    if cfg.compile and on_cpu:
        notes.append(
            f"compile=true planned with the {PLAN_COMPILE_BACKEND} backend: Inductor's graphs, "
            "decompositions and saved tensors, run op by op (Inductor's fused kernels make "
            "fewer temporaries)"
        )
    model = build_meta_model(cfg)
    with group, patches, mode:
        train_module = _build_train_module(cfg, model, device, planned, fake)
        batch = _rank_batch(cfg, simulated * micro_size, device)
        _fill_optimizer_state(train_module)
        model = train_module.model
        if isinstance(model, FSDPModule):
            tracker = _FSDPTracker(model, train_module.optim)
            tracker.track_inputs((batch["input_ids"],))
        else:
            tracker = _PlainTracker()
            tracker.track_external(model, train_module.optim, batch["input_ids"])

        counter = [0]

        def count_micro_batch(module, args) -> None:
            if module is model and torch.is_grad_enabled():
                tracker.micro_batch = counter[0]
                counter[0] += 1
                # The trackers keep per-module snapshots of one pass only (and refuse a
                # second); the step's peak, what the plan reads, is kept across passes.
                tracker.reset_mod_stats()
                if isinstance(tracker, FSDPMemTracker):
                    _mark_gradient_accumulators(model, tracker)

        # A global hook registered before the tracker's own (on entering it): runs first.
        handle = register_module_forward_pre_hook(count_micro_batch)
        try:
            with tracker:
                _one_step(train_module, batch)
        finally:
            handle.remove()
        snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()), {"Total": 0})
    breakdown = dict.fromkeys(BREAKDOWN_KEYS, 0)
    for kind, nbytes in snapshot.items():
        if kind in CATEGORIES:
            breakdown[CATEGORIES[kind]] += nbytes
    if planned == "cuda":
        notes.append("CUDA run simulated on fake CPU tensors (same FSDP2 code path)")
    moment = tracker.moment
    if moment.micro_batch == simulated - 1:  # the last one ran as the step's last
        moment = dataclasses.replace(moment, micro_batch=micro_batches - 1)
    return MemoryPlan(
        peak_bytes=int(snapshot.get("Total", sum(breakdown.values()))),
        breakdown=breakdown,
        moment=moment,
        micro_batches=micro_batches,
        simulated_micro_batches=counter[0],
        sharded=train_module.sharded,
        param_dtype=str(train_module.param_dtype).removeprefix("torch."),
        notes=notes,
    )
