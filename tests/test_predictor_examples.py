"""The example-file reader: good files parse, bad ones fail naming the file and the line."""

import json

import pytest

from tetriinfer.predictor.examples import ExampleFileError, LengthExample, read_examples, write_examples


def _write(tmp_path, data: bytes):
    path = tmp_path / "eval.jsonl"
    path.write_bytes(data)
    return path


def test_round_trip(tmp_path):
    examples = [
        LengthExample("USER: hi\n", response="hello", group="c1"),
        LengthExample("USER: count\n", output_tokens=42),
        LengthExample("USER: silence\n", response=""),
    ]
    path = tmp_path / "x.jsonl"
    write_examples(path, examples)
    assert read_examples(path) == examples


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        ([{"prompt": "a", "response": "b"}, {"response": "b"}], 2, "missing field 'prompt'"),
        ([{"prompt": "a"}], 1, "needs 'response' (text) or 'output_tokens' (int)"),
        ([{"prompt": "a", "output_tokens": -3}], 1, "non-negative integer"),
        ([{"prompt": "a", "output_tokens": "12"}], 1, "non-negative integer"),
        ([{"prompt": "a", "response": 5}], 1, "'response' must be a string"),
        ([{"prompt": 1, "response": "b"}], 1, "missing field 'prompt'"),
        ([[1, 2]], 1, "expected a JSON object"),
    ],
)
def test_bad_fields_name_the_line(tmp_path, lines, line_no, message):
    path = _write(tmp_path, "".join(json.dumps(x) + "\n" for x in lines).encode())
    with pytest.raises(ExampleFileError) as err:
        read_examples(path)
    assert f"{path}:{line_no}:" in str(err.value)
    assert message in str(err.value)


def test_empty_line_is_named(tmp_path):
    good = json.dumps({"prompt": "a", "output_tokens": 3})
    path = _write(tmp_path, f"{good}\n\n{good}\n".encode())
    with pytest.raises(ExampleFileError, match=r"eval\.jsonl:2: empty line"):
        read_examples(path)


def test_non_utf8_is_named(tmp_path):
    good = json.dumps({"prompt": "a", "output_tokens": 3}).encode()
    path = _write(tmp_path, good + b"\n" + b'{"prompt": "caf\xe9", "output_tokens": 1}\n')
    with pytest.raises(ExampleFileError, match=r"eval\.jsonl:2: not UTF-8"):
        read_examples(path)


def test_bad_json_is_named(tmp_path):
    path = _write(tmp_path, b'{"prompt": "a", "output_tokens": 3}\n{"prompt": \n')
    with pytest.raises(ExampleFileError, match=r"eval\.jsonl:2: not valid JSON"):
        read_examples(path)


def test_empty_file(tmp_path):
    with pytest.raises(ExampleFileError, match="no examples"):
        read_examples(_write(tmp_path, b""))
