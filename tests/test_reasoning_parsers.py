"""Reasoning parsers: the stream and the whole body split a reply the same way, wherever it is cut."""

import pytest

from tetriinfer.server.reasoning import ReasoningSplitter, split_reasoning

CASES = [  # parser, reply, (reasoning, content)
    ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", ("Let me think.\n", "\n\nThe answer is 4.")),
    ("deepseek_r1", "<think>\nhmm</think>4", ("\nhmm", "4")),
    ("deepseek_r1", "cut off while thinking </thi", ("cut off while thinking </thi", "")),
    ("deepseek_r1", "", ("", "")),
    ("qwen3", "<think>\nWeigh it.\n</think>\n\nYes.", ("\nWeigh it.\n", "\n\nYes.")),
    ("qwen3", "Yes, no thinking asked.", (None, "Yes, no thinking asked.")),
    ("qwen3", "<thin", (None, "<thin")),
    ("qwen3", "<think>never closed", ("never closed", "")),
    ("qwen3", "a < b and </think> here", (None, "a < b and </think> here")),
    ("deepseek_r1", "ünïcode ✓ thoughts</think>résumé", ("ünïcode ✓ thoughts", "résumé")),
]


@pytest.mark.parametrize("parser, reply, expected", CASES)
def test_the_whole_reply_splits_into_reasoning_and_content(parser, reply, expected):
    assert split_reasoning(parser, reply) == expected


@pytest.mark.parametrize("parser, reply, expected", CASES)
@pytest.mark.parametrize("piece", [1, 2, 3, 5])
def test_a_stream_in_any_pieces_gives_the_same_split_and_never_shows_a_tag(parser, reply, expected, piece):
    splitter = ReasoningSplitter(parser)
    reasoning = content = ""
    for i in range(0, len(reply), piece):
        r, c = splitter.feed(reply[i:i + piece])
        assert "</think>" not in r + c or "</think>" in expected[1]
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    assert (reasoning + r if splitter.thought else None, content + c) == expected


def test_an_unknown_parser_is_named():
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'; known: deepseek_r1, qwen3"):
        ReasoningSplitter("r2")
