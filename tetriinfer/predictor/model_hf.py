"""The paper's length model: a Hugging Face sequence classifier fine-tuned from a local directory.

The paper fine-tunes OPT-125M; any `AutoModelForSequenceClassification` checkpoint works. Its
classification head is resized to num_buckets + 1 outputs (bucket logits, then a ranking score),
the same layout as the built-in model. Prompts are cut from the left, keeping the newest tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tetriinfer.predictor.model_builtin import Encoded

HF_SUBDIR = "hf"


class HFLengthModel(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, max_prompt_tokens: int = 512) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        if tokenizer.pad_token_id is None:  # GPT-style tokenizers have no pad token
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, num_outputs: int, max_prompt_tokens: int = 512) -> "HFLengthModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_outputs, ignore_mismatched_sizes=True
        )
        return cls(model, tokenizer, max_prompt_tokens)

    def tokenize(self, prompts: list[str]) -> list[Encoded]:
        ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        return [Encoded(x[-self.max_prompt_tokens :], len(x)) for x in ids]

    def collate(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(1, max(len(e.ids) for e in batch))
        ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, e in enumerate(batch):  # right padding, the layout HF classifiers pool correctly
            if e.ids:
                ids[row, : len(e.ids)] = torch.tensor(e.ids)
                mask[row, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch).logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(str(out_dir / HF_SUBDIR))
        self.tokenizer.save_pretrained(str(out_dir / HF_SUBDIR))

    def config_dict(self) -> dict:
        return {"max_prompt_tokens": self.max_prompt_tokens}

    @classmethod
    def load(cls, model_dir: Path, config: dict) -> "HFLengthModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = str(model_dir / HF_SUBDIR)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        return cls(model, AutoTokenizer.from_pretrained(path), **config).eval()
