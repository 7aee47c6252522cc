"""FSDP2 inside MoETrainModule, 2 gloo processes on CPU: gradient sync once per step, and
PolyNorm coefficients that stay fp32 under a bf16 param dtype."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from .helpers import REPO, TEST_CONFIG, free_port

_SCRIPT = textwrap.dedent(
    """
    import sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import moe_model.activations as activations
    from olmo.config import load_config
    from olmo.train_module import MoETrainModule, activation_modules_with_params

    CONFIG = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failures = []


    def check(ok, message):
        if not ok:
            failures.append(f"rank {rank}: {message}")


    def build(*overrides):
        cfg = load_config(CONFIG, list(overrides))
        tm = MoETrainModule(cfg.model.build(init_device="meta"), cfg, torch.device("cpu"))
        # train_batch / optim_step read only these from olmo-core's Trainer.
        tm._trainer = SimpleNamespace(global_step=1, max_steps=8, record_metric=lambda *a, **k: None)
        return cfg, tm


    # Every rank draws the same global batch and trains on its own 8 sequences: 4 micro-batches.
    gen = torch.Generator().manual_seed(5)
    global_ids = torch.randint(0, 512, (8 * world, 32), generator=gen)
    batches = [{"input_ids": global_ids[8 * r : 8 * (r + 1)]} for r in range(world)]
    NUM_MICRO = 4

    # ---- gradient sync: one reduce-scatter per FSDP group per step -------------------------
    calls = {"n": 0, "depth": 0}


    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += calls["depth"] == 0  # an op calling another counts once
            calls["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                calls["depth"] -= 1

        return wrapper


    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name)))

    grads, counts = {}, {}
    for every in (False, True):
        cfg, tm = build("--precision=fp32", f"--reduce_grads_every_microbatch={every}")
        calls["n"] = 0
        tm.train_batch(dict(batches[rank]))
        counts[every] = calls["n"]
        grads[every] = {n: p.grad.full_tensor() for n, p in tm.model.named_parameters()}
    check(counts[False] > 0, "no reduce-scatter at all")
    check(
        counts[True] == NUM_MICRO * counts[False],
        f"reduce-scatters per step: {counts[False]} syncing on the last micro-batch only, "
        f"{counts[True]} syncing every one ({NUM_MICRO} micro-batches)",
    )

    # Reference: the same model whole, each rank's batch in turn, losses normalised as
    # train_batch does, gradients averaged over ranks as FSDP's reduce-scatter does.
    torch.manual_seed(cfg.seed)
    ref = cfg.model.build(init_device="meta")
    ref.to_empty(device="cpu")
    ref.init_weights()
    for batch in batches:
        ids = batch["input_ids"]
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)
        n_tokens = (labels != -100).sum()
        for ids_mb, labels_mb in zip(ids.chunk(NUM_MICRO), labels.chunk(NUM_MICRO)):
            out = ref(ids_mb)
            ce = F.cross_entropy(out.logits.flatten(0, 1), labels_mb.flatten(), reduction="sum")
            loss = ce / n_tokens + (out.lb_loss + out.z_loss) / NUM_MICRO
            (loss / world).backward()
    for name, p in ref.named_parameters():
        for every in (False, True):
            try:
                torch.testing.assert_close(grads[every][name], p.grad, rtol=1e-5, atol=1e-7)
            except AssertionError as err:
                check(False, f"every={every} {name}: {str(err).splitlines()[-1]}")

    # ---- PolyNorm coefficients under bf16 params --------------------------------------------
    real_poly_norm = activations.poly_norm
    seen = []


    def spy(x, weight, bias, eps, backend="auto"):
        y = real_poly_norm(x, weight, bias, eps, backend)
        seen.append((x.dtype, y.dtype, weight.detach().clone(), bias.dtype))
        return y


    activations.poly_norm = spy
    for per_expert in (False, True):
        cfg, tm = build("--precision=bf16", f"--model.moe_activation_per_expert={per_expert}")
        seen.clear()
        tm.train_batch(dict(batches[rank]))
        tm.optim_step()
        sets = cfg.model.moe_num_experts if per_expert else 1
        check(len(seen) == NUM_MICRO * cfg.model.n_layers * sets, f"{len(seen)} activation calls")
        for x_dtype, y_dtype, weight, bias_dtype in seen:
            check(x_dtype == y_dtype == torch.bfloat16, f"activation in/out {x_dtype}, {y_dtype}")
            check(weight.dtype == bias_dtype == torch.float32, f"coefficients {weight.dtype}")
            # The fp32 init 1/3 exactly; bf16 would have made it 0.333984375.
            check(torch.equal(weight, torch.full((3,), 1 / 3)), f"coefficients {weight.tolist()}")
        acts = [m for block in tm.model.blocks for m in activation_modules_with_params(block)]
        check(len(acts) == cfg.model.n_layers * sets, f"{len(acts)} coefficient sets")
        for act in acts:
            weight = act.weight.full_tensor()
            check(weight.dtype == torch.float32, f"master {weight.dtype}")
            check(not torch.equal(weight, torch.full((3,), 1 / 3)), "coefficients did not train")
    activations.poly_norm = real_poly_norm

    dist.destroy_process_group()
    if failures:
        sys.exit("\\n".join(failures))
    print("ok")
    """
)


def test_fsdp_grad_sync_and_fp32_coefficients(tmp_path):
    """2 gloo ranks: the gradient is reduce-scattered once per step, not once per micro-batch,
    and equals the whole-model reference either way; under bf16 params the PolyNorm forward gets
    the exact fp32 coefficients (shared and per-expert sets) and they train."""
    script = tmp_path / "fsdp_train_module.py"
    script.write_text(_SCRIPT)
    # The repo first, then whatever the caller's path holds (carried wheels on a GPU machine).
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script), TEST_CONFIG],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2
