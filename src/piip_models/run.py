"""Run any script that calls ``timm.create_model`` (timm's own ``train.py``, ``validate.py``, ``inference.py``, your
own) with the ``piip_*`` models registered, unchanged::

    python -m piip_models.run path/to/train.py --model piip_tsb ...
    piip-models run path/to/train.py --model piip_tsb ...
    torchrun --nproc-per-node 8 -m piip_models.run path/to/train.py --model piip_tsb ...

timm has no plugin mechanism: a model name is known to ``timm.create_model`` only once the module that registers it
has been imported. The launcher imports :mod:`piip_models`, then runs the script as ``__main__`` the way
``python SCRIPT ARGS`` would: ``sys.argv`` is the script and its arguments, the script's folder leads ``sys.path``.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import piip_models  # noqa: F401  (registers the piip_* models before the script creates one)

__all__ = ["add_run_command", "main", "run_script"]

def run_script(script: str | Path, args: Sequence[str] = ()) -> None:
    """Runs ``script`` as ``__main__`` with ``args`` as its command line; ``sys.argv`` and ``sys.path`` are restored
    afterwards. A ``SystemExit`` of the script propagates, as it would end ``python SCRIPT``.

    Raises:
        FileNotFoundError: ``script`` is not a file.
    """
    path = Path(script)
    if not path.is_file():
        raise FileNotFoundError(f"script {path} does not exist")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def _run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not Path(args.script).is_file():
        parser.error(f"script {args.script} does not exist")
    run_script(args.script, args.args)
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("script", help="the Python script to run (timm's train.py, validate.py, ...)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    parser.set_defaults(func=partial(_run_command, parser))
    return parser


_DESCRIPTION = (
    "Run SCRIPT as __main__ with ARGS after importing piip_models, so timm.create_model knows the piip_* models, "
    "e.g. train.py /data --model piip_tsb --drop-path 0.1"
)


def add_run_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the ``run`` subcommand. Errors raised by the script keep their tracebacks: ``piip-models`` passes
    them through."""
    parser = subparsers.add_parser(
        "run", help="run a timm script (train.py, validate.py, ...) with the piip_* models registered",
        description=_DESCRIPTION,
    )
    return _add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m piip_models.run SCRIPT [ARGS ...]``; exits 2 when SCRIPT is missing."""
    parser = _add_arguments(argparse.ArgumentParser(prog="python -m piip_models.run", description=_DESCRIPTION))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
