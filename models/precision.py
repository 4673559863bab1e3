"""Float32 islands in the backbones under bf16 autocast (train.py and sample.py autocast on CUDA).

bf16 keeps 8 significant bits: each value it stores is off by up to 2^-9 (0.2 %) of itself. Features
tolerate that; coordinates do not. A coordinate update is a sum of per-pair terms that can be much
larger than the sum: EGNN's per-edge step reaches 15 A (tanh times coords_range), where bf16 values are
1/16 A apart, and where the displacement is small, late in sampling, such steps nearly cancel. The
rounding of each term survives the sum. Measured on QM9 molecules (tests/test_precision.py): with
saturated gates the EGNN's displacement was off by up to 0.61 A; an EGNN fitted briefly from large
coordinate weights (steps up to 1.2 A, displacements of 0.25 A) by up to 0.021 A. The stability
metric's bond margins are 0.03 to 0.10 A.

So every backbone runs these parts with autocast off, in the positions' dtype (float32 in training and
sampling, float64 in the symmetry tests):
  - pairwise differences, distances and directions, and the distances' embedding in the EGNN;
  - the MLPs whose only consumer is the coordinate update, and the sum into the positions;
  - the output heads (type logits and coordinates).
That brings the two cases above to 0.0023 and 0.007 A. The feature MLPs and attention, nearly all the
FLOPs, stay in bf16; the error they leave grows with the displacement (with random weights, at most
about 1.5 % of it for the EGNN, 1 % for the Transformer and 2.5 % for the Pairformer).
"""
from __future__ import annotations

import torch


def flush_denormals() -> None:
    """Treat denormal numbers (float32 below 1.2e-38, float64 below 2.2e-308) as zero on the CPU, for the rest of the
    process; the scripts call it at startup. The x86 CPU handles a denormal operand in microcode, some 100 cycles,
    and trained networks make them: gates and radial bases exp(-gamma d^2) that underflow, their gradients. Measured
    on this machine (one thread, Xeon Sapphire Rapids class): a training step of the trained QM9 property oracle
    took 2.2 s with denormals and 0.91 s without; an untrained SchNet student's forces on 64 QM9 molecules 28 ms and
    20 ms; the generators' steps 2 % less. Nothing a model computes changes above 1e-38. Library code does not call
    it: torch offers no way to read the setting back, and a library must not change its caller's numerics."""
    torch.set_flush_denormal(True)


def no_autocast(x: torch.Tensor):
    """A context with autocast off on x's device type: every op in it runs in its inputs' dtype, so
    16-bit inputs must be cast up explicitly (tensor.to(pos.dtype), or full())."""
    return torch.autocast(x.device.type, enabled=False)


def full(x: torch.Tensor) -> torch.Tensor:
    """x as float32 if it is a 16-bit float (an autocast output); float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 matrices in AMX tiles (Sapphire Rapids and later). Without AMX, oneDNN
    converts bf16 to float32 around every product: a 2048 x 128 by 128 x 512 product on one thread of an AVX-512 Xeon
    without AMX or avx512_bf16 took 10.2 ms in bf16 against 2.1 ms in float32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def backbone_precision(device: torch.device, precision: str, backbone_cls) -> str:
    """What --precision means for a backbone: "bf16" or "fp32". With "auto", bf16 on CUDA and, on a CPU with AMX,
    bf16 only for the backbones whose class sets CPU_BF16, those kernels/step_bench.py measured faster in bf16 there;
    the others' steps are no faster, and bf16's error would grow for nothing. A CPU without AMX gets fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if getattr(backbone_cls, "CPU_BF16", False) and cpu_has_amx() else "fp32"


def backbone_autocast(device: torch.device, precision: str, backbone_cls) -> torch.autocast:
    """The autocast a backbone's training or sampling runs under (backbone_precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=backbone_precision(device, precision, backbone_cls) == "bf16")
