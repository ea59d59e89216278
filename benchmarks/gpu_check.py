"""GPU self-check for maintainers: the kernel self-check plus one model-level step, in one report.

Runs ``python -m piip_models.kernels.selfcheck`` (compile table; on CUDA the kernel numerics against float64 for every
dtype and the op timings against the PyTorch path and the ``grid_sample`` reference), then, on CUDA, a bf16 (autocast)
forward+backward of PIIP-TSB 1120/896/448 beside ViT-B at 1024 px, both timed in the same run. Writes one JSON. Sized
to finish in a few minutes on one H100. Without CUDA it prints the compile table and "no CUDA" and exits 0.

    python benchmarks/gpu_check.py --json benchmarks/out/gpu_check.json
"""

from __future__ import annotations

import sys

import timm
import torch
from piip_models.kernels import selfcheck

import piip_models  # noqa: F401  (registers the piip_* models with timm)

# (timm name, input side): the PIIP model and the single-branch baseline of about the same compute.
MODEL_PAIR = (("piip_tsb_1120_896_448", 1120), ("vit_base_patch16_224", 1024))


def model_step_ms(name: str, side: int, batch: int, reps: int) -> dict:
    """Median ms of a bf16-autocast forward + backward of ``name`` at ``side`` px, and its peak memory (GiB)."""
    from triton.testing import do_bench

    kwargs = {"img_size": side} if name.startswith("vit_") else {}
    model = timm.create_model(name, num_classes=0, **kwargs).cuda().train()
    x = torch.randn(batch, 3, side, side, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_features(x)
        out.float().square().mean().backward()

    step()  # autotuning and allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = float(do_bench(step, warmup=5, rep=max(reps, 50), return_mode="median"))
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"model": name, "input": side, "batch": batch, "fwd_bwd_ms": ms, "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    args = selfcheck.parse_args(argv)
    report, ok = selfcheck.run(args)
    if torch.cuda.is_available():
        rows = []
        for name, side in MODEL_PAIR:
            rows.append(model_step_ms(name, side, args.batch, args.reps))
            torch.cuda.empty_cache()
        rows[0]["time_vs_baseline"] = rows[0]["fwd_bwd_ms"] / rows[1]["fwd_bwd_ms"]
        report["models"] = rows
        print("\nbf16 forward+backward:")
        for row in rows:
            print(f"  {row['model']} @ {row['input']} px, batch {row['batch']}: {row['fwd_bwd_ms']:.1f} ms, "
                  f"peak {row['peak_gib']:.1f} GiB")
        print(f"  PIIP-TSB / ViT-B time: {rows[0]['time_vs_baseline']:.2f}")
    selfcheck.write_report(report, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
