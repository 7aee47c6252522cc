"""MoE routing and balancing variants against a per-token reference: sigmoid scores, route
scale, auxiliary-loss-free bias, capacity drops, shared experts, load-balancing granularities;
the bias update; global-batch balancing and bias updates on 2 gloo ranks vs 1 process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from moe_model.config import ModelConfig
from moe_model.moe import MoELayer
from moe_model.moe_losses import load_balancing_loss, sequence_load_balancing_loss
from moe_model.routing import capacity_keep, count_per_expert, expert_capacity, update_expert_bias_
from tests.olmo.helpers import REPO, free_port

pytestmark = pytest.mark.numerics

D, H, E, K = 16, 8, 6, 2


def make_layer(activation="polynorm", impl="loop", seed=0, **kw):
    """A layer with E experts, top-K, unless ``kw`` sets moe_num_experts / moe_top_k."""
    torch.manual_seed(seed)
    config = ModelConfig(**{
        "vocab_size": 64, "embedding_size": 64, "d_model": D, "n_layers": 1, "n_heads": 2,
        "mlp_hidden_size": H, "moe_num_experts": E, "moe_top_k": K,
        "activation_type": activation, "moe_expert_impl": impl, **kw,
    })  # fmt: skip
    layer = MoELayer(config.moe_layer_config())
    with torch.no_grad():  # non-default coefficients, different in every FFN
        for i, act in enumerate(m for m in layer.modules() if hasattr(m, "order")):
            act.weight.copy_(torch.tensor([0.7, -0.4, 1.3])[: act.order] * (1 + 0.2 * i))
            act.bias.fill_(0.1 - 0.03 * i)
        if layer.expert_bias_E is not None:
            # A bias large enough to change some tokens' choice.
            layer.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, len(layer.expert_bias_E)))
    return layer


def skewed_inputs(layer, shape=(40,), seed=1):
    """Inputs whose routing favours expert 0 (so capacity limits drop rows)."""
    torch.manual_seed(seed)
    x = torch.randn(*shape, D)
    x[..., 0] = 1.0
    num_experts = layer.config.num_experts
    skew = [1.5, 0.5, 0.0, 0.0, -0.5, -1.0]
    if num_experts != len(skew):  # other expert counts: expert 0 alone favoured
        skew = [1.5] + [0.0] * (num_experts - 1)
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor(skew)
    return x


def ffn(act, x_D, w_in_DI, w_out_HD):
    return act(x_D.unsqueeze(0) @ w_in_DI)[0] @ w_out_HD


def reference(layer, x, training=True):
    """The layer written out token by token from its config: (y, lb_loss, dropped rows, counts)."""
    cfg = layer.config
    E, K = cfg.num_experts, cfg.top_k
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    choices = []  # per token: (experts, score of each, combine weight of each)
    probs = []
    for t in range(T):
        logits = (x_TD[t] @ layer.router.weight.T).float()
        if cfg.router_score == "softmax":
            scores = logits.softmax(-1)
            dist_e = scores
        else:
            scores = logits.sigmoid()
            dist_e = scores / scores.sum()
        probs.append(dist_e)
        biased = scores.detach() + (
            layer.expert_bias_E if layer.expert_bias_E is not None else 0.0
        )
        experts = sorted(range(E), key=lambda e: -float(biased[e]))[:K]
        picked = torch.stack([scores[e] for e in experts])
        weights = picked / picked.sum() if cfg.renormalize else picked
        choices.append((experts, picked.detach(), weights * cfg.route_scale))
    kept = {(t, k) for t in range(T) for k in range(K)}
    if cfg.capacity_factor is not None and training:
        capacity = math.ceil(cfg.capacity_factor * T * K / E)
        kept = set()
        for e in range(E):
            rows = [(t, k) for t in range(T) for k in range(K) if choices[t][0][k] == e]
            rows.sort(key=lambda tk: (-float(choices[tk[0]][1][tk[1]]), tk))
            kept |= set(rows[:capacity])
    ys = []
    for t in range(T):
        experts, _, weights = choices[t]
        y = torch.zeros(D)
        for k, e in enumerate(experts):
            if (t, k) in kept:
                act = layer.act[e] if isinstance(layer.act, torch.nn.ModuleList) else layer.act
                y = y + weights[k] * ffn(act, x_TD[t], layer.w_in_EDH[e], layer.w_out_EHD[e])
        for shared in layer.shared_experts or ():
            y = y + ffn(shared.act, x_TD[t], shared.w_in.weight.T, shared.w_out.weight.T)
        ys.append(y)
    counts = torch.zeros(E)
    for experts, _, _ in choices:
        for e in experts:
            counts[e] += 1
    probs_TE = torch.stack(probs)
    w = cfg.lb_weight
    if cfg.lb_granularity == "sequence":
        S = x.shape[-2] if x.dim() >= 3 else T
        terms = []
        for b in range(T // S):
            rows = range(b * S, (b + 1) * S)
            c = torch.zeros(E)
            for t in rows:
                for e in choices[t][0]:
                    c[e] += 1
            p = torch.stack([probs_TE[t] for t in rows]).mean(0)
            terms.append(w * E / (S * K) * (c * p).sum())
        lb = torch.stack(terms).mean()
    else:
        lb = w * E / (T * K) * (counts * probs_TE.mean(0)).sum()
    return torch.stack(ys).reshape(x.shape), lb, T * K - len(kept), counts.long()


def named_grads(layer, x, out):
    params = dict(layer.named_parameters())
    g = torch.autograd.grad(out, [x, *params.values()], allow_unused=True)
    return dict(zip(["x", *params], g))


VARIANTS = {
    "default (OLMoE)": {},
    "sigmoid, renormalised, scaled": dict(
        moe_router_score="sigmoid", moe_renormalize=True, moe_route_scale=2.5, moe_zloss_weight=0.0
    ),
    "sigmoid, not renormalised": dict(moe_router_score="sigmoid", moe_zloss_weight=0.0),
    "softmax + bias": dict(moe_bias_update_rate=1e-3),
    "sigmoid + bias (DeepSeek-V3)": dict(
        moe_router_score="sigmoid", moe_renormalize=True, moe_bias_update_rate=1e-3,
        moe_zloss_weight=0.0, moe_lb_granularity="sequence",
    ),  # fmt: skip
    "capacity 1.0": dict(moe_capacity_factor=1.0),
    "capacity 0.5, renormalised": dict(moe_capacity_factor=0.5, moe_renormalize=True),
    "capacity + sigmoid + bias": dict(
        moe_capacity_factor=0.75, moe_router_score="sigmoid", moe_bias_update_rate=1e-2,
        moe_zloss_weight=0.0,
    ),  # fmt: skip
    "1 shared expert": dict(moe_shared_experts=1),
    "2 shared experts, own size": dict(moe_shared_experts=2, moe_shared_hidden_size=24),
    "shared + per-expert sets": dict(moe_shared_experts=1, moe_activation_per_expert=True),
    "sequence lb": dict(moe_lb_granularity="sequence"),
    "global lb, one process": dict(moe_lb_granularity="global_batch"),
}


# Fine-grained experts (DeepSeekMoE): many small experts and a larger top-k, through the
# options that index or count per expert.
FINE_GRAINED = ["default (OLMoE)", "sigmoid + bias (DeepSeek-V3)", "capacity 1.0",
                "1 shared expert", "sequence lb"]
SHAPES = [pytest.param(E, K, v, id=f"E{E}K{K}-{v}") for v in VARIANTS] + [
    pytest.param(32, 8, v, id=f"E32K8-{v}") for v in FINE_GRAINED
]


@pytest.mark.parametrize("num_experts, top_k, variant", SHAPES)
@pytest.mark.parametrize("activation", ["polynorm", "swiglu"])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_variant_matches_per_token_reference(num_experts, top_k, variant, activation, impl):
    layer = make_layer(activation, impl, moe_num_experts=num_experts, moe_top_k=top_k,
                       **VARIANTS[variant])  # fmt: skip
    x = skewed_inputs(layer, shape=(4, 10)).requires_grad_(True)
    y, aux = layer(x)
    y_ref, lb_ref, dropped_ref, counts_ref = reference(layer, x)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux.lb_loss, lb_ref, rtol=1e-5, atol=1e-9)
    assert aux.tokens_per_expert_E.tolist() == counts_ref.tolist()
    if layer.config.capacity_factor is None:
        assert aux.dropped_rows is None
    else:
        assert int(aux.dropped_rows) == dropped_ref > 0  # the inputs are skewed enough to drop

    cotangent = torch.randn_like(y)
    g = named_grads(layer, x, (y * cotangent).sum() + aux.lb_loss)
    g_ref = named_grads(layer, x, (y_ref * cotangent).sum() + lb_ref)
    for name in g:
        if g_ref[name] is None:  # unused in both (e.g. an expert nobody picked keeps None)
            assert g[name] is None or g[name].abs().max() == 0, name
            continue
        # Elementwise to rounding, relative to the tensor's largest gradient.
        scale = max(1.0, g_ref[name].abs().max().item())
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    if layer.shared_experts is not None:
        assert all(g[f"shared_experts.{s}.w_in.weight"].abs().sum() > 0
                   for s in range(len(layer.shared_experts)))


@pytest.mark.parametrize("activation", ["swiglu", "polynorm"])
@pytest.mark.parametrize("width", [None, 40])
def test_dense_first_block_computes_the_dense_ffn(activation, width):
    """Block 0 of moe_first_dense_layers=1: h = x + attn(norm(x)), then h + act(norm(h) W_in)
    W_out with the activation written out here, of width moe_first_dense_hidden_size (default
    K * H); no routing, no aux."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, embedding_size=64, d_model=D, n_layers=2, n_heads=2, mlp_hidden_size=H,
        moe_num_experts=E, moe_top_k=K, activation_type=activation, moe_first_dense_layers=1,
        moe_first_dense_hidden_size=width,
    )  # fmt: skip
    block = config.build().blocks[0]
    ffn = block.ffn
    with torch.no_grad():  # non-default norm gain and coefficients, weights of unit scale
        block.ffn_norm.weight.copy_(torch.linspace(0.5, 1.5, D))
        for w in (ffn.w_in.weight, ffn.w_out.weight):
            w.copy_(torch.randn_like(w) / w.shape[1] ** 0.5)
        if activation == "polynorm":
            ffn.act.weight.copy_(torch.tensor([0.7, -0.4, 1.3]))
            ffn.act.bias.fill_(0.2)
    x = torch.randn(2, 7, D)
    y, aux = block(x)
    assert aux is None

    hidden = width or K * H
    w_in, w_out = ffn.w_in.weight.detach(), ffn.w_out.weight.detach()
    assert w_out.shape == (D, hidden)
    with torch.no_grad():
        h = x + block.attn(block.attn_norm(x))
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config.layer_norm_eps)
        u = (n * block.ffn_norm.weight) @ w_in.T
        if activation == "swiglu":
            a = F.silu(u[..., :hidden]) * u[..., hidden:]
        else:
            w, b, eps = ffn.act.weight, ffn.act.bias, config.activation_eps
            a = b + sum(
                w[i] * u.pow(3 - i) * torch.rsqrt(u.pow(3 - i).pow(2).mean(-1, keepdim=True) + eps)
                for i in range(3)
            )
        want = h + a @ w_out.T
    assert (want - h).abs().mean() > 0.1  # the FFN's term is far above the tolerance
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_bias_changes_the_choice_but_not_the_weights():
    layer = make_layer("relu", moe_bias_update_rate=1e-3)
    x = skewed_inputs(layer)
    routing = layer.route(x)
    scores = (x @ layer.router.weight.T).softmax(-1)
    unbiased = scores.topk(K).indices
    assert (routing.experts_TK != unbiased).any()  # the bias moved some choices
    # Weights are the unbiased scores of the chosen experts.
    torch.testing.assert_close(routing.weights_TK, scores.gather(-1, routing.experts_TK))
    # The bias takes no gradient and is a buffer, not a parameter.
    assert "expert_bias_E" in dict(layer.named_buffers())
    assert "expert_bias_E" not in dict(layer.named_parameters())
    assert "expert_bias_E" in layer.state_dict()


def test_update_expert_bias_is_the_sign_rule():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.25])
    update_expert_bias_(bias, torch.tensor([5, 1, 3, 3]), rate=0.01)  # mean load 3
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.51, -0.5, 0.25]))
    layer = make_layer("relu")  # without the option: no bias, no update, no state
    assert layer.expert_bias_E is None and "expert_bias_E" not in layer.state_dict()
    layer.update_expert_bias(torch.arange(E))


def test_capacity_keep_against_a_sorting_loop():
    torch.manual_seed(3)
    T = 50
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    experts_TK[:30, 0] = 2  # overload expert 2
    priority_TK = torch.rand(T, K).round(decimals=1)  # many ties
    capacity = expert_capacity(T, K, E, 1.0)
    assert capacity == math.ceil(T * K / E)
    keep = capacity_keep(experts_TK, priority_TK, count_per_expert(experts_TK, E), capacity)
    for e in range(E):
        rows = [(t, k) for t in range(T) for k in range(K) if experts_TK[t, k] == e]
        rows.sort(key=lambda tk: (-float(priority_TK[tk]), tk))
        want = set(rows[:capacity])
        got = {(t, k) for t, k in rows if keep[t, k]}
        assert got == want, e
    assert (~keep).sum() > 0


def test_capacity_drops_only_in_training():
    layer = make_layer("relu", moe_capacity_factor=0.5)
    x = skewed_inputs(layer)
    layer.eval()
    y_eval, aux = layer(x)
    assert aux.dropped_rows is None and layer.route(x).keep_TK is None
    dropless = make_layer("relu")
    skewed_inputs(dropless)
    torch.testing.assert_close(y_eval, dropless.eval()(x)[0], rtol=0, atol=0)
    layer.train()
    assert layer(x)[1].dropped_rows > 0


def nan_past_offs(grouped_mm):
    """grouped_mm as CUDA's kernels leave it: output rows past offs[-1] unwritten (NaN here),
    and in backward the input gradient of those rows too."""

    def wrapped(x_RD, w_EDH, offs):
        tail_R1 = (torch.arange(x_RD.shape[0]) >= offs[-1]).unsqueeze(-1)
        if x_RD.requires_grad:
            x_RD.register_hook(lambda g: torch.where(tail_R1, float("nan"), g))
        return torch.where(tail_R1, float("nan"), grouped_mm(x_RD, w_EDH, offs=offs))

    return wrapped


@pytest.mark.parametrize("activation", ["polynorm", "swiglu"])
@pytest.mark.parametrize("per_expert", [False, True], ids=["shared set", "per-expert sets"])
def test_dropped_rows_past_the_experts_reach_nothing(activation, per_expert, monkeypatch):
    """Capacity drops keep fixed shapes: the dropped rows trail the experts' rows and grouped_mm
    never writes them. Output and every gradient equal the per-expert loop's (which never sees
    those rows), even when grouped_mm leaves NaN there, forward and backward."""
    import moe_model.moe as moe

    kw = dict(moe_capacity_factor=0.5, moe_activation_per_expert=per_expert)
    loop = make_layer(activation, "loop", **kw)
    grouped = make_layer(activation, "grouped_mm", **kw)
    x = skewed_inputs(loop)
    skewed_inputs(grouped)
    monkeypatch.setattr(moe, "grouped_mm", nan_past_offs(moe.grouped_mm))
    results = []
    for layer in (loop, grouped):
        x_in = x.clone().requires_grad_()
        y, aux = layer(x_in)
        assert aux.dropped_rows > 0
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append({"y": y, "dx": x_in.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    for name, want in results[0].items():
        assert torch.isfinite(results[1][name]).all(), name
        torch.testing.assert_close(results[1][name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_sequence_lb_is_the_per_sequence_formula_and_w_at_balance():
    torch.manual_seed(0)
    probs = torch.randn(3, 5, E).softmax(-1)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(15)]).reshape(3, 5, K)
    per_seq = [
        load_balancing_loss(probs[b], torch.bincount(experts[b].flatten(), minlength=E), K, 0.1)
        for b in range(3)
    ]
    torch.testing.assert_close(
        sequence_load_balancing_loss(probs, experts, K, 0.1), torch.stack(per_seq).mean()
    )
    # Uniform probabilities: exactly the weight, whatever the counts.
    uniform = torch.full((2, 4, E), 1.0 / E)
    assert sequence_load_balancing_loss(uniform, experts[:2, :4], K, 0.1).item() == pytest.approx(0.1)


def test_router_entropy_is_reported():
    layer = make_layer("relu", moe_router_score="sigmoid", moe_zloss_weight=0.0)
    x = skewed_inputs(layer)
    _, aux = layer(x)
    s = (x @ layer.router.weight.T).sigmoid()
    p = s / s.sum(-1, keepdim=True)
    torch.testing.assert_close(aux.router_entropy, -(p * p.log()).sum(-1).mean())
    assert 0 < aux.router_entropy < math.log(E)


# ---- 2 gloo ranks ---------------------------------------------------------------------------

_TWO_RANKS = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from tests.moe_model.test_moe_variants import make_layer, skewed_inputs
    from tests.olmo.test_train_module import make_batch, make_module, model_config

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), sys.argv[1]

    # Global-batch balancing: this rank's half of 80 tokens, counts summed over both ranks.
    layer = make_layer("relu", moe_lb_granularity="global_batch")
    layer.parallelize(lb_group=dist.group.WORLD)
    x = skewed_inputs(layer, shape=(80,)).chunk(2)[rank]
    _, aux = layer(x)
    aux.lb_loss.backward()
    torch.save({"lb": aux.lb_loss.detach(), "grad": layer.router.weight.grad}, f"{out}/lb{rank}.pt")

    # Bias updates through the train module (FSDP over both ranks), 3 steps; each rank takes
    # its half of every global batch.
    config = model_config(moe_bias_update_rate=0.01, moe_lb_granularity="global_batch",
                          moe_router_score="sigmoid", moe_zloss_weight=0.0,
                          moe_renormalize=True)
    module, trainer = make_module(config, global_train_batch_size=8)
    biases, lb = [], []
    for step in (1, 2, 3):
        trainer.global_step, trainer.metrics = step, {}
        batch = {"input_ids": make_batch(seed=step, size=8)["input_ids"].chunk(2)[rank]}
        module.zero_grads()
        module.train_batch(batch)
        module.optim_step()
        biases.append(torch.stack([m.expert_bias_E.clone() for m in module.model.moe_layers()]))
        lb.append(trainer.metrics["train/LoadBalancingLoss"])
    torch.save({"bias": biases, "lb": lb}, f"{out}/train{rank}.pt")
    dist.destroy_process_group()
    print("ok")
    """
)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """Global-batch balancing: the ranks' mean loss and router gradient equal one process's
    micro-batch loss over all 80 tokens. Bias updates: identical on both ranks after every step
    and equal to one process training on the same global batches."""
    from tests.olmo.test_train_module import make_batch, make_module, model_config

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script), str(tmp_path)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"lb{r}.pt") for r in (0, 1)]
    layer = make_layer("relu")  # micro_batch granularity over the whole batch
    _, aux = layer(skewed_inputs(layer, shape=(80,)))
    aux.lb_loss.backward()
    torch.testing.assert_close((ranks[0]["lb"] + ranks[1]["lb"]) / 2, aux.lb_loss)
    torch.testing.assert_close(
        (ranks[0]["grad"] + ranks[1]["grad"]) / 2, layer.router.weight.grad, rtol=1e-5, atol=1e-9
    )
    assert (ranks[0]["grad"] - ranks[1]["grad"]).abs().max() > 1e-6  # each rank its own half

    # One process, the same objective: micro-batches of 4 that are the ranks' simultaneous
    # micro-batches together (rows 0-1 with 4-5, then 2-3 with 6-7). No label mask, so both
    # ranks predict as many tokens and their mean CE gradient is the global one.
    config = model_config(moe_bias_update_rate=0.01, moe_lb_granularity="global_batch",
                          moe_router_score="sigmoid", moe_zloss_weight=0.0, moe_renormalize=True)
    module, trainer = make_module(config, global_train_batch_size=8,
                                  device_train_microbatch_size=4)
    want_bias, want_lb = [], []
    for step in (1, 2, 3):
        trainer.global_step, trainer.metrics = step, {}
        module.zero_grads()
        input_ids = make_batch(seed=step, size=8)["input_ids"][[0, 1, 4, 5, 2, 3, 6, 7]]
        module.train_batch({"input_ids": input_ids})
        module.optim_step()
        want_bias.append(torch.stack([m.expert_bias_E.clone() for m in module.model.moe_layers()]))
        want_lb.append(trainer.metrics["train/LoadBalancingLoss"])
    got = [torch.load(tmp_path / f"train{r}.pt") for r in (0, 1)]
    for step in range(3):
        assert torch.equal(got[0]["bias"][step], got[1]["bias"][step]), f"step {step + 1}"
        assert torch.equal(got[0]["bias"][step], want_bias[step]), f"step {step + 1}"
    assert want_bias[-1].abs().max() > 0
    # The ranks' mean balance loss is the one-process loss (to fp32 summation order).
    for step in range(3):
        mean = (got[0]["lb"][step] + got[1]["lb"][step]) / 2
        assert mean == pytest.approx(want_lb[step], rel=1e-5), f"step {step + 1}"
