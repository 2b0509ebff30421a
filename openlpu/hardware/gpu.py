"""GpuSpec: the GPUs OpenLPU compares an LPU system against, read from presets/*.json or a JSON file of
the same shape (your own GPU, or a preset with your price).

Each figure is {"value", "source", "confidence"}; prices are estimates and say so. GPU presets carry
"kind": "gpu" so they can share the presets folder with LPU systems. Loading checks every field as
an LPU system's are (spec_file): a missing, unknown or mistyped one is one clear OpenLPUError.
Costs read the server's price and power, which hold its GPUs (NVIDIA sells these on 8-GPU boards), so
a server figure below its GPUs' own is refused rather than priced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from openlpu.errors import OpenLPUError
from openlpu.hardware.spec_file import (
    build,
    check_energy_per_op,
    preset_names,
    read_hardware,
)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    description: str
    hbm_bytes: float
    hbm_bandwidth_bytes_per_s: float
    dense_flops_per_s: dict[str, float]  # precision -> dense tensor-core throughput (no sparsity)
    nvlink_bandwidth_bytes_per_s: float  # per GPU, each direction
    tdp_w: float  # one GPU's; server_power_w, which holds them, is what power reads
    price_usd: float  # estimate; one GPU's, as server_price_usd, which holds them, is what capex reads
    gpus_per_server: int
    server_price_usd: float  # the whole 8-GPU server, GPUs included
    server_power_w: float  # maximum at the plug, GPUs included
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # "h100-sxm.tdp_w" -> source

    def compute_flops_per_s(self, precision: str) -> float:
        """Tensor throughput for math in `precision`; weight-only formats the GPU has no units for
        (e.g. fp8 on A100, int4 anywhere) run their math in bf16 after dequantising, as
        TensorRT-LLM's weight-only kernels do. Wider math than bf16 (fp32) the preset gives no rate for."""
        from openlpu.graph.lower import as_precision

        if precision in self.dense_flops_per_s:
            return self.dense_flops_per_s[precision]
        if as_precision(precision).bytes_per_element > 2:
            raise OpenLPUError(f"{self.name} gives no tensor throughput for {precision} math (it gives "
                               f"{', '.join(self.dense_flops_per_s)}); choose --precision bf16 or narrower")
        return self.dense_flops_per_s["bf16"]


def gpu_names() -> list[str]:
    return preset_names("gpu")


def load_gpu(name_or_path: str | Path) -> GpuSpec:
    """A GPU from a preset name (e.g. "h100-sxm"; see presets/*.json with "kind": "gpu" for every figure's
    source) or a path to a JSON file shaped like one."""
    data, name = read_hardware(name_or_path, "gpu")
    sources: dict[str, str] = {}
    gpu = build(GpuSpec, data, name, sources)
    if "bf16" not in gpu.dense_flops_per_s:  # compute_flops_per_s falls back to it
        raise OpenLPUError(f"{name}.dense_flops_per_s must give bf16: math in a format the GPU has no units for "
                           "runs in bf16")
    check_energy_per_op(f"{name}.tdp_w", gpu.tdp_w, max(gpu.dense_flops_per_s.values()))
    for server_figure, gpu_figure in (("server_price_usd", "price_usd"), ("server_power_w", "tdp_w")):
        held = gpu.gpus_per_server * getattr(gpu, gpu_figure)
        if getattr(gpu, server_figure) < held:
            raise OpenLPUError(
                f"{name}.{server_figure} {getattr(gpu, server_figure):,g} is less than its {gpu.gpus_per_server} "
                f"GPUs' {gpu_figure} ({held:,g}); costs read {server_figure}, the whole server's: raise it, or "
                f"check that {gpu_figure} is one GPU's, in the unit its name ends in")
    return dataclasses.replace(gpu, sources=sources)
