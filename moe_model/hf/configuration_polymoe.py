"""Hugging Face config of an exported moe-polycom model (``model_type = "polymoe"``).

Self-contained: this file is copied into every exported directory and loaded there with
``trust_remote_code=True``, so it imports nothing from this repository.

Field names follow transformers' OLMoE config where one exists (``hidden_size``,
``num_experts_per_tok``, ``norm_topk_prob``...). ``vocab_size`` is the number of embedding rows
(50304 for OLMoE, as in its HF config); ``tokenizer_vocab_size`` is the tokenizer's (50280).
"""

from transformers import PreTrainedConfig

ACTIVATION_TYPES = (
    "relu", "gelu", "relu2", "swiglu", "polyrelu", "polynorm", "polyrelu_glu", "polynorm_glu"
)


class PolyMoEConfig(PreTrainedConfig):
    model_type = "polymoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 50304,
        tokenizer_vocab_size: int = 50280,
        hidden_size: int = 2048,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        qk_norm: bool = True,
        rms_norm_eps: float = 1e-5,
        block_type: str = "moe",
        hidden_act: str = "swiglu",
        activation_order: int = 3,
        activation_eps: float = 1e-6,
        intermediate_size: int = 1024,
        num_experts: int = 64,
        num_experts_per_tok: int = 8,
        norm_topk_prob: bool = False,
        moe_activation_per_expert: bool = False,
        moe_router_score: str = "softmax",
        moe_route_scale: float = 1.0,
        moe_bias_update_rate: float | None = None,
        moe_lb_granularity: str = "micro_batch",
        moe_capacity_factor: float | None = None,
        moe_shared_experts: int = 0,
        moe_shared_hidden_size: int | None = None,
        moe_first_dense_layers: int = 0,
        moe_first_dense_hidden_size: int | None = None,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        initializer_range: float = 0.02,
        init_cutoff_factor: float = 3.0,
        use_cache: bool = True,
        pad_token_id: int = 1,
        bos_token_id: int | None = None,
        eos_token_id: int = 50279,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if hidden_act not in ACTIVATION_TYPES:
            raise ValueError(f"hidden_act={hidden_act!r}; known activations: {list(ACTIVATION_TYPES)}")
        if block_type not in ("moe", "dense"):
            raise ValueError(f"block_type={block_type!r} must be 'moe' or 'dense'")
        if moe_router_score not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score={moe_router_score!r} must be 'softmax' or 'sigmoid'")
        if tie_word_embeddings:
            raise ValueError("polymoe models have an untied LM head (tie_word_embeddings=False)")
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # Plain multi-head attention; stated for tools that read it (vLLM, memory estimators).
        self.num_key_value_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.qk_norm = qk_norm
        self.rms_norm_eps = rms_norm_eps
        self.block_type = block_type
        self.hidden_act = hidden_act
        self.activation_order = activation_order
        self.activation_eps = activation_eps
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.moe_activation_per_expert = moe_activation_per_expert
        # Routing (used here): gate, weight scale, whether a selection bias is stored, shared
        # experts, dense first blocks. Training only (kept for the round trip): the bias update
        # rate's value, the balance-loss granularity, the capacity factor (inference is
        # dropless, as training's evaluation).
        self.moe_router_score = moe_router_score
        self.moe_route_scale = moe_route_scale
        self.moe_bias_update_rate = moe_bias_update_rate
        self.moe_lb_granularity = moe_lb_granularity
        self.moe_capacity_factor = moe_capacity_factor
        self.moe_shared_experts = moe_shared_experts
        self.moe_shared_hidden_size = moe_shared_hidden_size
        self.moe_first_dense_layers = moe_first_dense_layers
        self.moe_first_dense_hidden_size = moe_first_dense_hidden_size
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.initializer_range = initializer_range
        self.init_cutoff_factor = init_cutoff_factor
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
