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


def test_search_from_a_saved_calibration_gives_the_same_plan(tmp_path, calib_file, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    base = ["--model", "test_cli:local_model", "--target", "h100", "--budget", "density", "--density", "0.3"]
    saved = tmp_path / "calibration.json"
    assert search_main([*base, "--calib", str(calib_file), "--out", str(tmp_path / "a.json"),
                        "--save-calibration", str(saved)]) == 0
    assert "calibration written to" in capsys.readouterr().out
    assert search_main([*base, "--from-calibration", str(saved), "--out", str(tmp_path / "b.json")]) == 0
    first, again = Plan.load(tmp_path / "a.json").to_json(), Plan.load(tmp_path / "b.json").to_json()
    assert again["sites"] == first["sites"] and again["predictions"] == first["predictions"]
    # Another budget from the same calibration, no model run: a different plan.
    assert search_main([*base[:-1], "0.6", "--from-calibration", str(saved), "--out", str(tmp_path / "c.json")]) == 0
    assert Plan.load(tmp_path / "c.json").to_json()["sites"] != first["sites"]
    # Restricted to one calibrated strategy: only it and dense are used.
    from vdopt.calibrate import load_calibration

    label = min(load_calibration(saved)[0].candidates)
    assert search_main([*base, "--from-calibration", str(saved), "--out", str(tmp_path / "d.json"),
                        "--strategy", label]) == 0
    used = {s.label() for site in Plan.load(tmp_path / "d.json").sites for r in site.schedule for s in r.heads}
    assert used <= {"dense", label}
    capsys.readouterr()
    assert search_main([*base, "--from-calibration", str(saved), "--out", str(tmp_path / "e.json"),
                        "--strategy", "diagonal(width=9.0)"]) == 2
    assert "--strategy: strategies ['diagonal(width=9.0)'] were not calibrated" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--from-calibration", "/nonexistent/calibration.json"], "no such file"),
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


def test_from_calibration_rejects_a_file_that_is_not_one(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    bogus = tmp_path / "plan_not_calibration.json"
    bogus.write_text('{"version": 1, "sites": []}')
    code = search_main(["--model", "test_cli:local_model", "--from-calibration", str(bogus),
                        "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a saved calibration" in err[0], err
