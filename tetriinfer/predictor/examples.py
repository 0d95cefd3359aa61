"""The length-example file format (JSON lines) and its strict reader.

One JSON object per line: `prompt` (text, earlier turns included) and either `response` (text, to
be counted with the label tokenizer) or `output_tokens` (int). `group` (optional) names the
conversation, so splits can keep a conversation on one side.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class ExampleFileError(ValueError):
    """A malformed example file; the message names the file and the line."""


@dataclass(frozen=True)
class LengthExample:
    prompt: str
    response: str | None = None
    output_tokens: int | None = None
    group: str = ""


def _parse_line(text: str, where: str) -> LengthExample:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExampleFileError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ExampleFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ExampleFileError(f"{where}: missing field 'prompt' (a string)")
    response, output_tokens = obj.get("response"), obj.get("output_tokens")
    if response is None and output_tokens is None:
        raise ExampleFileError(f"{where}: needs 'response' (text) or 'output_tokens' (int)")
    if response is not None and not isinstance(response, str):
        raise ExampleFileError(f"{where}: 'response' must be a string")
    if output_tokens is not None and (
        isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0
    ):
        raise ExampleFileError(f"{where}: 'output_tokens' must be a non-negative integer, got {output_tokens!r}")
    group = obj.get("group", "")
    return LengthExample(prompt, response, output_tokens, str(group))


def read_examples(path: str | Path) -> list[LengthExample]:
    """Read a JSONL example file; any bad line (empty, not UTF-8, missing fields) raises naming it."""
    path = Path(path)
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ExampleFileError(f"{where}: not UTF-8 (byte {e.start})") from None
            if not text.strip():
                raise ExampleFileError(f"{where}: empty line")
            examples.append(_parse_line(text, where))
    if not examples:
        raise ExampleFileError(f"{path}: no examples")
    return examples


def write_examples(path: str | Path, examples: list[LengthExample]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {k: v for k, v in asdict(ex).items() if v is not None}
            if not ex.group:
                del row["group"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
