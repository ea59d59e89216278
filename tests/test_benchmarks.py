"""Benchmarks end to end on the CPU: ``benchmarks/msda.py`` (every path gets a row, timed side by side, with its
ratios) and ``benchmarks/export.py`` (registered models through torch.export, ONNX and onnxruntime; slow)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(monkeypatch, name: str = "msda") -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_msda_benchmark_rows_and_ratios(tmp_path, monkeypatch, one_thread, capsys):
    out = tmp_path / "msda.json"
    args = ["--shapes", "piip-D", "--batch", "1", "--reps", "2", "--no-compile", "--json", str(out), "--threads", "2"]
    load_benchmark(monkeypatch).main(args)
    result = json.loads(out.read_text())
    # --threads holds for the run only.
    assert result["meta"]["threads"] == 2 and torch.get_num_threads() == 1
    rows = {row["path"]: row for row in result["rows"]}
    assert set(rows) == {"grid_sample reference (eager)", "torch path (eager)", "triton (eager)"}
    assert rows["triton (eager)"]["note"] == "n/a (no CUDA)" and rows["triton (eager)"]["fwd_ms"] is None
    reference, ours = rows["grid_sample reference (eager)"], rows["torch path (eager)"]
    for row in (reference, ours):
        assert row["shape"] == "piip-D" and row["batch"] == 1
        assert 0 < row["fwd_ms"] < row["fwd_bwd_ms"]
        assert abs(row["bwd_ms"] - (row["fwd_bwd_ms"] - row["fwd_ms"])) < 1e-9
        assert row["fwd_bwd_peak_mib"] > 0 and row["fwd_gbps"] > 0
    # The PyTorch path never materialises the sampled values: its peak is a fraction of the reference's.
    assert ours["extra"]["fwd_bwd_peak_ratio"] > 2
    # Speed-ups are medians of the ratios of repetitions run back to back; the times are medians of the repetitions.
    for row in (reference, ours):
        assert len(row["fwd_bwd_reps_ms"]) == 2 and row["fwd_bwd_ms"] == statistics.median(row["fwd_bwd_reps_ms"])
    paired = [r / o for r, o in zip(reference["fwd_bwd_reps_ms"], ours["fwd_bwd_reps_ms"])]
    assert ours["extra"]["fwd_bwd_speedup"] == statistics.median(paired)
    table = capsys.readouterr().out
    assert "vs ref: f+b time / f+b mem" in table and f"{ours['extra']['fwd_bwd_peak_ratio']:.1f}x less" in table


@pytest.mark.slow
def test_export_benchmark_matches_eager_at_full_size(monkeypatch, capsys):
    """piip_tsb and the features_only piip_tsb_1120_896_448 at real sizes: onnxruntime within 1e-4 of eager on
    batches and shapes other than the export example (a few minutes on a 2-core CPU)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    rows = load_benchmark(monkeypatch, "export").main([])
    assert {row.model for row in rows} == {"piip_tsb", "piip_tsb_1120_896_448:features"}
    assert {row.input[0] for row in rows} == {1, 2, 3}  # the example has batch 2, the checks other batches too
    for row in rows:
        assert row.max_abs_diff <= 1e-4, row
        assert row.max_abs_value > 0.1  # the outputs are not trivially zero
    assert "| piip_tsb | " in capsys.readouterr().out
