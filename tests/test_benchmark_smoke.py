"""The GPU benchmark scripts run their whole code path on CPU (--smoke: tiny shapes, Triton kernels in the
interpreter, wall clock), so a device call is not spent finding a broken script. Asserted: the run completes, every
kernel variant passes its correctness check against the reference inside the script, and every timed field is
recorded (no variant fell back to an error entry). Timings here mean nothing and are not checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.slow


def run_smoke(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=1500, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return json.loads((out / script.replace(".py", ".json")).read_text())


def test_attention_kernels_smoke(tmp_path: Path) -> None:
    # One ragged cell (1000 tokens, density 0.25) of the full mode's code, every kernel variant in it.
    data = run_smoke("attention_kernels.py", tmp_path, "--mode", "smoke", "--shapes", "smoke_n1000",
                     "--densities", "0.25")
    assert data["complete"] and not data["skipped"]
    checks = data["checks_worst_rel_l2"]
    assert {"triton", "triton_host_desc", "triton_host_desc_storage", "triton_in_kernel_desc", "triton_out_desc",
            "triton_persistent", "cluster", "cluster_packed",
            "cluster_packed_permuted", "cluster_padded_permuted", "cluster_packed_w8"} <= set(checks)
    assert all(math.isfinite(value) for value in checks.values()), checks
    for record in data["records"]:
        assert not [key for key in record if key.endswith("_error")], record
        for name in ("triton", "triton_host_desc", "triton_host_desc_storage", "triton_in_kernel_desc",
                     "triton_out_desc", "triton_persistent", "triton_unequal", "triton_persistent_unequal",
                     "cluster", "cluster_packed", "cluster_packed_m64", "cluster_packed_w8",
                     "cluster_packed_permuted", "cluster_padded_permuted", "cluster_padded_permuted_w8",
                     "cluster_packed_permuted_q_in_kernel", "cluster_default_counts", "cluster_padded_out_scatter"):
            assert record[f"{name}_ms"] > 0, (name, record)
    assert (tmp_path / "attention_kernels.png").stat().st_size > 0


def test_strategy_overheads_smoke(tmp_path: Path) -> None:
    data = run_smoke("strategy_overheads.py", tmp_path, "--smoke")
    assert not data["errors"], data["errors"]
    fused = {key: value for key, value in data["checks"].items()
             if key.startswith(("fused_permutation", "out_scatter"))}
    assert len(fused) == 5 and all(value < 1e-2 for value in fused.values()), fused
    names = {row["strategy"] for row in data["strategies"]}
    assert any(name.endswith("_fused") for name in names) and any(name.endswith("_out_scatter") for name in names)
    # SemanticKMeans at its field defaults (the smoke run only lowers the cluster counts). Imported here, not at the
    # top: vdopt's kernels must first be imported after a kernel test module has set TRITON_INTERPRET.
    from vdopt.strategies import SemanticKMeans

    assert {"semantic_permutation_default", "semantic_permutation_default_out_scatter"} <= names
    [default] = data["kmeans_default"]
    assert (default["iterations"], default["top_p"]) == (SemanticKMeans().iterations, SemanticKMeans().top_p)
    assert all(default[f"{key}_ms"] > 0 for key in ("strategy_total", "step_out_scatter",
                                                     "cluster_kernel_in_cluster_order"))
    assert any(name.startswith("semantic_permutation") for name in names)


def test_paired_rounds_reverse_the_order_every_other_round() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("attention_kernels_bench",
                                                  Path(__file__).parent.parent / "benchmarks" / "attention_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    class Clock:  # the order of calls is what is checked; the time is the call's position
        def ms(self, fn, rep_ms):
            calls.append(fn())
            return float(len(calls))

    times = module.paired_rounds(Clock(), {"fa4": lambda: "fa4", "op": lambda: "op"}, 4, 1.0)
    assert calls == ["fa4", "op", "op", "fa4", "fa4", "op", "op", "fa4"]
    assert times == {"fa4": [1.0, 4.0, 5.0, 8.0], "op": [2.0, 3.0, 6.0, 7.0]}
