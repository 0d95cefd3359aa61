"""End to end: `tetriinfer serve` (tiny model, CPU) driven by the official `openai` client.

One disaggregated server (1 prefill + 2 decode) and one colocated server live for the whole module;
the fault tests that kill an instance start their own.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import openai
import pytest

from serve_utils import start_server
from tetriinfer import LLM, SamplingParams

SERVER_ARGS = ["--num-blocks", "256", "--chunk-size", "64", "--max-model-len", "512", "--dead-after", "3"]
PROMPTS = [f"Request {i}: the quick brown fox " + "jumps " * (i % 9) for i in range(64)]


def sampling_for(i: int) -> dict:
    """Half greedy, half seeded sampling: both must match the offline engine token for token."""
    return dict(temperature=0.0) if i % 2 == 0 else dict(temperature=1.0, top_p=0.9, seed=1000 + i)


@pytest.fixture(scope="module")
def disagg(tmp_path_factory):
    with start_server(["--prefill-instances", "1", "--decode-instances", "2", *SERVER_ARGS],
                      tmp_path_factory.mktemp("disagg")) as server:
        yield server


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    with start_server(["--mode", "colocated", "--instances", "2", "--baseline", "sarathi", *SERVER_ARGS],
                      tmp_path_factory.mktemp("colocated")) as server:
        yield server


@pytest.fixture(scope="module")
def offline():
    llm = LLM("tiny", num_blocks=256, chunk_size=64, max_model_len=512)
    params = [SamplingParams(max_tokens=12 + i % 5, ignore_eos=True, **sampling_for(i)) for i in range(len(PROMPTS))]
    return {p: o.outputs[0] for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def assert_no_kv_held(server) -> None:
    server.wait_until(lambda: server.metric_sum("tetriinfer_kv_blocks_used") == 0, 20, "every KV block freed")


def assert_concurrent_requests_equal_offline(server, offline, n: int) -> None:
    """PROMPTS[:n] at once, each with sampling_for(i) and ignore_eos: every text and token count is
    the offline engine's."""
    c = client(server)

    def one(i: int):
        return c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12 + i % 5,
                                    extra_body={"ignore_eos": True}, **sampling_for(i))

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    for i, result in enumerate(results):
        assert result.choices[0].text == offline[PROMPTS[i]].text, f"request {i}"
        assert result.usage.completion_tokens == 12 + i % 5, f"request {i}"


@pytest.mark.parametrize("which", ["disagg", "colocated"])
def test_completion_chat_and_stream(which, request, offline):
    server = request.getfixturevalue(which)
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    prompt = PROMPTS[0]
    out = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                               extra_body={"ignore_eos": True})
    assert out.choices[0].text == offline[prompt].text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(prompt.encode()) + 1

    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == offline[prompt].text
    assert chunks[-1].usage.completion_tokens == 12

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                     max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    llm_chat = LLM("tiny", num_blocks=64).chat([{"role": "user", "content": "Hi there"}],
                                               SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert chat.choices[0].message.content == llm_chat[0].outputs[0].text
    assert chat.choices[0].message.role == "assistant"
    assert_no_kv_held(server)


@pytest.mark.parametrize("which", ["disagg", "colocated"])
def test_64_concurrent_requests_equal_the_offline_engine(which, request, offline):
    server = request.getfixturevalue(which)
    assert_concurrent_requests_equal_offline(server, offline, len(PROMPTS))
    assert server.metric_sum("tetriinfer_requests_total", outcome="ok") >= len(PROMPTS)
    if which == "disagg":  # every request's KV moved from the prefill to a decode instance
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_transfer_bytes_total") > 0, 10, "transfer stats")
    assert_no_kv_held(server)


def test_bad_input_gets_4xx_with_openai_error(disagg):
    url = f"{disagg.url}/v1/completions"
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
        (dict(json={"model": "tiny", "prompt": "hi", "max_tokens": "many"}), 400),
        (dict(json={"model": "nope", "prompt": "hi"}), 404),
        (dict(json={"model": "tiny", "prompt": "x" * 600}), 400),  # longer than the 512-token context
        (dict(json={"model": "tiny", "prompt": "hi", "max_tokens": 600}), 400),
        (dict(json={"model": "tiny", "prompt": "hi", "temperature": -1}), 400),
    ]
    for kwargs, status in cases:
        r = httpx.post(url, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert r.json()["error"]["message"]
    assert_no_kv_held(disagg)


def test_client_disconnect_mid_stream_frees_kv(disagg):
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{disagg.url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # hang up mid-stream
    disagg.wait_until(lambda: disagg.metric_sum("tetriinfer_requests_total", outcome="aborted") >= 1, 20,
                      "the abort to be counted")
    assert_no_kv_held(disagg)


def test_api_key_required(tmp_path):
    with start_server(["--api-key", "sekrit", "--decode-instances", "1", *SERVER_ARGS], tmp_path) as server:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekrit", max_retries=0)
        out = ok.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 2


def test_decode_instance_death_fails_its_requests_and_the_rest_serve_on(tmp_path):
    with start_server(["--prefill-instances", "1", "--decode-instances", "2", *SERVER_ARGS], tmp_path) as server:
        c = client(server)
        pids = server.wait_for_instances(3)
        decoders = [i for i, (role, _) in pids.items() if role == "decode"]

        def busy_decoder():
            running = {i: server.metric_sum("tetriinfer_num_running", instance=i) for i in decoders}
            return max(running, key=running.get) if max(running.values()) > 0 else None

        def long_request(i: int):
            try:
                r = c.completions.create(model="tiny", prompt=f"story {i}", max_tokens=480, temperature=0,
                                         extra_body={"ignore_eos": True})
                return r.usage.completion_tokens
            except openai.APIError as e:
                return e

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(long_request, i) for i in range(8)]
            victim = server.wait_until(busy_decoder, 30, "requests decoding on a decode instance")
            os.kill(pids[victim][1], signal.SIGKILL)
            results = [f.result(timeout=120) for f in futures]
        errors = [r for r in results if isinstance(r, Exception)]
        assert errors, "some requests were decoding on the killed instance"
        assert all("died" in str(e) for e in errors), errors
        killed = pids[victim][1]  # gone from /metrics, or back as a new process (the supervisor's restart)
        server.wait_until(lambda: server.instance_pids().get(victim, (None, None))[1] != killed, 20,
                          "the dead process to leave /metrics")
        for i in range(4):  # the cluster keeps serving on the remaining decode instance
            out = c.completions.create(model="tiny", prompt=f"after {i}", max_tokens=5, temperature=0)
            assert out.usage.completion_tokens >= 1
        assert_no_kv_held(server)
        assert server.metric_sum("tetriinfer_restarts_total", what="instance") == 1


def test_idle_decode_instance_flips_to_prefill_under_prompt_pressure(tmp_path):
    """Only prompts (max_tokens=1: no decode work): one of the two idle decode instances turns
    into a second prefill instance, in the same process, and serves prompts from then on."""
    with start_server(["--prefill-instances", "1", "--decode-instances", "2", "--flip", "--flip-idle", "0.2",
                       *SERVER_ARGS], tmp_path) as server:
        c = client(server)
        before = server.wait_for_instances(3)

        def prompt_only(i: int):
            return c.completions.create(model="tiny", prompt=f"{i} " + "long prompt " * 40, max_tokens=1,
                                        temperature=0).usage.completion_tokens

        with cf.ThreadPoolExecutor(32) as pool:
            assert all(n == 1 for n in pool.map(prompt_only, range(400)))
        assert server.metric_sum("tetriinfer_flips_total") >= 1
        assert 0 < server.metric_sum("tetriinfer_last_flip_seconds") < 30
        after = server.instance_pids()
        flipped = [i for i in after if before[i][0] == "decode" and after[i][0] == "prefill"]
        assert flipped and after[flipped[0]][1] == before[flipped[0]][1]  # same process, weights kept
        assert sum(role == "decode" for role, _ in after.values()) >= 1  # FlipConfig.min_decode
        assert_no_kv_held(server)


def test_gloo_kv_transport_gives_the_same_tokens(tmp_path, offline):
    """The torch.distributed backend behind the same hand-off as the default shared memory."""
    with start_server(["--kv-transport", "gloo", "--decode-instances", "1", *SERVER_ARGS], tmp_path) as server:
        assert_concurrent_requests_equal_offline(server, offline, 8)
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_transfers_total") >= 16, 10, "transfer stats")
        assert server.metric_sum("tetriinfer_kv_transfer_failures_total") == 0
        assert_no_kv_held(server)


def test_async_scheduling_cluster_gives_the_same_tokens(tmp_path, offline):
    """Instances whose engines queue step t+1 before reading back step t: prefill-only requests park
    and hand off as before, and the tokens stay those of the offline engine."""
    with start_server(["--async-scheduling", "--decode-instances", "1", *SERVER_ARGS], tmp_path) as server:
        assert_concurrent_requests_equal_offline(server, offline, 16)
        chunks = list(client(server).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == offline[PROMPTS[0]].text
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_transfer_bytes_total") > 0, 10, "transfer stats")
        assert_no_kv_held(server)


def test_adaptive_cluster_prefills_on_decode_and_decodes_on_prefill_with_the_offline_tokens(tmp_path, offline):
    """The default policy under a prompt flood on a small cache: once the step cost is fitted, the
    decode instance prefills requests itself and the prefill instance keeps decodes when the decode
    side has no room; every request still gets the offline engine's tokens, and no KV is left."""
    args = ["--decode-instances", "1", "--interference-weight", "0", *SERVER_ARGS]
    args[args.index("--num-blocks") + 1] = "48"  # 768 tokens a side: the decode side fills up
    with start_server(args, tmp_path) as server:
        for _ in range(3):
            assert_concurrent_requests_equal_offline(server, offline, 48)
        server.wait_until(lambda: server.metric_sum("tetriinfer_num_local_prefills_total") > 0, 10,
                          "a local prefill on the decode instance")
        assert server.metric_sum("tetriinfer_num_kept_decodes_total") > 0
        assert server.metric_sum("tetriinfer_kv_transfers_total") > 0  # and the paper's way too
        assert_no_kv_held(server)


def test_the_paper_policy_never_prefills_on_a_decode_instance(tmp_path, offline):
    with start_server(["--policy", "paper", "--decode-instances", "1", "--interference-weight", "0",
                       *SERVER_ARGS], tmp_path) as server:
        assert_concurrent_requests_equal_offline(server, offline, 32)
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_transfers_total") >= 64, 10, "transfer stats")
        assert server.metric_sum("tetriinfer_num_local_prefills_total") == 0
        assert server.metric_sum("tetriinfer_num_kept_decodes_total") == 0
        assert_no_kv_held(server)


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage(colocated):
    """Prefix caching is on by default: the same prompt again is served from the cache (whole blocks
    only, never the last token), and usage says how much, as OpenAI's prompt_tokens_details does."""

    c = client(colocated)
    prompt = "The same long shared prefix, " * 6  # 174 byte-level tokens: 10 full blocks of 16
    results = []
    for _ in range(4):  # two instances: by the third request, one of them has served it before
        results.append(c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0))
        time.sleep(0.3)  # a monitor interval or more: the router sees the finished request's load gone
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in results]
    assert cached[0] == 0 and max(cached) == 160  # every full block but none holding the last token
    assert all(n % 16 == 0 for n in cached)
    assert len({r.choices[0].text for r in results}) == 1
    colocated.wait_until(lambda: colocated.metric_sum("tetriinfer_prefix_hit_tokens_total") >= sum(cached), 5,
                         "the hits in /metrics")
    assert colocated.metric_sum("tetriinfer_prefix_queried_tokens_total") >= 4 * results[0].usage.prompt_tokens
    assert colocated.metric_sum("tetriinfer_kv_blocks_cached") > 0


def test_requests_ending_within_handoff_after_tokens_never_move_and_longer_ones_move_exactly(tmp_path, offline):
    """Adaptive: the prefill instance generates a request's first tokens itself. One that ends by
    then never moves its KV; a longer one moves mid-decode and still gets the offline tokens."""
    with start_server(["--decode-instances", "1", "--handoff-after-tokens", "6", *SERVER_ARGS], tmp_path) as server:
        c = client(server)
        for i in range(8):
            c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=5, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert server.metric_sum("tetriinfer_kv_transfers_total") == 0
        assert_concurrent_requests_equal_offline(server, offline, 16)  # 12 to 16 tokens each
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_transfers_total") > 0, 10, "transfer stats")
        assert_no_kv_held(server)


def test_cache_aware_routing_sends_a_repeated_prompt_back_to_the_instance_that_cached_it(colocated):
    """Six distinct prompts spread over two instances, then the same six again: each goes back to
    the instance whose cache holds it (the controller remembers where it sent each prefix), so every
    second-round request reports its full blocks cached."""
    c = client(colocated)
    prompts = [f"Conversation {i} so far: " + "a long shared history, " * 6 for i in range(6)]

    def send(prompt):
        return c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)

    with cf.ThreadPoolExecutor(6) as pool:
        list(pool.map(send, prompts))
        time.sleep(0.3)  # a monitor interval: the view no longer counts the first round as queued
        second = list(pool.map(send, prompts))
    for prompt, result in zip(prompts, second):
        full_blocks = (result.usage.prompt_tokens - 1) // 16 * 16
        assert result.usage.prompt_tokens_details.cached_tokens == full_blocks, prompt
