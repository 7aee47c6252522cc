#!/usr/bin/env python
"""Expert parallelism: where one MoE layer's time goes, and how many bytes it moves.

Each case runs N processes (torchrun: gloo on CPU, NCCL on GPU, one GPU per process), each
with its own tokens, through one MoE layer in two ways:

* ``local``: every rank holds all E experts and sorts its rows locally (LocalDispatcher: what
  each rank computes under plain FSDP once the experts are gathered);
* ``ep``: the N ranks form one EP group, each holding E/N experts, rows sent by all-to-all
  (AllToAllDispatcher).

The layer runs stage by stage, forward then backward, each stage timed alone: ``dispatch``
(sort; with EP the count exchange, one host sync and the row all-to-all), ``experts`` (grouped
matmuls and the activation), ``combine`` (with EP the all-to-all back, then the weighted sum).
The router is timed forward only (it does not depend on the dispatcher). Times are medians over
iterations of the slowest rank in each. Bytes moved: the rows each rank sends to other ranks
in the four all-to-alls of forward + backward (rows x d_model x element size), summed over
ranks, plus the count exchange.

``--estimate`` prints instead the arithmetic estimate of OLMoE-1B-7B's communication per step
on 8 nodes x 8 GPUs (see ``paper_estimate``): no measurement.

    python -m benchmarks.bench_expert_parallel                    # CPU: 2 and 4 processes
    python -m benchmarks.bench_expert_parallel --device cuda --nproc 2 4 8
    python -m benchmarks.bench_expert_parallel --quick            # smoke test
    python -m benchmarks.bench_expert_parallel --estimate         # -> expert_parallel_estimate.json
    python -m benchmarks.bench_expert_parallel --force-balance    # every expert T*K/E rows

``--force-balance`` routes round-robin (model.moe_force_balance, moe_model/routing.py): every
expert, and so every EP rank, gets the same rows; the all-to-all sizes carry no routing noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_common import (
    REPO,
    Benchmark,
    Run,
    median,
    pick_device,
    run_benchmark,
    time_phases,
)

STAGES = ("dispatch", "experts", "combine")
PHASES = ("route", "dispatch_fwd", "experts_fwd", "combine_fwd",
          "combine_bwd", "experts_bwd", "dispatch_bwd")  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---- worker (one per process) -----------------------------------------------------------------


def layer_model_config(args):
    """The one-layer model config whose MoE layer every rank runs."""
    from moe_model.config import ModelConfig

    return ModelConfig(
        d_model=args.d_model, n_layers=1, n_heads=1, activation_type=args.activation,
        mlp_hidden_size=args.hidden, moe_num_experts=args.experts, moe_top_k=args.top_k,
        moe_force_balance=args.force_balance,
    )  # fmt: skip


def _staged_phases(layer, x_TD: torch.Tensor, g_TD: torch.Tensor, traffic: dict):
    """A ``time_phases`` factory: the layer's stages forward, then backward in reverse, each a
    separate autograd graph (stage inputs are fresh leaves) so each can be timed alone."""
    import torch.distributed as dist

    from moe_model.moe import compute_dtype

    def phases():
        layer.zero_grad(set_to_none=True)
        dist.barrier()  # every rank starts the iteration together
        s: dict = {}

        def route():
            r = layer.route(x_TD)
            s["experts_TK"] = r.experts_TK
            s["counts_E"] = r.tokens_per_expert_E
            s["weights_TK"] = r.weights_TK.detach().requires_grad_()

        def dispatch_fwd():
            s["x_in"] = x_TD.detach().to(compute_dtype(x_TD)).requires_grad_()
            s["x_RD"], s["rows"], s["dispatched"] = layer.dispatcher.dispatch(
                s["x_in"], s["experts_TK"], s["counts_E"]
            )

        def experts_fwd():
            s["x_leaf"] = s["x_RD"].detach().requires_grad_()
            s["y_RD"] = layer.experts(s["x_leaf"], s["rows"], layer._impl(s["x_leaf"]))

        def combine_fwd():
            s["y_leaf"] = s["y_RD"].detach().requires_grad_()
            s["y_TD"] = layer.dispatcher.combine(s["y_leaf"], s["weights_TK"], s["dispatched"])

        def combine_bwd():
            s["y_TD"].backward(g_TD)

        def experts_bwd():
            s["y_RD"].backward(s["y_leaf"].grad)

        def dispatch_bwd():
            s["x_RD"].backward(s["x_leaf"].grad)
            traffic["dispatched"] = s["dispatched"]

        return [route, dispatch_fwd, experts_fwd, combine_fwd, combine_bwd, experts_bwd,
                dispatch_bwd]  # fmt: skip

    return phases


def _off_rank_rows(dispatched, rank: int) -> int:
    """Rows this rank sends to other ranks over forward + backward: dispatch and the combine
    gradient send its rows out; combine and the dispatch gradient send received rows back."""
    sent = sum(dispatched.send_splits) - dispatched.send_splits[rank]
    received = sum(dispatched.recv_splits) - dispatched.recv_splits[rank]
    return 2 * (sent + received)


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from moe_model.moe import MoELayer

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    cfg = layer_model_config(args)
    gen = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(args.tokens, args.d_model, generator=gen).to(device, dtype)
    g_TD = torch.randn(args.tokens, args.d_model, generator=gen).to(device, dtype)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    for mode in ("local", "ep"):
        torch.manual_seed(0)  # the same weights on every rank and in both modes
        layer = MoELayer(cfg.moe_layer_config(), init_device="cpu").to(device, dtype)
        if mode == "ep":
            layer.parallelize(mesh["ep"])
        traffic: dict = {}
        times = time_phases(_staged_phases(layer, x_TD, g_TD, traffic), device=device,
                            warmup=args.warmup, iters=args.iters)  # fmt: skip
        # Per phase and iteration, the slowest rank's time (the others wait for it).
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        off_rank = torch.tensor(
            [_off_rank_rows(traffic["dispatched"], rank) if mode == "ep" else 0]
        )
        dist.all_reduce(off_rank)
        row = {"ranks": world, "mode": mode}
        for phase, per_iter in zip(PHASES, slowest.tolist()):
            row[phase], row[f"{phase}_all"] = median(per_iter), per_iter
        for stage in STAGES:
            row[stage] = row[f"{stage}_fwd"] + row[f"{stage}_bwd"]
        row["total"] = row["route"] + sum(row[stage] for stage in STAGES)
        row["dispatch_share_pct"] = 100 * (row["dispatch"] + row["combine"]) / row["total"]
        row["off_rank_rows"] = int(off_rank)
        counts_bytes = world * (world - 1) * (args.experts // world) * 8 if mode == "ep" else 0
        row["moved_mb"] = (int(off_rank) * args.d_model * element + counts_bytes) / 1e6
        rows.append(row)
    if rank == 0:
        Path(args.result).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


# ---- paper estimate (arithmetic only) ---------------------------------------------------------


def paper_estimate(
    *, nodes: int = 8, gpus_per_node: int = 8, ep: int = 8, global_batch: int = 1024,
    micro_batch: int = 4, param_bytes: int = 2, grad_bytes: int = 4, act_bytes: int = 2,
    nvlink_gbs: float = 450.0, nic_gbs: float = 50.0, gpu: str = "H100 SXM",
) -> list[dict]:  # fmt: skip
    """Bytes received per GPU per optimizer step for OLMoE-1B-7B (configs/olmoe-1b-7b-swiglu.yaml),
    without and with expert parallelism. Arithmetic, not a measurement. Assumptions:

    * uniform routing: a row leaves its rank with probability (ep-1)/ep; no drops;
    * FSDP2 as olmo/train_module.py sets it up: every block's parameters all-gathered in each
      micro-batch's forward and again in its backward (reshard after forward), bf16; gradients
      reduce-scattered in fp32 once per step; a collective over n ranks delivers (n-1)/n of the
      gathered (or reduced) tensor to each rank, of which the share from other nodes crosses
      the network;
    * expert parallelism: EP groups of ``ep`` GPUs inside a node (NVLink), experts FSDP-sharded
      over the other ``nodes*gpus/ep`` ranks (one per node), everything else over all GPUs;
    * no activation checkpointing (it would repeat each forward's all-to-alls in backward);
    * link time: bytes over datasheet bandwidths per GPU and direction (H100 SXM NVLink 450 GB/s;
      one 400 Gb/s NIC per GPU, 50 GB/s), no overlap with compute: a lower bound;
    * for scale, the step's compute at ``gpu``'s datasheet dense bf16 peak (olmo/flops.py; H100
      SXM 989.5 TFLOP/s) of ModelConfig.num_flops_per_token, also a lower bound.
    """
    from olmo.config import load_config
    from olmo.flops import datasheet_peak_flops

    _, peak_flops = datasheet_peak_flops(gpu, torch.bfloat16)

    model = load_config(REPO / "configs" / "olmoe-1b-7b-swiglu.yaml").model
    gpus = nodes * gpus_per_node
    tokens_per_gpu = global_batch * model.max_sequence_length // gpus
    micro_steps = global_batch // gpus // micro_batch
    total = model.num_params()
    expert = model.n_layers * model.moe_num_experts * model._ffn_params(model.mlp_hidden_size)
    dense = total - expert

    def collective(n_params: int, group: int, bytes_per: float, times: int, per_node: int):
        """(bytes received, of which from other nodes) per GPU: ``times`` collectives of
        ``n_params`` over ``group`` ranks placed ``per_node`` to a node."""
        size = times * n_params * bytes_per
        return size * (group - 1) / group, size * (group - per_node) / group

    def gather(n_params, group, per_node):  # forward and backward of every micro-batch
        return collective(n_params, group, param_bytes, 2 * micro_steps, per_node)

    def reduce(n_params, group, per_node):
        return collective(n_params, group, grad_bytes, 1, per_node)

    rows_per_gpu = tokens_per_gpu * model.moe_top_k
    # Dispatch and combine, forward and backward: four exchanges of the off-rank rows per layer.
    a2a = 4 * rows_per_gpu * (ep - 1) / ep * model.d_model * act_bytes * model.n_layers
    column = gpus // ep
    setups = {
        f"FSDP over {gpus} GPUs (ep=1)": (
            0.0, [gather(total, gpus, gpus_per_node)], [reduce(total, gpus, gpus_per_node)]
        ),
        f"ep={ep} in a node; experts FSDP over {column}, the rest over {gpus}": (
            a2a,
            [gather(expert // ep, column, 1), gather(dense, gpus, gpus_per_node)],
            [reduce(expert // ep, column, 1), reduce(dense, gpus, gpus_per_node)],
        ),
    }
    rows = []
    for setup, (all_to_all, gathers, reduces) in setups.items():
        received = all_to_all + sum(r for r, _ in gathers + reduces)
        inter_node = sum(x for _, x in gathers + reduces)
        rows.append({
            "setup": setup,
            "all_to_all_gb": all_to_all / 1e9,
            "param_allgather_gb": sum(r for r, _ in gathers) / 1e9,
            "grad_reduce_scatter_gb": sum(r for r, _ in reduces) / 1e9,
            "received_gb": received / 1e9,
            "inter_node_gb": inter_node / 1e9,
            "link_s": (received - inter_node) / (nvlink_gbs * 1e9) + inter_node / (nic_gbs * 1e9),
            "tokens_per_gpu": tokens_per_gpu, "micro_batches": micro_steps,
            "expert_params": expert, "other_params": dense,
            "compute_s_at_peak": model.num_flops_per_token(model.max_sequence_length)
            * tokens_per_gpu / peak_flops,
        })  # fmt: skip
    return rows


ESTIMATE_COLUMNS = [
    ("setup", "setup", ""), ("all_to_all_gb", "all-to-all GB", ".1f"),
    ("param_allgather_gb", "param all-gather GB", ".1f"),
    ("grad_reduce_scatter_gb", "grad reduce-scatter GB", ".1f"),
    ("received_gb", "received GB", ".1f"), ("inter_node_gb", "of which inter-node GB", ".1f"),
    ("link_s", "link time at datasheet bandwidth s", ".2f"),
]  # fmt: skip


# ---- driver -------------------------------------------------------------------------------------

COLUMNS = [
    ("ranks", "ranks", "d"), ("mode", "mode", ""), ("route", "route fwd ms", ".2f"),
    ("dispatch", "dispatch fwd+bwd ms", ".2f"), ("experts", "experts fwd+bwd ms", ".2f"),
    ("combine", "combine fwd+bwd ms", ".2f"), ("total", "layer ms", ".2f"),
    ("dispatch_share_pct", "dispatch+combine %", ".0f"),
    ("off_rank_rows", "rows sent off-rank", ",d"), ("moved_mb", "MB moved (all ranks)", ".2f"),
]  # fmt: skip
SHAPE = ("d_model", "hidden", "experts", "top_k", "tokens", "activation")
QUICK_SHAPE = {"d_model": 32, "hidden": 48, "experts": 4, "top_k": 2, "tokens": 64}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4], help="processes per case")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--hidden", type=int, default=768, help="expert hidden size H")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--activation", default="polynorm")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--force-balance", action="store_true",
                   help="route round-robin: every expert tokens*top_k/experts rows")  # fmt: skip
    p.add_argument("--estimate", action="store_true",
                   help="print the OLMoE-1B-7B arithmetic estimate instead of measuring")  # fmt: skip


def setup(run: Run) -> None:
    if run.quick:
        for key, value in QUICK_SHAPE.items():
            setattr(run.args, key, value)
    if run.args.estimate:
        run.args.name = run.args.name or "expert_parallel_estimate"
        run.settings.clear()
        run.extra.update(kind="arithmetic estimate, not a measurement",
                         assumptions=paper_estimate.__doc__)  # fmt: skip
        return
    run.args.dtype = run.args.dtype or ("bf16" if run.gpu else "fp32")
    run.settings.update(
        {k: getattr(run.args, k) for k in (*SHAPE, "dtype", "nproc", "force_balance")}
    )


def measure(run: Run):
    if run.args.estimate:
        yield from paper_estimate()
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    worker_args = [f"--device={run.args.device}", f"--dtype={run.args.dtype}",
                   f"--warmup={run.warmup}", f"--iters={run.iters}"]  # fmt: skip
    worker_args += [f"--{k.replace('_', '-')}={getattr(run.args, k)}" for k in SHAPE]
    worker_args += ["--force-balance"] if run.args.force_balance else []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in run.args.nproc:
            result = Path(tmp) / f"{nproc}.json"
            # --tee prefixes each rank's lines ("[default1]:"): a rank's own error (a C++
            # "terminate called ...", printed before torchrun's closing traceback) stays
            # attributable when several ranks write to one stderr.
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", f"--log-dir={tmp}/logs", "--tee=3",
                   "--module", __spec__.name, "--worker", "--result", str(result), *worker_args]  # fmt: skip
            subprocess.run(cmd, cwd=REPO, env=env, check=True)
            yield from json.loads(result.read_text())


def columns(run: Run):
    return ESTIMATE_COLUMNS if run.args.estimate else COLUMNS


def finish(run: Run, rows: list[dict]) -> None:
    if run.args.estimate:
        print("OLMoE-1B-7B on 8 x 8 GPUs, bytes received per GPU per step: ARITHMETIC "
              "ESTIMATE, not measured (assumptions: paper_estimate in this script)")
        print(f"{rows[0]['tokens_per_gpu']:,d} tokens per GPU per step in "
              f"{rows[0]['micro_batches']} micro-batches; compute at 100% of bf16 peak: "
              f"{rows[0]['compute_s_at_peak']:.2f} s per step")  # fmt: skip


def worker_main(argv: list[str]) -> int:
    """One torchrun rank (started by ``measure``), not a command for people."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--iters", type=int, required=True)
    add_arguments(p)
    worker(p.parse_args(argv))
    return 0


BENCHMARK = Benchmark(
    name="expert_parallel",
    doc=__doc__,
    add_arguments=add_arguments,
    setup=setup,
    measure=measure,
    columns=columns,
    finish=finish,
    devices=("cpu", "cuda"),
    timing={"cuda": (5, 20), "cpu": (2, 10), "quick": (1, 2)},
)

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(worker_main(argv) if "--worker" in argv else run_benchmark(BENCHMARK, argv))
