"""Linear layers in the weight formats OpenLPU runs: float32 (reference), bf16, int8 and int4.

A Linear takes float32 or bf16 activations. The float32 format returns float32; the others
compute in bf16 and return bf16, or float32 where OpenLPU's CPU kernels run or where the CPU has no
bf16 instructions (`dense_dtype`), so a caller casts only where its next op needs float32 (a
residual add promotes by itself). The low-bit formats are weight-only: int8 with one scale per
output row (torch._weight_int8pack_mm), int4 with an asymmetric scale and zero per group of
inputs (torch._weight_int4pack_mm_for_cpu, CPU only). Both kernels read the weights once per call
whatever the row count, which is what a decode step wants; for many rows (a prompt) an int8
matrix is dequantized for that call and multiplied densely, which is 2x faster at 128 rows
than the weight-only kernel (bench/results/engine_vs_llamacpp.md has the prefill figures).

On x86 CPUs with AVX2 (or AVX-512 VNNI), few-row products run OpenLPU's own kernels (cpu_kernels.cpp,
compiled on first use for the CPU's instruction set, KERNEL_ISAS): the activations are quantized to
int8 per block of 32 inputs and multiplied by the int8 or 4-bit weights with integer dot-product
instructions. The int4 format then packs its codes the way that kernel reads them (`_pack_codes`),
and a GGUF file's own 4- and 5-bit codes run as they are (GroupCodes, formats int4 and int5).
OPENLPU_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

INT4_GROUP = 32  # inputs sharing one int4 scale/zero; GGUF's quant blocks are 32 wide too
DENSE_FROM_ROWS = 32  # products of at least this many rows: dequantize, then one dense product (dense_dtype)
# torch._weight_int8pack_mm reads inputs 16 at a time: other widths give garbage or crash (torch 2.13,
# CPU), so those matrices are dequantized for each call instead
INT8PACK_MULTIPLE = 16
INT4PACK_ROWS_MULTIPLE = 16  # torch's int4 kernel packs output rows 16 at a time (torch 2.13, CPU)
PACK_CHUNK_ROWS = 16384  # quantize big matrices (the 262k-row embedding) in bounded pieces

KERNEL_SOURCES = tuple(Path(__file__).with_name(name)
                       for name in ("cpu_kernels.cpp", "cpu_kernels_avx512.h", "cpu_kernels_avx2.h"))
# instruction set -> (the /proc/cpuinfo flags it needs, the compiler flags it is built with); the first the CPU
# has is built
KERNEL_ISAS = {
    "AVX-512 VNNI": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "f16c", "fma"),
                     ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi", "-mf16c", "-mfma"]),
    "AVX2": (("avx2", "f16c", "fma"), ["-mavx2", "-mf16c", "-mfma"]),
}
KERNEL_CFLAGS = ["-O3", "-fopenmp"]
KERNEL_INT8_MULTIPLE, KERNEL_CODE_MULTIPLE = 64, 128  # inputs per step of each kernel's inner loop
CODE_BITS = {"int4": 4, "int5": 5}  # formats the code kernel runs
# /proc/cpuinfo flags of x86's bf16 matrix instructions: without them torch multiplies bf16 matrices 6.5x slower
# than float32 ones (128 x 640 by 640 x 2048: 16 vs 105 GFLOP/s, AMD EPYC with AVX2, torch 2.13, 2 threads)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
X86_MACHINES = ("x86_64", "AMD64", "i386", "i686")


def _cpuinfo(field: str) -> list[str]:
    """The values of one /proc/cpuinfo field, a line per CPU (none where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [line.partition(":")[2].strip() for line in text.splitlines() if line.split(":")[0].strip() == field]


def _cpu_flags() -> set[str]:
    return {flag for line in _cpuinfo("flags") for flag in line.split()}


def cpu_name() -> str:
    """The CPU's model name (or, without /proc/cpuinfo, the machine type), for benchmark reports."""
    return next(iter(_cpuinfo("model name")), platform.machine())


def kernel_isa() -> str | None:
    """The instruction set OpenLPU's CPU kernels are built for on this CPU (a KERNEL_ISAS key), or None."""
    flags = _cpu_flags()
    return next((isa for isa, (needs, _) in KERNEL_ISAS.items() if set(needs) <= flags), None)


@functools.cache
def dense_dtype() -> torch.dtype:
    """What many-row products multiply in: float32 on x86 CPUs without bf16 matrix instructions, else bf16 (other
    machines list their features otherwise, and were not measured)."""
    slow_bf16 = platform.machine() in X86_MACHINES and not set(BF16_CPU_FLAGS) & _cpu_flags()
    return torch.float32 if slow_bf16 else torch.bfloat16


@functools.cache
def cpu_kernels():
    """OpenLPU's compiled CPU kernels, or None where this CPU has neither instruction set, OPENLPU_CPU_KERNELS=0,
    or they cannot be built (then torch's kernels run, slower)."""
    isa = kernel_isa()
    if os.environ.get("OPENLPU_CPU_KERNELS", "1") == "0" or isa is None:
        return None
    from torch.utils.cpp_extension import load

    from openlpu.models.embedded import cache_dir

    cflags = KERNEL_CFLAGS + KERNEL_ISAS[isa][1]
    # One build per source, flags and torch version, so an upgrade never loads a stale library.
    key = hashlib.sha256(b"".join(source.read_bytes() for source in KERNEL_SOURCES) + " ".join(cflags).encode()
                         + torch.__version__.encode()).hexdigest()[:16]
    build = cache_dir() / "kernels" / key
    build.mkdir(parents=True, exist_ok=True)
    # torch marks a build in progress with a file it removes when done, and waits, without end, while it is
    # there: a build killed mid-way left every later start waiting (a review found it). One build at a time holds
    # this lock instead, which the system lets go when its holder dies, so a mark found while holding it is stale.
    with open(build / "openlpu.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("openlpu: waiting for another process compiling the CPU kernels", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)  # torch's mark (cpp_extension's FileBaton)
        if not any(build.glob("*.so")):
            print(f"openlpu: compiling the CPU kernels for {isa} (once, about a minute)", file=sys.stderr, flush=True)
        try:
            return load(name="openlpu_cpu_kernels", sources=[str(KERNEL_SOURCES[0])], extra_cflags=cflags,
                        extra_ldflags=["-fopenmp"], build_directory=str(build))
        except (OSError, RuntimeError, ImportError) as err:  # no compiler or headers: torch kernels still work
            print(f"openlpu: CPU kernels unavailable ({str(err).splitlines()[0]}); using torch's",
                  file=sys.stderr)
            return None


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


@dataclass
class GroupCodes:
    """A matrix as small unsigned codes per group of 32 inputs: w = code * scale + min. GGUF's
    Q4_0/1, Q5_0/1, Q4_K and Q5_K blocks are all this (models.gguf.group_codes reads them)."""

    bits: int  # 4 or 5
    codes: torch.Tensor  # uint8 [N, K], each < 2 ** bits
    scale: torch.Tensor  # float32 [N, K / 32]
    min: torch.Tensor  # float32 [N, K / 32]

    @classmethod
    def cat(cls, parts: list[GroupCodes]) -> GroupCodes:
        """Rows of several matrices, one after another (4-bit codes are 5-bit codes too)."""
        return cls(max(p.bits for p in parts), *(torch.cat([getattr(p, f) for p in parts])
                                                  for f in ("codes", "scale", "min")))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        groups = self.codes.view(n, -1, INT4_GROUP).float()
        return (groups * self.scale[..., None] + self.min[..., None]).view(n, k)

    def padded(self, inputs: int) -> GroupCodes:
        """The same rows over `inputs` inputs, the extra groups' weights zero (codes, scales and mins)."""
        extra = inputs - self.shape[1]
        return GroupCodes(self.bits, F.pad(self.codes, (0, extra)), F.pad(self.scale, (0, extra // INT4_GROUP)),
                          F.pad(self.min, (0, extra // INT4_GROUP)))


def _pack_codes(codes: GroupCodes) -> torch.Tensor:
    """Group codes -> one uint8 row per output in the layout cpu_kernels.cpp reads: the low 4
    bits as nibbles, the fifth bits (5-bit codes) as masks, then fp16 scales and mins."""
    n, k = codes.shape
    half = INT4_GROUP // 2
    g = codes.codes.view(n, k // INT4_GROUP, 2, half)  # [rows, group, first or last 16, input]
    parts = [((g[:, :, 0] & 15) | (g[:, :, 1] & 15) << 4).reshape(n, k // 2)]
    if codes.bits == 5:  # per 128 inputs, a 64-bit mask of the 4 groups' first 16, then last 16
        fifth = (g >> 4 & 1).view(n, k // 128, 4, 2, half).transpose(2, 3).reshape(n, -1, 8)
        parts.append((fifth << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8))
    parts += [codes.scale.half().view(torch.uint8), codes.min.half().view(torch.uint8)]
    return torch.cat(parts, 1)


def _group_codes_4bit(weight) -> GroupCodes:
    """Round float rows to 4-bit codes, each group spanning its own min..max."""
    n, k = weight.shape
    g = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo = g.amin(-1).half().float()  # round scale and min as the kernel will store them
    s = ((g.amax(-1) - lo) / 15).clamp_min(1e-7).half().float()
    codes = torch.round((g - lo[..., None]) / s[..., None]).clamp_(0, 15).to(torch.uint8)
    return GroupCodes(4, codes.view(n, k), s, lo)


def _pack_int4(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int4 weight, bf16 [K/group, N, 2] scale and zero) for torch's kernel:
    w ~= (q - 8) * scale + zero, the codes of _group_codes_4bit."""
    n, k = weight.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    scale_zero = torch.empty((k // INT4_GROUP, n, 2), dtype=torch.float32)
    for r in range(0, n, PACK_CHUNK_ROWS):  # the packed layout is blocked by 64 rows: chunkable
        codes = _group_codes_4bit(weight[r:r + PACK_CHUNK_ROWS])
        packed[r:r + PACK_CHUNK_ROWS] = torch._convert_weight_to_int4pack_for_cpu(codes.codes.int(), 1)
        scale_zero[:, r:r + PACK_CHUNK_ROWS, 0] = codes.scale.T
        scale_zero[:, r:r + PACK_CHUNK_ROWS, 1] = (codes.min + 8 * codes.scale).T
    return packed, scale_zero.to(torch.bfloat16)


def _codes_4bit_chunked(weight, inputs: int) -> torch.Tensor:
    """Float rows -> _pack_codes rows of 4-bit codes over `inputs` inputs (zero weights past the matrix's),
    rounded a bounded number of rows at a time."""
    n, k = weight.shape
    rows = torch.empty((n, _code_row_bytes(inputs, 4)), dtype=torch.uint8)
    for r in range(0, n, PACK_CHUNK_ROWS):
        chunk = weight[r:r + PACK_CHUNK_ROWS].float()
        chunk = F.pad(chunk, (0, inputs - k)) if inputs > k else chunk
        rows[r:r + PACK_CHUNK_ROWS] = _pack_codes(_group_codes_4bit(chunk))
    return rows


def _kernel_inputs(k: int) -> int:
    """A code matrix's inputs as the kernels store it: whole 128-input steps of their inner loop, the groups past
    k holding zero weights (a width of whole groups that is not whole steps, as SmolLM2's 576, runs as codes too,
    for 11% more bytes there)."""
    return -(-k // KERNEL_CODE_MULTIPLE) * KERNEL_CODE_MULTIPLE


def _code_row_bytes(inputs: int, bits: int) -> int:
    """Bytes of one _pack_codes row: 4 bits an input, a fifth bit for 5-bit codes, fp16 scale and min a group."""
    return inputs // 2 + (inputs // 8 if bits == 5 else 0) + inputs // 8


@dataclass
class Linear:
    """y = x @ W.T (+ bias), W stored in `fmt`: float32, bf16, int8 (per-row scale), int4 or
    int5 (codes per group of 32, the latter only on OpenLPU's CPU kernels)."""

    fmt: str
    weight: torch.Tensor  # float32 / bf16 matrix, int8 rows, packed 4-bit (torch) or _pack_codes rows
    scale: torch.Tensor | None = None  # int8: bf16 per row; torch's int4: scale and zero per group
    bias: torch.Tensor | None = None  # float32
    kernels: object | None = None  # OpenLPU's compiled CPU kernels, when this matrix runs on them
    padding: int = 0  # zero-weight inputs the code kernels' layout adds past the matrix's (_kernel_inputs)

    @classmethod
    def build(cls, weight, fmt: str, bias: torch.Tensor | None = None,
              device: torch.device | str | None = None) -> Linear:
        """`weight`: a float tensor, anything with .shape and float rows by slice (quantized in
        chunks of rows, so a huge matrix never exists in float32 all at once), or GroupCodes
        with fmt "codes" (run as they are where OpenLPU's CPU kernels can, else as int8)."""
        device = torch.device(device or (weight.device if isinstance(weight, torch.Tensor) else "cpu"))
        if device.type != "cpu" and fmt in ("int8", "int4", "codes"):
            fmt = "bf16"  # the weight-only int kernels used here are CPU kernels
        k = weight.shape[1]
        if fmt == "int4" and k % INT4_GROUP:
            fmt = "int8"  # the int4 kernel needs whole groups
        if fmt == "codes" and not (isinstance(weight, GroupCodes) and cpu_kernels()):
            fmt = "int8"  # codes run only on OpenLPU's kernels
        if fmt == "int4" and not cpu_kernels() and weight.shape[0] % INT4PACK_ROWS_MULTIPLE:
            fmt = "int8"  # torch's int4 kernel needs whole packs of rows (a vocabulary of 32,001 tokens has not)
        if fmt in ("int4", "codes") and cpu_kernels() and \
                _code_row_bytes(_kernel_inputs(k), getattr(weight, "bits", 4)) >= k:
            fmt = "int8"  # padded to whole steps, a narrow matrix's codes would outweigh its int8 rows
        if isinstance(weight, GroupCodes) and fmt != "codes":
            weight = weight.dequantize()
        # int8 rows run on the kernels in whole 64-input steps; codes in any whole groups (_kernel_inputs)
        kernels = cpu_kernels() if fmt in ("int4", "codes") or (fmt == "int8" and k % KERNEL_INT8_MULTIPLE == 0) \
            else None
        padding = _kernel_inputs(k) - k if kernels and fmt in ("int4", "codes") else 0
        if fmt in ("float32", "bf16") and not isinstance(weight, torch.Tensor):
            weight = weight[0:weight.shape[0]]  # a lazy row source (model.GGUFRows): read it all
        if fmt == "float32":
            built = cls(fmt, weight.float().contiguous(), bias=bias)
        elif fmt == "bf16":
            built = cls(fmt, weight.to(torch.bfloat16).contiguous(), bias=bias)
        elif fmt == "int8":
            q, s = quantize_int8_rows(weight)
            built = cls(fmt, q, s.to(torch.bfloat16), bias, kernels)
        elif fmt == "int4" and kernels:
            built = cls(fmt, _codes_4bit_chunked(weight, k + padding), None, bias, kernels, padding)
        elif fmt == "int4":
            built = cls(fmt, *_pack_int4(weight), bias)
        elif fmt == "codes":
            codes = weight.padded(k + padding) if padding else weight
            built = cls(f"int{weight.bits}", _pack_codes(codes), None, bias, kernels, padding)
        else:
            raise ValueError(f"unknown weight format {fmt!r}")
        return built.to(device)

    def to(self, device) -> Linear:
        move = lambda t: None if t is None else t.to(device)
        return Linear(self.fmt, move(self.weight), move(self.scale), move(self.bias), self.kernels, self.padding)

    def __call__(self, x: torch.Tensor, dense_from_rows: float = DENSE_FROM_ROWS) -> torch.Tensor:
        """x [rows, in] float32 or bf16 -> [rows, out]: float32 for the float32 format, from OpenLPU's CPU
        kernels and where many rows multiply in float32 (dense_dtype), else bf16. From `dense_from_rows` rows a
        low-bit matrix is dequantized for the call and multiplied densely."""
        if self.fmt == "float32":
            return F.linear(x.float(), self.weight, self.bias)
        if self.padding:
            x = F.pad(x, (0, self.padding))
        if self.kernels is not None and x.shape[0] < dense_from_rows:
            if self.fmt == "int8":
                y = self.kernels.int8_linear(x.contiguous(), self.weight, self.scale)
            else:
                y = self.kernels.code_linear(x.contiguous(), self.weight, CODE_BITS[self.fmt])
            return y if self.bias is None else y + self.bias
        # dequantized for this call and multiplied densely, or torch's weight-only kernels (bf16 only)
        codes = self.fmt in CODE_BITS and self.kernels is not None  # (torch's int4 is fmt int4 too)
        dense = codes or (self.fmt == "int8" and (x.shape[0] >= dense_from_rows or x.shape[1] % INT8PACK_MULTIPLE))
        dtype = dense_dtype() if dense else torch.bfloat16
        if x.dtype != dtype:  # (a cast to its own dtype still costs a dispatch)
            x = x.to(dtype)
        if self.fmt == "bf16":
            y = F.linear(x, self.weight)
        elif codes:
            y = F.linear(x, self.kernels.code_dequantize(self.weight, CODE_BITS[self.fmt], x.shape[1],
                                                         dtype == torch.float32))
        elif dense:
            y = F.linear(x, self.weight.to(dtype).mul_(self.scale[:, None]))
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scale)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.weight, self.scale, self.bias) if t is not None)
