"""The built-in length model: small enough to ship, trains from scratch on a CPU in minutes.

Two forms share one interface (tokenize -> collate -> forward -> [batch, num_buckets + 1] logits,
the last column a ranking score):
- `bag`: mean of unigram and hashed-bigram embeddings over the prompt's last `max_prompt_tokens`
  tokens and, separately, over its last `tail_tokens` tokens (where the newest request sits),
  plus log prompt length, into an MLP (fastText-style).
- `transformer`: a small pre-norm transformer encoder over the last `max_prompt_tokens` tokens,
  mean-pooled and last-token features into the same head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from tetriinfer.predictor.config import FORMS
from tetriinfer.predictor.features import NUM_FEATURES, prompt_features
from tetriinfer.predictor.tokenizer import load_tokenizer

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class BuiltinModelConfig:
    form: str = "bag"
    vocab_size: int = 8192
    num_outputs: int = 7  # num_buckets + 1 (the score)
    dim: int = 48
    hidden: int = 128
    bigram_buckets: int = 8192
    max_prompt_tokens: int = 512
    tail_tokens: int = 64
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")


@dataclass
class Encoded:
    """A prompt's last `max_prompt_tokens` ids, its full length in tokens, its shape features."""

    ids: list[int]
    num_tokens: int
    features: list[float] = field(default_factory=list)


def _features(batch: list[Encoded]) -> torch.Tensor:
    return torch.tensor([e.features for e in batch], dtype=torch.float32)


class BagEncoder(nn.Module):
    def __init__(self, cfg: BuiltinModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.EmbeddingBag(cfg.vocab_size + cfg.bigram_buckets, cfg.dim, mode="mean")
        self.out_dim = 2 * cfg.dim + NUM_FEATURES

    def _ngrams(self, ids: list[int]) -> list[int]:
        v, h = self.cfg.vocab_size, self.cfg.bigram_buckets
        bigrams = [v + (a * 1_000_003 + b) % h for a, b in zip(ids, ids[1:])]
        return ids + bigrams or [0]

    def collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        flat: list[int] = []
        offsets: list[int] = []
        for views in ([e.ids for e in batch], [e.ids[-self.cfg.tail_tokens :] for e in batch]):
            for ids in views:
                offsets.append(len(flat))
                flat.extend(self._ngrams(ids))
        return {
            "ids": torch.tensor(flat, dtype=torch.long),
            "offsets": torch.tensor(offsets, dtype=torch.long),
            "features": _features(batch),
        }

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        pooled = self.embed(ids, offsets)
        whole, tail = pooled.chunk(2, dim=0)
        return torch.cat([whole, tail, features], dim=1)


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: BuiltinModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_prompt_tokens, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.num_heads, 2 * cfg.dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.out_dim = 2 * cfg.dim + NUM_FEATURES

    def collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(1, max(len(e.ids) for e in batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, e in enumerate(batch):  # right-aligned, so the newest token is always last
            if e.ids:
                ids[row, width - len(e.ids) :] = torch.tensor(e.ids)
                mask[row, width - len(e.ids) :] = True
        mask[:, -1] = True  # an empty prompt still attends to one (padding) token
        return {"ids": ids, "mask": mask, "features": _features(batch)}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(positions)
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1)
        return torch.cat([mean, h[:, -1], features], dim=1)


class BuiltinLengthModel(nn.Module):
    """Tokenizer + encoder + MLP head; outputs [batch, num_outputs] (bucket logits, then score)."""

    def __init__(self, cfg: BuiltinModelConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = BagEncoder(cfg) if cfg.form == "bag" else TransformerEncoder(cfg)
        self.head = nn.Sequential(
            nn.Linear(self.encoder.out_dim, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_outputs),
        )

    def tokenize(self, prompts: list[str]) -> list[Encoded]:
        encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=False)
        keep = self.cfg.max_prompt_tokens
        return [
            Encoded(enc.ids[-keep:], len(enc.ids), prompt_features(prompt, len(enc.ids)))
            for prompt, enc in zip(prompts, encodings)
        ]

    def collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        return self.encoder.collate(batch)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(**batch))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, out_dir: Path) -> None:
        """Weights in float16 (half the size to ship; predictions barely move), tokenizer beside them."""
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out_dir / WEIGHTS_FILE))
        self.tokenizer.save(str(out_dir / TOKENIZER_FILE))

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    @classmethod
    def load(cls, model_dir: Path, config: dict) -> "BuiltinLengthModel":
        model = cls(BuiltinModelConfig(**config), load_tokenizer(model_dir / TOKENIZER_FILE))
        state = {k: v.float() for k, v in load_file(str(model_dir / WEIGHTS_FILE)).items()}
        model.load_state_dict(state)
        return model.eval()
