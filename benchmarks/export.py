"""Export registered PIIP models with a dynamic batch and image size: ``torch.export``, then ONNX (the dynamo exporter),
then onnxruntime, compared with eager PyTorch on inputs of other batch sizes and shapes than the export example.

    python benchmarks/export.py                                 # piip_tsb and piip_tsb_1120_896_448 (features_only)
    python benchmarks/export.py --models piip_sbl_1568_1120_672:features --shapes 1x640x960 2x512x512 --json out.json

A model name ending in ``:features`` is built with ``features_only=True`` (every pyramid level is an ONNX output).
Weights are random (seeded) with the interaction gates opened, so the cross-branch attention contributes to every
output: a checkpoint would give the same timings. The graph takes any batch from 1 to ``--max-batch`` and any side
that is a multiple of 16 between ``--min-side`` and ``--max-side``. The table gives the time of each export step, and
per input the eager and onnxruntime times (one run each after one warm-up) and the largest absolute difference of
every output against eager, with the largest absolute eager value beside it for scale. CPU only: MSDA exports through
its gather formulation, chosen automatically under export.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch.export import Dim

import piip_models  # noqa: F401  (registers the piip_* models with timm)

DEFAULT_MODELS = ["piip_tsb", "piip_tsb_1120_896_448:features"]
PATCH = 16
# The export example has batch 2: PyTorch specialises a dimension whose example size is 1.
EXAMPLE_BATCH = 2


@dataclass
class Row:
    model: str
    export_s: float
    onnx_s: float
    ort_load_s: float
    input: list[int]
    eager_ms: float
    ort_ms: float
    max_abs_diff: float
    max_abs_value: float


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"BxHxW"`` to ``(B, H, W)``."""
    try:
        batch, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BxHxW, e.g. 2x448x672") from None
    return batch, height, width


def build(spec: str) -> tuple[torch.nn.Module, bool]:
    """The eval-mode model of ``spec`` (``name`` or ``name:features``), seeded, its interaction gates opened."""
    name, _, kind = spec.partition(":")
    if kind not in ("", "features"):
        raise SystemExit(f"{spec}: the only suffix is ':features'")
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=kind == "features").eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("_gamma"):
                param.normal_(std=0.1)
    return model, kind == "features"


def default_shapes(model: torch.nn.Module, features: bool) -> list[tuple[int, int, int]]:
    """The model's own input size at batch 1, and a smaller non-square input at batch 3 (dense: 448x672, 2x512x384)."""
    if features:
        return [(1, 448, 672), (2, 512, 384)]
    side = model.pretrained_cfg["input_size"][-1]
    return [(1, side, side), (3, side - 3 * PATCH, side + 3 * PATCH)]


def _outputs(out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return out if isinstance(out, list) else [out]


def _timed(fn, *args):
    fn(*args)
    start = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - start) * 1e3


def benchmark(spec: str, args: argparse.Namespace, folder: Path) -> list[Row]:
    import onnxruntime

    model, features = build(spec)
    shapes = args.shapes or default_shapes(model, features)
    low, high = -(-args.min_side // PATCH), args.max_side // PATCH
    for batch, height, width in shapes:
        sides_fit = low * PATCH <= min(height, width) and max(height, width) <= high * PATCH
        if not (1 <= batch <= args.max_batch and sides_fit and height % PATCH == width % PATCH == 0):
            raise SystemExit(f"{spec}: input {batch}x{height}x{width} is outside the exported range")
    dynamic = {"x": {0: Dim("batch", min=1, max=args.max_batch),
                     2: PATCH * Dim("h", min=low, max=high), 3: PATCH * Dim("w", min=low, max=high)}}
    _, height, width = shapes[0]
    example = torch.randn(EXAMPLE_BATCH, 3, height, width)

    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    # onnxscript's graph optimiser takes many minutes on these graphs; onnxruntime optimises on loading anyway
    path = folder / f"{spec.replace(':', '_')}.onnx"
    torch.onnx.export(program, dynamo=True, optimize=False, verbose=False).save(path)
    onnx_s = time.perf_counter() - start
    start = time.perf_counter()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_load_s = time.perf_counter() - start
    (graph_input,) = session.get_inputs()

    rows = []
    for batch, height, width in shapes:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected, eager_ms = _timed(model, x)
        got, ort_ms = _timed(session.run, None, {graph_input.name: x.numpy()})
        expected = _outputs(expected)
        if len(got) != len(expected):
            raise RuntimeError(f"{spec}: ONNX gave {len(got)} outputs, eager {len(expected)}")
        diff = max((torch.from_numpy(g) - e).abs().max().item() for g, e in zip(got, expected))
        scale = max(e.abs().max().item() for e in expected)
        rows.append(Row(spec, export_s, onnx_s, ort_load_s, [batch, 3, height, width], eager_ms, ort_ms, diff, scale))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| model | torch.export (s) | ONNX (s) | ort load (s) | input | eager (ms) | onnxruntime (ms) "
        "| max abs diff | max abs value |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.export_s:.1f} | {r.onnx_s:.1f} | {r.ort_load_s:.1f} | {'x'.join(map(str, r.input))} "
            f"| {r.eager_ms:.0f} | {r.ort_ms:.0f} | {r.max_abs_diff:.1e} | {r.max_abs_value:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="registered names, optionally ':features'")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="inputs BxHxW to compare (first: export example)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for spec in args.models:
            print(f"{spec} ...", file=sys.stderr, flush=True)
            rows += benchmark(spec, args, Path(folder))
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
