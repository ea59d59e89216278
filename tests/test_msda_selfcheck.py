"""The GPU self-check (``python -m piip_models.kernels.selfcheck`` and ``benchmarks/gpu_check.py``) end to end on the
CPU, and its GPU steps on tiny problems through the Triton interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from piip_models.kernels import compile_gate, selfcheck

from .test_msda import _TRITON_ERROR, _TRITON_RUNNABLE

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not _TRITON_RUNNABLE, reason=f"Triton unavailable: {_TRITON_ERROR}")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the full GPU checks")


@cpu_only
def test_selfcheck_command_on_cpu(tmp_path):
    """One command: the compile table, then "no CUDA", exit status 0, and the JSON report."""
    report = tmp_path / "selfcheck.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "piip_models.kernels.selfcheck", "--heuristic-only", "--dtypes", "bfloat16",
         "--head-dims", "24", "--json", str(report)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA" in result.stdout
    saved = json.loads(report.read_text())
    assert saved["gpu"] == "no CUDA" and saved["environment"]["cuda"] is False
    if compile_gate.unavailable() is None:
        assert "sm_80 regs" in result.stdout and "sm_90 occupancy" in result.stdout
        kernels = saved["compile_table"]["kernels"]
        assert len(kernels) == 6  # forward, backward, backward without value gradient; sm_80 and sm_90
        assert {k["arch"] for k in kernels} == {80, 90} and all(k["head_dim"] == 24 for k in kernels)
        assert all(k["spill_stores"] == k["spill_loads"] == 0 for k in kernels)
    else:
        assert "compile table skipped" in result.stdout


def test_selfcheck_rejects_an_unknown_head_dim(capsys):
    with pytest.raises(ValueError, match="--head-dims"):
        compile_gate.selected_cases(selfcheck.parse_args(["--head-dims", "7"]))


@cpu_only
def test_gpu_check_script_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "gpu_check.json"
    assert module.main(["--heuristic-only", "--dtypes", "float32", "--head-dims", "12", "--json", str(report)]) == 0
    assert "no CUDA" in capsys.readouterr().out
    assert json.loads(report.read_text())["gpu"] == "no CUDA"


@needs_triton
def test_numerics_step_in_the_interpreter():
    """The GPU numerics step on a tiny case for every dtype: errors within tolerance, deterministic backward bitwise
    repeatable, forward independent of the launch config."""
    case = ([(3, 4), (2, 3)], 2, 6, 2, 5)
    rows = selfcheck.check_numerics("cpu", cases=[case])
    assert [row["dtype"] for row in rows] == ["float32", "float16", "bfloat16", "float64"]
    for row in rows:
        assert set(row["errors"]) == {"output", "grad_value", "grad_loc", "grad_attn"}
        assert row["within_tolerance"], row
        assert row["deterministic_repeatable"] and row["config_independent"], row


@needs_triton
def test_timing_step_in_the_interpreter():
    """The timing step's report on a tiny workload: every path timed, speed-ups and bandwidths derived from them."""

    def tiny(name, batch, dtype, device):
        gen = torch.Generator().manual_seed(0)
        shapes = [(4, 5)]
        value = torch.randn(batch, 20, 2, 4, generator=gen).to(device, dtype)
        loc = torch.rand(batch, 6, 2, 1, 2, 2, generator=gen)
        attn = torch.rand(batch, 6, 2, 1, 2, generator=gen)
        return shapes, value, loc, attn, torch.randn(batch, 6, 8, generator=gen).to(device, dtype)

    (row,) = selfcheck.time_paths("cpu", shapes=["tiny"], batch=1, dtypes=[torch.float32], reps=1, make=tiny)
    assert row["shape"] == "tiny" and row["dtype"] == "float32"
    for path in selfcheck.PATHS:
        assert row[path]["fwd_ms"] > 0 and row[path]["fwd_bwd_ms"] > 0
    speedup = row["speedup_vs_torch path"]["fwd_ms"]
    assert speedup == pytest.approx(row["torch path"]["fwd_ms"] / row["triton"]["fwd_ms"])
    assert row["triton"]["fwd_gbps"] > 0 and row["triton"]["gather_tbps"] > 0
    assert "fwd_pct_peak" not in row["triton"]  # no peak bandwidth on the CPU
