"""PIIP against single-branch baselines: parameters, FLOPs and measured latency, side by side in one run.

First version (classification family): parameters, multiply-accumulates counted by ``torch.utils.flop_counter`` on
the real input (matmuls/convs; the deformable sampling itself is not counted yet) and median forward latency on the
current device, each PIIP model beside its single-branch timm baseline, with PIIP/baseline ratios.

    python benchmarks/flops.py                       # quick default: every classification model, batch 1, CPU
    python benchmarks/flops.py --models piip_tsb --repeats 10 --json out.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time
from dataclasses import asdict, dataclass

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import piip_models

# Single-branch baselines of the paper's classification table (arXiv:2406.04330, Table 2).
BASELINES = {
    "piip_tsb": ("deit_base_patch16_224", 224),
    "piip_sbl": ("vit_large_patch16_224", 224),
    "piip_sbl_320_160_96": ("vit_large_patch16_224", 224),
    "piip_tsbl": ("deit3_large_patch16_224", 224),
}


@dataclass
class Row:
    model: str
    input_size: int
    params: int
    flops: int
    latency_ms: float
    baseline: str
    flops_ratio: float | None = None
    time_ratio: float | None = None


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def median_latency_ms(model: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name: str, size: int, baseline: str, args: argparse.Namespace) -> Row:
    model = timm.create_model(name, device=args.device).eval()
    x = torch.randn(args.batch_size, 3, size, size, device=args.device)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, x) // args.batch_size
    latency = median_latency_ms(model, x, args.warmup, args.repeats)
    return Row(name, size, params, macs, latency, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["piip_*"], help="fnmatch patterns of PIIP models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows as JSON to this path")
    args = parser.parse_args()
    torch.manual_seed(0)

    names = [n for n in piip_models.list_models() if n in BASELINES and any(fnmatch.fnmatch(n, p) for p in args.models)]
    if not names:
        parser.error(f"no classification model matches {args.models}; known: {sorted(BASELINES)}")
    rows: list[Row] = []
    baseline_rows: dict[str, Row] = {}
    for name in names:
        base_name, base_size = BASELINES[name]
        if base_name not in baseline_rows:
            baseline_rows[base_name] = measure(base_name, base_size, "", args)
            rows.append(baseline_rows[base_name])
        size = timm.get_pretrained_cfg(name).input_size[-1]
        row = measure(name, size, base_name, args)
        base = baseline_rows[base_name]
        row.flops_ratio = row.flops / base.flops
        row.time_ratio = row.latency_ms / base.latency_ms
        rows.append(row)

    print(f"device={args.device} batch={args.batch_size} threads={torch.get_num_threads()} "
          f"(MACs from torch.utils.flop_counter; deformable sampling not counted)\n")
    print("| model | input | params (M) | GMACs | latency (ms) | baseline | FLOPs ratio | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"| {r.model} | {r.input_size} | {r.params / 1e6:.2f} | {r.flops / 1e9:.2f} | {r.latency_ms:.1f} | "
              f"{r.baseline or '-'} | {ratio(r.flops_ratio)} | {ratio(r.time_ratio)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
