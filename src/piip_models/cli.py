"""The ``piip-models`` command: list models, show one, count FLOPs, benchmark against the baselines.

    piip-models list [FILTER]            registered models (fnmatch filter, default piip_*)
    piip-models info MODEL               configuration, branches, sizes, parameter and FLOP counts
    piip-models flops [--models ...]     parameters and FLOPs (no timing)
    piip-models bench [--models ...]     FLOPs, latency, throughput and peak memory beside the baselines
    piip-models convert SRC --out DIR    an official checkpoint as a timm Hub folder (model.safetensors + config.json)
    piip-models run SCRIPT [ARGS ...]    a timm script (train.py, validate.py, ...) with the piip_* models registered

Each subcommand comes from a registrar in :data:`COMMANDS`: ``registrar(subparsers)`` adds its parser and sets the
parser's ``func`` default to a handler ``func(args) -> int``.

Arguments are checked before any work starts (argparse types for numbers; output folders are created, or refused,
before the first model is counted); an error is one line on stderr and a non-zero exit status (2 for bad input or
files, 1 for anything unexpected, 130 when interrupted), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from ._factory import list_models
from .bench import (
    benchmark,
    check_plotting,
    markdown_table,
    published_table,
    resolve_models,
    write_csv,
    write_json,
    write_plot,
)
from .convert import add_convert_command
from .counting import CONVENTIONS, build_model, count_model, create
from .piip import PIIP
from .published import baseline_of, published_row
from .run import add_run_command

__all__ = ["COMMANDS", "DEFAULT_BENCH_MODELS", "DEFAULT_BENCH_SCALE", "build_parser", "main"]

# The README's quick job: the paper's headline detection pair at half its resolution (< 1 min on 2 CPU cores).
DEFAULT_BENCH_MODELS = ("piip_tsb_1120_896_448",)
DEFAULT_BENCH_SCALE = 0.5


def _progress(desc: str) -> Callable[[Iterable], Iterable]:
    # disable=None: bars on an interactive stderr only
    return lambda items: tqdm(list(items), desc=desc, unit="model", file=sys.stderr, disable=None, leave=False)


def _cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.filter)
    if not names:
        print(f"no model matches {args.filter!r}", file=sys.stderr)
        return 1
    print("| model | input | tags | published params | published GMACs |")
    print("|---|---:|---|---:|---:|")
    for name in names:
        cfg = timm.get_pretrained_cfg(name)
        tags = ", ".join(n.partition(".")[2] for n in list_models(name, include_tags=True))
        row = published_row(name)
        params = f"{row.params / 1e6:.0f}M" if row and row.params else "-"
        flops = f"{row.macs / 1e9:.1f}" if row else "-"
        print(f"| {name} | {cfg.input_size[-1]} | {tags} | {params} | {flops} |")
    return 0


def _describe(model: PIIP) -> list[str]:
    lines = [f"head: {model.head_type}, {len(model.branches)} branches, {len(model.interactions)} interactions"]
    for k, (cfg, branch, size) in enumerate(zip(model.branch_cfgs, model.branches, model.branch_sizes)):
        windows = sorted(set(model.windows[k]))
        attention = "global" if windows == [0] else "window " + "/".join(str(w or "global") for w in windows)
        heads = f"heads {branch.blocks[0].attn.num_heads}  " if isinstance(branch, VisionTransformer) else ""
        lines.append(
            f"  branch {k}: {cfg.model_name} ({type(branch).__name__}) @{size}px  dim {model.embed_dims[k]}  "
            f"units {len(model.windows[k])}  {heads}min input {model.min_input_sizes[k][0]}px  {attention}  "
            f"segments {len(cfg.segments)}  drop_path {cfg.drop_path_rate} ({cfg.drop_path_mode})"
        )
    icfg = model.interaction_cfg
    lines.append(
        f"interactions: {icfg.num_heads} heads, {icfg.n_points} points, deform ratio {icfg.deform_ratio}, "
        f"ConvFFN {icfg.cffn_ratio if icfg.with_cffn else 'off'}, projections {'on' if icfg.with_proj else 'off'}, "
        f"norms {'on' if icfg.with_norm else 'off'}"
    )
    return lines


def _cmd_info(args: argparse.Namespace) -> int:
    name = args.model
    if name not in timm.list_models():
        resolve_models([name])  # raises the helpful error
    cfg = timm.get_pretrained_cfg(name)
    model = create(name)
    lines = [name]
    if isinstance(model, PIIP):
        lines += _describe(model)
    lines.append(f"input: {cfg.input_size}, mean {cfg.mean}, std {cfg.std}, tags: "
                 + ", ".join(n.partition(".")[2] for n in timm.list_models(name, include_tags=True)))
    dense = isinstance(model, PIIP) and model.head_type == "dense"
    full = count_model(build_model(name) if dense else model, "full")
    paper = count_model(model, "paper")
    row = published_row(name)
    module = "module as it runs" + (", with its feature pyramid" if dense else "")
    published = f", published {row.params / 1e6:.0f}M ({row.source})" if row and row.params else ""
    lines.append(f"params: {full.params:,} ({module}) / {paper.params:,} (paper convention){published}")
    side = "x".join(map(str, full.input_size))
    lines.append(f"GMACs at {side}: {full.macs / 1e9:.2f} (full) / {paper.macs / 1e9:.2f} (paper)"
                 + (f", published {row.macs / 1e9:.1f} ({row.source})" if row else ""))
    if row and row.exception:
        lines.append(f"note: {row.exception}")
    lines.append(f"baseline: {baseline_of(name) or '-'}")
    print("\n".join(lines))
    return 0


def _prepare_output(path: str | None, option: str) -> None:
    """Creates the folder of an output file up front, or refuses a path that cannot be written, so that a finished
    run is never lost at the end."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{option} {path}: cannot create its folder, a file is in the way") from None
    if not os.access(target.parent, os.W_OK) or target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path}: not writable")


def _run(args: argparse.Namespace, latency: bool) -> int:
    if args.plot:
        check_plotting()
    for option in ("json", "csv", "plot"):
        _prepare_output(getattr(args, option), f"--{option}")
    models = resolve_models(args.models or args.default_models)
    scale = args.scale if args.scale is not None else (1.0 if args.models else args.default_scale)
    timed = latency and not getattr(args, "no_latency", False)
    rows = benchmark(
        models,
        convention=args.convention,
        scale=scale,
        batch_size=getattr(args, "batch", 1),
        device=getattr(args, "device", "cpu"),
        latency=timed,
        warmup=getattr(args, "warmup", 1),
        repeats=getattr(args, "repeats", 3),
        threads=getattr(args, "threads", 1),
        progress=_progress("bench" if timed else "count"),
    )
    if timed:
        load = f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""
        print(f"device={args.device} batch={args.batch} warm-up={args.warmup} repeats={args.repeats} "
              f"threads={args.threads or torch.get_num_threads()} torch={torch.__version__}{load}; input = "
              f"{scale:g} x native size (last branch), GMACs = multiply-accumulates per image\n")
    print(markdown_table(rows))
    if args.convention == "paper":
        check = published_table(rows, progress=_progress("published"))
        if check.count("\n") > 1:
            print("\nPaper convention at the native size against the published numbers:\n")
            print(check)
    if args.json:
        write_json(rows, args.json)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        write_plot(rows, args.plot)
    return 0


def _number(kind: type, minimum: float, open_below: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` of at least ``minimum`` (above it when ``open_below``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < minimum or open_below and value == minimum:
            raise argparse.ArgumentTypeError(f"must be {'>' if open_below else '>='} {minimum:g}, got {text}")
        return value
    return parse


def _add_run_options(parser: argparse.ArgumentParser, default_models: Sequence[str], default_scale: float) -> None:
    parser.add_argument("--models", nargs="+", metavar="PATTERN",
                        help="fnmatch patterns of registered models, or timm names (default: "
                             f"{' '.join(default_models)} at {default_scale:g} x the native size); "
                             "each PIIP model brings its baseline")
    parser.add_argument("--convention", choices=CONVENTIONS, default="paper",
                        help="paper: the official mmcv convention; full: every executed multiply-add")
    parser.add_argument("--scale", type=_number(float, 0, open_below=True),
                        help="input side as a fraction of each model's native size (last branch), rounded to "
                             f"16 px (default 1, or {default_scale:g} for the default models)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    parser.add_argument("--plot", metavar="PATH", help="draw a PNG (needs matplotlib)")
    parser.set_defaults(default_models=tuple(default_models), default_scale=default_scale)


def add_list_command(subparsers: Any) -> None:
    """Registers ``list``: the registered models with their published counts."""
    parser = subparsers.add_parser("list", help="list the registered models")
    parser.add_argument("filter", nargs="?", default="piip_*", help="fnmatch filter (default piip_*)")
    parser.set_defaults(func=_cmd_list)


def add_info_command(subparsers: Any) -> None:
    """Registers ``info``: one model's configuration and both counts."""
    parser = subparsers.add_parser("info", help="configuration, branches, sizes, params and FLOPs of a model")
    parser.add_argument("model", help="registered model name")
    parser.set_defaults(func=_cmd_info)


def add_flops_command(subparsers: Any) -> None:
    """Registers ``flops``: parameters and MACs of models and their baselines, on meta."""
    parser = subparsers.add_parser("flops", help="parameters and FLOPs, counted on the meta device")
    _add_run_options(parser, ("piip_*",), 1.0)
    parser.set_defaults(func=lambda args: _run(args, latency=False))


def add_bench_command(subparsers: Any) -> None:
    """Registers ``bench``: counts plus latency, throughput and peak memory beside the baselines."""
    parser = subparsers.add_parser(
        "bench", help="FLOPs, latency, throughput and peak memory of PIIP models beside their baselines"
    )
    _add_run_options(parser, DEFAULT_BENCH_MODELS, DEFAULT_BENCH_SCALE)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=_number(int, 1), default=1, help="images per timed forward")
    parser.add_argument("--warmup", type=_number(int, 1), default=1,
                        help="untimed forwards first (the first one's peak memory is recorded)")
    parser.add_argument("--repeats", type=_number(int, 1), default=3, help="timed forwards (median reported)")
    parser.add_argument("--threads", type=_number(int, 0), default=1,
                        help="CPU threads per measurement (default 1: on a shared machine, threads stall at OpenMP "
                             "barriers while other processes hold the cores; 0: torch's default)")
    parser.add_argument("--no-latency", action="store_true", help="count only")
    parser.set_defaults(func=lambda args: _run(args, latency=True))


CommandRegistrar = Callable[[Any], None]

# Each adds one subcommand.
COMMANDS: tuple[CommandRegistrar, ...] = (
    add_list_command, add_info_command, add_flops_command, add_bench_command, add_convert_command, add_run_command
)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (its subcommand parsers are of the same class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``piip-models`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = _Parser(
        prog="piip-models", description="PIIP models: list them, show one, count FLOPs, benchmark against baselines."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for bad input or files, 1 for an unexpected error, 130 when
    interrupted). Errors are printed as one line, without a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "run":  # a script's errors are its own: tracebacks pass through
        return args.func(args)
    prefix = f"piip-models {args.command}: error:"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"piip-models {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # bad input, missing or unusable files
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line, with the exception's type to report it by
        print(f"{prefix} unexpected {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
