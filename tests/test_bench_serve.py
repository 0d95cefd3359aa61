"""`tetriinfer bench serve` against a fake OpenAI-compatible streaming server in a thread."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time

import pytest
from aiohttp import web

from tetriinfer.bench.cli import cap_prompts
from tetriinfer.bench.serve_client import SSEParser, prompt_token_ids, run_load_sync
from tetriinfer.bench.workload import RequestSpec, build_specs, poisson_arrivals
from tetriinfer.cli import main
from tetriinfer.net import free_port

MODEL = "fake-model"


class FakeServer:
    """Streams `max_tokens` one-letter chunks: the first after `prefill_s`, the rest `token_s` apart,
    then a usage chunk and [DONE], as OpenAI does. Requests whose max_tokens is in `fail_with_500`
    get HTTP 500; in `error_midway`, an error event after one token; in `cut_midway`, the stream
    ends without [DONE]."""

    def __init__(self) -> None:
        self.prefill_s = 0.05
        self.token_s = 0.01
        self.empty_text = False  # chunks without text until the last (a byte-level tokenizer's partial characters)
        self.fail_with_500: set[int] = set()
        self.error_midway: set[int] = set()
        self.cut_midway: set[int] = set()
        self.received: list[tuple[float, dict]] = []  # (perf_counter at arrival, request body)
        self.in_flight = self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = ""

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        assert self._ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        self._loop.run_forever()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.perf_counter()
        body = await request.json()
        self.received.append((arrived, body))
        n = body["max_tokens"]
        if n in self.fail_with_500:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(self.prefill_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(self.token_s)
                if i == 1 and n in self.error_midway:
                    await self._send(response, {"error": {"message": "instance died", "code": 500}})
                    return response
                if i == 1 and n in self.cut_midway:
                    return response
                choice = {"index": 0, "text": "" if self.empty_text and i < n - 1 else "a", "logprobs": None, "finish_reason": "length" if i == n - 1 else None}
                await self._send(response, {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                                            "choices": [choice]})
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                     "total_tokens": len(body["prompt"]) + n}
            await self._send(response, {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                                        "choices": [], "usage": usage})
            await response.write(b"data: [DONE]\n\n")
            return response
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _send(response: web.StreamResponse, message: dict) -> None:
        await response.write(f"data: {json.dumps(message)}\n\n".encode())


@pytest.fixture
def fake():
    with FakeServer() as server:
        yield server


def closed_batch(lengths: list[tuple[int, int]]) -> list[RequestSpec]:
    return [RequestSpec(i, 0.0, p, o) for i, (p, o) in enumerate(lengths)]


def test_sse_parser_joins_split_bytes_crlf_and_multiline_data():
    body = 'data: {"a": "é"}\r\n\r\n: keep-alive\n\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]'.encode()
    parser = SSEParser()
    events = [e for i in range(len(body)) for e in parser.feed(body[i:i + 1])]  # byte by byte
    events += parser.close()
    assert events == ['{"a": "é"}', "line1\nline2", "[DONE]"]


def test_prompt_ids_are_deterministic_in_range_and_differ_between_requests():
    a = prompt_token_ids(3, 500, vocab_size=256, seed=1)
    assert a == prompt_token_ids(3, 500, vocab_size=256, seed=1)
    assert len(a) == 500 and min(a) >= 0 and max(a) < 256
    assert a != prompt_token_ids(4, 500, vocab_size=256, seed=1)
    with pytest.raises(ValueError, match="prompt length"):
        prompt_token_ids(0, 0)


def test_records_reflect_the_servers_delays_and_usage(fake):
    fake.prefill_s, fake.token_s = 0.06, 0.015
    specs = closed_batch([(10, 1), (20, 5), (7, 9)])
    result = run_load_sync(fake.url, specs, model=None, progress=False)  # model from GET /v1/models
    assert result.model == MODEL and not result.failures
    by_id = {r.request_id: r for r in result.records}
    assert sorted(by_id) == [0, 1, 2]
    for spec in specs:
        record = by_id[spec.request_id]
        assert record.output_tokens == spec.output_tokens and record.prompt_tokens == spec.prompt_tokens
        assert 0.06 <= record.ttft_s < 0.06 + 0.05
        expected_jct = 0.06 + 0.015 * (spec.output_tokens - 1)
        assert expected_jct <= record.jct_s < expected_jct + 0.06
        if spec.output_tokens > 1:
            assert record.tpot_s == pytest.approx(0.015, abs=0.006)
    assert result.wall_s >= max(r.finish_s for r in result.records)
    # The request the server saw: token ids of the spec's length, greedy, streaming with usage.
    bodies = {len(body["prompt"]): body for _, body in fake.received}
    body = bodies[20]
    assert body["model"] == MODEL and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert body["temperature"] == 0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert all(isinstance(t, int) and 0 <= t < 256 for t in body["prompt"])


def test_chunks_without_text_still_time_the_tokens(fake):
    """A chunk is a step of output even when its text is empty: TTFT and JCT must not wait for text."""
    fake.prefill_s, fake.token_s, fake.empty_text = 0.05, 0.02, True
    result = run_load_sync(fake.url, closed_batch([(10, 6)]), model=None, progress=False)
    (record,) = result.records
    assert 0.05 <= record.ttft_s < 0.05 + 0.04
    assert 0.05 + 0.02 * 5 <= record.jct_s < 0.05 + 0.02 * 5 + 0.06
    assert record.output_tokens == 6


def test_poisson_arrivals_are_sent_at_their_offsets(fake):
    import random

    fake.prefill_s, fake.token_s = 0.005, 0.002
    arrivals = poisson_arrivals(8, rate=25.0, rng=random.Random(1))
    specs = [RequestSpec(i, t, 4, 3) for i, t in enumerate(arrivals)]
    start = time.perf_counter()
    result = run_load_sync(fake.url, specs, model=MODEL, progress=False)
    assert len(result.records) == 8 and not result.failures
    for record in result.records:
        scheduled = arrivals[record.request_id]
        assert scheduled <= record.arrival_s < scheduled + 0.05
    # The server clock agrees: the last request reached it no earlier than its offset.
    last_arrival = max(t for t, _ in fake.received)
    assert last_arrival - start >= arrivals[-1]
    assert result.wall_s >= arrivals[-1]


def test_concurrency_caps_requests_in_flight(fake):
    fake.prefill_s, fake.token_s = 0.03, 0.002
    specs = closed_batch([(4, 2)] * 6)
    result = run_load_sync(fake.url, specs, model=MODEL, progress=False, concurrency=2)
    assert len(result.records) == 6
    assert fake.max_in_flight == 2
    # Waiting requests count from when they were sent, so their TTFT stays the server's.
    assert max(r.ttft_s for r in result.records) < 0.03 + 0.04
    assert max(r.arrival_s for r in result.records) >= 2 * 0.03


def test_failures_are_counted_and_reported_not_raised(fake):
    fake.prefill_s, fake.token_s = 0.005, 0.002
    fake.fail_with_500, fake.error_midway, fake.cut_midway = {7}, {8}, {9}
    specs = closed_batch([(5, 3), (5, 7), (5, 8), (5, 9), (5, 7)])
    result = run_load_sync(fake.url, specs, model=MODEL, progress=False)
    assert [r.request_id for r in result.records] == [0]
    failures = {f.request_id: f for f in result.failures}
    assert sorted(failures) == [1, 2, 3, 4]
    assert failures[1].status == 500 and "boom" in failures[1].error
    assert "instance died" in failures[2].error
    assert "[DONE]" in failures[3].error
    assert result.failures_by_reason()["HTTP 500"] == 2


def test_unreachable_server_fails_every_request_and_the_cli_says_so(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    result = run_load_sync(url, closed_batch([(3, 2)] * 3), model=MODEL, progress=False)
    assert not result.records and len(result.failures) == 3
    assert all(f.status is None and "Connect" in f.error for f in result.failures)
    code = main(["bench", "serve", "--url", url, "--workload", "lpld", "--num-requests", "3", "--model", MODEL,
                 "--no-progress"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "0 ok, 3 failed" in printed and "no request succeeded" in printed


def test_cli_trace_run_writes_json_and_plot(fake, tmp_path, capsys):
    fake.prefill_s, fake.token_s = 0.01, 0.002
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,12,4\n0.05,3000,5\n0.1,30,6\n0.1,8,2\n")
    out, plot = tmp_path / "run.json", tmp_path / "run.png"
    code = main(["bench", "serve", "--url", fake.url, "--trace", str(trace), "--max-model-len", "1024",
                 "--instances", "2", "--label", "fake", "--ttft-slo", "1", "--json", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 requests" in printed and "TTFT p99 (ms)" in printed and "fake" in printed
    with open(out) as f:
        report = json.load(f)
    assert list(report) == ["fake"]
    summary = report["fake"]["summary"]
    assert summary["num_requests"] == 3 and report["fake"]["num_failures"] == 0
    assert summary["ttft"]["p50"] > 0.01 and summary["slo_attainment"] == 1.0
    assert summary["resource_time_s"] == pytest.approx(2 * summary["makespan_s"])
    assert report["fake"]["config"]["model"] == MODEL
    assert sorted(len(body["prompt"]) for _, body in fake.received) == [8, 12, 30]  # 3000 + 5 > 1024: dropped
    assert plot.stat().st_size > 0  # beside --json by default


def test_cli_workload_run_reports_failures(fake, tmp_path, capsys):
    fake.prefill_s, fake.token_s = 0.002, 0.0005
    specs = build_specs("lpld", 6, seed=2, rate=50.0)
    fake.fail_with_500 = {specs[0].output_tokens}
    out = tmp_path / "w.json"
    code = main(["bench", "serve", "--url", fake.url, "--workload", "lpld", "--num-requests", "6", "--rate", "50",
                 "--seed", "2", "--max-prompt-tokens", "16", "--model", MODEL, "--json", str(out),
                 "--plot", str(tmp_path / "w.png"), "--no-progress"])
    assert code == 0
    assert "failed" in capsys.readouterr().out
    report = json.loads(out.read_text())["server"]
    failed = sum(1 for s in specs if s.output_tokens in fake.fail_with_500)
    assert report["num_failures"] == failed and report["failures_by_reason"] == {"HTTP 500": failed}
    assert report["summary"]["num_requests"] == 6 - failed
    assert all(len(body["prompt"]) == min(s.prompt_tokens, 16) for (_, body), s in zip(fake.received, specs))
    assert [body["max_tokens"] for _, body in fake.received] == [s.output_tokens for s in specs]


def test_cli_exits_nonzero_when_nothing_succeeds(fake, tmp_path, capsys):
    fake.fail_with_500 = {2}
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,4,2\n")
    assert main(["bench", "serve", "--url", fake.url, "--trace", str(trace), "--no-progress"]) == 1
    assert "no request succeeded" in capsys.readouterr().out


def test_specs_match_simulate_for_the_same_flags():
    from tetriinfer.presets import get_preset
    from tetriinfer.bench.simulate import build_specs as sim_build_specs

    context = get_preset("llama3-8b")["max_position_embeddings"]
    for workload, rate in (("mixed", None), ("hphd", 4.0), ("azure-conv", None), ("azure-code", 2.0)):
        flags = argparse.Namespace(trace=None, workload=workload, num_requests=20, rate=rate, seed=3,
                                   model="llama3-8b")
        ours = build_specs(workload, 20, rate=rate, seed=3, max_total_tokens=context)
        assert ours == sim_build_specs(flags)


def test_max_prompt_tokens_cuts_prompts_only():
    specs = closed_batch([(5, 3), (50, 7)])
    assert cap_prompts(specs, 10) == [RequestSpec(0, 0.0, 5, 3), RequestSpec(1, 0.0, 10, 7)]
    with pytest.raises(ValueError, match="max-prompt-tokens"):
        cap_prompts(specs, 0)


def test_an_unreachable_server_is_a_one_line_error_naming_the_url(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SystemExit) as exited:
        main(["bench", "serve", "--url", url, "--num-requests", "2", "--no-progress"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}/v1/models" in err and "is the server running there?" in err
