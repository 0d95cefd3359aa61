"""`tetriinfer profile`'s grid: its defaults fit the model's context and KV cache (so the defaults run
on the tiny model), and a grid that does not fit fails naming the flags to change."""

from __future__ import annotations

import argparse

import pytest

from tetriinfer.entrypoints.profile import fit_grid
from tetriinfer.presets import get_preset

TINY_CONTEXT = get_preset("tiny")["max_position_embeddings"]  # 4096


def grid(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"chunk_tokens": None, "context_tokens": None, "batch_sizes": None,
                                 "context_per_seq": None, **given})


def test_the_default_grid_is_cut_to_the_tiny_models_context():
    args = grid()
    fit_grid(args, TINY_CONTEXT, kv_tokens=10**7, block_size=16)
    assert args.chunk_tokens == [256, 512, 1024, 2048]
    assert max(args.chunk_tokens) + max(args.context_tokens) <= TINY_CONTEXT and args.context_tokens == [0, 1024]
    assert args.context_per_seq == [128, 1024] and args.batch_sizes == [1, 8, 32, 64, 128, 256]


def test_a_long_context_model_keeps_the_full_default_grid():
    args = grid()
    fit_grid(args, 8192, kv_tokens=10**7, block_size=16)
    assert args.chunk_tokens[-1] == 4096 and args.context_tokens == [0, 1024, 4096]
    assert args.context_per_seq == [128, 1024, 4096]


def test_default_batch_sizes_are_cut_to_the_kv_cache():
    args = grid()
    fit_grid(args, TINY_CONTEXT, kv_tokens=40 * (1024 + 16), block_size=16)
    assert args.batch_sizes == [1, 8, 32]


def test_a_given_grid_beyond_the_context_names_the_flags_to_change():
    with pytest.raises(ValueError) as e:
        fit_grid(grid(chunk_tokens=[4096], context_tokens=[0, 4096]), TINY_CONTEXT, 10**7, 16)
    message = str(e.value)
    assert "exceeds the model's context of 4096" in message
    assert "--chunk-tokens" in message and "--context-tokens" in message and "--max-model-len" in message


def test_a_given_decode_context_beyond_the_context_names_its_flag():
    with pytest.raises(ValueError, match="--context-per-seq"):
        fit_grid(grid(context_per_seq=[4096]), TINY_CONTEXT, 10**7, 16)


def test_a_grid_beyond_the_cache_names_the_cache_flags():
    with pytest.raises(ValueError) as e:
        fit_grid(grid(batch_sizes=[64], context_per_seq=[100]), TINY_CONTEXT, kv_tokens=128, block_size=16)
    assert "--batch-sizes" in str(e.value) and "--num-blocks" in str(e.value)


def test_the_cli_reports_a_grid_beyond_the_context_as_an_error(tmp_path, capsys):
    from tetriinfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["profile", "--out", str(tmp_path / "x.json"), "--chunk-tokens", "4096", "--context-tokens", "1"])
    assert e.value.code == 2 and "--chunk-tokens" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
