"""``compile: true`` compiles what it says: with activation checkpointing too, every block is one
graph with no break, and the compiled step's loss and gradients equal the eager step's within
bf16 noise.

bf16, as on a GPU (the MoE experts' grouped_mm traces only in bf16; see
tests/moe_model/test_graph_breaks.py). The backend is ``aot_eager``: the graph dynamo captures
and AOTAutograd's joint forward/backward, run op by op. Inductor's C++ code generation would
take minutes on this test machine's 2 shared cores and adds nothing to what is checked here
(that the model traces whole and the traced step computes the same thing).
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from moe_model.config import ModelConfig
from olmo.config import TrainConfig
from olmo.metric_names import CE_LOSS, LB_LOSS
from olmo.train_module import MoETrainModule, train_module_config

from .test_cuda_syncs import TrainerStandIn, batch

VOCAB, SEQ = 64, 16


def recording_aot_eager(graphs: list[set[str]]):
    """The aot_eager backend, noting the ops of each graph dynamo hands it (checkpointed
    regions are submodules of the graph)."""
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append({
            str(node.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for node in m.graph.nodes
        })  # fmt: skip
        return aot_eager(gm, example_inputs)

    return backend


def step(
    precision: str, compile_blocks: bool, monkeypatch, graphs: list | None = None
) -> tuple[dict, dict]:
    """One train_batch; returns (gradients in fp32, recorded metrics)."""
    if compile_blocks:
        compile_module = torch.nn.Module.compile
        backend = recording_aot_eager(graphs)
        monkeypatch.setattr(
            torch.nn.Module, "compile",
            lambda self, **kw: compile_module(self, backend=backend, **kw),
        )  # fmt: skip
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, embedding_size=VOCAB, d_model=32, n_layers=2, n_heads=2,
        max_sequence_length=SEQ, activation_type="polynorm", mlp_hidden_size=24,
        moe_num_experts=4, moe_top_k=2, moe_capacity_factor=1.0, moe_shared_experts=1,
    )  # fmt: skip
    cfg = TrainConfig(
        model=config, precision=precision, global_train_batch_size=4,
        device_train_microbatch_size=2, compile=compile_blocks, activation_checkpointing=True,
    )  # fmt: skip
    module = MoETrainModule(config.build(), train_module_config(cfg), torch.device("cpu"))
    module._attach_trainer(TrainerStandIn())
    step_batch = batch()
    step_batch.pop("source")
    module.train_batch(step_batch)
    grads = {n: p.grad.float() for n, p in module.model.named_parameters()}
    return grads, module.trainer.metrics


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    return {
        n: ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)).item()
        for n in want
    }


def test_compiled_step_is_one_graph_per_block_and_matches_eager(monkeypatch):
    reference, ref_metrics = step("fp32", False, monkeypatch)
    eager, eager_metrics = step("bf16", False, monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[set[str]] = []
    compiled, compiled_metrics = step("bf16", True, monkeypatch, graphs)

    # Every block traced whole, checkpoint included: no break, no frame left to eager, and the
    # graph holds the checkpointed block with the MoE experts. (The two blocks share one graph:
    # dynamo passes each block's parameters as inputs.)
    assert dict(counters["graph_break"]) == {}
    assert counters["frames"]["total"] == counters["frames"]["ok"] >= 1
    assert graphs
    for ops in graphs:
        assert any("checkpoint" in op for op in ops) and any("grouped_mm" in op for op in ops), ops

    # bf16 noise: how far eager bf16 lands from fp32. The compiled step rounds differently
    # (AOTAutograd's decompositions), so it may land elsewhere, but no farther from fp32 than
    # eager bf16 does (twice that, for the two ways of rounding).
    noise = relative_errors(eager, reference)
    off = relative_errors(compiled, reference)
    worse = {n: (off[n], noise[n]) for n in noise if off[n] > 2 * max(noise[n], 1e-3)}
    assert not worse, f"compiled step farther from fp32 than bf16 noise: {worse}"
    for name in (CE_LOSS, LB_LOSS):
        bf16_noise = abs(float(eager_metrics[name]) - float(ref_metrics[name]))
        got = abs(float(compiled_metrics[name]) - float(ref_metrics[name]))
        assert got <= 2 * bf16_noise + 1e-3 * abs(float(ref_metrics[name])), name


def test_fp32_compile_of_moe_blocks_warns(caplog):
    """fp32 experts cannot trace (grouped_mm's fake rule is bf16-only): the run says so instead
    of silently compiling around a graph break in every MoE block."""
    from olmo.parallelism import parallelize_model

    def model(**changes):
        return ModelConfig(
            vocab_size=VOCAB, embedding_size=VOCAB, d_model=32, n_layers=1, n_heads=2,
            max_sequence_length=SEQ, mlp_hidden_size=24, moe_num_experts=4, moe_top_k=2,
            **changes,
        ).build("meta")  # fmt: skip

    cases = {
        "fp32 moe": (model(), torch.float32, True),
        "bf16 moe": (model(), torch.bfloat16, False),
        "fp32 dense": (model(block_type="dense"), torch.float32, False),
    }
    for name, (built, dtype, warns) in cases.items():
        caplog.clear()
        parallelize_model(built, device=torch.device("cpu"), param_dtype=dtype,
                          activation_checkpointing=False, compile_blocks=True)  # fmt: skip
        assert ("fp32 MoE experts" in caplog.text) == warns, name
