"""Compile the shipped Triton MSDA kernels for CUDA targets without a GPU, and read their resource usage.

Every kernel configuration a launch can use (:func:`shipped_cases`) is bound exactly as a launch binds it (meta
tensors of a representative problem through :func:`.msda_triton.forward_args` / ``backward_args`` and Triton's own
argument specialisation), compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, and its cubin
inspected: registers from ``cuobjdump --dump-resource-usage``, spill stores and loads from ``ptxas -v`` on the PTX
(Triton's bundled tools), shared memory from the compile metadata. Theoretical occupancy follows from the per-SM
limits of the target (:data:`SM_LIMITS`).

Needs Triton with its NVIDIA backend and bundled ``ptxas``; :func:`unavailable` says why not, or None.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache

import torch

__all__ = [
    "ARCHS", "DTYPES", "GateCase", "KernelUsage", "SM_LIMITS", "compile_case", "compile_cases", "format_table",
    "occupancy", "shipped_cases", "unavailable",
]

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNELS = ("forward", "backward", "backward (no value grad)")


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of a compute capability (CUDA occupancy calculator)."""

    registers: int = 65536
    max_registers_per_thread: int = 255
    register_unit: int = 256  # registers are allocated per warp in units of this many
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 167936  # 164 KiB on sm_80, 228 KiB on sm_90
    reserved_shared_bytes: int = 1024  # per block, for the system
    shared_unit: int = 128


SM_LIMITS = {80: SmLimits(shared_bytes=167936), 90: SmLimits(shared_bytes=233472)}

# Head dims and (heads, levels, points) of the registered models (16 heads, one level, 4 points in every PIIP
# interaction) and of the Deformable-DETR encoder (8 heads of 32, 4 levels of 4 points).
PIIP_HEAD_DIMS = (3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 100)
MODEL_SHAPES = tuple((d, 16, 1, 4) for d in PIIP_HEAD_DIMS) + ((32, 8, 4, 4),)


@dataclass(frozen=True)
class GateCase:
    """One shipped configuration: kernel, value dtype, head width, heads, levels, points and launch config."""

    kernel: str
    dtype: str
    head_dim: int
    heads: int
    levels: int
    points: int
    block_rows: int
    num_warps: int

    @property
    def name(self) -> str:
        return (f"{self.kernel} {self.dtype} D{self.head_dim} M{self.heads} {self.levels}x{self.points} "
                f"R{self.block_rows} w{self.num_warps}")


@dataclass(frozen=True)
class KernelUsage:
    """Resources of one compiled kernel on one target."""

    case: GateCase
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    occupancy: float  # resident warps / max warps per SM

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def unavailable() -> str | None:
    """Why kernels cannot be compiled for CUDA here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as exc:  # no Triton, or no NVIDIA backend
        return f"Triton's NVIDIA backend does not import ({type(exc).__name__}: {exc})"
    tool = _tool("cuobjdump")
    if not os.path.isfile(get_ptxas(80).path) or not os.path.isfile(tool):
        return "Triton's bundled ptxas / cuobjdump are missing"
    return None


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def shipped_cases(dtypes: Iterable[torch.dtype] = DTYPES, shapes=MODEL_SHAPES, tuning: bool = True) -> list[GateCase]:
    """Every (kernel, dtype, shape) with each config a launch may use: the launch heuristic's and, with ``tuning``,
    every autotuning candidate. In a stable order, without duplicates."""
    from .msda_triton import candidate_configs, launch_config

    cases: dict[GateCase, None] = {}
    for head_dim, heads, levels, points in shapes:
        for dtype in dtypes:
            for kernel in KERNELS:
                name = kernel.split()[0]
                configs = candidate_configs(name, head_dim, dtype) if tuning else [launch_config(name, head_dim, dtype)]
                for config in configs:
                    cases[GateCase(kernel, str(dtype).removeprefix("torch."), head_dim, heads, levels, points,
                                   config.block_rows, config.num_warps)] = None
    return list(cases)


def _launch_args(case: GateCase):
    """The kernel and arguments a launch of ``case`` passes, on meta tensors of a PIIP-sized problem."""
    from .msda_triton import KERNELS, LaunchConfig, backward_args, forward_args

    dtype = getattr(torch, case.dtype)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(70 >> level, 70 >> level) for level in range(case.levels)]
    batch, queries, positions = 2, 4900, sum(h * w for h, w in shapes)
    meta = {"device": "meta"}
    value = torch.empty(batch, positions, case.heads, case.head_dim, dtype=dtype, **meta)
    loc = torch.empty(batch, queries, case.heads, case.levels, case.points, 2, dtype=coord, **meta)
    attn = torch.empty(batch, queries, case.heads, case.levels, case.points, dtype=dtype, **meta)
    out = torch.empty(batch, queries, case.heads * case.head_dim, dtype=dtype, **meta)
    config = LaunchConfig(case.block_rows, case.num_warps)
    if case.kernel == "forward":
        launch = forward_args(value, shapes, loc, attn, out, config)
    else:
        grad_value = None if "no value" in case.kernel else torch.empty(value.shape, dtype=coord, **meta)
        launch = backward_args(out, value, shapes, loc, attn, grad_value, torch.empty_like(loc), torch.empty_like(attn),
                               config)
    return KERNELS[launch.kernel], launch


def _compile(case: GateCase, arch: int):
    """``triton.compile`` of ``case`` for ``sm_<arch>``, specialised as Triton's launcher specialises it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, launch = _launch_args(case)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    constants = launch.launch_constants
    bound_args, specialization, options = binder(*launch.args, **constants)
    options, signature, constexprs, attrs = kernel._pack_args(backend, constants, bound_args, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=backend.target, options=options.__dict__)


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int, int]:
    """Stack frame, spill store and spill load bytes that ``ptxas -v`` reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             source, "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    if found is None:
        raise RuntimeError(f"no spill report in ptxas output:\n{result.stderr}")
    return tuple(int(n) for n in found.groups())


def _cubin_registers(cubin: bytes) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        result = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                                check=True)
    found = re.search(r"REG:(\d+)", result.stdout)
    if found is None:
        raise RuntimeError(f"no register count in cuobjdump output:\n{result.stdout}")
    return int(found.group(1))


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> float:
    """Theoretical occupancy (resident warps / maximum warps per SM) of a kernel on ``sm_<arch>``."""
    limits = SM_LIMITS[arch]
    unit = limits.register_unit
    warp_registers = -(-max(registers, 1) * 32 // unit) * unit
    by_registers = limits.registers // warp_registers // num_warps
    block_shared = -(-(shared_bytes + limits.reserved_shared_bytes) // limits.shared_unit) * limits.shared_unit
    by_shared = limits.shared_bytes // block_shared
    blocks = min(by_registers, by_shared, limits.max_warps // num_warps, limits.max_blocks)
    return blocks * num_warps / limits.max_warps


@cache
def compile_case(case: GateCase, arch: int) -> KernelUsage:
    """Compile ``case`` for ``sm_<arch>`` and measure it. Cached in the process, and on disk beside Triton's own
    cache of the compiled kernel (keyed by its hash), so a warm run only binds and looks up."""
    import json

    from triton.runtime.cache import get_cache_manager

    compiled = _compile(case, arch)
    store = get_cache_manager(compiled.hash)
    cached = store.get_file(_USAGE_FILE)
    if cached is not None:
        with open(cached) as f:
            stack, stores, loads, registers = json.load(f)
    else:
        stack, stores, loads = _ptxas_spills(compiled.asm["ptx"], arch)
        registers = _cubin_registers(compiled.asm["cubin"])
        store.put(json.dumps([stack, stores, loads, registers]), _USAGE_FILE, binary=False)
    shared = int(compiled.metadata.shared)
    return KernelUsage(case, arch, registers, stores, loads, stack, shared,
                       occupancy(registers, shared, case.num_warps, arch))


_USAGE_FILE = "piip_msda_resource_usage.json"


def _compile_job(job: tuple[GateCase, int, bool]) -> tuple[KernelUsage, str | None]:
    case, arch, with_ptx = job
    usage = compile_case(case, arch)
    return usage, (_compile(case, arch).asm["ptx"] if with_ptx else None)


def compile_cases(cases: Iterable[GateCase], archs: Iterable[int] = ARCHS, workers: int | None = None,
                  with_ptx: bool = False) -> list[KernelUsage] | list[tuple[KernelUsage, str]]:
    """:func:`compile_case` for every case and arch, in spawned worker processes (``workers`` default: one per CPU)
    that never see ``TRITON_INTERPRET``, so that a process running the Triton interpreter can gate too (the
    interpreter turns every ``@triton.jit`` function into a Python one, which cannot be compiled for a GPU). Results
    in the order of ``cases`` then ``archs``; with ``with_ptx``, ``(usage, ptx)`` pairs."""
    import multiprocessing

    jobs = [(case, arch, with_ptx) for case in cases for arch in archs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # spawned children copy the environment
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return results if with_ptx else [usage for usage, _ in results]


def format_table(usages: Iterable[KernelUsage]) -> str:
    """Markdown table: one row per case, registers / spills / shared / occupancy per arch side by side."""
    by_case: dict[GateCase, dict[int, KernelUsage]] = {}
    for usage in usages:
        by_case.setdefault(usage.case, {})[usage.arch] = usage
    archs = sorted({arch for per_arch in by_case.values() for arch in per_arch})
    header = ["kernel", "dtype", "head dim", "heads", "levels x points", "rows x warps"]
    for arch in archs:
        header += [f"sm_{arch} regs", f"sm_{arch} spills (B)", f"sm_{arch} shared (B)", f"sm_{arch} occupancy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case, per_arch in by_case.items():
        cells = [case.kernel, case.dtype, str(case.head_dim), str(case.heads), f"{case.levels} x {case.points}",
                 f"{case.block_rows} x {case.num_warps}"]
        for arch in archs:
            usage = per_arch.get(arch)
            cells += (["-"] * 4 if usage is None else
                      [str(usage.registers), f"{usage.spill_stores} / {usage.spill_loads}", str(usage.shared_bytes),
                       f"{usage.occupancy:.0%}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_json(usages: Iterable[KernelUsage]) -> list[dict]:
    return [{**asdict(u.case), **{k: v for k, v in asdict(u).items() if k != "case"}} for u in usages]


def add_arguments(parser) -> None:
    """Command-line options selecting the configurations of a compile table (``argparse``)."""
    parser.add_argument("--dtypes", nargs="+", choices=[str(d).removeprefix("torch.") for d in DTYPES],
                        help="value dtypes (default: all four)")
    parser.add_argument("--head-dims", type=int, nargs="+",
                        help="only these head dims (default: every registered model's and the DETR encoder's)")
    parser.add_argument("--heuristic-only", action="store_true",
                        help="only the launch heuristic's configs (default: also every autotuning candidate)")
    parser.add_argument("--workers", type=int, help="compile processes (default: one per CPU)")


def selected_cases(args) -> list[GateCase]:
    """The cases :func:`add_arguments`' options select.

    Raises:
        ValueError: no registered head dim among ``--head-dims``.
    """
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else DTYPES
    shapes = [s for s in MODEL_SHAPES if not args.head_dims or s[0] in args.head_dims]
    if not shapes:
        known = sorted({s[0] for s in MODEL_SHAPES})
        raise ValueError(f"--head-dims {args.head_dims}: none is a shipped head dim ({known})")
    return shipped_cases(dtypes, shapes, tuning=not args.heuristic_only)


def run_table(args) -> tuple[list[KernelUsage], float]:
    """Compile the selected cases for sm_80 and sm_90; print the table and a summary line. Returns the usages and
    the seconds the compiles took."""
    import time

    cases = selected_cases(args)
    start = time.perf_counter()
    usages = compile_cases(cases, workers=args.workers)
    seconds = time.perf_counter() - start
    print(format_table(usages))
    spilling = sum(1 for u in usages if u.spills or u.stack_bytes)
    print(f"\n{len(usages)} kernels ({len(cases)} configurations x sm_{'/sm_'.join(map(str, ARCHS))}) compiled in "
          f"{seconds:.0f} s: {spilling} of them spill registers, occupancy {min(u.occupancy for u in usages):.0%}-"
          f"{max(u.occupancy for u in usages):.0%}")
    return usages, seconds
