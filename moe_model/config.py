"""ModelConfig: sizes, validation, total/active parameter and FLOP counts.

The YAML ``model:`` section maps one-to-one onto :class:`ModelConfig`
(``ModelConfig(**yaml["model"])`` or ``ModelConfig.from_dict``), and ``build()`` makes the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from moe_model.activations import ACTIVATIONS
from moe_model.attention import DOCUMENT_MASK_BACKENDS
from moe_model.errors import ConfigError
from moe_model.init import WeightInit
from moe_model.kernels.dispatch import BACKENDS as ACTIVATION_BACKENDS
from moe_model.moe import GROUPED_MM_ALIGN, ActivationSpec, MoEConfig, MoELayer
from moe_model.moe_losses import LB_GRANULARITIES
from moe_model.routing import ROUTER_SCORES
from moe_model.tokenizer import EMBEDDING_SIZE, VOCAB_SIZE
from moe_model.transformer import Attention, Block, DenseFFN, MoETransformer

__all__ = ["ConfigError", "ModelConfig", "equal_param_hidden_size"]

# The options a string key takes, as Literal types the one validator (_check_types) reads; the
# registries' names, so a new registry entry is a new valid value.
BlockType = Literal["moe", "dense"]
ExpertImpl = Literal["auto", "grouped_mm", "loop"]
ActivationType = Literal[tuple(ACTIVATIONS)]
ActivationBackend = Literal[tuple(ACTIVATION_BACKENDS)]
DocumentMaskBackend = Literal[("auto", *DOCUMENT_MASK_BACKENDS)]
RouterScore = Literal[tuple(ROUTER_SCORES)]
LbGranularity = Literal[tuple(LB_GRANULARITIES)]


def _num_matrices(activation: str) -> int:
    """Weight matrices per expert FFN: 3 for gated (w1, w3, w2), 2 otherwise (w1, w2)."""
    return 3 if ACTIVATIONS[activation].gated else 2


def equal_param_hidden_size(hidden_size: int, from_activation: str, to_activation: str) -> int:
    """Expert hidden size for ``to_activation`` with the FFN weight count of ``hidden_size``
    under ``from_activation`` (gated 1024 <-> non-gated 1536).

    Counts the FFN matrices only; the 4 PolyNorm/PolyReLU coefficients per layer are noise.
    Raises ConfigError when no integer size matches exactly.
    """
    for name in (from_activation, to_activation):
        if name not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {name!r}; known activations: {sorted(ACTIVATIONS)}"
            )
    n_from, n_to = _num_matrices(from_activation), _num_matrices(to_activation)
    if (hidden_size * n_from) % n_to:
        raise ConfigError(
            f"hidden_size={hidden_size} for {from_activation!r} has no exact equal-parameter "
            f"size for {to_activation!r} (needs {n_to} | {n_from}*hidden_size)"
        )
    return hidden_size * n_from // n_to


@dataclass
class ModelConfig:
    """An OLMoE-style decoder; defaults are OLMoE-1B-7B with SwiGLU experts."""

    vocab_size: int = VOCAB_SIZE
    """Tokenizer vocabulary; token ids must be < this."""
    embedding_size: int = EMBEDDING_SIZE
    """Rows of the embedding and LM head (vocab padded to a multiple of 128 for speed)."""
    d_model: int = 2048
    """Residual stream width D."""
    n_layers: int = 16
    """Transformer blocks L."""
    n_heads: int = 16
    """Attention heads; d_model / n_heads is the head dim (must be even for RoPE)."""
    max_sequence_length: int = 4096
    """Longest sequence the model is trained/evaluated on."""
    rope_theta: float = 10000.0
    """RoPE base."""
    qk_norm: bool = True
    """RMSNorm over the full q and k projections (D wide) before splitting heads (OLMoE)."""
    document_masking: bool = False
    """Attend only within each document of a packed sequence (split after data.eos_token_id) and
    restart RoPE positions at each document; OLMoE (false) attends across documents."""
    document_masking_backend: DocumentMaskBackend = "auto"
    """'sdpa' (dense mask, any device), 'flex' (FlexAttention, skips masked tiles; trains on
    CUDA only) or 'auto' (flex on CUDA, sdpa elsewhere); see moe_model/attention.py."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (block norms, QK-norm, final norm)."""
    block_type: BlockType = "moe"
    """'moe' (router + experts in every block) or 'dense' (one FFN per block)."""
    activation_type: ActivationType = "swiglu"
    """Expert activation, a key of moe_model.activations.ACTIVATIONS."""
    activation_order: int = 3
    """Polynomial order of polyrelu/polynorm and their _glu forms (ignored by the others)."""
    activation_eps: float = 1e-6
    """Epsilon of polynorm's (and polynorm_glu's) per-row RMS norm (ignored by the others)."""
    activation_backend: ActivationBackend = "auto"
    """Kernel backend of polyrelu/polynorm and their _glu forms (see moe_model.kernels)."""
    mlp_hidden_size: int = 1024
    """Per-expert hidden size H; for gated activations each of w1, w3 is D -> H."""
    moe_num_experts: int = 64
    """Experts per MoE layer E. Fine-grained experts (DeepSeekMoE, arXiv:2401.06066 sec. 3.1):
    E -> mE, moe_top_k K -> mK, mlp_hidden_size H -> H/m keeps the expert parameters and active FLOPs."""
    moe_top_k: int = 8
    """Experts per token K."""
    moe_loss_weight: float = 0.01
    """Load-balancing loss weight (equals the loss at perfect balance)."""
    moe_zloss_weight: float = 0.001
    """Router z-loss weight."""
    moe_renormalize: bool = False
    """Renormalise the top-k routing weights to sum to 1 (OLMoE: no); needs moe_top_k > 1, as
    one renormalised weight is the constant 1."""
    moe_expert_impl: ExpertImpl = "auto"
    """'grouped_mm', 'loop', or 'auto': grouped_mm when d_model and H are multiples of 8 and it
    supports the dtype (bf16 anywhere; fp32 on CPU without torch.compile), else the loop."""
    moe_activation_per_expert: bool = False
    """One polyrelu/polynorm coefficient set per expert instead of one per MoE layer shared by its
    experts (the paper); ignored by activations without coefficients and by dense blocks."""
    moe_router_score: RouterScore = "softmax"
    """Router gate: 'softmax' over all E experts (OLMoE) or 'sigmoid' per expert (DeepSeek-V3);
    the load-balancing loss then averages the sigmoid scores normalised over E."""
    moe_route_scale: float = 1.0
    """Factor on the top-k combine weights, after moe_renormalize (DeepSeek-V3: 2.5)."""
    moe_bias_update_rate: float | None = None
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores, used for the
    top-k choice only, moved by this step after every optimizer step towards the mean load
    (DeepSeek-V3: 0.001); None = off."""
    moe_lb_granularity: LbGranularity = "micro_batch"
    """Token set of the load-balancing loss: 'micro_batch' (OLMoE), 'sequence' (each sequence
    on its own, DeepSeek-V3) or 'global_batch' (expert counts all-reduced over data-parallel
    ranks per micro-batch, not pooled over gradient-accumulation micro-batches; Qiu et al.,
    arXiv:2501.11873, pool over both)."""
    moe_capacity_factor: float | None = None
    """None = dropless (OLMoE). A number cf: each expert takes at most ceil(cf*T*K/E) of the T*K
    routed rows of a micro-batch's T tokens on this rank in training, the rest (lowest router
    score first) dropped (Switch Transformer, arXiv:2101.03961 sec. 2.2; GShard,
    arXiv:2006.16668)."""
    moe_shared_experts: int = 0
    """Always-on experts per MoE layer, each an FFN with the layer's activation, added to the
    routed output (DeepSeek-V3: 1)."""
    moe_shared_hidden_size: int | None = None
    """Hidden size of each shared expert; None = mlp_hidden_size."""
    moe_first_dense_layers: int = 0
    """The first k blocks have a dense FFN act(x W_in) W_out instead of MoE (DeepSeek-V3: 3,
    n_dense_layers in inference/configs/config_671B.json)."""
    moe_first_dense_hidden_size: int | None = None
    """Hidden size of those dense FFNs; None = moe_top_k * mlp_hidden_size (the routed experts'
    active width). DeepSeek-V3's is (K + shared experts) * expert width: 9 * 2048 = 18432."""
    moe_force_balance: bool = False
    """Benchmarks and the planner only (training refuses it): route token t's k-th row to expert
    (t*K + k) mod E, every expert T*K/E rows, weights the router's scores there (torchtitan)."""
    init_std: float = 0.02
    """Std of the truncated-normal init of every linear, embedding and expert weight."""
    init_cutoff_factor: float = 3.0
    """Truncate the init at +-init_cutoff_factor * init_std."""

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Like ``ModelConfig(**d)`` but an unknown key is a ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def build(self, init_device: str = "cpu") -> MoETransformer:
        """The model; on ``init_device="meta"`` call ``to_empty`` then ``init_weights`` after."""
        model = MoETransformer(
            [self.build_block(layer, "meta") for layer in range(self.n_layers)],
            embedding_size=self.embedding_size,
            d_model=self.d_model,
            norm_eps=self.layer_norm_eps,
            init=self.weight_init,
            document_masking=self.document_masking,
            document_masking_backend=self.document_masking_backend,
            init_device=init_device,
        )
        model.config = self
        return model

    def build_block(self, layer: int, init_device: str | torch.device = "cpu") -> Block:
        """Block ``layer`` (0-based): attention and its MoE layer or dense FFN."""
        attn = Attention(
            self.d_model,
            self.n_heads,
            qk_norm=self.qk_norm,
            norm_eps=self.layer_norm_eps,
            rope_theta=self.rope_theta,
            init=self.weight_init,
            init_device=init_device,
        )
        if self.is_moe_block(layer):
            ffn = MoELayer(self.moe_layer_config(), init_device)
        else:
            ffn = DenseFFN(self.d_model, self.dense_hidden_size(layer), self.activation_spec(),
                           self.weight_init, init_device)  # fmt: skip
        return Block(attn, ffn, self.d_model, self.layer_norm_eps, init_device)

    def moe_layer_config(self) -> MoEConfig:
        """The settings of every MoE layer, from the ``moe_*`` keys."""
        return MoEConfig(
            d_model=self.d_model,
            hidden_size=self.mlp_hidden_size,
            num_experts=self.moe_num_experts,
            top_k=self.moe_top_k,
            activation=self.activation_spec(),
            activation_per_expert=self.activation_sets_per_layer > 1,
            init=self.weight_init,
            router_score=self.moe_router_score,
            renormalize=self.moe_renormalize,
            route_scale=self.moe_route_scale,
            bias_update_rate=self.moe_bias_update_rate,
            capacity_factor=self.moe_capacity_factor,
            lb_granularity=self.moe_lb_granularity,
            lb_weight=self.moe_loss_weight,
            z_weight=self.moe_zloss_weight,
            expert_impl=self.moe_expert_impl,
            shared_experts=self.moe_shared_experts,
            shared_hidden_size=self.shared_hidden_size,
            force_balance=self.moe_force_balance,
        )

    @property
    def weight_init(self) -> WeightInit:
        return WeightInit(self.init_std, self.init_cutoff_factor)

    def activation_spec(self) -> ActivationSpec:
        """The activation every FFN of the model builds."""
        return ActivationSpec(self.activation_type, self.activation_kwargs())

    # ---- validation --------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self._check_types()
        for key in (
            "vocab_size",
            "embedding_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_sequence_length",
            "activation_order",
            "mlp_hidden_size",
            "moe_num_experts",
            "moe_top_k",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        for key in (
            "rope_theta",
            "layer_norm_eps",
            "activation_eps",
            "init_std",
            "init_cutoff_factor",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        for key in ("moe_loss_weight", "moe_zloss_weight"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0")
        if self.embedding_size < self.vocab_size:
            raise ConfigError(
                f"model.embedding_size={self.embedding_size} must be >= "
                f"model.vocab_size={self.vocab_size}"
            )
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.d_model/model.n_heads={self.d_model // self.n_heads} (head dim) must be "
                "even for RoPE"
            )
        if self.moe_top_k > self.moe_num_experts:
            raise ConfigError(
                f"model.moe_top_k={self.moe_top_k} must be <= "
                f"model.moe_num_experts={self.moe_num_experts}"
            )
        if self.moe_expert_impl == "grouped_mm":
            for key in ("d_model", "mlp_hidden_size"):
                if getattr(self, key) % GROUPED_MM_ALIGN:
                    raise ConfigError(
                        f"model.{key}={getattr(self, key)} must be a multiple of "
                        f"{GROUPED_MM_ALIGN} for model.moe_expert_impl='grouped_mm' "
                        "(16-byte aligned strides); use 'loop' or 'auto'"
                    )
        self._check_moe_options()

    def _check_moe_options(self) -> None:
        """The routing and balancing variants: each value, then the combinations."""
        if not self.moe_route_scale > 0:
            raise ConfigError(f"model.moe_route_scale={self.moe_route_scale} must be > 0")
        for key in ("moe_bias_update_rate", "moe_capacity_factor", "moe_shared_hidden_size",
                    "moe_first_dense_hidden_size"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"model.{key}={value} must be > 0 (or null)")
        for key in ("moe_shared_experts", "moe_first_dense_layers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0")
        defaults = {f.name: f.default for f in fields(self)}
        moe_only = ("moe_router_score", "moe_route_scale", "moe_bias_update_rate",
                    "moe_lb_granularity", "moe_capacity_factor", "moe_shared_experts",
                    "moe_shared_hidden_size", "moe_first_dense_layers",
                    "moe_first_dense_hidden_size")
        if self.block_type != "moe":
            for key in moe_only:
                if getattr(self, key) != defaults[key]:
                    raise ConfigError(
                        f"model.{key}={getattr(self, key)!r} needs model.block_type='moe' "
                        f"(is {self.block_type!r})"
                    )
        if self.moe_first_dense_layers >= self.n_layers:
            raise ConfigError(
                f"model.moe_first_dense_layers={self.moe_first_dense_layers} must be < "
                f"model.n_layers={self.n_layers} (for no MoE layer at all use "
                "model.block_type='dense')"
            )
        if self.moe_first_dense_hidden_size is not None and self.moe_first_dense_layers == 0:
            raise ConfigError(
                f"model.moe_first_dense_hidden_size={self.moe_first_dense_hidden_size} is unused: "
                "model.moe_first_dense_layers is 0"
            )
        if self.moe_shared_hidden_size is not None and self.moe_shared_experts == 0:
            raise ConfigError(
                f"model.moe_shared_hidden_size={self.moe_shared_hidden_size} is unused: "
                "model.moe_shared_experts is 0"
            )
        if self.moe_renormalize and self.moe_top_k == 1:
            # w / w = 1 for the one chosen expert: the combine weight is a constant, and the
            # router would learn only from the balancing losses, never from the LM loss.
            raise ConfigError(
                "model.moe_renormalize=true with model.moe_top_k=1 makes every combine weight 1, "
                "so the router gets no gradient from the LM loss; set model.moe_renormalize=false "
                "or model.moe_top_k > 1"
            )
        if self.moe_router_score != "softmax" and self.moe_zloss_weight > 0:
            raise ConfigError(
                f"model.moe_zloss_weight={self.moe_zloss_weight} is the softmax router's z-loss "
                f"(logsumexp of the logits); with model.moe_router_score="
                f"{self.moe_router_score!r} set it to 0"
            )
        if self.moe_lb_granularity != defaults["moe_lb_granularity"] and self.moe_loss_weight == 0:
            raise ConfigError(
                f"model.moe_lb_granularity={self.moe_lb_granularity!r} has no effect with "
                "model.moe_loss_weight=0"
            )

    def _check_types(self) -> None:
        """Check every field against its annotation (int, float, bool, str, a Literal of the
        allowed values, or one of them | None); ints become floats where a float is expected.

        PyYAML reads ``1e-5`` (no dot) as a string, so numeric strings are accepted for floats.
        """
        for name, kind in _field_types(type(self)).items():
            setattr(self, name, _checked(f"model.{name}", getattr(self, name), kind))

    # ---- derived sizes -----------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        """Whether the activation takes a fused 2H input (w1 and w3)."""
        return ACTIVATIONS[self.activation_type].gated

    @property
    def mlp_in_size(self) -> int:
        """Output width of the expert input projection: 2H for gated activations, else H."""
        return self.in_size(self.mlp_hidden_size)

    def in_size(self, hidden_size: int) -> int:
        """Output width of an FFN input projection of hidden size ``hidden_size`` (2x if gated)."""
        return 2 * hidden_size if self.gated else hidden_size

    def is_moe_block(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has the MoE layer; else a dense FFN."""
        return self.block_type == "moe" and layer >= self.moe_first_dense_layers

    @property
    def moe_layer_ids(self) -> list[int]:
        """The blocks with an MoE layer, in order (rows of ModelOutput.tokens_per_expert_LE)."""
        return [i for i in range(self.n_layers) if self.is_moe_block(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def shared_hidden_size(self) -> int:
        """Hidden size of each shared expert."""
        return self.moe_shared_hidden_size or self.mlp_hidden_size

    def dense_hidden_size(self, layer: int) -> int:
        """Hidden size of the dense FFN of block ``layer`` (not an MoE block)."""
        if self.block_type == "dense":
            return self.mlp_hidden_size
        return self.moe_first_dense_hidden_size or self.moe_top_k * self.mlp_hidden_size

    def activation_kwargs(self) -> dict[str, Any]:
        """The settings the chosen activation class accepts, from this config."""
        available = {
            "order": self.activation_order,
            "eps": self.activation_eps,
            "backend": self.activation_backend,
        }
        cls = ACTIVATIONS[self.activation_type]
        return {k: v for k, v in available.items() if k in cls.options}

    @property
    def has_activation_coefficients(self) -> bool:
        """Whether the activation has trainable coefficients (polyrelu, polynorm)."""
        return ACTIVATIONS[self.activation_type].has_coefficients

    @property
    def activation_sets_per_layer(self) -> int:
        """Coefficient sets of the routed experts in one block: E with moe_activation_per_expert,
        else 1 (0 if the activation has none). Shared experts and dense FFNs have one each."""
        if not self.has_activation_coefficients:
            return 0
        if self.moe_activation_per_expert and self.block_type == "moe":
            return self.moe_num_experts
        return 1

    def _coefficients_per_set(self) -> int:
        return self.activation_order + 1 if self.has_activation_coefficients else 0

    def _ffn_params(self, hidden_size: int) -> int:
        """One FFN (an expert, a shared expert, a dense FFN) of hidden size ``hidden_size`` with
        its own coefficient set, if the activation has one: D x in, H x D out."""
        return (
            self.d_model * self.in_size(hidden_size)
            + hidden_size * self.d_model
            + self._coefficients_per_set()
        )

    def _moe_params(self, experts: int) -> int:
        """One MoE layer counting ``experts`` routed experts (all E, or top-k for 'active')."""
        expert = self._ffn_params(self.mlp_hidden_size) - self._coefficients_per_set()
        sets = self.activation_sets_per_layer
        if sets > 1:  # one set per expert: those of the counted experts
            sets = experts
        return (
            self.d_model * self.moe_num_experts  # router: always fully used
            + experts * expert
            + sets * self._coefficients_per_set()
            + self.moe_shared_experts * self._ffn_params(self.shared_hidden_size)  # always on
        )

    def _attention_block_params(self) -> int:
        """Attention + the two block norms (+ QK-norm weights)."""
        d = self.d_model
        n = 4 * d * d + 2 * d  # q, k, v, o projections; attention and FFN norms
        if self.qk_norm:
            n += 2 * d
        return n

    def _blocks_params(self, experts: int) -> int:
        """All blocks, counting ``experts`` routed experts in each MoE layer."""
        return sum(
            self._attention_block_params()
            + (
                self._moe_params(experts)
                if self.is_moe_block(layer)
                else self._ffn_params(self.dense_hidden_size(layer))
            )
            for layer in range(self.n_layers)
        )

    def _embedding_params(self) -> int:
        return self.embedding_size * self.d_model

    def num_params(self) -> int:
        """Total parameters (equals the sum of p.numel() over the built model)."""
        return (
            self._embedding_params()  # token embedding
            + self._blocks_params(self.moe_num_experts)
            + self.d_model  # final norm
            + self.embedding_size * self.d_model  # untied LM head
        )

    def num_active_params(self) -> int:
        """Parameters touched per token: top-k experts of each MoE layer, everything else (shared
        experts and dense FFNs included) in full.

        Like OLMo/OLMoE's reported "1B active", the input embedding and the LM head are counted
        (OLMoE-1B-7B: 1.28B active of 6.92B total). Dropped rows (moe_capacity_factor) are not
        subtracted: this is the routed work, not what survived the capacity limit.
        """
        return (
            self._embedding_params()
            + self._blocks_params(self.moe_top_k)
            + self.d_model
            + self.embedding_size * self.d_model
        )

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, forward + backward (olmo-core / PaLM convention).

        6 * (active params minus the input embedding, whose lookup does no matmul; the LM head is
        counted) + 12 * L * D * S for the attention scores and values (QK^T and AV, forward 2x2,
        backward twice that, per layer). Norms, softmax, activations and the router softmax are
        not counted.
        """
        n = self.num_active_params() - self._embedding_params()
        return 6 * n + 12 * self.n_layers * self.d_model * seq_len


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> its annotation evaluated (the module has postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _checked(key: str, value: Any, kind: Any) -> Any:
    """``value`` if it fits the annotation ``kind`` (a float for a number), else a ConfigError
    naming ``key``, the value and what was expected."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None, Optional[X]
        if value is None:
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} must be one of {list(choices)}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an int")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be finite")
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"{key}: no check for the annotation {kind!r}")
