"""olmo.flops: the one peak-FLOP/s table behind the trainer's and the benchmarks' MFU."""

from __future__ import annotations

import logging

import pytest
import torch

from olmo import flops
from olmo.flops import GPU_PEAKS, datasheet_peak_flops, device_peak_flops


# Names as torch.cuda.get_device_name reports them, against the datasheet's dense figures.
@pytest.mark.parametrize(
    ("device_name", "bf16_tflops", "fp32_tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5, 67),
        ("NVIDIA H100 PCIe", 756.5, 51),
        ("NVIDIA H100 NVL", 835.5, 60),
        ("NVIDIA H200", 989.5, 67),
        ("NVIDIA H200 NVL", 835.5, 60),
        ("NVIDIA A100-SXM4-80GB", 312, 19.5),
        ("NVIDIA A100 80GB PCIe", 312, 19.5),
        ("NVIDIA B200", 2250, 75),
    ],
)
def test_known_gpus_map_to_the_datasheet(device_name, bf16_tflops, fp32_tflops):
    for dtype, tflops in ((torch.bfloat16, bf16_tflops), (torch.float16, bf16_tflops),
                          (torch.float32, fp32_tflops)):  # fmt: skip
        label, peak = datasheet_peak_flops(device_name, dtype)
        assert peak == pytest.approx(tflops * 1e12), (device_name, dtype, label)


def test_variants_precede_their_family():
    # A family key matched first would give every H100 NVL / PCIe the SXM figure.
    keys = [key.lower() for key, *_ in GPU_PEAKS]
    for i, key in enumerate(keys):
        assert not any(earlier in key for earlier in keys[:i]), (key, keys[:i])


def test_unknown_gpu_reports_no_mfu_and_says_so(monkeypatch, caplog):
    assert datasheet_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with caplog.at_level(logging.WARNING, logger="olmo.flops"):
        assert device_peak_flops(torch.device("cuda"), torch.bfloat16) is None
    assert "Tesla V100-SXM2-16GB" in caplog.text and "device_peak_flops" in caplog.text


def test_known_gpu_through_device_peak_flops(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops(torch.device("cuda"), torch.bfloat16) == pytest.approx(989.5e12)


def test_override_wins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops(torch.device("cuda"), torch.bfloat16, override=123e12) == 123e12
    monkeypatch.setattr(flops, "measure_cpu_peak_flops", lambda *a, **k: pytest.fail("measured"))
    assert device_peak_flops(torch.device("cpu"), torch.float32, override=5e9) == 5e9


def test_cpu_peak_is_measured_in_the_given_dtype(monkeypatch):
    seen = []
    real_mm = torch.mm

    def mm(a, b):
        seen.append(a.dtype)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", mm)
    peak = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert seen and set(seen) == {torch.bfloat16}
    assert 1e6 < peak < 1e15  # a rate, not a time or a count: FLOP/s of a CPU


def test_unsupported_dtype_is_an_error():
    with pytest.raises(ValueError, match="float64"):
        datasheet_peak_flops("NVIDIA H100 80GB HBM3", torch.float64)
