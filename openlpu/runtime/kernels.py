"""Linear layers in the weight formats OpenLPU runs: float32 (reference), bf16, int8 and int4.

A Linear takes float32 or bf16 activations. The float32 format returns float32; the others
compute in bf16 and return bf16, so a caller casts only where its next op needs float32 (a
residual add promotes by itself). The low-bit formats are weight-only: int8 with one scale per
output row (torch._weight_int8pack_mm), int4 with an asymmetric scale and zero per group of
inputs (torch._weight_int4pack_mm_for_cpu, CPU only). Both kernels read the weights once per call
whatever the row count, which is what a decode step wants; for many rows (a prompt) an int8
matrix is dequantized to bf16 for that call and multiplied densely, which is 2x faster at 128 rows
than the weight-only kernel (bench/results/engine_vs_llamacpp.md has the prefill figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUP = 32  # inputs sharing one int4 scale/zero; GGUF's quant blocks are 32 wide too
DENSE_FROM_ROWS = 32  # int8 with at least this many rows: dequantize, then one dense bf16 product
PACK_CHUNK_ROWS = 16384  # quantize big matrices (the 262k-row embedding) in bounded pieces


def quantize_int8_rows(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row), symmetric: w ~= q * scale."""
    device = weight.device if isinstance(weight, torch.Tensor) else None
    q = torch.empty(tuple(weight.shape), dtype=torch.int8, device=device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
    for r in range(0, weight.shape[0], PACK_CHUNK_ROWS):
        w = weight[r:r + PACK_CHUNK_ROWS].float()
        s = w.abs().amax(1).clamp_min(1e-12) / 127
        q[r:r + PACK_CHUNK_ROWS] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r:r + PACK_CHUNK_ROWS] = s
    return q, scale


def _pack_int4(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int4 weight, bf16 [K/group, N, 2] scale and zero): w ~= (q - 8) * scale + zero."""
    n, k = weight.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    scale_zero = torch.empty((k // INT4_GROUP, n, 2), dtype=torch.float32)
    for r in range(0, n, PACK_CHUNK_ROWS):  # the packed layout is blocked by 64 rows: chunkable
        g = weight[r:r + PACK_CHUNK_ROWS].float().reshape(-1, k // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).clamp_min(1e-12)
        codes = torch.round((g - lo[..., None]) / s[..., None]).clamp_(0, 15).to(torch.int32)
        packed[r:r + PACK_CHUNK_ROWS] = torch._convert_weight_to_int4pack_for_cpu(
            codes.reshape(-1, k), 1)
        scale_zero[:, r:r + PACK_CHUNK_ROWS, 0] = s.T
        scale_zero[:, r:r + PACK_CHUNK_ROWS, 1] = (lo + 8 * s).T
    return packed, scale_zero.to(torch.bfloat16)


@dataclass
class Linear:
    """y = x @ W.T (+ bias), W stored in `fmt`."""

    fmt: str
    weight: torch.Tensor  # float32 / bf16 matrix, int8 rows, or packed int4
    scale: torch.Tensor | None = None  # int8: bf16 per row; int4: bf16 scale/zero per group
    bias: torch.Tensor | None = None  # float32

    @classmethod
    def build(cls, weight, fmt: str, bias: torch.Tensor | None = None,
              device: torch.device | str | None = None) -> "Linear":
        """`weight`: a float tensor, or anything with .shape and float rows by slice (quantized
        in chunks of rows, so a huge matrix never exists in float32 all at once)."""
        device = torch.device(device or (weight.device if isinstance(weight, torch.Tensor) else "cpu"))
        if device.type != "cpu" and fmt in ("int8", "int4"):
            fmt = "bf16"  # the weight-only int kernels used here are CPU kernels
        if fmt == "int4" and weight.shape[1] % INT4_GROUP:
            fmt = "int8"  # the int4 kernel needs whole groups
        if fmt in ("float32", "bf16") and not isinstance(weight, torch.Tensor):
            weight = weight[0:weight.shape[0]]  # a lazy row source (model.GGUFRows): read it all
        if fmt == "float32":
            built = cls(fmt, weight.float().contiguous(), bias=bias)
        elif fmt == "bf16":
            built = cls(fmt, weight.to(torch.bfloat16).contiguous(), bias=bias)
        elif fmt == "int8":
            q, s = quantize_int8_rows(weight)
            built = cls(fmt, q, s.to(torch.bfloat16), bias=bias)
        elif fmt == "int4":
            packed, scale_zero = _pack_int4(weight)
            built = cls(fmt, packed, scale_zero, bias=bias)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")
        return built.to(device)

    def to(self, device) -> "Linear":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Linear(self.fmt, move(self.weight), move(self.scale), move(self.bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] float32 or bf16 -> [rows, out]: float32 for the float32 format, else bf16."""
        if self.fmt == "float32":
            return F.linear(x.float(), self.weight, self.bias)
        if x.dtype != torch.bfloat16:  # (a cast to its own dtype still costs a dispatch)
            x = x.to(torch.bfloat16)
        if self.fmt == "bf16":
            y = F.linear(x, self.weight)
        elif self.fmt == "int8" and x.shape[0] >= DENSE_FROM_ROWS:
            y = F.linear(x, self.weight.to(torch.bfloat16).mul_(self.scale[:, None]))
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scale)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.weight, self.scale, self.bias) if t is not None)
