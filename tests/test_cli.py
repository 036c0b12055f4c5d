"""vdopt-search end to end on a tiny model, and one-line errors with exit code 2 on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vdopt.cli import search_main
from vdopt.plan import Plan


def local_model():
    """Factory for --model tests.test_cli:local_model."""
    from conftest import LocalAttentionDiT

    torch.manual_seed(0)
    return LocalAttentionDiT().eval()


@pytest.fixture()
def calib_file(tmp_path):
    from conftest import local_dit_inputs

    path = tmp_path / "calib.pt"
    torch.save([local_dit_inputs(s, timestep=t) for s in range(2) for t in (800, 300)], path)
    return path


def test_search_writes_plan_and_summary(tmp_path, calib_file, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "plan.json"
    code = search_main(["--model", "test_cli:local_model", "--calib", str(calib_file), "--target", "h100",
                        "--out", str(out), "--recall", "0.9"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "predicted attention speedup" in printed and "plan written to" in printed
    plan = Plan.load(out)
    assert plan.target == "h100" and plan.sites


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "tpu9"], "--target 'tpu9' is unknown"),
        (["--recall", "1.5"], "recall_budget must be in (0, 1]"),
        (["--calib", "/nonexistent/prompts.txt"], "no such file"),
        (["--out", "/nonexistent/dir/plan.json"], "does not exist"),
        (["--model", "no_such_module:factory"], "cannot import factory from no_such_module"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, calib_file, tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    base = ["--model", "test_cli:local_model", "--calib", str(calib_file), "--out", str(tmp_path / "p.json")]
    proc = subprocess.run([sys.executable, "-c", "import sys; from vdopt.cli import search_main; sys.exit(search_main(sys.argv[1:]))",
                           *base, *args], capture_output=True, text=True, check=False, cwd=str(__import__("pathlib").Path(__file__).parent))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_search_balances_heads_for_ulysses(tmp_path, calib_file, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "plan.json"
    code = search_main(["--model", "test_cli:local_model", "--calib", str(calib_file), "--out", str(out),
                        "--recall", "0.9", "--ulysses-degree", "2"])
    assert code == 0 and "balanced for ulysses_degree=2" in capsys.readouterr().out
    plan = Plan.load(out)
    assert plan.parallel["ulysses_degree"] == 2
    assert set(plan.parallel["head_order"]) == {s.site for s in plan.sites}
