"""benchmarks/bench_profile.py: kernel kinds by name, and a CPU profile's shares and ordering."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_profile import format_profile, kind_of, profile_step


@pytest.mark.parametrize(
    "name, kind",
    [
        ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, cutlass::bf16>>",
         "attention"),
        ("_poly_norm_bwd", "activation kernel"),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
        ("Memcpy DtoD (Device -> Device)", "memory"),
        ("void at::native::(anonymous namespace)::fused_adamw_kernel<float>", "optimizer"),
        ("triton_poi_fused_add_mul_0", "other"),
        ("aten::mm", "matmul"),
    ],
)  # fmt: skip
def test_kernel_kinds(name, kind):
    assert kind_of(name) == kind


def test_cpu_profile_shares_and_order():
    a = torch.randn(1024, 1024)

    def step():
        b = a @ a  # 2 GFLOP: about 10x the time of the elementwise ops on its output
        return (b * 2 + 1).relu()

    step()
    prof = profile_step(lambda: [step], torch.device("cpu"), steps=3)
    assert prof["steps"] == 3 and prof["total_ms"] > 0
    assert sum(k["pct"] for k in prof["kinds"]) == pytest.approx(100)
    assert prof["kinds"][0]["kind"] == "matmul"
    ms = [r["ms"] for r in prof["top"]]
    assert ms == sorted(ms, reverse=True)
    mm = next(r for r in prof["top"] if r["kind"] == "matmul")
    assert mm["calls"] == pytest.approx(1)  # per step, over 3 steps
    assert format_profile("x", prof).startswith("# profile x: ")
