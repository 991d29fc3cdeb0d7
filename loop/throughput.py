"""Throughput figures beyond tokens/s: model FLOPs utilisation and peak memory.

MFU uses the standard estimate of 6 x parameters x tokens FLOPs for a forward and backward pass
(Kaplan et al.; attention's extra FLOPs are left out, so it slightly understates long sequences),
against the device's dense bf16 peak. Known GPUs are in `PEAK_TFLOPS`; set TRAINER_ENGINE_PEAK_TFLOPS
to use another figure. On a CPU, or a GPU not in the table, MFU is not reported.
"""

from __future__ import annotations

import os
import resource

import torch

# Dense bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {
    "H200": 989.0, "H200 NVL": 835.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "B200": 2250.0,
    "MI300X": 1307.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name; the longest matching key wins ("H100 PCIe" before "H100")."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


def device_peak_flops() -> float | None:
    """Peak FLOP/s of this process's GPU, or None when unknown (or on CPU)."""
    override = os.environ.get("TRAINER_ENGINE_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if not torch.cuda.is_available():
        return None
    peak = peak_tflops(torch.cuda.get_device_name())
    return peak * 1e12 if peak else None


def mfu(num_params: int, input_tokens_per_sec: float, num_devices: int, peak_flops: float | None) -> float | None:
    """Fraction of the devices' peak used by 6 x params x tokens; None when the peak is unknown."""
    if not peak_flops or num_devices <= 0:
        return None
    return 6 * num_params * input_tokens_per_sec / (peak_flops * num_devices)


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
