"""The docs cannot name a flag the command line does not have.

Every `tetriinfer SUBCOMMAND ... --flag` in the user docs (fenced code blocks and inline code spans)
must name a flag of that subcommand's argparse parser (`tetriinfer.cli.build_parser`); a code span
that starts with a flag (`--flip-idle`) must name a flag of some subcommand; in a table with a
column headed by a command (docs/compatibility.md: "`tetriinfer serve`"), that column's flags must be
that command's, and the table's other columns (vLLM's flags, notes) are not checked. Commands of
other programs (`vllm serve`, `pip`, `lm_eval`, scripts) are not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tetriinfer.cli import build_parser, walk_subparsers

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/compatibility.md", "docs/simulation.md", "docs/workloads.md", "docs/serving.md"]

FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
FENCE = re.compile(r"^```(\w*)[^\n]*$(.*?)^```\s*$", re.S | re.M)
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}  # python blocks etc. are not commands
SPAN = re.compile(r"`([^`]+)`")
CELL_SPLIT = re.compile(r"(?<!\\)\|")
SUBCOMMAND_WORD = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class Problem:
    where: str
    command: str
    flag: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.command}` has no {self.flag}"


def cli_flags() -> dict[tuple[str, ...], set[str]]:
    """(subcommand path) -> its long option strings, for every subcommand at any depth."""
    return {path: {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
            for path, sub in walk_subparsers(build_parser())}


class Checker:
    def __init__(self) -> None:
        self.flags = cli_flags()
        self.all_flags = set().union(*self.flags.values())
        self.subcommand_names = {name for path in self.flags for name in path}
        self.checked = 0  # flags looked up (so a test can tell the docs were read at all)

    # ---- one piece of text -------------------------------------------------------------------------
    def command(self, text: str, where: str) -> list[Problem]:
        """`text` is one shell command (or a code span); if it runs `tetriinfer SUB`, check its flags."""
        tokens = text.split()
        try:
            start = next(i for i, t in enumerate(tokens) if t == "tetriinfer" or t.endswith("/tetriinfer"))
        except StopIteration:
            return []
        path: tuple[str, ...] = ()
        rest = tokens[start + 1:]
        while rest and (*path, rest[0]) in self.flags:
            path, rest = (*path, rest[0]), rest[1:]
        if not path:
            word = rest[0] if rest else ""
            # `tetriinfer serve: error: ...` (a quoted message) is not a command; a plain unknown word is.
            return [Problem(where, text.strip(), f"subcommand {word!r}")] if SUBCOMMAND_WORD.match(word) else []
        command = " ".join(("tetriinfer", *path))
        return self.against(self.flags[path], " ".join(rest), where, command)

    def against(self, known: set[str], text: str, where: str, command: str) -> list[Problem]:
        problems = []
        for flag in FLAG.findall(text):
            self.checked += 1
            if flag not in known:
                problems.append(Problem(where, command, flag))
        return problems

    def span(self, span: str, where: str) -> list[Problem]:
        if span.lstrip().startswith("--"):
            return self.against(self.all_flags, span, where, "tetriinfer (any subcommand)")
        return self.command(span, where)

    def prose(self, text: str, where: str) -> list[Problem]:
        return [p for m in SPAN.finditer(text) for p in self.span(m.group(1), where)]

    def code_block(self, block: str, where: str) -> list[Problem]:
        problems = []
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]  # a shell comment
            for part in re.split(r"\s(?:&&|\|\||;|\|)\s", line):
                problems += self.command(part, where)
        return problems

    def table(self, rows: list[str], where: str) -> list[Problem]:
        cells = [[c.strip() for c in CELL_SPLIT.split(row.strip().strip("|"))] for row in rows]
        header, body = cells[0], [r for r in cells[2:]]
        columns = {}
        for i, head in enumerate(header):
            for m in SPAN.finditer(head):
                tokens = m.group(1).split()
                if tokens[:1] == ["tetriinfer"] and tuple(tokens[1:]) in self.flags:
                    columns[i] = tuple(tokens[1:])
        if not columns:
            return self.prose("\n".join(rows), where)
        problems = []
        for row in body:
            for i, path in columns.items():
                if i < len(row):
                    problems += self.against(self.flags[path], row[i].replace("\\|", "|"), where,
                                             "tetriinfer " + " ".join(path))
        return problems

    # ---- a whole markdown file -----------------------------------------------------------------------
    def markdown(self, text: str, name: str) -> list[Problem]:
        problems = []
        for m in FENCE.finditer(text):
            if m.group(1).lower() in SHELL_FENCES:
                problems += self.code_block(m.group(2), f"{name}:{text.count(chr(10), 0, m.start()) + 1}")
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
        lines = text.split("\n")
        i, prose_start = 0, 0
        while i <= len(lines):
            if i < len(lines) and lines[i].lstrip().startswith("|"):
                problems += self.prose("\n".join(lines[prose_start:i]), f"{name}:{prose_start + 1}")
                j = i
                while j < len(lines) and lines[j].lstrip().startswith("|"):
                    j += 1
                problems += self.table(lines[i:j], f"{name}:{i + 1}")
                i = prose_start = j
                continue
            i += 1
        problems += self.prose("\n".join(lines[prose_start:]), f"{name}:{prose_start + 1}")
        return problems


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_a_doc_names_exists(checker, doc):
    path = ROOT / doc
    before = checker.checked
    problems = checker.markdown(path.read_text(encoding="utf-8"), doc)
    assert not problems, "flags the CLI does not have:\n" + "\n".join(map(str, problems))
    assert checker.checked > before, f"{doc}: no tetriinfer flag found: is the parser still reading it?"


def test_the_compatibility_table_is_checked_against_serve(checker):
    text = (ROOT / "docs/compatibility.md").read_text(encoding="utf-8")
    before = checker.checked
    table = [line for line in text.splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(table) if "`tetriinfer serve`" in line)
    rows = [table[start], table[start + 1]]
    for line in table[start + 2:]:
        if line.startswith("|---"):
            break
        rows.append(line)
    assert checker.table(rows, "compatibility") == []
    assert checker.checked - before >= 25  # the serve column of the vLLM flag map


BAD_DOC = """
Run `tetriinfer serve --port 8000 --no-such-flag` or `tetriinfer simulate --trace f.jsonl --tracee x`.
A lone span: `--policy paper`, then `--made-up-knob`. Unknown subcommand: `tetriinfer simulat --x`.

```bash
tetriinfer bench serve --url http://x \\
    --bogus-bench-flag 3      # the continuation line counts too
vllm serve m --trust-remote-code && tetriinfer serve --model tiny --also-bogus
pip install torch --index-url https://example   # not ours: not checked
```

| `vllm serve` | `tetriinfer serve` | notes |
|---|---|---|
| `--trust-remote-code` | `--served-model-name` | vLLM's `--no-enable-prefix-caching` is not ours |
| `--foo` | `--not-a-serve-flag` | |
"""


def test_a_doc_naming_a_missing_flag_fails(checker):
    found = {(p.command, p.flag) for p in checker.markdown(BAD_DOC, "bad.md")}
    assert found == {
        ("tetriinfer serve", "--no-such-flag"),
        ("tetriinfer simulate", "--tracee"),
        ("tetriinfer (any subcommand)", "--made-up-knob"),
        ("tetriinfer simulat --x", "subcommand 'simulat'"),
        ("tetriinfer bench serve", "--bogus-bench-flag"),
        ("tetriinfer serve", "--also-bogus"),
        ("tetriinfer serve", "--not-a-serve-flag"),
    }


def test_flags_of_the_right_subcommand_and_negated_booleans_pass(checker):
    ok = ("`tetriinfer serve --no-cache-aware-routing --policy=paper --handoff-after-tokens 1 --no-prefix-caching`, "
          "`tetriinfer simulate --prefix-cache-fraction 0 --trace tests/data/mooncake_sample.jsonl`, "
          "`tetriinfer predictor eval --online 50`, `tetriinfer serve: error: argument --kv-cache-dtype: ...`")
    assert checker.markdown(ok, "ok.md") == []
    # a flag of another subcommand is not good enough after a named one
    wrong = checker.markdown("`tetriinfer serve --prefix-cache-fraction 0.5`", "wrong.md")
    assert [p.flag for p in wrong] == ["--prefix-cache-fraction"]
