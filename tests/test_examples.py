"""The examples that run on a CPU in seconds keep running."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_dit_example_runs(capsys) -> None:
    runpy.run_path(str(EXAMPLES / "custom_dit.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "vdopt plan for TokenDiT" in printed and "relative L2 vs dense" in printed
