"""Gradient checkpointing of the dense PIIP backbones: peak memory and time of one forward+backward, without and with.

    python benchmarks/memory.py                               # TSB 1120/896/448 and SBL 1568/1120/672, 2x3x448x672
    python benchmarks/memory.py --models piip_sbl_1568_1120_672 --input 1 3 896 1344 --device cuda --json out.json

Each (model, checkpointing) measurement runs in a fresh worker process, which builds the model from a fixed seed,
runs a warm-up forward+backward on a tiny input (lazy initialisation, thread pools and the parameters' ``.grad``
buffers, which are the same with and without checkpointing, are then out of the measurement), and measures one
train-mode forward+backward of the ``features_only`` model (the summed squares of every pyramid level as loss) on
the requested input:

* CUDA: ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` after the warm-up.
* CPU: peak RSS above the RSS after the warm-up. A process's high-water mark never goes down, so it is reset after
  the warm-up through ``/proc/self/clear_refs`` (Linux) and read as ``VmHWM``. The worker runs with a fixed glibc
  mmap threshold (1 MiB) and calls ``malloc_trim`` before the baseline, so every large tensor is its own mapping,
  returned to the system when freed: RSS then follows the live tensor bytes instead of the allocator's free lists.
  Without ``/proc`` (e.g. macOS) it falls back to ``ru_maxrss``, which is only right when the measured run
  exceeds the construction peak. ``torch.profiler``'s memory profile was the alternative; it slows the run, needs
  private APIs to turn its events into a peak, and misses memory outside the tensor allocator.

The first worker saves its gradients (safetensors, in a temporary folder); the checkpointed worker compares its own
with them after its measurement, so the table also shows the largest absolute gradient difference. Both runs draw
the same drop-path masks: the seed is reset before the measured step, and checkpointing restores the RNG state when
it recomputes. Times are single runs (the first at that input size) and noisy on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from piip_models.bench import PeakMemory, warmup_side  # importing piip_models registers its models with timm

DEFAULT_MODELS = ["piip_tsb_1120_896_448", "piip_sbl_1568_1120_672"]


@dataclass
class Measurement:
    peak_mb: float
    time_s: float
    loss: float
    max_grad_diff: float | None = None


@dataclass
class Row:
    model: str
    input: list[int]
    peak_mb: float
    peak_mb_ckpt: float
    ratio: float
    time_s: float
    time_s_ckpt: float
    max_grad_diff: float


def train_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    features = model(x)
    loss = sum(f.float().square().mean() for f in features)
    loss.backward()
    return loss.detach()


def run_worker(args: argparse.Namespace) -> Measurement:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, features_only=True, device=device).train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    side = warmup_side(model.model)
    train_step(model, torch.randn(1, args.input[1], side, side, device=device))
    model.zero_grad(set_to_none=False)  # keep the .grad buffers: the measured step accumulates into them

    torch.manual_seed(args.seed)
    x = torch.randn(*args.input, device=device)
    meter = PeakMemory(device)
    meter.start()
    start = time.perf_counter()
    loss = train_step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    result = Measurement(meter.peak_mb(), elapsed, loss.item())

    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    if args.save_grads:
        save_file({name: g.contiguous() for name, g in grads.items()}, args.save_grads)
    if args.compare_grads:
        with safe_open(args.compare_grads, framework="pt", device=str(device)) as ref:
            if set(ref.keys()) != set(grads):
                raise RuntimeError("the two runs produced gradients for different parameters")
            result.max_grad_diff = max((grads[name] - ref.get_tensor(name)).abs().max().item() for name in grads)
    return result


def measure(model: str, grad_checkpointing: bool, args: argparse.Namespace, grads: Path) -> Measurement:
    """Runs one measurement in a fresh worker process and returns its result."""
    cmd = [
        sys.executable, __file__, "--worker", "--models", model, "--input", *map(str, args.input),
        "--device", args.device, "--seed", str(args.seed),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if grad_checkpointing:
        cmd += ["--grad-checkpointing", "--compare-grads", str(grads)]
    else:
        cmd += ["--save-grads", str(grads)]
    # A fixed threshold (no glibc dynamic adjustment) maps every tensor over 1 MiB on its own, so RSS tracks live data.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker for {model} (grad checkpointing {grad_checkpointing}) failed:\n{proc.stderr}")
    return Measurement(**json.loads(proc.stdout.strip().splitlines()[-1]))


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| model | input | peak MB w/o | peak MB with | ratio | time w/o (s) | time with (s) | max abs grad diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {'x'.join(map(str, r.input))} | {r.peak_mb:.0f} | {r.peak_mb_ckpt:.0f} | {r.ratio:.2f} "
            f"| {r.time_s:.2f} | {r.time_s_ckpt:.2f} | {r.max_grad_diff:.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="dense PIIP models")
    parser.add_argument("--input", nargs=4, type=int, default=[2, 3, 448, 672], metavar=("B", "C", "H", "W"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per worker (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save-grads", help=argparse.SUPPRESS)
    parser.add_argument("--compare-grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        args.model = args.models[0]
        print(json.dumps(asdict(run_worker(args))))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        grads = Path(tmp) / "grads.safetensors"
        for model in args.models:
            print(f"{model}: without checkpointing ...", file=sys.stderr, flush=True)
            plain = measure(model, False, args, grads)
            print(f"{model}: with checkpointing ...", file=sys.stderr, flush=True)
            ckpt = measure(model, True, args, grads)
            rows.append(Row(
                model, args.input, plain.peak_mb, ckpt.peak_mb, ckpt.peak_mb / plain.peak_mb,
                plain.time_s, ckpt.time_s, ckpt.max_grad_diff,
            ))

    table = markdown_table(rows)
    print(f"device: {args.device}, threads: {args.threads or torch.get_num_threads()}, torch {torch.__version__}\n")
    print(table)
    if args.json:
        meta = dict(device=args.device, threads=args.threads or torch.get_num_threads(), torch=torch.__version__)
        args.json.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=2))


if __name__ == "__main__":
    main()
