"""GPU self-check of the MSDA kernels, in one command: ``python -m piip_models.kernels.selfcheck``.

1. The compile table: every shipped Triton kernel configuration compiled for sm_80 and sm_90 (:mod:`.compile_gate`,
   no GPU needed): registers, spills, shared memory, occupancy.
2. Without CUDA it prints ``no CUDA`` and stops there (exit status 0 unless a kernel spills).
3. On CUDA: the kernels against the float64 reference on the GPU for every value dtype (forward and every gradient,
   plus bitwise-repeatable deterministic backward and autotuning-independent forward), then forward and
   forward+backward times at the PIIP and Deformable-DETR encoder shapes for the Triton kernels, the PyTorch path and
   the ``grid_sample`` reference, with the speed-ups measured in the same run and the achieved bandwidth against the
   card's peak.

Writes one JSON (``--json``, default ``msda_selfcheck.json``). ``benchmarks/gpu_check.py`` adds a model-level step
(PIIP-TSB against ViT-B) to the same report. Exit status 1 when a kernel spills or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import compile_gate, multi_scale_deformable_attention
from .msda_reference import reference
from .workloads import SHAPES, compulsory_bytes, gather_bytes, hbm_bytes_per_second, make_inputs

__all__ = ["NUMERIC_CASES", "check_numerics", "main", "parse_args", "run", "time_paths"]

# (value maps, heads, head dim, points, queries): PIIP interactions (one map, 16 heads, 4 points) at every head-dim
# class, and a Deformable-DETR-like encoder (4 maps, 8 heads of 32, 4 points).
NUMERIC_CASES = (
    ([(20, 30)], 16, 6, 4, 300),
    ([(20, 30)], 16, 12, 4, 300),
    ([(30, 20)], 16, 24, 4, 300),
    ([(20, 30)], 16, 32, 4, 300),
    ([(12, 10)], 16, 100, 4, 120),
    ([(16, 20), (8, 10), (4, 5), (2, 3)], 8, 32, 4, 425),
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tolerance(dtype: torch.dtype) -> float:
    """Error bound relative to the largest reference value: two roundings of the result in half precision, float32
    accumulation otherwise."""
    return {torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]


def _case_inputs(case, dtype: torch.dtype, device, seed: int = 0):
    shapes, heads, head_dim, points, queries = case
    gen = torch.Generator().manual_seed(seed)
    positions = sum(h * w for h, w in shapes)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(2, positions, heads, head_dim, generator=gen).to(device, dtype)
    loc = (torch.rand(2, queries, heads, len(shapes), points, 2, generator=gen) * 1.4 - 0.2).to(device, coord)
    attn = torch.rand(2, queries, heads, len(shapes), points, generator=gen).to(device, dtype)
    grad = torch.randn(2, queries, heads * head_dim, generator=gen).to(device, dtype)
    return shapes, value, loc, attn, grad


def _forward_backward(fn, shapes, value, loc, attn, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, grad))


def _triton(v, s, lo, a):
    return multi_scale_deformable_attention(v, s, None, lo, a, backend="triton")


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected).abs().max().item() / scale


def check_numerics(device: str | torch.device = "cuda", cases: Sequence = NUMERIC_CASES,
                   dtypes: Sequence[torch.dtype] = DTYPES) -> list[dict]:
    """The Triton kernels against the float64 ``grid_sample`` reference: one row per case and dtype with the largest
    error of the output and of each gradient relative to the largest reference value, whether they are within the
    dtype's tolerance, whether the deterministic backward repeats bitwise, and whether the forward equals the one of
    the launch heuristic's config (no autotuning) bitwise."""
    from . import msda_triton

    rows = []
    for case in cases:
        for dtype in dtypes:
            shapes, value, loc, attn, grad = _case_inputs(case, dtype, device)
            expected = _forward_backward(reference, shapes, value.double(), loc.double(), attn.double(),
                                         grad.double())
            actual = _forward_backward(_triton, shapes, value, loc, attn, grad)
            errors = dict(zip(("output", "grad_value", "grad_loc", "grad_attn"),
                              (_max_error(a, e) for a, e in zip(actual, expected))))
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                runs = [_forward_backward(_triton, shapes, value, loc, attn, grad) for _ in range(2)]
            finally:
                torch.use_deterministic_algorithms(previous)
            repeatable = all(torch.equal(a, b) for a, b in zip(*runs))
            autotune = os.environ.get(msda_triton.ENV_AUTOTUNE)
            os.environ[msda_triton.ENV_AUTOTUNE] = "0"
            try:
                heuristic = _triton(value, shapes, loc, attn)
            finally:
                if autotune is None:
                    os.environ.pop(msda_triton.ENV_AUTOTUNE)
                else:
                    os.environ[msda_triton.ENV_AUTOTUNE] = autotune
            rows.append({
                "maps": shapes, "heads": case[1], "head_dim": case[2], "points": case[3],
                "dtype": str(dtype).removeprefix("torch."), "errors": errors, "tolerance": _tolerance(dtype),
                "within_tolerance": max(errors.values()) <= _tolerance(dtype),
                "deterministic_repeatable": repeatable, "config_independent": torch.equal(heuristic, actual[0]),
            })
    return rows


def _median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(25, reps), return_mode="median"))
    times = []
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


PATHS = {
    "triton": _triton,
    "torch path": lambda v, s, lo, a: multi_scale_deformable_attention(v, s, None, lo, a, backend="torch"),
    # grid_sample needs one dtype for the map and the grid: the reference samples in the value dtype.
    "grid_sample reference": lambda v, s, lo, a: reference(v, s, lo.to(v.dtype), a.to(v.dtype)),
}


def _time_path(fn, inputs, device: torch.device, reps: int) -> dict:
    """Forward (no grad) and forward+backward medians of ``fn`` on ``inputs`` (ms)."""
    spatial, value, loc, attn, grad = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]

    def forward():
        with torch.no_grad():
            return fn(value, spatial, loc, attn)

    def forward_backward():
        return torch.autograd.grad(fn(leaves[0], spatial, leaves[1], leaves[2]), leaves, grad)

    return {"fwd_ms": _median_ms(forward, device, reps), "fwd_bwd_ms": _median_ms(forward_backward, device, reps)}


def time_paths(device: str | torch.device = "cuda", shapes: Sequence[str] = tuple(SHAPES), batch: int = 2,
               dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16), reps: int = 100,
               make=make_inputs) -> list[dict]:
    """Forward and forward+backward medians (ms) of every path in :data:`PATHS` at the workloads ``shapes``, with
    the speed-ups of the Triton kernels over the others, the compulsory bytes' bandwidth (and its share of the
    card's peak on CUDA) and the forward's logical corner-gather rate."""
    device = torch.device(device)
    peak = hbm_bytes_per_second(device) if device.type == "cuda" else None
    rows = []
    for name in shapes:
        for dtype in dtypes:
            inputs = make(name, batch, dtype, device)
            _, value, loc, attn, grad = inputs
            fwd_bytes, total_bytes = compulsory_bytes(value, loc, attn, grad)
            row = {"shape": name, "batch": batch, "dtype": str(dtype).removeprefix("torch.")}
            row.update({path: _time_path(fn, inputs, device, reps) for path, fn in PATHS.items()})
            fast = row["triton"]
            fast["fwd_gbps"] = fwd_bytes / fast["fwd_ms"] / 1e6
            fast["fwd_bwd_gbps"] = total_bytes / fast["fwd_bwd_ms"] / 1e6
            fast["gather_tbps"] = gather_bytes(value, loc) / fast["fwd_ms"] / 1e9
            if peak is not None:
                fast["fwd_pct_peak"] = 100 * fast["fwd_gbps"] * 1e9 / peak
                fast["fwd_bwd_pct_peak"] = 100 * fast["fwd_bwd_gbps"] * 1e9 / peak
            for path in PATHS:
                if path != "triton":
                    row[f"speedup_vs_{path}"] = {mode: row[path][mode] / fast[mode]
                                                 for mode in ("fwd_ms", "fwd_bwd_ms")}
            rows.append(row)
    return rows


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None):
    parser = parser or argparse.ArgumentParser(prog="python -m piip_models.kernels.selfcheck",
                                               description=__doc__.splitlines()[0])
    compile_gate.add_arguments(parser)
    parser.add_argument("--json", type=Path, default=Path("msda_selfcheck.json"), help="report file")
    parser.add_argument("--reps", type=int, default=100, help="timing repetitions (ms of do_bench) on CUDA")
    parser.add_argument("--batch", type=int, default=2, help="batch of the timed workloads")
    return parser.parse_args(argv)


def _environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal: the PyTorch path works without Triton
        info["triton"] = f"not importable ({type(exc).__name__}: {exc})"
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                    peak_memory_tbps=hbm_bytes_per_second(0) / 1e12)
    return info


def run(args) -> tuple[dict, bool]:
    """Every step for the parsed ``args``: the report and whether everything passed. Prints as it goes."""
    report: dict = {"environment": _environment()}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()), flush=True)
    ok = True
    reason = compile_gate.unavailable()
    if reason is None:
        usages, seconds = compile_gate.run_table(args)
        report["compile_table"] = {"seconds": seconds, "kernels": compile_gate.as_json(usages)}
        ok = not any(u.spills or u.stack_bytes for u in usages)
    else:
        print(f"compile table skipped: {reason}")
        report["compile_table"] = {"skipped": reason}
    if not torch.cuda.is_available():
        print("no CUDA: the GPU checks did not run")
        report["gpu"] = "no CUDA"
        return report, ok
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the GPU checks run the compiled kernels")
    numerics = check_numerics("cuda")
    report["numerics"] = numerics
    print("\nnumerics against float64 (max error / largest reference value):")
    for row in numerics:
        worst = max(row["errors"].values())
        flags = [] if row["deterministic_repeatable"] else ["deterministic backward NOT repeatable"]
        flags += [] if row["config_independent"] else ["forward depends on the launch config"]
        status = "ok" if row["within_tolerance"] and not flags else "FAIL"
        print(f"  {status:4} {row['dtype']:8} D{row['head_dim']:<3} M{row['heads']:<2} {len(row['maps'])}x"
              f"{row['points']}: {worst:.2e} (tolerance {row['tolerance']:.0e}) {' '.join(flags)}")
        ok &= status == "ok"
    timings = time_paths("cuda", batch=args.batch, reps=args.reps)
    report["timings"] = timings
    print(f"\ntimes (ms, median) on {report['environment']['device']}, batch {args.batch}:")
    for row in timings:
        fast = row["triton"]
        print(f"  {row['shape']:9} {row['dtype']:8} triton fwd {fast['fwd_ms']:.3f} f+b {fast['fwd_bwd_ms']:.3f}  "
              f"x{row['speedup_vs_torch path']['fwd_bwd_ms']:.1f} vs torch path, "
              f"x{row['speedup_vs_grid_sample reference']['fwd_bwd_ms']:.1f} vs grid_sample (f+b); "
              f"{fast['fwd_gbps']:.0f} GB/s fwd ({fast['fwd_pct_peak']:.0f}% of peak), "
              f"gathers {fast['gather_tbps']:.2f} TB/s")
    return report, ok


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report, ok = run(args)
    write_report(report, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
