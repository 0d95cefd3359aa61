"""The built-in length model: small enough to ship, trains from scratch on a CPU in minutes.

Two forms share one interface (tokenize -> collate -> forward -> [batch, num_buckets + 1] logits,
the last column a ranking score):
- `bag`: mean of unigram and hashed-bigram embeddings over the prompt's last `max_prompt_tokens`
  tokens and, separately, over its last `tail_tokens` tokens (where the newest request sits),
  plus the prompt's conversation-shape (and, with `features="text"`, cheap text) features
  (`features.py`), into an MLP (fastText-style).
- `transformer`: a small pre-norm transformer encoder over the last `max_prompt_tokens` tokens,
  mean-pooled and last-token features into the same head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from tetriinfer.predictor.config import FORMS
from tetriinfer.predictor.features import num_features, prompt_features
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
    features: str = "shape"  # features.FEATURE_SETS; artifacts written before the `text` set lack the key
    members: int = 1  # > 1: an ensemble of that many models of this shape (`predictor ensemble`)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        num_features(self.features)  # checks the name
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")


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
        self.out_dim = 2 * cfg.dim + num_features(cfg.features)

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
        self.out_dim = 2 * cfg.dim + num_features(cfg.features)

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


def _encoder(cfg: BuiltinModelConfig) -> nn.Module:
    return BagEncoder(cfg) if cfg.form == "bag" else TransformerEncoder(cfg)


def _head(cfg: BuiltinModelConfig, in_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                         nn.Linear(cfg.hidden, cfg.num_outputs))


class EnsembleEncoder(nn.Module):
    """Members' encoders over one collated batch (they share tokenizer and shape); outputs side by side."""

    def __init__(self, cfg: BuiltinModelConfig) -> None:
        super().__init__()
        self.members = nn.ModuleList(_encoder(cfg) for _ in range(cfg.members))
        self.widths = [m.out_dim for m in self.members]
        self.out_dim = sum(self.widths)

    def collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        return self.members[0].collate(batch)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(**batch) for m in self.members], dim=1)


class EnsembleHead(nn.Module):
    """Members' heads, each on its encoder's part; bucket logits are the log of the members' mean
    probabilities, the score the mean of the members' scores, each standardised by the shift and
    scale `predictor ensemble` measured on validation prompts (the members' scales differ)."""

    def __init__(self, cfg: BuiltinModelConfig, widths: list[int]) -> None:
        super().__init__()
        self.widths = widths
        self.heads = nn.ModuleList(_head(cfg, w) for w in widths)
        self.register_buffer("score_shift", torch.zeros(len(widths)))
        self.register_buffer("score_scale", torch.ones(len(widths)))

    def member_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(part) for head, part in zip(self.heads, x.split(self.widths, dim=1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack(self.member_outputs(x))  # [members, batch, outputs]
        probs = outs[..., :-1].float().log_softmax(-1).logsumexp(0) - math.log(len(self.widths))
        scores = (outs[..., -1] - self.score_shift[:, None]) / self.score_scale[:, None]
        return torch.cat([probs, scores.mean(0, keepdim=True).T], dim=1)


class BuiltinLengthModel(nn.Module):
    """Tokenizer + encoder + MLP head; outputs [batch, num_outputs] (bucket logits, then score).
    With `cfg.members` > 1, an ensemble (`EnsembleEncoder`, `EnsembleHead`) in the same interface."""

    def __init__(self, cfg: BuiltinModelConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        if cfg.members == 1:
            self.encoder = _encoder(cfg)
            self.head = _head(cfg, self.encoder.out_dim)
        else:
            self.encoder = EnsembleEncoder(cfg)
            self.head = EnsembleHead(cfg, self.encoder.widths)

    def tokenize(self, prompts: list[str]) -> list[Encoded]:
        encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=False)
        keep = self.cfg.max_prompt_tokens
        return [
            Encoded(enc.ids[-keep:], len(enc.ids), prompt_features(prompt, len(enc.ids), self.cfg.features))
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
