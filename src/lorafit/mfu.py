"""Model FLOPs utilisation: the FLOPs one trained token costs, over the GPU's measured dense bf16 peak, logged as
train/mfu at every logging step (lorafit.trainer) and summarised in summary.json.
"""

from __future__ import annotations

import os

# Measured dense bf16 matmul peaks (FLOP/s) of the GPUs we benchmark on: an 8192^3 product through PyTorch, ~790 TF
# on H100 and H200 (see docs/benchmarks.md). LORAFIT_PEAK_TFLOPS overrides; unknown devices report no MFU.
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}
# The datasheet's dense bf16 peak of the same chips (NVIDIA's H100 SXM and H200 figure, without sparsity): MFU on this
# basis is the measured-peak MFU x 790 / 989, summary.json's steady_mfu_datasheet.
DATASHEET_FLOPS = {"H100": 989e12, "H200": 989e12}


def peak_flops() -> float:
    import torch

    if os.environ.get("LORAFIT_PEAK_TFLOPS"):
        return float(os.environ["LORAFIT_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def flops_per_token(total_params: int, recompute: bool) -> float:
    """FLOPs per trained token, the basis of the MFU we log: 2P forward + 2P backward to the inputs (the frozen base
    needs no weight gradients; LoRA's are negligible) + 2P more when checkpointing recomputes the forward.
    Attention's sequence-length term is left out, which understates MFU slightly at 1024 tokens."""
    return (6.0 if recompute else 4.0) * total_params


def datasheet_ratio() -> float | None:
    """measured peak / datasheet peak of this GPU (None where either is unknown): MFU on the datasheet basis is
    MFU x this."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    measured = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    datasheet = next((v for k, v in DATASHEET_FLOPS.items() if k in name), None)
    return measured / datasheet if measured and datasheet else None
