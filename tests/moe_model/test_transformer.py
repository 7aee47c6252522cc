"""The decoder: outputs, causality, init (incl. meta), state dicts, overfitting a batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_model.activations import ACTIVATIONS
from moe_model.config import ModelConfig
from moe_model.transformer import ModelOutput, MoETransformer, apply_rope, rope_cos_sin
from tests.cpu_capability import INDUCTOR_CPU

pytestmark = pytest.mark.numerics

VOCAB = 64


def tiny_config(activation="polynorm", **kw) -> ModelConfig:
    hidden = 16 if ACTIVATIONS[activation].gated else 24  # equal expert parameters
    base = dict(
        vocab_size=VOCAB,
        embedding_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_sequence_length=32,
        activation_type=activation,
        mlp_hidden_size=hidden,
        moe_num_experts=4,
        moe_top_k=2,
    )
    base.update(kw)
    return ModelConfig(**base)


def set_poly_coefficients(model: MoETransformer) -> None:
    """Non-default PolyNorm/PolyReLU coefficients, different in every layer."""
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            act = block.ffn.act
            act.weight.copy_(torch.arange(1, act.order + 1, dtype=torch.float32) * (i + 1) / 7)
            act.bias.fill_(-0.3 * (i + 1))


def test_forward_output():
    config = tiny_config()
    model = config.build()
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(ids)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 12, config.embedding_size)
    assert out.lb_loss.shape == () and out.z_loss.shape == ()
    assert out.tokens_per_expert_LE.shape == (config.n_layers, config.moe_num_experts)
    assert out.tokens_per_expert_LE.dtype == torch.long
    assert not out.tokens_per_expert_LE.requires_grad
    assert isinstance(model.blocks, torch.nn.ModuleList)


def test_aux_losses_are_the_layer_mean_of_the_formulas():
    """lb_loss and z_loss from each MoE layer's router input, written out (DESIGN.md), then
    averaged over layers; the counts are each layer's top-k choices."""
    config = tiny_config(moe_loss_weight=0.01, moe_zloss_weight=0.001)
    torch.manual_seed(0)
    model = config.build()
    inputs = []
    for block in model.blocks:
        block.ffn.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach()))
    out = model(torch.randint(0, VOCAB, (2, 12)))
    E, K, T = config.moe_num_experts, config.moe_top_k, 2 * 12
    lb, z, counts = [], [], []
    for x, block in zip(inputs, model.blocks):
        logits = x.reshape(T, -1).double() @ block.ffn.router.weight.double().T
        probs = logits.softmax(-1)
        count_E = torch.bincount(probs.topk(K).indices.flatten(), minlength=E)
        lb.append(0.01 * E / (T * K) * (count_E * probs.mean(0)).sum())
        z.append(0.001 * (logits.logsumexp(-1) ** 2).sum() / (T * K))
        counts.append(count_E)
    assert out.tokens_per_expert_LE.tolist() == torch.stack(counts).tolist()
    torch.testing.assert_close(out.lb_loss.double(), torch.stack(lb).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.z_loss.double(), torch.stack(z).mean(), rtol=1e-5, atol=0)


def test_dense_model():
    config = tiny_config("gelu", block_type="dense", mlp_hidden_size=64)
    model = config.build()
    out = model(torch.randint(0, VOCAB, (2, 8)))
    assert out.logits.shape == (2, 8, VOCAB)
    assert out.lb_loss == 0 and out.z_loss == 0
    assert out.tokens_per_expert_LE.numel() == 0
    assert config.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("block_type", ["moe", "dense"])
def test_causality(block_type):
    model = tiny_config(block_type=block_type).build().eval()
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    logits = model(ids).logits
    for t in (0, 5, 15):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits_changed = model(changed).logits
        # Not bit-exact: expert matmuls batch a different set of rows once a token changes.
        torch.testing.assert_close(logits_changed[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits_changed[:, t], logits[:, t])


def test_rope_relative_positions():
    """<rope(q, m), rope(k, n)> depends only on m - n; position 0 is the identity."""
    cos, sin = rope_cos_sin(8, 16, 10000.0, torch.device("cpu"))
    q = torch.randn(16).expand(1, 1, 8, 16)
    k = torch.randn(16).expand(1, 1, 8, 16)
    rq, rk = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]
    torch.testing.assert_close(rq[0], q[0, 0, 0])
    torch.testing.assert_close(rq[3] @ rk[1], rq[7] @ rk[5], rtol=1e-4, atol=1e-5)


def test_init_statistics():
    config = tiny_config(d_model=64, init_std=0.02, init_cutoff_factor=3.0)
    model = config.build()
    for name, p in model.named_parameters():
        if "norm" in name:
            assert (p == 1).all(), name
        elif name.endswith("act.weight"):
            torch.testing.assert_close(p.detach(), torch.full_like(p, 1 / 3))
        elif name.endswith("act.bias"):
            assert (p == 0).all()
        else:
            assert p.abs().max() <= 0.06 + 1e-7, name
            if p.numel() > 1000:
                assert 0.015 < p.std() < 0.021, name


def test_meta_build_then_init():
    config = tiny_config()
    model = config.build("meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    reference = config.build()
    for (name, p), (_, p_ref) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.isfinite(p).all(), name
        if p.numel() > 1000:  # same init distribution
            assert abs(p.std() - p_ref.std()) < 0.003, name
        if "norm" in name or ".act." in name:
            torch.testing.assert_close(p, p_ref, msg=name)
    out = model(torch.randint(0, VOCAB, (2, 16)))
    assert torch.isfinite(out.logits).all()
    # Same weights -> same logits as an eagerly built model (no stale RoPE/buffers on meta).
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("activation", ["polynorm", "polyrelu"])
def test_state_dict_round_trip_keeps_coefficients(activation):
    config = tiny_config(activation)
    model = config.build()
    set_poly_coefficients(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "blocks.1.ffn.act.weight" in state and "blocks.1.ffn.act.bias" in state

    loaded = config.build("meta")
    loaded.to_empty(device="cpu")
    loaded.load_state_dict(state)  # no init_weights: nothing may fall back to defaults
    for i, block in enumerate(loaded.blocks):
        torch.testing.assert_close(block.ffn.act.weight, model.blocks[i].ffn.act.weight)
        torch.testing.assert_close(block.ffn.act.bias, torch.tensor([-0.3 * (i + 1)]))
    ids = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_every_parameter_gets_a_gradient():
    model = tiny_config("polynorm").build()
    out = model(torch.randint(0, VOCAB, (2, 16)))
    loss = out.logits.float().logsumexp(-1).mean() + out.lb_loss + out.z_loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


# Under autocast the fp32 RMSNorm weights meet bf16 activations; torch then skips its fused
# rms_norm kernel and says so (FSDP's bf16 params avoid it on GPU).
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bf16_autocast_forward():
    model = tiny_config("polynorm").build()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert out.logits.dtype == torch.bfloat16
    with torch.no_grad():
        fp32 = model(ids)
    # bf16 matmuls and activations (8 mantissa bits): the fp32 logits to a few percent.
    scale = fp32.logits.abs().max().item()
    torch.testing.assert_close(out.logits.float(), fp32.logits, rtol=0, atol=0.03 * scale)
    assert out.tokens_per_expert_LE.tolist() == fp32.tokens_per_expert_LE.tolist()
    out.logits.float().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_tiny_moe_overfits_one_batch(activation):
    torch.manual_seed(0)
    model = tiny_config(activation).build()
    ids = torch.randint(0, VOCAB, (2, 33))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)

    def loss_fn():
        out = model(inputs)
        ce = F.cross_entropy(out.logits.reshape(-1, VOCAB).float(), labels.reshape(-1))
        return ce, ce + out.lb_loss + out.z_loss

    first, _ = loss_fn()
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        ce, total = loss_fn()
        if ce < first.item() / 2:
            break
        total.backward()
        opt.step()
    assert ce < first.item() / 2, (activation, first.item(), ce.item())


def test_default_state_dict_keys_are_olmoes():
    """The routing options off (the default): exactly the tensors models had before them, so
    every existing checkpoint loads strictly."""
    keys = list(tiny_config("polynorm").build("meta").state_dict())
    per_block = ["attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight",
                 "attn.v_proj.weight", "attn.o_proj.weight", "attn.q_norm.weight",
                 "attn.k_norm.weight", "ffn_norm.weight", "ffn.w_in_EDH", "ffn.w_out_EHD",
                 "ffn.router.weight", "ffn.act.weight", "ffn.act.bias"]
    want = ["embedding.weight", *(f"blocks.{i}.{k}" for i in range(2) for k in per_block),
            "norm.weight", "lm_head.weight"]
    assert sorted(keys) == sorted(want)


def test_dense_first_blocks_and_shared_experts():
    from moe_model.moe import FeedForward, MoELayer
    from moe_model.transformer import DenseFFN

    config = tiny_config("swiglu", n_layers=3, moe_first_dense_layers=1, moe_shared_experts=1,
                         moe_capacity_factor=1.0)
    model = config.build()
    assert isinstance(model.blocks[0].ffn, DenseFFN)
    assert model.blocks[0].ffn.w_out.in_features == 2 * 16  # K * H
    assert [isinstance(b.ffn, MoELayer) for b in model.blocks] == [False, True, True]
    assert isinstance(model.blocks[1].ffn.shared_experts[0], FeedForward)
    assert model.moe_layers() == [model.blocks[1].ffn, model.blocks[2].ffn]
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(ids)
    assert out.tokens_per_expert_LE.shape == (2, 4)
    assert out.router_entropy_L.shape == (2,) and out.dropped_rows_L.shape == (2,)
    model.eval()
    out = model(ids)
    assert out.dropped_rows_L is None  # evaluation is dropless


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Inductor's CPU FlexAttention template does not compile under ATEN_CPU_CAPABILITY=default.
VECTORIZED_CPU = INDUCTOR_CPU


@pytest.mark.parametrize("backend, device", [
    ("sdpa", "cpu"),
    # torch runs FlexAttention's backward on CUDA only: on CPU the forward, under no_grad.
    pytest.param("flex", "cpu", marks=VECTORIZED_CPU),
    pytest.param("flex", "cuda", marks=[pytest.mark.gpu, CUDA]),
    pytest.param("sdpa", "cuda", marks=[pytest.mark.gpu, CUDA]),
])  # fmt: skip
def test_packed_documents_give_the_logits_of_each_document_alone(backend: str, device: str):
    """With document masking a packed row is several independent documents: attention stays
    inside each and RoPE positions restart, so each document's logits equal those of a forward
    over that document alone (dropless routing is per token). On CUDA the gradients match too:
    a loss summed over the packed rows has the gradient of the same loss summed over the
    documents run one by one."""
    from moe_model.attention import document_ids

    eos = VOCAB - 1
    config = tiny_config(document_masking=True, document_masking_backend=backend, max_sequence_length=40)
    torch.manual_seed(0)
    model = config.build().to(device)
    set_poly_coefficients(model)
    model.eval()
    gen = torch.Generator().manual_seed(3)

    def doc(n: int, ends: bool = True) -> torch.Tensor:
        body = torch.randint(0, eos, (n - 1 if ends else n,), generator=gen)
        return (torch.cat([body, torch.tensor([eos])]) if ends else body).to(device)

    rows = [[doc(5), doc(11), doc(1), doc(7), doc(6, ends=False)],  # a one-token document too
            [doc(3), doc(27)]]
    packed = torch.stack([torch.cat(r) for r in rows])
    train = device == "cuda"
    tol = dict(rtol=1e-4, atol=1e-4) if train else dict(rtol=1e-5, atol=1e-5)
    weights = torch.randn(*packed.shape, VOCAB, generator=gen).to(device)
    with torch.set_grad_enabled(train):
        logits = model(packed, document_ids(packed, eos)).logits
        alone_loss = torch.zeros((), device=device)
        for r, docs in enumerate(rows):
            start = 0
            for d in docs:
                alone = model(d[None]).logits[0]
                torch.testing.assert_close(logits[r, start:start + len(d)], alone, **tol)
                alone_loss = alone_loss + (alone * weights[r, start:start + len(d)]).sum()
                start += len(d)
    if train:
        params = [p for p in model.parameters() if p.requires_grad]
        packed_grads = torch.autograd.grad((logits * weights).sum(), params)
        alone_grads = torch.autograd.grad(alone_loss, params)
        for p_grad, a_grad in zip(packed_grads, alone_grads):
            torch.testing.assert_close(p_grad, a_grad, **tol)
    # Without masking the later documents see the earlier ones: the property is not vacuous.
    plain = tiny_config(max_sequence_length=40).build().to(device)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad():
        crossing = plain(packed).logits
        second = model(rows[0][1][None]).logits[0]
    assert (crossing[0, 5:16] - second).abs().max() > 1e-3


def test_document_ids_need_document_masking_on():
    model = tiny_config().build()
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="document_masking is off"):
        model(ids, torch.zeros_like(ids))
