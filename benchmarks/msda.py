"""Benchmark multi-scale deformable attention: Triton kernels vs the PyTorch paths, side by side.

Rows per shape: the ``grid_sample`` reference (the Deformable-DETR / PIIP PyTorch formulation, eager and
``torch.compile``), this package's PyTorch path (eager and ``torch.compile``) and the Triton kernels (CUDA only; rows
read "n/a (no CUDA)" elsewhere). Columns: forward / backward / forward+backward medians (backward = difference),
peak memory of forward and of forward+backward (bytes allocated above the inputs), effective bandwidth of the
compulsory bytes and, on a GPU, the % of its peak memory bandwidth (from its memory clock and bus width). Shapes:
the four PIIP interaction shapes and the Deformable-DETR encoder (survey section 6). On the CPU the paths of a shape
are timed round-robin, repetition by repetition, and speed-ups are medians of per-repetition ratios, so they stay
fair on a machine whose speed drifts.

    python benchmarks/msda.py --quick          # CPU: batch 2, a few minutes on 2 cores
    python benchmarks/msda.py --batch 2 8      # GPU default
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from piip_models.kernels import multi_scale_deformable_attention
from piip_models.kernels.msda_reference import reference
from piip_models.kernels.workloads import SHAPES, compulsory_bytes, hbm_bytes_per_second, make_inputs


@dataclass
class Row:
    shape: str
    batch: int
    path: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_peak_mib: float | None = None
    fwd_bwd_peak_mib: float | None = None
    fwd_gbps: float | None = None
    fwd_bwd_gbps: float | None = None
    fwd_pct_hbm: float | None = None
    fwd_bwd_pct_hbm: float | None = None
    note: str = ""
    fwd_reps_ms: list[float] = field(default_factory=list)
    fwd_bwd_reps_ms: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _times_ms(fns: list[Callable[[], object]], reps: int, warmup: int, device: str) -> list[list[float]]:
    """Times of each function (ms), one per repetition. On CUDA, the median of ``triton.testing.do_bench`` per
    function when Triton imports. On the CPU the repetitions run round-robin over the functions, so that a shared
    machine's changing speed slows every path alike and the ratios stay fair."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return [[float(do_bench(fn, warmup=25, rep=max(100, reps), return_mode="median"))] for fn in fns]
        except ImportError:
            pass
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, fn_times in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            fn_times.append((time.perf_counter() - start) * 1e3)
    return times


def _paired_ratio(base: list[float], times: list[float]) -> float:
    """Median over repetitions of ``base / times``: repetition ``i`` of two paths ran back to back, so a speed drift
    of the machine cancels out of each ratio, not out of a ratio of medians."""
    return statistics.median(b / t for b, t in zip(base, times))


def _peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before (MiB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def _hbm_tbps(device: str) -> float | None:
    return hbm_bytes_per_second() / 1e12 if device == "cuda" else None


def _closures(fn: Callable, inputs) -> tuple[Callable[[], object], Callable[[], object]]:
    """Forward (no grad) and forward+backward of ``fn`` on fresh leaves of ``inputs``."""
    shapes, value, loc, attn, grad = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]

    def forward():
        with torch.no_grad():
            return fn(leaves[0], shapes, leaves[1], leaves[2])

    def forward_backward():
        return torch.autograd.grad(fn(leaves[0], shapes, leaves[1], leaves[2]), leaves, grad)

    return forward, forward_backward


def bench_paths(name: str, paths: list[tuple[str, Callable | None, str]], inputs, reps: int, warmup: int,
                device: str, hbm: float | None) -> list[Row]:
    """One row per path (``fn`` None: a row with only its note); the paths are timed side by side, and every timed
    path after the first gets its speed-ups and peak-memory ratios against the first (``extra``)."""
    value = inputs[1]
    rows = [Row(shape=name, batch=value.shape[0], path=path, note=note) for path, _, note in paths]
    timed = [(row, _closures(fn, inputs)) for row, (_, fn, _) in zip(rows, paths) if fn is not None]
    fwd_reps = _times_ms([forward for _, (forward, _) in timed], reps, warmup, device)
    fwd_bwd_reps = _times_ms([forward_backward for _, (_, forward_backward) in timed], reps, warmup, device)
    fwd_bytes, total_bytes = compulsory_bytes(*inputs[1:])
    for (row, (forward, forward_backward)), fwd_times, fwd_bwd_times in zip(timed, fwd_reps, fwd_bwd_reps):
        row.fwd_reps_ms, row.fwd_bwd_reps_ms = fwd_times, fwd_bwd_times
        fwd, fwd_bwd = statistics.median(fwd_times), statistics.median(fwd_bwd_times)
        row.fwd_ms, row.fwd_bwd_ms = fwd, fwd_bwd
        # Compiled graphs donate buffers (no retain_graph), so the backward is timed as the difference.
        row.bwd_ms = fwd_bwd - fwd
        row.fwd_peak_mib = _peak_mib(forward, device)
        row.fwd_bwd_peak_mib = _peak_mib(forward_backward, device)
        row.fwd_gbps = fwd_bytes / fwd / 1e6
        row.fwd_bwd_gbps = total_bytes / fwd_bwd / 1e6
        if hbm is not None:
            row.fwd_pct_hbm = 100 * row.fwd_gbps / (hbm * 1e3)
            row.fwd_bwd_pct_hbm = 100 * row.fwd_bwd_gbps / (hbm * 1e3)
    base = timed[0][0] if timed else None
    for row, _ in timed[1:]:
        row.extra = {
            "fwd_speedup": _paired_ratio(base.fwd_reps_ms, row.fwd_reps_ms),
            "fwd_bwd_speedup": _paired_ratio(base.fwd_bwd_reps_ms, row.fwd_bwd_reps_ms),
            "fwd_peak_ratio": base.fwd_peak_mib / max(row.fwd_peak_mib, 1e-9),
            "fwd_bwd_peak_ratio": base.fwd_bwd_peak_mib / max(row.fwd_bwd_peak_mib, 1e-9),
        }
    return rows


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 2 (encoder 1 on CPU), 5 repetitions, no compiled reference: minutes on 2 CPU cores")
    parser.add_argument("--batch", type=int, nargs="+", help="PIIP batch sizes (default 2 8 on CUDA, 2 on CPU)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 100 on CUDA, 9 on CPU, 5 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--json", type=Path, help="output file (default benchmarks/out/msda_<device>.json)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default 0: torch's default). While other processes hold a core, every "
                             "parallel op waits at its OpenMP barrier, the PyTorch path's many small ops far more "
                             "often than the reference's few large ones; 1 thread keeps that out of the ratios")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> None:
    """Benchmark what the parsed ``args`` of :func:`main` ask for: print the table, write the JSON."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = args.batch or ([2] if device == "cpu" or args.quick else [2, 8])
    reps = args.reps or (100 if device == "cuda" else 5 if args.quick else 9)
    dtype = getattr(torch, args.dtype)
    hbm = _hbm_tbps(device)

    def ours(backend: str):
        return lambda v, s, lo, a: multi_scale_deformable_attention(v, s, None, lo, a, backend=backend)

    # Factories: every shape gets fresh compiled functions (no recompile limits, no dynamic-shape graphs).
    paths: list[tuple[str, Callable[[], Callable] | None, str]] = [
        ("grid_sample reference (eager)", lambda: reference, ""),
        ("torch path (eager)", lambda: ours("torch"), ""),
    ]
    if not args.no_compile:
        if not args.quick:  # Inductor compiles C++ for the reference: minutes on a small CPU.
            paths.insert(1, ("grid_sample reference (compile)", lambda: torch.compile(reference, dynamic=False), ""))
        paths.append(("torch path (compile)", lambda: torch.compile(ours("torch"), fullgraph=True, dynamic=False), ""))
    try:
        import triton  # noqa: F401

        triton_ok = device == "cuda"
    except ImportError:
        triton_ok = False
    triton_row = (lambda: ours("triton")) if triton_ok else None
    paths.append(("triton (eager)", triton_row, "" if triton_ok else "n/a (no CUDA)"))

    rows: list[Row] = []
    for name in args.shapes:
        # The encoder shape is ~10x the PIIP ones: batch 2, or 1 with --quick on CPU.
        for batch in ([1 if args.quick and device == "cpu" else 2] if name == "detr-enc" else batches):
            inputs = make_inputs(name, batch, dtype, device)
            torch.compiler.reset()  # compiled rows of earlier shapes count towards the recompile limit
            built = [(path, None if factory is None else factory(), note) for path, factory, note in paths]
            for row in bench_paths(name, built, inputs, reps, 1, device, hbm):
                rows.append(row)
                print(f"  {name} b{batch} {row.path}: fwd+bwd {_fmt(row.fwd_bwd_ms)} ms", flush=True)
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.processor() or 'x86'}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nMSDA benchmark on {device_name} ({torch.get_num_threads()} threads"
          f"{'' if load is None else f', load average {load:.1f} on {os.cpu_count()} CPUs'}), value {args.dtype}, "
          f"locations/weights float32, median of {reps}; peak = MiB allocated above the inputs")
    header = (f"{'shape':9} {'b':>2} {'path':32} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'fwd MiB':>8} "
              f"{'f+b MiB':>8} {'f+b GB/s':>8} {'%HBM':>5}  {'vs ref: f+b time / f+b mem':>26}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = ""
        if r.extra:
            ratio = f"{r.extra['fwd_bwd_speedup']:.2f}x / {r.extra['fwd_bwd_peak_ratio']:.1f}x less"
        print(f"{r.shape:9} {r.batch:>2} {r.path:32} {_fmt(r.fwd_ms):>8} {_fmt(r.bwd_ms):>8} {_fmt(r.fwd_bwd_ms):>8} "
              f"{_fmt(r.fwd_peak_mib):>8} {_fmt(r.fwd_bwd_peak_mib):>8} {_fmt(r.fwd_bwd_gbps):>8} "
              f"{_fmt(r.fwd_bwd_pct_hbm, '.0f') if hbm else 'n/a':>5}  {ratio or r.note:>26}")

    out = args.json or Path(__file__).resolve().parent / "out" / f"msda_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name, "threads": torch.get_num_threads(), "load_average": load,
            "torch": torch.__version__, "dtype": args.dtype, "reps": reps, "hbm_tbps": hbm}
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1, default=_json_default))
    print(f"\nwrote {out}")


def _json_default(x):
    return None if isinstance(x, float) and math.isnan(x) else str(x)


if __name__ == "__main__":
    main()
