"""Compile table of the Triton MSDA kernels for sm_80 and sm_90, without a GPU.

Every shipped configuration (forward, backward with and without the value gradient; float32, float16, bfloat16,
float64; the head dims and level/point counts of every registered model and of the Deformable-DETR encoder; the launch
heuristic's config and each autotuning candidate) is compiled with Triton for both targets. The table lists
registers, spill stores / loads, Triton's shared memory and the theoretical occupancy; the launch heuristic in
``kernels/msda_triton.py`` was chosen from it. Exits 1 when a kernel spills.

    python benchmarks/msda_compile.py                  # every configuration, markdown table
    python benchmarks/msda_compile.py --heuristic-only --dtypes bfloat16 --head-dims 12 24 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from piip_models.kernels import compile_gate as gate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gate.add_arguments(parser)
    parser.add_argument("--json", type=Path, help="output file (default benchmarks/out/msda_compile.json)")
    args = parser.parse_args(argv)
    reason = gate.unavailable()
    if reason is not None:
        print(f"cannot compile for CUDA targets: {reason}")
        return 1
    usages, seconds = gate.run_table(args)
    out = args.json or Path(__file__).resolve().parent / "out" / "msda_compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": seconds, "kernels": gate.as_json(usages)}, indent=1))
    print(f"wrote {out}")
    return 1 if any(u.spills or u.stack_bytes for u in usages) else 0


if __name__ == "__main__":
    sys.exit(main())
