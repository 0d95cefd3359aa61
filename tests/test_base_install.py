"""What a user gets from the repository alone on a base install: the package copied into a temporary
folder with no data folder beside it, matplotlib hidden (it is the `plot` extra), and the README's
main job, `simulate --compare` and `predictor eval` with the shipped model run there as commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tetriinfer

REPO = Path(tetriinfer.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """(a folder holding the package alone, the environment that runs it without matplotlib)."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(REPO / "tetriinfer", root / "repo" / "tetriinfer", ignore=shutil.ignore_patterns("__pycache__"))
    hidden = root / "no-extras" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'matplotlib\'", name="matplotlib")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("TETRIINFER_DATA_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "no-extras"), str(root / "repo")])
    return root / "repo", env


def run(clone, *args: str) -> str:
    folder, env = clone
    done = subprocess.run([sys.executable, "-m", "tetriinfer.cli", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_the_copy_runs_its_own_code_and_has_no_matplotlib(clone):
    folder, env = clone
    probe = "import tetriinfer, importlib.util as u; print(tetriinfer.__file__)\ntry:\n import matplotlib\nexcept ImportError: print('none')"
    out = subprocess.run([sys.executable, "-c", probe], cwd=folder, env=env, capture_output=True, text=True).stdout
    assert out.splitlines() == [str(folder / "tetriinfer" / "__init__.py"), "none"]


def test_the_readme_main_job_runs(clone):
    assert "Hello, TetriInfer" in run(clone, "generate", "--prompt", "Hello, TetriInfer", "--max-tokens", "4")


def test_simulate_compare_runs_without_matplotlib_and_says_how_to_get_the_plot(clone):
    out = run(clone, "simulate", "--compare", "tetriinfer,sarathi", "--workload", "mixed", "--num-requests", "40",
              "--no-progress")
    assert "tetriinfer" in out and "sarathi" in out
    assert "no plot: matplotlib is not installed (pip install 'tetriinfer[plot]')" in out


def test_an_asked_for_plot_without_matplotlib_is_a_one_line_error(clone):
    folder, env = clone
    done = subprocess.run([sys.executable, "-m", "tetriinfer.cli", "simulate", "--workload", "lpld", "--num-requests",
                           "10", "--no-progress", "--plot", "x.png"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "drawing x.png needs matplotlib: pip install 'tetriinfer[plot]'" in done.stderr


def test_predictor_eval_uses_the_shipped_model_by_default(clone, tmp_path):
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"USER: question {i}\n", "output_tokens": 40 * i}) + "\n"
                            for i in range(1, 21)))
    out = run(clone, "predictor", "eval", "--data", str(data))
    assert "20" in out and "tau" in out.lower()
