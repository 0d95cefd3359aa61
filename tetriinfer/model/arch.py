"""One normalized description of a decoder-only architecture, read from a Hugging Face config dict.

Hugging Face spells the same thing several ways across families and versions (rope_theta vs
rope_parameters, ffn_dim vs intermediate_size, ...); everything downstream reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# phi3: Llama with q/k/v and gate/up stored fused; mixtral, qwen2_moe, qwen3_moe: sparse MoE MLPs;
# granite: Llama with four scalar multipliers (embeddings, residual branches, attention, logits)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "granite")
SUPPORTED_MODEL_TYPES = LLAMA_LIKE + ("opt",)
ROPE_SCALINGS = ("linear", "llama3", "yarn")  # besides the default (model.layers.rope_inv_freq)


def token_id_list(value) -> list[int]:
    """A config's token id field (`eos_token_id`: one id, a list of ids, or absent) as a list."""
    return [] if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # Llama's: gate, up and down projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    # Granite: embeddings times `embedding_multiplier`, each residual branch (attention, MLP) times
    # `residual_multiplier` before it is added, `attention_multiplier` as the softmax scale (None:
    # head_dim ** -0.5), logits divided by `logits_scaling`. 1.0 (None) everywhere else.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # Mixture of experts (model.moe): each token's MLP is the weighted sum of its router's top
    # `num_experts_per_tok` experts (renormalized if `norm_topk_prob`), plus a gated shared expert
    # (Qwen2-MoE) when `shared_expert_intermediate_size`; in the layers `sparse_layers` names.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    sparse_layers: tuple[int, ...] = ()
    # OPT only
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    @property
    def context_limit(self) -> int:
        """The longest sequence served exactly: the positions trained, or the sliding window (we keep
        no window mask, so a window model is exact only within it)."""
        limit = self.max_position_embeddings
        return limit if self.sliding_window is None else min(limit, self.sliding_window)

    def check_fits(self, max_model_len: int | None, tensor_parallel_sizes: tuple[int, ...] = (1,)) -> None:
        """Before any process starts: the context asked for fits, and each TP size splits the heads,
        KV heads and MLP features evenly (the same checks the engine would fail on later)."""
        if max_model_len is not None and max_model_len > self.context_limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's limit of {self.context_limit} tokens")
        for size in tensor_parallel_sizes:
            for n, what in ((self.num_heads, "attention heads"), (self.num_kv_heads, "KV heads"),
                            (self.intermediate_size, "MLP features"), (self.moe_intermediate_size, "expert features"),
                            (self.shared_expert_intermediate_size, "shared-expert features")):
                if n % size:
                    raise ValueError(f"tensor_parallel_size {size} does not divide the model's {n} {what}")

    @property
    def is_opt(self) -> bool:
        return self.model_type == "opt"

    @property
    def kv_bytes_per_token(self) -> int:
        """Per token, all layers, K and V, at 1 byte per element (multiply by the dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArch":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        eos_ids = tuple(token_id_list(cfg.get("eos_token_id")))
        num_heads = cfg["num_attention_heads"]
        common = dict(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "opt")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
        )
        if model_type == "opt":
            if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
                raise ValueError("OPT variants without biases or affine layer norms are not supported")
            if cfg.get("activation_function", "relu") != "relu":
                raise ValueError(f"unsupported OPT activation {cfg.get('activation_function')!r}")
            return cls(
                **common,
                intermediate_size=cfg["ffn_dim"],
                num_kv_heads=num_heads,
                head_dim=cfg["hidden_size"] // num_heads,
                norm_eps=1e-5,
                qkv_bias=True,
                word_embed_proj_dim=cfg.get("word_embed_proj_dim", cfg["hidden_size"]),
                do_layer_norm_before=cfg.get("do_layer_norm_before", True),
            )

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported activation {act!r} for {model_type}")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:  # e.g. Phi-4-mini: RoPE on part of each head
            raise ValueError(f"unsupported partial_rotary_factor {cfg['partial_rotary_factor']} (RoPE on whole heads only)")
        rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ROPE_SCALINGS:
                raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, {', '.join(ROPE_SCALINGS)})")
            else:
                scaling["rope_type"] = kind
                if kind == "yarn":  # transformers' defaults: the context given is the original one
                    scaling.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
                    if scaling.get("factor") is None:
                        scaling["factor"] = cfg["max_position_embeddings"] / scaling["original_max_position_embeddings"]
        sliding = cfg.get("sliding_window")
        qwen2_like = model_type in ("qwen2", "qwen2_moe")  # q/k/v biased, o not
        if model_type.startswith("qwen") and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            **common,
            intermediate_size=cfg["intermediate_size"],
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", qwen2_like))),
            # Qwen2 biases q/k/v only; Llama and Qwen3's `attention_bias` covers o_proj too
            o_bias=not qwen2_like and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=sliding,
            **_moe_fields(model_type, cfg),
            **_granite_fields(model_type, cfg),
        )


def _granite_fields(model_type: str, cfg: dict) -> dict:
    if model_type != "granite":
        return {}
    return dict(embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
                attention_multiplier=float(cfg.get("attention_multiplier", 1.0)),  # GraniteConfig's default
                logits_scaling=float(cfg.get("logits_scaling", 1.0)))


def _moe_fields(model_type: str, cfg: dict) -> dict:
    """The MoE fields of a Mixtral or Qwen-MoE config ({} for a dense model)."""
    if model_type == "mixtral":  # every layer sparse; top-k always renormalized
        return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True,
                    sparse_layers=tuple(range(cfg["num_hidden_layers"])))
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return {}
    # the hub's configs say num_experts; transformers >= 5 writes num_local_experts
    experts, step = cfg.get("num_experts") or cfg.get("num_local_experts", 0), cfg.get("decoder_sparse_step", 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    return dict(num_experts=experts, num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"], norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0,
                sparse_layers=tuple(i for i in range(cfg["num_hidden_layers"])
                                    if experts > 0 and i not in dense and (i + 1) % step == 0))
