"""Vendor peak rates of known GPUs, for "% of roofline" columns: dense (no sparsity) tensor-core
FLOP/s per dtype and HBM bandwidth, SXM parts, from the vendors' data sheets. A GPU not in the
table (or a different board, e.g. PCIe) needs `--peak-tflops` / `--peak-gbs`."""
from __future__ import annotations

# name fragment (matched in torch.cuda.get_device_name) -> {dtype: dense TFLOP/s, "gbs": GB/s}
# fp32 is the TF32 tensor-core rate (what cuBLAS uses for fp32 matmuls with TF32 allowed);
# "fp32_simt" is the plain fp32 rate, the peak when TF32 is off (torch's default for matmuls).
PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5, "fp32_simt": 67.0, "gbs": 4800.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5, "fp32_simt": 67.0, "gbs": 3350.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0, "fp32_simt": 19.5, "gbs": 2039.0},
}


def lookup(device_name: str) -> dict | None:
    """The PEAKS row whose name occurs in `device_name` (e.g. "NVIDIA H200"), or None."""
    for name, row in PEAKS.items():
        if name.lower() in device_name.lower():
            return dict(row, name=name)
    return None


def peak_tflops(row: dict, dtype: str, tf32: bool) -> float:
    """The compute peak that applies to `dtype` ("fp32", "bf16", "fp16")."""
    if dtype == "fp32":
        return row["fp32"] if tf32 else row["fp32_simt"]
    return row[dtype]
