"""The shipped default predictor and the serving interface the prefill side calls."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tetriinfer.predictor import ConstantPredictor, LengthPrediction, load_predictor
from tetriinfer.predictor.artifact import DEFAULT_DIR, read_meta
from tetriinfer.predictor.tokenizer import load_tokenizer

PROMPTS = [
    "USER: hi\n",
    "USER: Write a detailed 2000-word essay on the history of the Roman empire, with sections.\n",
    "USER: What is 2 + 2? Answer with a number only.\n",
    "USER: Write a python function that parses a CSV file and explain every line.\n",
]


@pytest.fixture(scope="module")
def default_predictor():
    return load_predictor()


def test_default_is_small_enough_to_ship():
    shipped = [p for p in DEFAULT_DIR.iterdir() if p.is_file()]
    assert {p.suffix for p in shipped} <= {".json", ".txt", ".safetensors"}
    # 6 MB: the default is three `text` bags (5.4 MB, issue 15: val tau 0.450 against 0.447 for two),
    # still small beside any served model's weights; the bound keeps a bigger model from slipping in
    assert sum(p.stat().st_size for p in shipped) < 6 * 2**20


def test_default_loads_and_predicts_buckets_with_bounds(default_predictor):
    spec = read_meta(DEFAULT_DIR).buckets
    predictions = default_predictor.predict(PROMPTS)
    assert len(predictions) == len(PROMPTS)
    for p in predictions:
        assert isinstance(p, LengthPrediction)
        assert 0 <= p.bucket < spec.num_buckets
        assert (p.lower, p.upper) == (spec.lower(p.bucket), spec.upper(p.bucket))
        assert isinstance(p.score, float)
    # the model tells an essay request from a one-word answer
    assert predictions[1].score > predictions[2].score
    assert default_predictor.predict([]) == []


def test_token_id_prompts_need_and_use_decode():
    tokenizer = load_tokenizer(DEFAULT_DIR / "tokenizer.json")
    ids = [tokenizer.encode(p).ids for p in PROMPTS]
    with pytest.raises(TypeError, match="decode"):
        load_predictor().predict(ids)
    from_ids = load_predictor(decode=tokenizer.decode).predict(ids)
    assert [p.bucket for p in from_ids] == [p.bucket for p in load_predictor().predict(PROMPTS)]


def test_concurrent_calls_and_submit_match_serial(default_predictor):
    serial = default_predictor.predict(PROMPTS * 8)
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda _: default_predictor.predict(PROMPTS * 8), range(4)))
    for result in parallel:
        assert [p.bucket for p in result] == [p.bucket for p in serial]
        assert [p.score for p in result] == pytest.approx([p.score for p in serial], abs=1e-5)
    future = default_predictor.submit(PROMPTS)
    assert [p.bucket for p in future.result(timeout=30)] == [p.bucket for p in serial[: len(PROMPTS)]]
    default_predictor.close()


def test_disabled_predictor_returns_training_majority_bucket():
    meta = read_meta(DEFAULT_DIR)
    predictor = load_predictor("none")
    assert isinstance(predictor, ConstantPredictor)
    predictions = predictor.predict(PROMPTS + [[1, 2, 3]])
    assert {p.bucket for p in predictions} == {meta.majority_bucket}
    assert {p.score for p in predictions} == {0.0}


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a predictor directory"):
        load_predictor(tmp_path)


def test_eval_cli_writes_report_and_names_bad_line(tmp_path, capsys):
    from tetriinfer.cli import main

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": p, "output_tokens": 150 * i}) + "\n" for i, p in enumerate(PROMPTS)))
    report = tmp_path / "report.json"
    assert main(["predictor", "eval", "--model", str(DEFAULT_DIR), "--data", str(good), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["examples"] == len(PROMPTS) and 0.0 <= result["accuracy"] <= 1.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "output_tokens": 3}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predictor", "eval", "--model", str(DEFAULT_DIR), "--data", str(bad)])
    assert exit_info.value.code == 2
    assert f"{bad}:2: needs 'response'" in capsys.readouterr().err
