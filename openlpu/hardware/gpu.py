"""GpuSpec: the GPUs OpenLPU compares an LPU system against, read from presets/*.json.

Each preset figure is {"value", "source", "confidence"}; prices are estimates and say so.
GPU presets carry "kind": "gpu" so they can share the presets folder with LPU systems.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from openlpu.errors import OpenLPUError

PRESETS_DIR = Path(__file__).parent / "presets"
FIGURES = ("hbm_bytes", "hbm_bandwidth_bytes_per_s", "dense_flops_per_s", "nvlink_bandwidth_bytes_per_s",
           "tdp_w", "price_usd", "gpus_per_server", "server_price_usd", "server_power_w")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    description: str
    hbm_bytes: float
    hbm_bandwidth_bytes_per_s: float
    dense_flops_per_s: dict  # precision -> dense tensor-core throughput (no sparsity)
    nvlink_bandwidth_bytes_per_s: float  # per GPU, each direction
    tdp_w: float
    price_usd: float  # estimate
    gpus_per_server: int
    server_price_usd: float  # the whole 8-GPU server, GPUs included
    server_power_w: float  # maximum at the plug, GPUs included
    sources: dict = field(default_factory=dict, compare=False)  # figure -> (source, confidence)

    def compute_flops_per_s(self, precision: str) -> float:
        """Tensor throughput for math in `precision`; weight-only formats the GPU has no units for
        (e.g. fp8 on A100, int4 anywhere) run their math in bf16 after dequantising, as
        TensorRT-LLM's weight-only kernels do."""
        return self.dense_flops_per_s.get(precision, self.dense_flops_per_s["bf16"])


def gpu_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json")
                  if json.loads(p.read_text()).get("kind") == "gpu")


def load_gpu(name: str) -> GpuSpec:
    """A GPU preset by name (see presets/*.json with "kind": "gpu" for every figure's source)."""
    path = PRESETS_DIR / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("kind") != "gpu":
        close = difflib.get_close_matches(name, gpu_names(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise OpenLPUError(f"unknown GPU {name!r}{hint} (known GPUs: {', '.join(gpu_names())})")
    missing = [f for f in FIGURES if f not in data]
    if missing:
        raise OpenLPUError(f"{path}: missing figure(s) {', '.join(missing)}")
    values = {f: data[f]["value"] for f in FIGURES}
    values["gpus_per_server"] = int(values["gpus_per_server"])
    sources = {f: (data[f]["source"], data[f]["confidence"]) for f in FIGURES}
    return GpuSpec(name=data["name"], description=data["description"], sources=sources, **values)
