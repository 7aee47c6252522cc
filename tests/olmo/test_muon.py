"""Muon (olmo/muon.py): Newton-Schulz against an SVD reference, the step against torch.optim.Muon
and torch.optim.AdamW, the learning-rate rules, which parameters Muon takes, bad input, the
distributed step against a single-process one (2 and 4 gloo ranks, with and without expert
parallelism) and exact resume through a checkpoint."""

import math

import pytest
import torch
import torch.nn as nn

from moe_model.errors import ConfigError
from olmo import metric_names as names
from olmo.config import OPTIMIZER_NAMES, OptimizerConfig, load_config
from olmo.muon import (
    LR_SCALES,
    NS_COEFFICIENTS,
    MatrixLayout,
    MuonWithAdamW,
    muon_layouts,
    newton_schulz,
    newton_schulz_flops,
)
from olmo.optim import OPTIMIZERS, build_muon
from tests.moe_model.test_transformer import tiny_config

from .helpers import TEST_CONFIG, make_data, read_metrics, run_train, run_worker, tiny_overrides

F64 = torch.float64


def polar_reference(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """What the quintic iteration does, computed on the SVD in float64: each singular value of
    g / ||g||_F goes through p(s) = a s + b s^3 + c s^5 ``steps`` times; the singular vectors stay."""
    a, b, c = NS_COEFFICIENTS
    u, s, vh = torch.linalg.svd(g.to(F64), full_matrices=False)
    s = s / torch.linalg.vector_norm(g.to(F64), dim=(-2, -1), keepdim=True).squeeze(-1)
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag_embed(s) @ vh


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 24)], ids=["wide", "tall", "batch"])
def test_newton_schulz_matches_the_svd_reference_and_lands_near_the_polar_factor(shape):
    g = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    torch.testing.assert_close(out, polar_reference(g), rtol=0, atol=1e-12)
    # Its singular values lie in the quintic's band, not at 1: U S' V^T with S' in p's invariant
    # interval [0.6818, 1.1344] (p's maximum on [0, 1] is 1.2024 at 0.5545; p maps
    # [0.5545, 1.2024] onto [0.6818, 1.2024] and [0.6818, 1.2024] onto [0.6818, 1.1344]).
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6818 and s.max() < 1.1344, (s.min(), s.max())
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert (out - u @ vh).abs().max() < 0.33


def test_newton_schulz_on_2d_is_torch_muons():
    """The same ops as torch.optim.Muon's private iteration, so bf16 results agree bit for bit."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(20, 36, generator=torch.Generator().manual_seed(1))
    for m in (g, g.T):
        ours = newton_schulz(m, dtype=torch.bfloat16)
        theirs = _zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7)
        assert torch.equal(ours, theirs)


def _muon_group(params, **kw):
    group = {"params": params, "use_muon": True, "lr": 0.02, "weight_decay": 0.1, "momentum": 0.95,
             "lr_scale": "match_rms_adamw", "ns_steps": 5, "ns_dtype": "bf16"}  # fmt: skip
    return {**group, **kw}


def _run(optimizer, params, steps=3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


@pytest.mark.parametrize("lr_scale", ["match_rms_adamw", "original"])
def test_step_on_plain_matrices_is_torch_optim_muon(lr_scale):
    init = [torch.randn(16, 40), torch.randn(40, 16)]
    ours = [nn.Parameter(t.clone()) for t in init]
    theirs = [nn.Parameter(t.clone()) for t in init]
    layouts = {p: MatrixLayout(experts=False) for p in ours}
    _run(MuonWithAdamW([_muon_group(ours, lr_scale=lr_scale)], layouts), ours)
    _run(torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95,
                          adjust_lr_fn=lr_scale), theirs)  # fmt: skip
    for a, b in zip(ours, theirs):  # the same ops in the same order
        assert torch.equal(a, b)


def test_each_expert_and_each_gated_half_is_its_own_matrix():
    """An expert stack (E, D, 2H) of a gated layer steps as if every expert's w1 = [:, :H] and
    w3 = [:, H:] were separate 2-D matrices (the 2-D step is torch.optim.Muon's, above), float64."""
    e, d, h = 3, 12, 8
    stack = nn.Parameter(torch.randn(e, d, 2 * h, dtype=F64))
    pieces = [nn.Parameter(stack.detach()[i, :, j * h:(j + 1) * h].clone())
              for i in range(e) for j in range(2)]  # fmt: skip
    # A (D, H) piece as a 2-D matrix is (fan_in, fan_out); Moonlight's rule is symmetric.
    opts = [
        MuonWithAdamW([_muon_group([stack], ns_dtype=None)],
                      {stack: MatrixLayout(experts=True, pieces=2)}),
        MuonWithAdamW([_muon_group(pieces, ns_dtype=None)],
                      {p: MatrixLayout(experts=False) for p in pieces}),
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        stack.grad = torch.randn(stack.shape, dtype=F64, generator=gen)
        for k, p in enumerate(pieces):
            i, j = divmod(k, 2)
            p.grad = stack.grad[i, :, j * h:(j + 1) * h].clone()
        for opt in opts:
            opt.step()
    for k, p in enumerate(pieces):
        i, j = divmod(k, 2)
        torch.testing.assert_close(stack.detach()[i, :, j * h:(j + 1) * h], p.detach(),
                                   rtol=0, atol=1e-13)  # fmt: skip
    # Not the same as orthogonalising the fused D x 2H matrix.
    fused = MatrixLayout(experts=True).orthogonalise(stack.grad, 5, None)
    split = MatrixLayout(experts=True, pieces=2).orthogonalise(stack.grad, 5, None)
    assert (fused - split).abs().max() > 0.05


def test_lr_scale_rules_and_update_rms():
    """Moonlight: 0.2 sqrt(max(A, B)) makes the update's RMS 0.2 x that of NS's singular
    values (about 0.2, AdamW's); Keller Jordan: sqrt(max(1, fan_out / fan_in)), with fan_out of an
    expert stack (E, in, out) its last dim."""
    assert LR_SCALES["match_rms_adamw"](64, 256) == pytest.approx(0.2 * 16)
    assert LR_SCALES["original"](256, 64) == pytest.approx(2.0)
    assert LR_SCALES["original"](64, 256) == 1.0
    assert MatrixLayout(experts=True).fans(torch.Size([4, 64, 256])) == (256, 64)
    assert MatrixLayout(experts=True, pieces=2).fans(torch.Size([4, 64, 256])) == (128, 64)
    assert MatrixLayout(experts=False).fans(torch.Size([256, 64])) == (256, 64)
    p = nn.Parameter(torch.zeros(48, 96, dtype=F64))
    opt = MuonWithAdamW([_muon_group([p], lr=1.0, weight_decay=0.0, momentum=0.0, ns_dtype=None)],
                        {p: MatrixLayout(experts=False)})  # fmt: skip
    p.grad = torch.randn(48, 96, dtype=F64, generator=torch.Generator().manual_seed(4))
    opt.step()
    expected = -0.2 * math.sqrt(96) * polar_reference(p.grad)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    rms = p.detach().pow(2).mean().sqrt().item()
    assert 0.2 * 0.6818 < rms < 0.2 * 1.1344


def test_adamw_groups_step_as_torch_adamw():
    init = [torch.randn(7, 5), torch.randn(11)]
    ours = [nn.Parameter(t.clone()) for t in init]
    theirs = [nn.Parameter(t.clone()) for t in init]
    group = {"params": ours, "use_muon": False, "lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8,
             "weight_decay": 0.1}  # fmt: skip
    _run(MuonWithAdamW([group], {}), ours)
    _run(torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                           foreach=True), theirs)  # fmt: skip
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_config("swiglu", n_layers=2, moe_first_dense_layers=1,
                        moe_shared_experts=1).build("cpu")  # fmt: skip
    layouts = muon_layouts(model)
    everything = dict(model.named_parameters())
    adamw = set(everything) - set(layouts)
    assert adamw == {"embedding.weight", "lm_head.weight", "norm.weight",
                     "blocks.1.ffn.router.weight"} | {
        n for n, p in everything.items() if p.ndim == 1}  # fmt: skip
    assert layouts["blocks.1.ffn.w_in_EDH"] == MatrixLayout(experts=True, pieces=2)
    assert layouts["blocks.1.ffn.w_out_EHD"] == MatrixLayout(experts=True, pieces=1)
    assert layouts["blocks.1.ffn.shared_experts.0.w_in.weight"] == MatrixLayout(False, pieces=2)
    assert layouts["blocks.0.ffn.w_in.weight"] == MatrixLayout(False, pieces=2)  # dense block
    assert layouts["blocks.0.attn.q_proj.weight"] == MatrixLayout(False, pieces=1)
    optim = build_muon(model, OptimizerConfig(name="muon"))
    muon, *rest = optim.param_groups
    assert muon["use_muon"] and len(muon["params"]) == len(layouts)
    assert muon["ns_dtype"] == "fp32"  # the CPU default (bf16 on GPU)
    assert sum(len(g["params"]) for g in rest) == len(adamw)
    # PolyNorm coefficients stay out of weight decay under Muon too.
    poly = tiny_config("polynorm").build("cpu")
    groups = build_muon(poly, OptimizerConfig(name="muon")).param_groups
    no_decay = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert {id(p) for p in no_decay} == {id(p) for n, p in poly.named_parameters() if ".act." in n}
    assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES)


def test_unsupported_shapes_are_one_line_config_errors():
    model = tiny_config("polynorm").build("cpu")
    model.blocks[0].attn.register_parameter("kernel", nn.Parameter(torch.zeros(2, 3, 4, 5)))
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.kernel of shape \(2, 3, 4, 5\)") as e:
        muon_layouts(model)
    assert "\n" not in str(e.value)
    model = tiny_config("polynorm").build("cpu")
    model.blocks[1].attn.register_parameter("stack", nn.Parameter(torch.zeros(2, 3, 4)))
    with pytest.raises(ConfigError, match=r"blocks\.1\.attn\.stack .*expected 2 dims"):
        muon_layouts(model)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--optimizer.name=sgd"], r"optimizer.name='sgd' is unknown; expected one of \['adamw'"),
        (["--optimizer.muon_momentum=0.9"], r"optimizer.muon_momentum is a Muon option but "
                                            r"optimizer.name='adamw'"),
        (["--optimizer.name=muon", "--optimizer.muon_lr_scale=rms"],
         r"optimizer.muon_lr_scale='rms' is unknown"),
        (["--optimizer.name=muon", "--optimizer.muon_momentum=1.0"], r"muon_momentum=1.0 must"),
        (["--optimizer.name=muon", "--optimizer.muon_ns_dtype=fp16"], r"muon_ns_dtype='fp16'"),
    ],
)  # fmt: skip
def test_bad_optimizer_config_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(TEST_CONFIG, overrides)
    assert "\n" not in str(e.value)


def test_muon_learning_rate_is_a_ratio_the_schedule_keeps():
    model = tiny_config("polynorm").build("cpu")
    cfg = OptimizerConfig(name="muon", learning_rate=1e-3, muon_learning_rate=2e-2)
    muon, *rest = build_muon(model, cfg).param_groups
    assert muon["lr"] == 2e-2 and muon["lr_ratio"] == pytest.approx(20.0)
    assert all(g["lr"] == 1e-3 and "lr_ratio" not in g for g in rest)


def test_newton_schulz_flops_formula():
    # Square n: per step X X^T (2n^3), the Gram squared (2n^3), times X (2n^3).
    assert newton_schulz_flops(8, 8, steps=1) == 6 * 8**3
    assert newton_schulz_flops(4, 8, steps=5) == newton_schulz_flops(8, 4, steps=5)
    assert newton_schulz_flops(4, 8, steps=1) == 2 * 16 * 8 + 2 * 64 + 2 * 16 * 8


@pytest.mark.parametrize(
    "nproc, ep",
    [(2, 1), pytest.param(2, 2, marks=pytest.mark.slow), pytest.param(4, 1, marks=pytest.mark.slow),
     pytest.param(4, 2, marks=pytest.mark.slow)],
    ids=["2 ranks fsdp", "2 ranks ep2", "4 ranks fsdp", "4 ranks ep2 x fsdp2"],
)  # fmt: skip
def test_distributed_step_equals_single_process_step(nproc, ep):
    """FSDP2 (and expert parallelism): two Muon+AdamW steps leave every parameter as a
    whole-model single-process step does, in float64 (tests/olmo/muon_worker.py)."""
    proc = run_worker("tests.olmo.muon_worker", nproc, str(ep))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok") == nproc


@pytest.mark.slow
def test_muon_training_resumes_exactly_on_two_ranks(tmp_path):
    """2 FSDP ranks with Muon: stopped at step 4 and resumed from its checkpoint (momentum
    buffers and AdamW moments included), the per-step losses and final weights are those of the
    uninterrupted run."""
    data = make_data(tmp_path)

    def train(name, **extra):
        opts = {"optimizer.name": "muon", "optimizer.learning_rate": 3e-3, **extra}
        proc = run_train([TEST_CONFIG, *tiny_overrides(tmp_path / name, data, **opts)], nproc=2)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [(m["step"], m[names.CE_LOSS]) for m in read_metrics(tmp_path / name)
                if names.CE_LOSS in m]  # fmt: skip

    straight = train("straight")
    train("split", stop_at=4)
    resumed = train("split")
    assert [s for s, _ in straight] == list(range(1, 9))
    assert resumed == straight
    assert straight[-1][1] < straight[0][1]
    from olmo.checkpoint_io import load_state_dict

    a, b = load_state_dict(tmp_path / "split" / "step8"), load_state_dict(tmp_path / "straight" / "step8")
    assert a.keys() == b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]), key
