"""`tetriinfer serve --tensor-parallel-size 2` on the CPU (gloo): every instance spans two rank
processes, the KV moved between instances is gathered from and scattered to the rank shards, and
the tokens equal the single-process engine's on the same Hugging Face checkpoint. (Presets with
random weights draw each rank's shard separately, so only a checkpoint gives comparable tokens.)"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import openai
import pytest

from hf_models import build_hf_model
from serve_utils import start_server
from tetriinfer import LLM, SamplingParams

ENGINE = ["--num-blocks", "128", "--chunk-size", "16", "--max-model-len", "512"]
PROMPTS = [f"the quick brown fox {'jumps ' * i}over the lazy dog" for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("llama-tp")
    build_hf_model("llama", path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    return path


def rank_processes(parent: int) -> list[int]:
    """Pids of the spawned processes whose parent is `parent` (multiprocessing's resource tracker aside)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and "multiprocessing" in cmd and "resource_tracker" not in cmd:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("decode_tp", [2, 1])
def test_tensor_parallel_instances_serve_the_single_process_tokens_and_leave_no_rank_behind(tmp_path, model_dir,
                                                                                            decode_tp):
    llm = LLM(str(model_dir), num_blocks=128, chunk_size=16, max_model_len=512)  # one process, TP 1
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, greedy)]
    del llm
    args = ["--model", str(model_dir), *ENGINE, "--tensor-parallel-size", "2", "--torch-threads", "1",
            "--decode-tensor-parallel-size", str(decode_tp),
            "--policy", "paper"]  # the paper's split: every request's KV moves from the TP-2 prefill instance
    with start_server(args, tmp_path) as server:
        instances = server.wait_for_instances(2)
        workers = {role: rank_processes(pid) for role, pid in instances.values()}
        assert {role: len(w) for role, w in workers.items()} == {"prefill": 1, "decode": decode_tp - 1}
        workers = [w for ranks in workers.values() for w in ranks]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def one(prompt: str) -> str:
            out = client.completions.create(model=str(model_dir), prompt=prompt, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 10
            return out.choices[0].text

        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            served = list(pool.map(one, PROMPTS))
        # The counters reach /metrics with the instances' next reports (stats are a few ticks stale).
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_transfers_total") >= len(PROMPTS), 20,
                          "every request's KV move in the transfer stats")
        assert server.metric_sum("tetriinfer_kv_transfer_bytes_total") > 0
        server.wait_until(lambda: server.metric_sum("tetriinfer_kv_blocks_used") == 0, 20, "every KV block freed")
    server.wait_until(lambda: not any(alive(w) for w in workers), 15, "every rank process gone")
    assert served == expected
