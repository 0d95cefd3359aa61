"""A model's sizes as the cost models need them, derived from a preset's HF-style config dict.

Counts weights of the decoder layers (attention and MLP projections), the embedding and the LM head.
Biases and norms are left out: they are under 0.1% of the parameters of every preset.
"""

from __future__ import annotations

from dataclasses import dataclass

from tetriinfer.presets import get_preset

DTYPE_BYTES = 2  # the simulated serving runs in fp16/bf16: weights and KV cache alike


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mlp_matrices: int  # 3 for gated MLPs (SwiGLU: gate, up, down), 2 for OPT's fc1/fc2
    vocab_size: int
    tied_embeddings: bool
    position_embeddings: int  # learned position table rows (OPT); 0 with RoPE

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelShape":
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        if config.get("model_type") == "opt":
            return cls(
                name=name,
                num_layers=config["num_hidden_layers"],
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=config["ffn_dim"],
                mlp_matrices=2,
                vocab_size=config["vocab_size"],
                tied_embeddings=config.get("tie_word_embeddings", True),
                position_embeddings=config["max_position_embeddings"] + 2,  # OPT offsets positions by 2
            )
        return cls(
            name=name,
            num_layers=config["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim", hidden // heads),
            intermediate_size=config["intermediate_size"],
            mlp_matrices=3,
            vocab_size=config["vocab_size"],
            tied_embeddings=config.get("tie_word_embeddings", False),
            position_embeddings=0,
        )

    @classmethod
    def from_preset(cls, name: str) -> "ModelShape":
        return cls.from_config(name, get_preset(name))

    @property
    def layer_params(self) -> int:
        """Weights of all decoder layers: the GEMMs every token goes through."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = self.mlp_matrices * self.hidden_size * self.intermediate_size
        return self.num_layers * (q_and_o + k_and_v + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        embeddings = (self.vocab_size + self.position_embeddings) * self.hidden_size
        lm_head = 0 if self.tied_embeddings else self.lm_head_params
        return self.layer_params + embeddings + lm_head

    @property
    def weight_bytes(self) -> int:
        """Memory the weights occupy."""
        return self.total_params * DTYPE_BYTES

    @property
    def weight_bytes_read_per_step(self) -> int:
        """Weights one forward pass streams from memory: every layer and the LM head (the embedding
        table is only gathered row by row)."""
        return (self.layer_params + self.lm_head_params) * DTYPE_BYTES

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES
