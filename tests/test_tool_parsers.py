"""The auto tool-call parsers (server.tool_parsers) on model outputs: hermes, llama3_json, mistral
and pythonic."""

from __future__ import annotations

import json

from tetriinfer.server.tool_parsers import PARSERS, HermesParser, Llama3JsonParser, MistralParser, PythonicParser

hermes, llama, mistral, pythonic = HermesParser(), Llama3JsonParser(), MistralParser(), PythonicParser()


def test_parsers_are_registered_by_their_vllm_names():
    assert PARSERS == {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
                       "pythonic": PythonicParser}


def test_hermes_reads_one_call_with_no_content():
    out = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert hermes.parse(out) == (None, [("get_weather", '{"city": "Paris"}')])


def test_hermes_keeps_the_text_before_the_first_call_and_reads_two_calls():
    out = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
           '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    content, calls = hermes.parse(out)
    assert content == "Let me check.\n"
    assert calls == [("a", '{"x": 1}'), ("b", "{}")]


def test_hermes_reads_a_last_call_missing_its_closing_tag():
    assert hermes.parse('<tool_call>\n{"name": "a", "arguments": {"q": "é"}}') == (None, [("a", '{"q": "é"}')])


def test_hermes_malformed_json_or_no_tag_is_all_content():
    broken = '<tool_call>\n{"name": "a", "arguments": {"x": }\n</tool_call>'
    assert hermes.parse(broken) == (broken, [])
    assert hermes.parse("just text") == ("just text", [])
    assert hermes.parse('<tool_call>["not", "a call"]</tool_call>')[1] == []


def test_hermes_keeps_unicode_unescaped_in_the_arguments():
    _, [(name, arguments)] = hermes.parse('<tool_call>{"name": "天气", "arguments": {"城市": "北京 🌧"}}</tool_call>')
    assert name == "天气" and arguments == '{"城市": "北京 🌧"}' and json.loads(arguments) == {"城市": "北京 🌧"}


def test_hermes_streams_text_until_a_tool_call_may_be_starting():
    assert hermes.streamable("Hello") == 5
    assert hermes.streamable("Hello <tool") == 6
    assert hermes.streamable("Hello <") == 6
    assert hermes.streamable("a < b") == 5
    assert hermes.streamable('Hi<tool_call>{"na') == 2


def test_llama3_json_reads_parameters_or_arguments_and_calls_separated_by_semicolons():
    out = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {"y": "z"}}'
    assert llama.parse(out) == (None, [("a", '{"x": 1}'), ("b", '{"y": "z"}')])
    assert llama.parse('<|python_tag|>{"name": "a", "parameters": {}}') == (None, [("a", "{}")])


def test_llama3_json_plain_text_or_malformed_json_is_all_content():
    assert llama.parse("The answer is 4.") == ("The answer is 4.", [])
    assert llama.parse('{"name": "a", "parameters": {') == ('{"name": "a", "parameters": {', [])
    assert llama.parse('{"answer": 4}') == ('{"answer": 4}', [])
    assert llama.streamable('{"name"') == 0


def test_mistral_reads_the_json_list_after_the_marker_and_keeps_the_content_before():
    out = 'Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    assert mistral.parse(out) == ("Let me check. ", [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")])


def test_mistral_reads_v11_calls_one_marker_each():
    out = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]get_time[ARGS]{}'
    assert mistral.parse(out) == (None, [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")])


def test_mistral_without_marker_or_with_broken_json_is_all_content():
    for out in ('[{"name": "f", "arguments": {}}]', '[TOOL_CALLS][{"name": "f", "argu', "[TOOL_CALLS]f[ARGS]{bad"):
        assert mistral.parse(out) == (out, [])


def test_mistral_streams_text_until_the_marker_may_be_starting_and_asks_for_special_tokens():
    assert mistral.streamable("Hello [TOOL_") == len("Hello ")
    assert mistral.streamable("Hi [TOOL_CALLS][") == len("Hi ")
    assert mistral.streamable("Hi [x]") == len("Hi [x]")
    assert mistral.keeps_special_tokens
    ids = {mistral.call_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 9 and i.isalnum() for i in ids)


def test_pythonic_reads_a_list_of_calls_with_literal_keyword_arguments():
    out = '[get_weather(city="Paris", days=[1, 2], opts={"metric": True}), get_time()]'
    assert pythonic.parse(out) == (None, [("get_weather", '{"city": "Paris", "days": [1, 2], "opts": {"metric": true}}'),
                                          ("get_time", "{}")])
    assert pythonic.parse('<|python_start|>[f(x=None)]<|python_end|>') == (None, [("f", '{"x": null}')])


def test_pythonic_never_runs_code_and_reads_anything_else_as_content():
    for out in ("[1, 2]", '[f("positional")]', "[f(a=g())]", '[__import__("os").system("x")]', "[f(**k)]",
                "Paris is sunny.", "[f(a=1)", "[]"):
        assert pythonic.parse(out) == (out, [])


def test_pythonic_holds_a_stream_only_while_it_may_be_a_call_list():
    assert pythonic.streamable("") == 0 and pythonic.streamable("  [get_") == 0 and pythonic.streamable("<|python") == 0
    assert pythonic.streamable("Paris is") == len("Paris is")
