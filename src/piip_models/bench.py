"""PIIP models beside their single-branch baselines: parameters, FLOPs, latency, throughput and peak memory.

Counting uses :mod:`piip_models.counting` (on the meta device, no compute). Timing and memory run each model in a
fresh worker process (``python -m piip_models.bench --worker SPEC``), so one model's allocations never hide in
another's numbers: the worker builds the model (random weights, eval mode), runs the warm-up forwards, measures the
peak memory of one forward (CUDA: ``max_memory_allocated`` above the allocated memory before it; CPU: peak RSS above
the RSS before it, see :class:`PeakMemory`) and then times the repeated forwards (median). Dense backbones run with
their feature pyramid (``features_only=True``), classifiers as they are.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import fnmatch
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from ._factory import list_models
from .counting import CONVENTIONS, build_model, count_model
from .piip import PIIP
from .published import baseline_of, published_row

__all__ = [
    "BenchRow",
    "PeakMemory",
    "benchmark",
    "markdown_table",
    "measure",
    "measure_in_subprocess",
    "published_table",
    "resolve_models",
    "warmup_side",
    "write_csv",
    "write_json",
    "write_plot",
]


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss // 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory of a code region, above the memory in use when :meth:`start` is called.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the RSS high-water mark, reset through ``/proc/self/clear_refs``
    (Linux >= 4.0) and read as ``VmHWM``, after ``malloc_trim``. Run the process with a fixed glibc mmap threshold
    (``MALLOC_MMAP_THRESHOLD_``, as :func:`measure_in_subprocess` does) so every large tensor is its own mapping,
    returned to the system when freed, and RSS follows the live tensor bytes. Without ``/proc`` it falls back to
    ``ru_maxrss``, which is only right when the region exceeds every earlier peak of the process.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        """Marks the start of the region: resets the peak and records the memory in use now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the RSS high-water mark
            self.base = _proc_status_kib("VmRSS")
        except OSError:
            self.base = _maxrss_kib()

    def peak_mb(self) -> float:
        """Peak memory (MiB) since :meth:`start`, above what was in use then."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _proc_status_kib("VmHWM") or _maxrss_kib()
        return (peak - self.base) / 1024


def warmup_side(model: torch.nn.Module) -> int:
    """Smallest multiple of 32 that gives every branch of a PIIP model at least one patch (64 for other models)."""
    if not isinstance(model, PIIP):
        return 64
    last = model.branch_sizes[-1]
    side = max(math.ceil(max(p) * last / s) for p, s in zip(model.min_input_sizes, model.branch_sizes))
    return 32 * math.ceil(side / 32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_timing(batch_size: int, warmup: int, repeats: int, threads: int = 0) -> None:
    """Raises unless the timing options can run: at least one image, warm-up and timed forward; threads >= 0."""
    if min(batch_size, warmup, repeats) < 1 or threads < 0:
        raise ValueError(
            f"batch_size, warmup and repeats must be >= 1 and threads >= 0, got {batch_size}, {warmup}, {repeats} "
            f"and {threads}"
        )


def measure(
    model_name: str, size: int, batch_size: int = 1, device: str = "cpu", warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median latency (ms per forward), throughput (images/s) and peak memory (MB) of ``model_name`` in this process.

    A tiny forward first initialises everything lazy; the first full-size warm-up forward is the one whose peak
    memory is measured; the ``repeats`` timed forwards follow. Prefer :func:`measure_in_subprocess`: the memory
    reading assumes a fresh process.
    """
    _check_timing(batch_size, warmup, repeats)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(model_name, dev)
    x = torch.randn(batch_size, 3, size, size, device=dev)
    meter = PeakMemory(dev)
    times = []
    with torch.inference_mode():
        side = warmup_side(model.model if hasattr(model, "model") else model)  # features_only wraps the PIIP
        model(torch.randn(1, 3, side, side, device=dev))
        _sync(dev)
        meter.start()
        model(x)
        peak = meter.peak_mb()
        for _ in range(warmup - 1):
            model(x)
        for _ in range(repeats):
            _sync(dev)
            start = time.perf_counter()
            model(x)
            _sync(dev)
            times.append((time.perf_counter() - start) * 1e3)
    latency = statistics.median(times)
    return dict(latency_ms=latency, throughput=batch_size * 1e3 / latency, peak_mem_mb=peak)


def measure_in_subprocess(
    model_name: str,
    size: int,
    batch_size: int = 1,
    device: str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    threads: int = 0,
) -> dict[str, float]:
    """:func:`measure` in a fresh worker process (``threads`` > 0 sets its CPU threads)."""
    spec = dict(model_name=model_name, size=size, batch_size=batch_size, device=device, warmup=warmup,
                repeats=repeats)
    cmd = [sys.executable, "-m", "piip_models.bench", "--worker", json.dumps(spec), "--threads", str(threads)]
    # A fixed threshold (no glibc dynamic adjustment) maps every tensor over 1 MiB on its own, so RSS tracks live data.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), f"exit {proc.returncode}")
        raise RuntimeError(f"benchmark worker for {model_name} at {size} px failed: {last.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Rows


@dataclass
class BenchRow:
    """One model in one run. ``macs`` are multiply-accumulates per image; ratios are PIIP / baseline."""

    model: str
    convention: str
    input_size: int
    params: int
    macs: int
    latency_ms: float | None = None
    throughput: float | None = None
    peak_mem_mb: float | None = None
    baseline: str | None = None
    macs_ratio: float | None = None
    time_ratio: float | None = None
    mem_ratio: float | None = None


def resolve_models(patterns: Sequence[str]) -> list[str]:
    """Registered ``piip_*`` models matching any fnmatch pattern, in registry order, plus exact timm names.

    Raises:
        ValueError: a pattern that matches nothing.
    """
    known = list_models()
    names: list[str] = []
    for pattern in patterns:
        matches = [n for n in known if fnmatch.fnmatch(n, pattern)]
        if not matches and pattern in timm.list_models():
            matches = [pattern]
        if not matches:
            raise ValueError(f"no model matches {pattern!r}; `piip-models list` shows the registered ones")
        names += [n for n in matches if n not in names]
    return names


def _scaled_size(model_name: str, scale: float) -> int:
    native = timm.get_pretrained_cfg(model_name).input_size[-1]  # the last branch's size for PIIP models
    return max(16, round(native * scale / 16) * 16)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def benchmark(
    models: Sequence[str],
    convention: str = "paper",
    scale: float = 1.0,
    batch_size: int = 1,
    device: str = "cpu",
    latency: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    threads: int = 1,
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[BenchRow]:
    """Counts (and times) every model and its baseline, baselines first, with PIIP/baseline ratios.

    Args:
        models: Model names (see :func:`resolve_models`); each PIIP model brings its baseline (:func:`baseline_of`)
            when that is registered.
        convention: FLOP convention, ``'paper'`` or ``'full'``.
        scale: Input side as a fraction of each model's native size (last branch size), rounded to 16 px; a PIIP
            model and its baseline are scaled alike.
        batch_size: Images per timed forward.
        device: ``'cpu'`` or ``'cuda'``.
        latency: Measure latency, throughput and memory (else count only).
        warmup: Untimed forwards before the measurements.
        repeats: Timed forwards (the median is reported).
        threads: CPU threads of the workers (0: torch's default).
        progress: Wraps the work list (e.g. ``tqdm``).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not 0 < scale < math.inf:
        raise ValueError(f"scale must be a positive number, got {scale}")
    if latency:
        _check_timing(batch_size, warmup, repeats, threads)
    elif batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and latency and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    registered = set(timm.list_models())
    order: list[str] = []
    for name in models:
        base = baseline_of(name)
        for item in ([base] if base in registered else []) + [name]:
            if item not in order:
                order.append(item)

    rows: dict[str, BenchRow] = {}
    for name in progress(order):
        size = _scaled_size(name, scale)
        count = count_model(name, convention, size)
        row = BenchRow(name, convention, size, count.params, count.macs)
        if latency:
            result = measure_in_subprocess(name, size, batch_size, device, warmup, repeats, threads)
            row.latency_ms, row.throughput, row.peak_mem_mb = (
                result["latency_ms"], result["throughput"], result["peak_mem_mb"]
            )
        rows[name] = row
    for row in rows.values():
        base = rows.get(baseline_of(row.model) or "")
        if base is not None:
            row.baseline = base.model
            row.macs_ratio = _ratio(row.macs, base.macs)
            row.time_ratio = _ratio(row.latency_ms, base.latency_ms)
            row.mem_ratio = _ratio(row.peak_mem_mb, base.peak_mem_mb)
    return list(rows.values())


# ----------------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[BenchRow]) -> str:
    """The rows as a markdown table (M params, G multiply-accumulates)."""
    lines = [
        "| model | convention | input | params (M) | GMACs | latency (ms) | img/s | peak MB | baseline "
        "| FLOPs ratio | time ratio | mem ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.convention} | {r.input_size} | {r.params / 1e6:.2f} | {r.macs / 1e9:.2f} "
            f"| {_fmt(r.latency_ms, '.0f')} | {_fmt(r.throughput, '.2f')} | {_fmt(r.peak_mem_mb, '.0f')} "
            f"| {r.baseline or '-'} | {_fmt(r.macs_ratio, '.2f')} | {_fmt(r.time_ratio, '.2f')} "
            f"| {_fmt(r.mem_ratio, '.2f')} |"
        )
    return "\n".join(lines)


def published_table(rows: Sequence[BenchRow], progress: Callable[[Iterable], Iterable] = iter) -> str:
    """Paper-convention counts at the native size beside the published #Param/#FLOPs, for the rows' models that
    have published numbers (rows already counted that way are reused)."""
    lines = [
        "| model | input | params (M) | published | GMACs | published | source |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in progress([r for r in rows if published_row(r.model) is not None]):
        native = _scaled_size(row.model, 1.0)
        if row.convention != "paper" or row.input_size != native:
            count = count_model(row.model, "paper")
            row = BenchRow(row.model, "paper", native, count.params, count.macs)
        ref = published_row(row.model)
        params = "-" if ref.params is None else f"{ref.params / 1e6:.0f}"
        note = " (documented exception)" if ref.exception else ""
        lines.append(
            f"| {row.model} | {native} | {row.params / 1e6:.2f} | {params} | {row.macs / 1e9:.2f} "
            f"| {ref.macs / 1e9:.1f}{note} | {ref.source} |"
        )
    return "\n".join(lines)


def _row_dicts(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in rows]


def write_json(rows: Sequence[BenchRow], path: str | Path) -> None:
    """Writes the rows as a JSON list of objects (the :class:`BenchRow` fields)."""
    Path(path).write_text(json.dumps(_row_dicts(rows), indent=2) + "\n")


def write_csv(rows: Sequence[BenchRow], path: str | Path) -> None:
    """Writes the rows as CSV with a header of the :class:`BenchRow` fields."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(BenchRow)])
        writer.writeheader()
        writer.writerows(_row_dicts(rows))


def check_plotting() -> None:
    """Raises a clear error when matplotlib (needed for ``--plot``) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib, or the 'test' extra)"
        ) from exc


def write_plot(rows: Sequence[BenchRow], path: str | Path) -> None:
    """PNG: latency against GMACs (GMACs against params without latency), each PIIP model joined to its baseline."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all(r.latency_ms is not None for r in rows)
    x_of = (lambda r: r.macs / 1e9) if timed else (lambda r: r.params / 1e6)
    y_of = (lambda r: r.latency_ms) if timed else (lambda r: r.macs / 1e9)
    by_name = {r.model: r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        is_baseline = baseline_of(r.model) is None
        ax.scatter(x_of(r), y_of(r), marker="s" if is_baseline else "o", color="gray" if is_baseline else "C0")
        ax.annotate(r.model, (x_of(r), y_of(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = by_name.get(r.baseline or "")
        if base is not None:
            ax.plot([x_of(base), x_of(r)], [y_of(base), y_of(r)], color="C0", alpha=0.3, linewidth=1)
    conv = rows[0].convention if rows else ""
    ax.set_xlabel(f"GMACs ({conv})" if timed else "params (M)")
    ax.set_ylabel("latency (ms)" if timed else f"GMACs ({conv})")
    ax.set_title("PIIP (circles) vs single-branch baselines (squares)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _worker() -> None:
    parser = argparse.ArgumentParser(prog="python -m piip_models.bench")
    parser.add_argument("--worker", required=True, help="JSON keyword arguments of measure()")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(**json.loads(args.worker))
    except Exception as exc:  # one line for the parent's error message, not a traceback
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker()
