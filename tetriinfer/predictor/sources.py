"""Real (prompt, reply) data from ../shared/data, turned into `LengthExample`s, and the split.

- ShareGPT: every human turn followed by a reply becomes one example; the prompt is the earlier
  turns (their last `context_chars` characters) plus the human turn, the label is the reply.
- AlpacaEval: each of 805 instructions with the replies of several models (one example per reply).
- GSM8K: test questions with their human-written worked answers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tetriinfer.predictor.examples import LengthExample

ROLE_TAGS = {"human": "USER", "gpt": "ASSISTANT", "system": "SYSTEM"}
OPENAI_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
SPLITS = ("train", "val", "test")
_CHUNK_SUFFIX = re.compile(r"_\d+$")


def format_turn(role: str, text: str) -> str:
    return f"{ROLE_TAGS.get(role, role.upper())}: {text}\n"


def format_chat(messages: Sequence[Mapping[str, str]]) -> str:
    """OpenAI-style chat messages (`role`, `content`) in the layout the predictor was trained on."""
    return "".join(format_turn(OPENAI_ROLES.get(m["role"], m["role"]), m["content"]) for m in messages)


def conversation_group(record_id: str) -> str:
    """ShareGPT ids `X_k` are the k-th chunk of conversation X: all chunks form one group."""
    return _CHUNK_SUFFIX.sub("", record_id)


def sharegpt_examples(data_dir: str | Path, context_chars: int = 2000) -> list[LengthExample]:
    examples = []
    with gzip.open(Path(data_dir) / "sharegpt_v3_partial.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            group = conversation_group(record["id"])
            turns = record["conversations"]
            context = ""
            for turn, reply in zip(turns, turns[1:]):
                if turn["from"] == "human" and reply["from"] == "gpt" and turn["value"].strip():
                    prompt = context[-context_chars:] + format_turn("human", turn["value"])
                    examples.append(LengthExample(prompt, response=reply["value"], group=group))
                context += format_turn(turn["from"], turn["value"])
    return examples


def split_of(group: str, val_percent: int = 10, test_percent: int = 10) -> str:
    """Deterministic split by a hash of the group, so a conversation never spans two splits."""
    bucket = int.from_bytes(hashlib.sha1(group.encode()).digest()[:4], "big") % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + val_percent:
        return "val"
    return "train"


def split_examples(examples: list[LengthExample]) -> dict[str, list[LengthExample]]:
    splits: dict[str, list[LengthExample]] = {name: [] for name in SPLITS}
    for ex in examples:
        splits[split_of(ex.group)].append(ex)
    return splits


def alpaca_eval_examples(data_dir: str | Path) -> list[LengthExample]:
    data_dir = Path(data_dir)
    with open(data_dir / "prompts.jsonl", encoding="utf-8") as f:
        prompts = {row["idx"]: row["instruction"] for row in map(json.loads, f)}
    with gzip.open(data_dir / "outputs_selected_models.jsonl.gz", "rt", encoding="utf-8") as f:
        return [
            LengthExample(format_turn("human", prompts[row["idx"]]), response=row["output"],
                          group=f"alpaca-{row['idx']}")
            for row in map(json.loads, f)
        ]


def gsm8k_examples(data_dir: str | Path) -> list[LengthExample]:
    with gzip.open(Path(data_dir) / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        return [
            LengthExample(format_turn("human", row["question"]), response=row["answer"], group=f"gsm8k-{i}")
            for i, row in enumerate(map(json.loads, f))
        ]
