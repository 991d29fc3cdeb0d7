"""MFU and the GPU peak table."""

import pytest

from loop import throughput


def test_mfu_is_six_params_tokens_over_peak():
    # 1B parameters at 50k tokens/s on one 989 TFLOP/s GPU: 6e9 * 5e4 / 9.89e14 = 30.3%
    assert throughput.mfu(1_000_000_000, 50_000, 1, 989e12) == pytest.approx(0.3033, rel=1e-3)
    assert throughput.mfu(1_000_000_000, 50_000, 2, 989e12) == pytest.approx(0.3033 / 2, rel=1e-3)
    assert throughput.mfu(10, 10, 1, None) is None


def test_peak_override_and_lookup(monkeypatch):
    monkeypatch.setenv("TRAINER_ENGINE_PEAK_TFLOPS", "100")
    assert throughput.device_peak_flops() == 100e12
    monkeypatch.delenv("TRAINER_ENGINE_PEAK_TFLOPS")
    monkeypatch.setattr(throughput.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert throughput.device_peak_flops() == 756e12  # the longer, more specific name wins
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    assert throughput.device_peak_flops() is None


def test_peak_memory_is_positive_on_cpu():
    assert throughput.peak_memory_bytes() > 0
