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


@pytest.mark.slow
def test_cpu_peak_is_measured_in_the_given_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(flops, "CPU_PEAK_CACHE", tmp_path / "cpu_peak.json")
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


AVX2_CPU = {"model name": "AMD EPYC", "cpu MHz": "2445.404",
            "flags": "fpu sse sse2 avx f16c fma avx2 bmi2"}


def test_cpu_datasheet_peak_is_cores_clock_and_fma_width(monkeypatch):
    monkeypatch.setattr(flops.Path, "read_text", _no_cpufreq(flops.Path.read_text))
    # Two 256-bit FMA pipes: 2 x 8 lanes x 2 FLOPs per cycle in fp32; bf16 runs on them too.
    assert flops.cpu_datasheet_peak_flops(torch.float32, 2, AVX2_CPU) == 2 * 2445.404e6 * 32
    assert flops.cpu_datasheet_peak_flops(torch.bfloat16, 2, AVX2_CPU) == 2 * 2445.404e6 * 32
    avx512 = {**AVX2_CPU, "flags": AVX2_CPU["flags"] + " avx512f avx512_bf16 amx_bf16"}
    assert flops.cpu_datasheet_peak_flops(torch.float32, 1, avx512) == 2445.404e6 * 64
    assert flops.cpu_datasheet_peak_flops(torch.bfloat16, 1, avx512) == 2445.404e6 * 2048
    no_fma = {**AVX2_CPU, "flags": "sse2 avx avx2"}
    assert flops.cpu_datasheet_peak_flops(torch.float32, 1, no_fma) == 2445.404e6 * 16
    # An Arm CPU's /proc/cpuinfo has neither x86 flags nor a clock: no datasheet figure.
    assert flops.cpu_datasheet_peak_flops(torch.float32, 2, {"Features": "fp asimd sve"}) is None


def _no_cpufreq(read_text):
    def read(self, *args, **kwargs):
        if "cpufreq" in str(self):
            raise OSError("no cpufreq in this test")
        return read_text(self, *args, **kwargs)
    return read


def test_cpu_peak_is_the_same_on_every_run_and_at_least_the_datasheet(monkeypatch, tmp_path):
    """The figure MFU divides by: measured once per machine, then read back, never below the
    cores x clock x FMA width figure (so a measurement taken on a busy machine cannot inflate
    MFU, as the per-start measurement did: 43-164 GFLOP/s on one machine)."""
    monkeypatch.setattr(flops, "CPU_PEAK_CACHE", tmp_path / "cpu_peak.json")
    rates = iter([3e9, 500e9])  # a busy first measurement; a second would be far higher
    calls = []

    def measure(dtype, size, repeats):
        calls.append(dtype)
        return next(rates)

    monkeypatch.setattr(flops, "measure_cpu_peak_flops", measure)
    monkeypatch.setattr(flops, "cpu_datasheet_peak_flops", lambda dtype, threads: threads * 40e9)
    first = [flops.device_peak_flops(torch.device("cpu"), torch.float32) for _ in range(3)]
    assert first == [torch.get_num_threads() * 40e9] * 3 and calls == [torch.float32]
    # Another dtype (and another thread count) is another entry of the cache.
    assert flops.cpu_peak_flops(torch.bfloat16, threads=1) == 500e9
    assert len(calls) == 2
