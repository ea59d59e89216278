"""The compile gate: every shipped Triton MSDA kernel configuration, compiled for sm_80 and sm_90 without a GPU, uses
no local memory for register spills, and its resource usage is what the launch heuristic was chosen for.

Skips only when Triton's NVIDIA backend or its bundled ptxas / cuobjdump are absent. The compiles run once per
session, in parallel worker processes, and Triton's disk cache (with the measured usage beside each kernel) makes a
second session take seconds.
"""

from __future__ import annotations

import pytest
import torch
from piip_models.kernels import compile_gate as gate

REASON = gate.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no CUDA compile toolchain: {REASON}")


@pytest.fixture(scope="session")
def usages() -> list[gate.KernelUsage]:
    return gate.compile_cases(gate.shipped_cases())


def test_every_dtype_kernel_and_model_shape_is_gated():
    cases = gate.shipped_cases()
    covered = {(c.head_dim, c.heads, c.levels, c.points) for c in cases}
    assert covered == set(gate.MODEL_SHAPES)
    assert (32, 8, 4, 4) in covered  # the Deformable-DETR encoder
    for shape in gate.MODEL_SHAPES:
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            kernels = {c.kernel for c in cases if (c.head_dim, c.heads, c.levels, c.points) == shape and
                       c.dtype == dtype}
            assert kernels == set(gate.KERNELS), (shape, dtype)
    # The launch heuristic's config and every autotuning candidate.
    from piip_models.kernels.msda_triton import candidate_configs

    forward_bf16_d24 = {c.block_rows for c in cases if c.kernel == "forward" and c.dtype == "bfloat16" and
                        c.head_dim == 24}
    assert forward_bf16_d24 == {config.block_rows for config in candidate_configs("forward", 24, torch.bfloat16)}
    assert len(forward_bf16_d24) == 2


@pytest.mark.parametrize("kernel", gate.KERNELS)
@pytest.mark.parametrize("arch", gate.ARCHS)
def test_no_register_spills(usages, arch, kernel, capsys):
    rows = [u for u in usages if u.arch == arch and u.case.kernel == kernel]
    assert len(rows) == len([c for c in gate.shipped_cases() if c.kernel == kernel])
    spilling = [f"{u.case.name}: {u.registers} registers, {u.spill_stores} / {u.spill_loads} B spilled, "
                f"{u.stack_bytes} B stack" for u in rows if u.spills or u.stack_bytes]
    assert not spilling, "\n".join(spilling)
    # What the heuristic and the autotuning candidates were chosen for (benchmarks/msda_compile.py prints the table):
    # at most 128 registers and at least a quarter of the SM's warps resident.
    assert max(u.registers for u in rows) <= 128
    assert min(u.occupancy for u in rows) >= 0.25
    with capsys.disabled():
        print(f"\nsm_{arch} {kernel}: {len(rows)} configs, registers {min(u.registers for u in rows)}-"
              f"{max(u.registers for u in rows)}, occupancy {min(u.occupancy for u in rows):.0%}-"
              f"{max(u.occupancy for u in rows):.0%}, no spills")


def test_the_gate_compiles_what_a_launch_runs():
    """The gate binds arguments through Triton's own specialisation: unit strides become constants, so the value
    gathers are vector loads and the value gradient vector atomics on sm_90; warps match the config."""
    forward, backward, no_value_grad = [ptx for _, ptx in gate.compile_cases([
        gate.GateCase("forward", "float32", 32, 16, 1, 4, 32, 4),
        gate.GateCase("backward", "float32", 12, 16, 1, 4, 32, 4),
        gate.GateCase("backward (no value grad)", "float32", 12, 16, 1, 4, 32, 4),
    ], archs=(90,), with_ptx=True)]
    assert ".reqntid 128" in forward and "ld.global.v4.b32" in forward
    assert "atom.global.gpu.relaxed.add.v4.f32" in backward
    assert "atom.global" not in no_value_grad and "ld.global.v4.b32" in no_value_grad


def test_occupancy_follows_the_per_sm_limits():
    # 4-warp blocks: registers are allocated per warp in units of 256 (40 registers take 1280 per warp).
    assert gate.occupancy(32, 0, 4, 90) == 1.0
    assert gate.occupancy(40, 0, 4, 90) == 48 / 64  # 51 warps fit: 12 blocks
    assert gate.occupancy(64, 0, 4, 80) == 0.5
    assert gate.occupancy(255, 0, 4, 90) == 8 / 64
    # Shared memory: 100 KB per block leaves room for one block on sm_80 (164 KB), two on sm_90 (228 KB).
    assert gate.occupancy(32, 100 * 1024, 4, 80) == 4 / 64
    assert gate.occupancy(32, 100 * 1024, 4, 90) == 8 / 64
    # At most 32 resident blocks: 1-warp blocks cannot fill the SM.
    assert gate.occupancy(16, 0, 1, 90) == 32 / 64


def test_format_table_lists_both_targets(usages):
    table = gate.format_table(u for u in usages if u.case.head_dim == 24 and u.case.dtype == "bfloat16")
    lines = table.splitlines()
    assert "sm_80 regs" in lines[0] and "sm_90 occupancy" in lines[0]
    assert len(lines) == 2 + 6  # the heuristic and one autotuning candidate per kernel
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.mark.slow
def test_gate_shapes_are_the_registered_models():
    """MODEL_SHAPES is every (head dim, heads, levels, points) of an MSDeformAttn in a registered model (about 40 s:
    every model is built on the meta device)."""
    import timm

    import piip_models
    from piip_models.layers.msdeform_attn import MSDeformAttn

    shapes = set()
    for name in piip_models.list_models():
        model = timm.create_model(name, device="meta")
        shapes |= {(m.value_dim // m.n_heads, m.n_heads, m.n_levels, m.n_points) for m in model.modules()
                   if isinstance(m, MSDeformAttn)}
    assert shapes == {s for s in gate.MODEL_SHAPES if s[1:] == (16, 1, 4)}
