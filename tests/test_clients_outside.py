"""Clients this project does not own, installed from PyPI (the `test` extra), drive a real
`tetriinfer serve` (tiny model, CPU, 1 prefill + 1 decode instance) as their users run them:
lm-eval's `local-completions` (a loglikelihood multiple-choice task and a generate_until task, from
local JSONL), LangChain's `ChatOpenAI` (invoke, stream, batch) and guidellm (a short synthetic
load). The `openai` client has its own tests (test_serve_e2e.py and others).

Nothing may touch the network: the clients that tokenize for themselves (lm-eval, guidellm) get
the tiny model's byte tokenizer saved as a Hugging Face tokenizer folder, HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE are set, and their HTTP(S) proxy is a closed local port (127.0.0.1 exempt), so
a download fails instead of happening. docs/compatibility.md ("Using outside clients") has the
commands and what each client sends.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from langchain_openai import ChatOpenAI

from serve_utils import start_server
from tetriinfer import LLM, SamplingParams

SERVER_ARGS = ["--num-blocks", "256", "--chunk-size", "64", "--max-model-len", "512"]
MODEL = "tiny"  # the served name of the built-in preset


def offline_env(tmp_path: Path) -> dict:
    """The environment for a client's process: Hugging Face offline, its caches under tmp_path,
    and every proxied HTTP(S) request (what requests/httpx/huggingface_hub send to the internet) to a
    closed port; only 127.0.0.1 goes direct."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    dead = "http://127.0.0.1:9"
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
            "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1"}


def byte_tokenizer_folder(path: Path) -> Path:
    """The tiny preset's tokenizer (UTF-8 bytes are ids 0..255, then <bos> <eos> <pad>) as a Hugging
    Face tokenizer folder: a byte-level BPE with no merges whose vocabulary maps byte b's
    printable stand-in (GPT-2's byte-to-unicode table) to id b, so it encodes any text exactly as
    the server does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={stand_in[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<bos>", "<eos>", "<pad>")])  # 256, 257, 258
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "model_max_length": 512}))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(SERVER_ARGS, tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return byte_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


def requests_counted(server) -> tuple[float, float]:
    """(requests answered ok, requests rejected with a 4xx before running) so far."""
    metrics = server.metrics()
    return (server.metric_sum("tetriinfer_requests_total", metrics, outcome="ok"),
            server.metric_sum("tetriinfer_requests_total", metrics, outcome="rejected"))


def run_client(args: list[str], tmp_path: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """`python -m <client> ARGS` offline; fails the test with the client's output if it exits non-zero."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{args[0]} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


# --- lm-eval ---------------------------------------------------------------------------------------

MC_DOCS = [{"question": f"Question {i}: is the sky blue?", "choices": ["yes", "no", "maybe"], "answer": i % 3}
           for i in range(4)]
GEN_DOCS = [{"question": f"Say {w}:", "answer": w} for w in ("cat", "dog", "sun", "sea")]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
"""
MC_YAML = TASK_YAML + """doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = TASK_YAML + """generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path) -> Path:
    folder.mkdir()
    for name, docs, yaml, output_type in (("tetri_mc", MC_DOCS, MC_YAML, "multiple_choice"),
                                          ("tetri_gen", GEN_DOCS, GEN_YAML, "generate_until")):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(yaml.format(name=name, data=data, output_type=output_type))
    return folder


def read_samples(out: Path, task: str) -> list[dict]:
    [path] = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_lm_eval_local_completions_scores_a_local_loglikelihood_task_and_a_generation_task_with_the_engines_numbers(
        server, tokenizer_dir, tmp_path):
    assert importlib.util.find_spec("lm_eval") is not None, "lm-eval is missing: pip install -e '.[test]'"
    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    ok_before, rejected_before = requests_counted(server)
    run_client(["lm_eval", "--model", "local-completions",
                "--model_args", f"model={MODEL},base_url={server.url}/v1/completions,tokenizer={tokenizer_dir},"
                                "max_length=512,max_retries=1",
                "--tasks", "tetri_mc,tetri_gen", "--include_path", str(tasks), "--limit", "4",
                "--output_path", str(out), "--log_samples"], tmp_path)

    [results_path] = out.rglob("results_*.json")
    results = json.loads(results_path.read_text())["results"]
    assert 0.0 <= results["tetri_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["tetri_gen"]["exact_match,none"] <= 1.0
    # one request per (question, choice) and one per generation, every one answered, none rejected
    ok_after, rejected_after = requests_counted(server)
    assert (ok_after - ok_before, rejected_after - rejected_before) == (4 * 3 + 4, 0)

    # lm-eval's numbers are the engine's: each choice's loglikelihood is the sum of the offline
    # engine's prompt logprobs over the continuation's tokens, and each generation is the offline
    # greedy text (token-id prompts, no BOS, as lm-eval sends them)
    llm = LLM("tiny", num_blocks=256, chunk_size=64, max_model_len=512)
    mc = read_samples(out, "tetri_mc")
    pairs = [(args["arg_0"], args["arg_1"], float(resp[0][0]))  # one (context, continuation) per choice
             for s in mc for args, resp in zip(s["arguments"].values(), s["resps"])]
    assert len(pairs) == 12
    outs = llm.generate(prompt_token_ids=[list((ctx + cont).encode()) for ctx, cont, _ in pairs],
                        sampling_params=SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    for (ctx, cont, got), o in zip(pairs, outs):
        want = sum(o.prompt_logprobs[len(ctx.encode()):])
        assert got == pytest.approx(want, abs=1e-3), (ctx, cont)

    gen = read_samples(out, "tetri_gen")
    assert len(gen) == 4
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in gen]
    stop = gen[0]["arguments"]["gen_args_0"]["arg_1"]["until"]
    outs = llm.generate(prompt_token_ids=[list(p.encode()) for p in prompts],
                        sampling_params=SamplingParams(max_tokens=8, temperature=0, stop=["\n", "<eos>"]))
    assert "\n" in stop
    assert [s["resps"][0][0] for s in gen] == [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def server_with_tokenizer_info(tmp_path_factory):
    with start_server([*SERVER_ARGS, "--enable-tokenizer-info-endpoint"], tmp_path_factory.mktemp("serve-info")) as s:
        yield s


def test_lm_eval_remote_tokenizer_reads_tokenizer_info_and_tokenizes_through_the_server(
        server_with_tokenizer_info, tmp_path):
    """With --enable-tokenizer-info-endpoint, lm-eval's `tokenizer_backend=remote` needs no tokenizer
    folder: it reads GET /tokenizer_info and tokenizes through /tokenize and /detokenize."""
    server = server_with_tokenizer_info
    assert httpx.get(f"{server.url}/tokenizer_info").json()["eos_token"] == "<eos>"
    tasks, out = write_tasks(tmp_path / "tasks"), tmp_path / "out"
    done = run_client(["lm_eval", "--model", "local-completions",
                       "--model_args", f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                                       "max_length=512,max_retries=1",
                       "--tasks", "tetri_gen", "--include_path", str(tasks), "--limit", "2",
                       "--output_path", str(out), "--log_samples"], tmp_path)
    assert "Using remote tokenizer" in done.stdout + done.stderr
    gen = read_samples(out, "tetri_gen")
    llm = LLM("tiny", num_blocks=256, chunk_size=64, max_model_len=512)
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in gen]
    outs = llm.generate(prompt_token_ids=[list(p.encode()) for p in prompts],
                        sampling_params=SamplingParams(max_tokens=8, temperature=0, stop=["\n", "<eos>"]))
    assert len(gen) == 2 and [s["resps"][0][0] for s in gen] == [o.outputs[0].text for o in outs]


# --- LangChain -------------------------------------------------------------------------------------

def chat_model(server, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=12,
                      max_retries=0, timeout=120, **kwargs)


def test_langchain_chat_openai_invoke_stream_and_batch_give_the_same_greedy_answers(server):
    ok_before, rejected_before = requests_counted(server)
    llm = chat_model(server)
    answer = llm.invoke("Hello there")
    assert isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.usage_metadata["output_tokens"] == 12 and answer.usage_metadata["input_tokens"] > 0

    chunks = list(llm.stream("Hello there"))
    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == answer.content

    streamed = None  # with stream_usage, the chunks add up to the message and its usage
    for chunk in chat_model(server, stream_usage=True).stream("Hello there"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.content == answer.content
    assert streamed.usage_metadata["output_tokens"] == 12

    messages = [("system", "You answer briefly."), ("human", "Name a colour.")]
    stopped = llm.invoke(messages, stop=["d"])
    assert "d" not in stopped.content
    batch = llm.batch(["Hello there", "Good morning"])  # concurrent requests
    assert batch[0].content == answer.content
    assert batch[1].content == llm.invoke("Good morning").content

    ok_after, rejected_after = requests_counted(server)
    assert (ok_after - ok_before, rejected_after - rejected_before) == (7, 0)


# --- guidellm --------------------------------------------------------------------------------------

def test_guidellm_runs_a_synthetic_concurrent_load_with_no_errors(server, tokenizer_dir, tmp_path):
    assert importlib.util.find_spec("guidellm") is not None, "guidellm is missing: pip install -e '.[test]'"
    report = tmp_path / "benchmarks.json"
    ok_before, rejected_before = requests_counted(server)
    run_client(["guidellm", "run", "--backend", f"kind=openai_http,target={server.url}",
                "--profile", "kind=concurrent,streams=2", "--constraint", "kind=max_requests,count=6",
                "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=8",
                "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
                "--output", f"kind=json,path={report}", "--disable-console-interactive"], tmp_path)

    [bench] = json.loads(report.read_text())["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert (totals["successful"], totals["errored"], totals["incomplete"]) == (6, 0, 0)
    # it streams chat with max_completion_tokens and vLLM's ignore_eos: exactly 8 tokens each
    assert bench["metrics"]["output_token_count"]["successful"]["total_sum"] == 6 * 8
    assert bench["metrics"]["time_to_first_token_ms"]["successful"]["count"] == 6
    ok_after, rejected_after = requests_counted(server)
    assert (ok_after - ok_before, rejected_after - rejected_before) == (6, 0)
