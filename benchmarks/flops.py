"""PIIP against its single-branch baselines: parameters, FLOPs, latency, throughput and peak memory in one run.

    python benchmarks/flops.py                          # quick default: PIIP-TSB 1120/896/448 vs ViT-B@1024, both at
                                                        # half size, CPU, plus the paper-convention check
    python benchmarks/flops.py --models 'piip_tsb*' --convention full --json out.json --csv out.csv
    python benchmarks/flops.py --models 'piip_*' --no-latency   # every model's counts and the published numbers

Options: ``--models PATTERN ...`` (fnmatch; each PIIP model brings its baseline), ``--convention paper|full``,
``--scale F`` (input side as a fraction of the native size), ``--json/--csv/--plot PATH``, ``--device cpu|cuda``,
``--batch N``, ``--warmup N``, ``--repeats N``, ``--threads N``, ``--no-latency``. The same as ``piip-models bench``
(:mod:`piip_models.cli`); counting conventions in :mod:`piip_models.counting`, measurements in
:mod:`piip_models.bench`.
"""

from __future__ import annotations

import sys

from piip_models.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
