"""Incremental detokenizer: streamed deltas add up to the engine's text (whole decode cut at the
first stop string) for the byte tokenizer and locally built Hugging Face tokenizers, with no
half-characters or stop-string pieces ever streamed, at linear cost."""

from __future__ import annotations

import json
import random

import pytest

from tetriinfer.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from tetriinfer.model.tokenizer import ByteTokenizer, HFTokenizer

SENTENCES = [
    "héllo 世界 🙂 the quick brown fox jumps over the lazy dog",
    "naïve café déjà vu, 東京 and 北京 are cities; 🙂🚀 emoji too",
    "stop here? no, keep going: the end is not the end.",
    "ümlaut Ärger größer, ça va très bien, 你好 世界",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


# ---- tokenizers --------------------------------------------------------------------------------
def _save(tok, path) -> HFTokenizer:
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return HFTokenizer(path)


@pytest.fixture(scope="module")
def byte_level_bpe(tmp_path_factory) -> HFTokenizer:
    """GPT-2 / Llama 3 / Qwen style: byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    return _save(tok, tmp_path_factory.mktemp("bytelevel") / "tok")


def _metaspace_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS)
    tok.train_from_iterator([s for s in SENTENCES if s.isascii()] * 20 + ["the lazy brown dog"] * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace_bpe(tmp_path_factory) -> HFTokenizer:
    """sentencepiece style: words start with '▁', the first token's leading space is dropped."""
    return _save(_metaspace_bpe(), tmp_path_factory.mktemp("metaspace") / "tok")


@pytest.fixture(scope="module")
def byte_fallback_sp(tmp_path_factory) -> HFTokenizer:
    """Llama 2 / Mistral style: sentencepiece with <0xNN> byte tokens for characters not in the vocab."""
    from tokenizers import Tokenizer

    spec = json.loads(_metaspace_bpe().to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = Tokenizer.from_str(json.dumps(spec))
    hf = _save(tok, tmp_path_factory.mktemp("bytefallback") / "tok")
    assert any(hf._tok.id_to_token(i).startswith("<0x") for i in hf.encode("世界"))  # the fallback is used
    return hf


# ---- helpers -------------------------------------------------------------------------------------
def engine_reference(tokenizer, ids: list[int], stop: list[str]) -> tuple[int, str, str | None]:
    """What the engine does today (engine.py `_check_stop`): after each token decode everything and
    look for each stop string in order. Returns (tokens consumed, text, matched stop)."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        for s in stop:
            idx = text.find(s)
            if idx >= 0:
                return n, text[:idx], s
    return len(ids), tokenizer.decode(ids), None


def stream(tokenizer, ids: list[int], stop: list[str], holdback: bool = True, include_stop: bool = False):
    """Feed tokens one by one as the engine will, taking a delta after each; stop on a match."""
    detok = IncrementalDetokenizer(tokenizer, stop, stream_holdback=holdback, include_stop=include_stop)
    deltas, consumed = [], 0
    for token_id in ids:
        consumed += 1
        matched = detok.append(token_id)
        deltas.append(detok.take_delta())
        if matched is not None:
            assert matched == detok.stop_reason
            break
    deltas.append(detok.finish())
    return consumed, detok, deltas


def check_against_engine(tokenizer, ids: list[int], stop: list[str]) -> None:
    consumed, detok, deltas = stream(tokenizer, ids, stop)
    ref_consumed, ref_text, ref_stop = engine_reference(tokenizer, ids, stop)
    assert (consumed, detok.stop_reason) == (ref_consumed, ref_stop), (ids, stop)
    assert detok.text == ref_text, (ids, stop)
    assert "".join(deltas) == ref_text, (ids, stop)  # so no delta ever held any of the stop string
    if "\ufffd" not in tokenizer.decode(ids):
        assert not any("\ufffd" in d for d in deltas), (ids, deltas)


def random_stops(rng: random.Random, text: str, k: int) -> list[str]:
    """Substrings of the text (so they match, often across token boundaries), free of U+FFFD."""
    stops = []
    for _ in range(k):
        n = rng.randint(1, 6)
        i = rng.randrange(max(1, len(text) - n + 1))
        s = text[i:i + n].replace("\ufffd", "")
        stops.append(s or "zz")
    return stops


def valid_stream(rng: random.Random, tokenizer, specials: list[int]) -> list[int]:
    """Encodings of random text pieces (valid UTF-8 when joined), special tokens sprinkled anywhere,
    even inside a multi-byte character's tokens."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 6)):
        sentence = rng.choice(SENTENCES)
        i = rng.randrange(len(sentence))
        ids += [t for t in tokenizer.encode(sentence[i:i + rng.randint(1, 30)]) if t not in specials]
    for _ in range(rng.randint(0, 3)):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
    return ids


# ---- byte tokenizer ------------------------------------------------------------------------------
BYTE = ByteTokenizer()
BYTE_SPECIALS = [256, 257, 258, 300]


def test_multibyte_characters_are_never_split():
    text = "héllo 世界 🙂"
    consumed, detok, deltas = stream(BYTE, list(text.encode()), [])
    assert "".join(deltas) == text == detok.text
    assert "\ufffd" not in "".join(deltas)
    assert deltas[:3] == ["h", "", "é"]  # é is two bytes: nothing after its first
    assert "世" in deltas and "🙂" in deltas


@pytest.mark.parametrize("seed", range(300))
def test_byte_tokenizer_random_streams(seed):
    rng = random.Random(seed)
    if seed % 2:
        ids = valid_stream(rng, BYTE, BYTE_SPECIALS)
    else:  # arbitrary bytes: invalid UTF-8 must come out as the whole decode shows it
        ids = [rng.randrange(300) if rng.random() < 0.5 else rng.choice(list(range(0x80, 0x100)))
               for _ in range(rng.randint(1, 60))]
    full = BYTE.decode(ids)
    check_against_engine(BYTE, ids, [])
    check_against_engine(BYTE, ids, random_stops(rng, full, rng.randint(1, 3)))


# ---- Hugging Face tokenizers ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["byte_level_bpe", "metaspace_bpe", "byte_fallback_sp"])
def test_hf_random_streams(name, request):
    tokenizer = request.getfixturevalue(name)
    specials = [tokenizer._tok.token_to_id(s) for s in SPECIALS]
    vocab = tokenizer._tok.get_vocab_size()
    rng = random.Random(name)
    for trial in range(150):
        # byte fallback decodes a run of byte tokens as one group (an invalid byte turns the whole
        # run into U+FFFD after the fact), which no streamer can follow: valid text only there
        if trial % 2 or name == "byte_fallback_sp":
            ids = valid_stream(rng, tokenizer, specials)
        else:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        full = tokenizer.decode(ids)
        check_against_engine(tokenizer, ids, [])
        check_against_engine(tokenizer, ids, random_stops(rng, full, rng.randint(1, 3)))


def test_sentencepiece_spacing_across_special_tokens(metaspace_bpe):
    tok = metaspace_bpe
    pad, space = tok._tok.token_to_id("<pad>"), tok._tok.token_to_id("▁")
    word = tok.encode("the lazy dog")
    # the first word's space is dropped (as in the whole decode), later ones kept, specials skipped
    for ids in ([pad] * 3 + word, word[:1] + [pad] * 40 + word[1:], [space] + [pad] * 40 + word,
                [pad] * 40 + [space, space] + word):
        check_against_engine(tok, ids, [])


# ---- stop strings and holdback -------------------------------------------------------------------
def feed(detok: IncrementalDetokenizer, text: str) -> list[str]:
    out = []
    for b in text.encode():
        detok.append(b)
        out.append(detok.take_delta())
    return out


def test_holdback_releases_only_what_cannot_start_a_stop_string():
    detok = IncrementalDetokenizer(BYTE, ["abc"])
    assert feed(detok, "xa") == ["x", ""]  # "a" may start "abc"
    assert feed(detok, "b") == [""]
    assert feed(detok, "d") == ["abd"]  # "abd" is not "abc": all released
    assert feed(detok, "ab") == ["", ""]
    assert detok.finish() == "ab"  # the end releases held text
    assert detok.text == "xabdab" and detok.stop_reason is None


def test_stop_cut_releases_text_held_for_another_stop():
    detok = IncrementalDetokenizer(BYTE, ["xyz", "b"])
    assert feed(detok, "axy") == ["a", "", ""]
    assert detok.append(ord("b")) == "b"
    assert detok.take_delta() == "xy"  # not part of the matched stop: released now
    assert detok.finish() == ""
    assert detok.text == "axy"
    with pytest.raises(RuntimeError, match="after the request ended"):
        detok.append(ord("c"))


def test_include_stop_keeps_the_matched_stop_string_and_streams_it():
    detok = IncrementalDetokenizer(BYTE, ["xyz", "b"], include_stop=True)
    assert feed(detok, "axy") == ["a", "", ""]
    assert detok.append(ord("b")) == "b"
    assert detok.take_delta() == "xyb"  # the held text, then the stop string itself
    assert detok.finish() == "" and detok.text == "axyb"
    consumed, detok, deltas = stream(BYTE, list("ab世界cd".encode()), ["b世界"], include_stop=True)
    assert detok.text == "ab世界" == "".join(deltas)


def test_stop_spanning_multibyte_tokens_cuts_inside_the_last_token():
    text = "ab世界cd"
    consumed, detok, deltas = stream(BYTE, list(text.encode()), ["b世界"])
    assert detok.stop_reason == "b世界" and detok.text == "a" and "".join(deltas) == "a"
    assert consumed == len("ab世界".encode())  # found at the token that completes 界


def test_stop_strings_checked_in_the_given_order_like_the_engine():
    # both complete on the token that ends é; the engine takes the first listed one
    ids = list("aé!".encode())
    for stop, text in ((["é", "aé"], "a"), (["aé", "é"], "")):
        check_against_engine(BYTE, ids, stop)
        consumed, detok, deltas = stream(BYTE, ids, stop)
        assert (detok.stop_reason, detok.text, consumed) == (stop[0], text, 3)


def test_without_holdback_text_streams_at_once_and_is_still_cut():
    detok = IncrementalDetokenizer(BYTE, ["abc"], stream_holdback=False)
    assert feed(detok, "xab") == ["x", "a", "b"]
    assert detok.append(ord("c")) == "abc"
    assert detok.text == "x" and detok.finish() == ""


def test_no_stop_strings_hold_back_nothing_but_unfinished_characters():
    detok = IncrementalDetokenizer(BYTE, [])
    assert feed(detok, "ab ") == ["a", "b", " "]
    detok.append(0xE4)  # first byte of 世, then the request ends: the whole decode shows U+FFFD
    assert detok.take_delta() == ""
    assert detok.finish() == "\ufffd" and detok.text == "ab \ufffd" == BYTE.decode(list(b"ab ") + [0xE4])


def test_bad_stop_strings_are_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(BYTE, ["ok", ""])
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(BYTE, [3])


def test_replay_continues_where_the_exporting_instance_stopped_sending():
    text = "héllo 世界 🙂 done"
    ids = list(text.encode())
    stop = ["🙂 dX"]
    whole = IncrementalDetokenizer(BYTE, stop)
    sent = []
    for i, token_id in enumerate(ids):
        whole.append(token_id)
        sent.append(whole.take_delta())
        if i == 14:  # mid-way through 🙂 and inside a possible stop string: move the request
            moved = IncrementalDetokenizer.replay(BYTE, stop, ids[:15])
            rest = []
            for t in ids[15:]:
                moved.append(t)
                rest.append(moved.take_delta())
            rest.append(moved.finish())
            assert "".join(sent) + "".join(rest) == text
    with pytest.raises(ValueError, match="stop string"):
        IncrementalDetokenizer.replay(BYTE, ["llo"], ids)


# ---- cost ----------------------------------------------------------------------------------------
# Measured as decode work, not seconds: the token ids handed to tokenizer.decode, in all and per call.
class CountingTokenizer:
    """`inner`, with its decode calls counted: how many, how many token ids in all, the widest one."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = self.ids = self.widest = 0

    def decode(self, ids, *args, **kwargs):
        self.calls += 1
        self.ids += len(ids)
        self.widest = max(self.widest, len(ids))
        return self.inner.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _decode_work(tokenizer, ids, stop) -> CountingTokenizer:
    """Stream `ids` (append, take_delta each token, finish); check the text; return the counts."""
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, stop)
    out = []
    for token_id in ids:
        detok.append(token_id)
        out.append(detok.take_delta())
    out.append(detok.finish())
    assert "".join(out) == tokenizer.decode(ids)
    return counting


def assert_linear_decode_work(tokenizer, make_ids, stop, n: int = 5000) -> None:
    """The same kind of output at n and 4n tokens: the work grows 4x (not 16x, as re-decoding all
    the text each step would), and no decode call ever sees more than a bounded window."""
    small, large = (_decode_work(tokenizer, make_ids(m), stop) for m in (n, 4 * n))
    window = 2 * MAX_PENDING_TOKENS + 4  # settled context + undecided tokens + the new one
    assert large.widest <= window, f"a decode call saw {large.widest} tokens (of {4 * n})"
    assert large.ids <= 5 * small.ids, f"decoded ids: {small.ids} for {n} tokens, {large.ids} for {4 * n}"
    assert large.calls <= 5 * small.calls, f"decode calls: {small.calls} for {n} tokens, {large.calls} for {4 * n}"


BYTE_OUTPUTS = {
    "text": lambda n: list(("héllo 世界 🙂 stoq " * (n // 10 + 1)).encode())[:n],
    "garbage_bytes": lambda n: [0x80] * n,  # a random-weight model stuck on one byte
    "invisible": lambda n: [257] * n,  # stuck on EOS with ignore_eos
    "unfinished_then_invisible": lambda n: [0xE4] + [258] * n,
}


@pytest.mark.parametrize("kind", list(BYTE_OUTPUTS))
def test_byte_tokenizer_cost_is_linear(kind):
    assert_linear_decode_work(BYTE, BYTE_OUTPUTS[kind], ["stop", "世界 🙂 X"])  # partial matches all the time


def test_hf_tokenizer_cost_is_linear(byte_level_bpe):
    ids = byte_level_bpe.encode(" ".join(SENTENCES))
    assert_linear_decode_work(byte_level_bpe, lambda n: (ids * (n // len(ids) + 1))[:n], ["the end is near", "🙂🚀X"])


def test_settle_keeps_the_last_delta_for_the_streamer():
    """The engine settles a finished request's text; the server still takes the last delta."""
    tok = ByteTokenizer()
    ids = [218] + [92] * 11  # a lone lead byte, settled into U+FFFD only at the end
    detok = IncrementalDetokenizer(tok, [])
    streamed = ""
    for i, t in enumerate(ids):
        detok.append(t)
        if i == len(ids) - 1:
            detok.settle()
        streamed += detok.take_delta()
    assert streamed == detok.text == tok.decode(ids)


@pytest.mark.parametrize("name", ["byte_level_bpe", "metaspace_bpe"])
def test_skip_special_tokens_false_streams_the_special_tokens_texts_too(name, request):
    tokenizer = request.getfixturevalue(name)
    specials = [tokenizer._tok.token_to_id(s) for s in ("<s>", "</s>")]
    ids = tokenizer.encode("the lazy dog", add_special_tokens=False)
    ids = ids[:2] + [specials[0]] + ids[2:] + [specials[1]]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        deltas = [detok.append(t) or detok.take_delta() for t in ids] + [detok.finish()]
        assert "".join(deltas) == detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert ("<s>" in detok.text and "</s>" in detok.text) is (not skip)
