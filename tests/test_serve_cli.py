"""`tetriinfer serve` refuses bad arguments with a clear message before starting any process."""

from __future__ import annotations

import socket

import pytest

from tetriinfer.cli import main


def run_cli(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_port_in_use(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in run_cli(capsys, "--port", str(port))


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "neither a preset"),
    (["--prefill-instances", "0"], "num_prefill must be >= 1"),
    (["--kv-timeout", "0"], "must be > 0"),
    # Checked against the model before any process starts (the tiny preset: 4 heads, 4096 positions).
    (["--tensor-parallel-size", "3"], "tensor_parallel_size 3 does not divide the model's 4 attention heads"),
    (["--decode-tensor-parallel-size", "3"], "tensor_parallel_size 3 does not divide"),
    (["--max-model-len", "100000"], "max_model_len 100000 exceeds the model's limit of 4096 tokens"),
])
def test_bad_arguments(capsys, args, message):
    assert message in run_cli(capsys, *args)


def test_the_model_may_come_first_as_vllm_serve_takes_it_but_only_once(capsys):
    import argparse

    from tetriinfer.entrypoints.serve import add_parser, serve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for args in (["tiny-llama", "--port", "8123"], ["--port", "8123", "--model", "tiny-llama"],
                 ["tiny-llama", "--model", "tiny-llama", "--port", "8123"]):
        cfg = serve_config(parser.parse_args(["serve", *args]))
        assert (cfg.engine.model, cfg.port) == ("tiny-llama", 8123)
    assert "the model is given twice" in run_cli(capsys, "tiny-llama", "--model", "tiny-qwen2")
    assert "neither a preset" in run_cli(capsys, "no-such-model")


@pytest.mark.parametrize("mode", [["--mode", "disagg"], ["--mode", "colocated", "--baseline", "vllm"],
                                  ["--mode", "colocated", "--baseline", "sarathi"]])
def test_engine_flags_reach_every_instance(mode):
    import argparse

    from tetriinfer.cluster.plan import instance_engine, instance_roles
    from tetriinfer.entrypoints.serve import add_parser, serve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cfg = serve_config(parser.parse_args(["serve", *mode, "--async-scheduling", "--max-num-seqs", "48",
                                          "--no-prefix-caching", "--tensor-parallel-size", "2",
                                          "--quantization", "fp8", "--kv-cache-dtype", "fp8"]))
    for role in instance_roles(cfg):
        engine = instance_engine(cfg, role, "cpu")
        assert engine.scheduler.async_scheduling and engine.scheduler.max_num_seqs == 48
        assert not engine.cache.enable_prefix_caching
        assert (engine.tensor_parallel_size, engine.quantization, engine.kv_cache_dtype) == (2, "fp8", "fp8")
    assert serve_config(parser.parse_args(["serve", *mode])).engine.cache.enable_prefix_caching  # the default


def test_api_key_comes_from_the_environment_and_help_never_prints_it(monkeypatch, capsys):
    import argparse

    from tetriinfer.entrypoints.serve import add_parser, serve_config

    monkeypatch.setenv("TETRIINFER_API_KEY", "sekrit-from-env")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert serve_config(parser.parse_args(["serve"])).api_key == "sekrit-from-env"
    assert serve_config(parser.parse_args(["serve", "--api-key", "given"])).api_key == "given"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "sekrit-from-env" not in capsys.readouterr().out


def test_each_instance_gets_its_own_tensor_parallel_gpus():
    from tetriinfer.cluster.plan import instance_devices
    from tetriinfer.config import ClusterShape, EngineConfig, ServeConfig

    cfg = ServeConfig(shape=ClusterShape(1, 2), engine=EngineConfig(device="cuda", tensor_parallel_size=2))
    assert instance_devices(cfg, num_gpus=6) == ["cuda:0", "cuda:2", "cuda:4"]  # ranks: 0-1, 2-3, 4-5
    with pytest.raises(ValueError, match=r"3 instances need 6 GPUs \(one per tensor-parallel rank\), but 4"):
        instance_devices(cfg, num_gpus=4)
    shared = ServeConfig(engine=EngineConfig(device="cuda:1", tensor_parallel_size=2))  # both on GPUs 1-2
    assert instance_devices(shared, num_gpus=0) == ["cuda:1", "cuda:1"]


def test_decode_instances_may_span_another_number_of_gpus():
    from tetriinfer.cluster.plan import instance_devices, instance_engine, instance_roles
    from tetriinfer.config import ClusterShape, EngineConfig, ServeConfig

    cfg = ServeConfig(shape=ClusterShape(2, 1), engine=EngineConfig(device="cuda", tensor_parallel_size=1),
                      decode_tensor_parallel_size=4)
    assert instance_devices(cfg, num_gpus=6) == ["cuda:0", "cuda:1", "cuda:2"]  # decode: GPUs 2-5
    assert [instance_engine(cfg, r, "cuda").tensor_parallel_size for r in instance_roles(cfg)] == [1, 1, 4]
    with pytest.raises(ValueError, match="needs the disagg mode"):
        ServeConfig(mode="colocated", decode_tensor_parallel_size=2)


def test_a_vllm_serve_command_line_runs_with_the_command_name_changed():
    import argparse

    from tetriinfer.entrypoints.serve import add_parser, serve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    line = ("tiny --host 0.0.0.0 --port 8123 --dtype auto -tp 2 --max-model-len 256 --max-num-seqs 32 "
            "--gpu-memory-utilization 0.5 --num-gpu-blocks-override 77 --no-enable-prefix-caching --seed 3 "
            "--served-model-name served --api-key k --disable-log-requests --uvicorn-log-level info "
            "--enable-tokenizer-info-endpoint")
    cfg = serve_config(parser.parse_args(["serve", *line.split()]))
    engine = cfg.engine
    assert (cfg.host, cfg.port, cfg.served_model_name, cfg.api_key, cfg.uvicorn_log_level) == (
        "0.0.0.0", 8123, "served", "k", "info")
    assert cfg.enable_tokenizer_info_endpoint
    assert not serve_config(parser.parse_args(["serve", "tiny"])).enable_tokenizer_info_endpoint  # off, as in vLLM
    assert (engine.model, engine.dtype, engine.tensor_parallel_size, engine.max_model_len, engine.seed) == (
        "tiny", "float32", 2, 256, 3)
    assert (engine.scheduler.max_num_seqs, engine.cache.memory_fraction, engine.cache.num_blocks,
            engine.cache.enable_prefix_caching) == (32, 0.5, 77, False)


def test_vllm_tool_calling_and_reasoning_flags_reach_the_serve_config_and_auto_choice_needs_a_parser():
    import argparse

    from tetriinfer.entrypoints.serve import add_parser, serve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cfg = serve_config(parser.parse_args(["serve", "tiny", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                          "--reasoning-parser", "qwen3"]))
    assert (cfg.enable_auto_tool_choice, cfg.tool_call_parser, cfg.reasoning_parser) == (True, "hermes", "qwen3")
    with pytest.raises(ValueError, match="--tool-call-parser"):
        serve_config(parser.parse_args(["serve", "tiny", "--enable-auto-tool-choice"]))


def test_dtype_auto_is_float32_on_a_cpu_and_the_checkpoints_16_bit_type_on_a_gpu(tmp_path):
    import argparse
    import json

    from tetriinfer.config import EngineConfig
    from tetriinfer.entrypoints.serve import add_parser, serve_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert serve_config(parser.parse_args(["serve", "--dtype", "auto"])).engine.dtype == "float32"
    assert serve_config(parser.parse_args(["serve", "--dtype", "auto", "--device", "cuda"])).engine.dtype == "bfloat16"
    for declared, expected in (("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")):
        (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": declared}))
        assert EngineConfig(model=str(tmp_path), dtype="auto", device="cuda:1").dtype == expected
        assert EngineConfig(model=str(tmp_path), dtype="auto", device="cpu").dtype == "float32"


@pytest.mark.parametrize("flags, gpus, mode", [
    ([], 1, "colocated"),  # one GPU, nothing asked: the colocated instance
    ([], 2, "disagg"),  # a GPU per instance: the split
    ([], 0, "disagg"),  # no GPU: refused later, as before, by the launcher
    (["--mode", "disagg"], 1, "disagg"),  # asked for: kept
    (["--prefill-instances", "1"], 1, "disagg"),
    (["--mps-sm-shares", "40,60"], 1, "disagg"),
])
def test_one_visible_gpu_serves_one_colocated_instance_unless_a_split_is_asked_for(monkeypatch, capsys, flags, gpus,
                                                                                     mode):
    import argparse

    import torch

    from tetriinfer.cluster.plan import instance_roles
    from tetriinfer.entrypoints.serve import ONE_GPU_NOTE, add_parser, serve_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    cfg = serve_config(parser.parse_args(["serve", "tiny", "--device", "cuda", *flags]))
    assert cfg.mode == mode
    assert (ONE_GPU_NOTE in capsys.readouterr().out) == (mode == "colocated")
    if mode == "colocated":
        assert instance_roles(cfg) == ["colocated"] and cfg.baseline == "sarathi"
    else:
        assert len(instance_roles(cfg)) == 2
    on_cpu = serve_config(parser.parse_args(["serve", "tiny", *flags]))  # the CPU default keeps the split
    assert on_cpu.mode == "disagg"
