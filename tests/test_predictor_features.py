"""The built-in model's prompt features: the `shape` set (the first default) and the `text` set."""

import json

import pytest

from tetriinfer.predictor.features import FEATURE_SETS, num_features, prompt_features
from tetriinfer.predictor.model_builtin import BuiltinModelConfig


def test_shape_set_is_unchanged():
    prompt = "USER: hi\nASSISTANT: hello there\nUSER: more please\n"
    assert len(prompt_features(prompt, 12)) == num_features("shape") == 4
    assert prompt_features(prompt, 12) == prompt_features(prompt, 12, "shape")
    assert prompt_features(prompt, 12)[3] == 1.0  # has a previous reply
    assert prompt_features("cut-off reply text.\nUSER: go on\n", 9)[2:] == [0.0, 0.0]  # shape: no reply seen


@pytest.mark.parametrize("prompt", ["", "plain text", "USER: hi\n", "USER: a\nASSISTANT: b\nUSER: c\n",
                                    "tail of a reply.\nUSER: continue\n", "USER: 写一篇500字的文章\n"])
def test_text_set_has_a_fixed_width_and_finite_values(prompt):
    values = prompt_features(prompt, 7, "text")
    assert len(values) == num_features("text") == 34
    assert all(v == v and abs(v) < 10 for v in values)


def test_text_set_reads_a_cut_off_reply_and_the_request():
    # the training prompts keep the last 2,000 chars of earlier turns: a long reply loses its mark
    cut = prompt_features("x" * 1990 + " the end\nUSER: continue in 500 words?\n", 600, "text")
    whole = prompt_features("USER: q\nASSISTANT: " + "x" * 1990 + " the end\nUSER: continue in 500 words?\n", 600, "text")
    assert cut[3] == whole[3] == 1.0  # a previous reply is there
    assert cut[4] == 1.0 and whole[4] == 0.0  # only the first is flagged cut off
    assert cut[2] == pytest.approx(whole[2], abs=0.01)  # about the same reply length
    assert cut[12] == 1.0  # a "continue" request
    assert cut[13] > 0.7  # a requested count (500 words)
    assert cut[14] == 1.0  # ends with a question mark
    first = prompt_features("USER: 写一篇文章\n", 5, "text")
    assert first[3] == 0.0 and first[30] > 0.5 and first[33] > 0.5  # no reply; CJK, non-ASCII


def test_feature_set_names_are_checked_and_old_artifacts_read_as_shape():
    assert FEATURE_SETS == ("shape", "text")
    with pytest.raises(ValueError, match="features"):
        num_features("words")
    with pytest.raises(ValueError, match="features"):
        BuiltinModelConfig(features="words")
    old = json.loads('{"form": "bag", "vocab_size": 8192, "num_outputs": 7, "dim": 48, "hidden": 128,'
                     ' "bigram_buckets": 8192, "max_prompt_tokens": 512, "tail_tokens": 64, "num_layers": 2,'
                     ' "num_heads": 4, "dropout": 0.1}')  # a predictor.json written before the `text` set
    assert BuiltinModelConfig(**old).features == "shape"
