"""Every `--help` entry of every subcommand says what it does and shows its default, and every
preset is listed wherever presets are listed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tetriinfer.cli import build_parser, main, walk_subparsers
from tetriinfer.presets import PRESETS

PARSER = build_parser()
SUBCOMMANDS = {" ".join(path): sub for path, sub in walk_subparsers(PARSER)}
LEAVES = {name: sub for name, sub in SUBCOMMANDS.items()
          if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)}


def test_the_walk_finds_every_subcommand_including_nested_ones():
    assert {"generate", "profile", "serve", "simulate", "bench serve", "predictor train", "predictor eval"} <= set(LEAVES)


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_every_option_of_every_subcommand_has_help_text(name):
    missing = [a.option_strings or a.dest for a in LEAVES[name]._actions
               if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS]
    assert not missing, f"`tetriinfer {name} --help` has entries without text: {missing}"


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_every_subcommand_shows_its_defaults(name):
    sub = LEAVES[name]
    assert issubclass(sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    text = " ".join(sub.format_help().split())  # unwrapped
    for action in sub._actions:
        shows = action.option_strings and action.default is not argparse.SUPPRESS and action.nargs != 0 \
            and not action.required
        if shows:
            assert f"(default: {action.default}" in text or "%(default)" in action.help, (name, action.option_strings)


def test_every_preset_is_listed_in_the_model_help_the_readme_and_the_error():
    from tetriinfer.model.loader import resolve_model

    model_help = " ".join(SUBCOMMANDS["generate"].format_help().split())
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("no-such-model")
    for name in PRESETS:
        assert name in model_help, name
        assert re.search(rf"`{re.escape(name)}`", readme), f"README does not list the preset {name}"
        assert name in str(e.value), name


def test_an_unknown_flag_names_the_closest_one_and_an_abbreviation_is_not_taken(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--max-num-batched-token", "64", "--prefill-instance", "2", "--trust-remote-code"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-num-batched-token: did you mean --max-num-batched-tokens?" in err
    assert "--prefill-instance: did you mean --prefill-instances?" in err
    assert "--trust-remote-code: no such flag" in err
    with pytest.raises(SystemExit):
        main(["predictor", "train", "--data", "d", "--out", "o", "--epoch", "1"])  # a nested subcommand's flags are the ones searched
    assert "--epoch: did you mean --epochs?" in capsys.readouterr().err
