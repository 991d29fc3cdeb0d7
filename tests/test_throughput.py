"""MFU, the GPU peak table and peak memory."""

import os

import pytest
import torch

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


def memory_in_use() -> tuple[int, int]:
    """(bytes this process holds now, bytes there are): CUDA memory on a GPU; resident and physical
    memory on a CPU (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated(), torch.cuda.get_device_properties(0).total_memory
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not torch.cuda.is_available() and not os.path.exists("/proc/self/statm"),
                    reason="reads resident memory from /proc")
def test_peak_memory_counts_a_known_allocation_in_bytes():
    size = 128 * 2**20
    in_use, capacity = memory_in_use()
    block = torch.ones(size // 4, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    # At least what was in use plus the block (with slack for memory freed meanwhile), and no more than
    # the device has: a count in KiB or pages instead of bytes fails one side or the other.
    assert in_use + 0.9 * size <= throughput.peak_memory_bytes() <= capacity
    del block
