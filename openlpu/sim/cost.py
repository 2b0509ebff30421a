"""What a deployment costs: capex, power at the wall, opex, TCO over N years and $ per million tokens.

The same arithmetic prices an LPU system (chips in host nodes, nodes in racks, direct chip-to-chip
cables) and a GPU system (8-GPU servers, racks, an InfiniBand fabric once there is more than one
server). Every default below is an assumption, named, and sourced where a public figure exists (the rest
say ESTIMATE); callers override any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from openlpu.errors import OpenLPUError

SECONDS_PER_YEAR = 365 * 24 * 3600
HOURS_PER_YEAR = 365 * 24

# ESTIMATE: a 42U rack with PDUs and cabling, installed; no vendor publishes one price.
RACK_USD = 20_000
# ESTIMATE: per GPU server in a multi-server deployment: 8 x 400G InfiniBand NICs, optics and its
# share of leaf switches (~$3k per port-NIC pair). One-server systems need none.
GPU_FABRIC_USD_PER_SERVER = 25_000
# ESTIMATE: per LPU node: the passive chip-to-chip cables of its global links (no switches exist in
# Groq's network, ISCA 2022).
LPU_CABLES_USD_PER_NODE = 2_000
# ESTIMATE: GPU servers per rack, for every GPU: 4 DGX H100 at their 10.2 kW maximum draw about 41 kW;
# 4 DGX B200 at 14.3 kW, 57 kW, a rack cooled by liquid or rear-door exchangers.
GPU_SERVERS_PER_RACK = 4


# What a deployment could have, per assumption: (least, most, what they are); a value outside is a slip, and was
# priced as given (a review found $1.5e301 per million tokens over 1e-300 years)
ASSUMPTION_RANGES = {
    "years": (1 / 365, 100, "a day to a century"),
    "usd_per_kwh": (0, 10, "dollars per kWh; grids charge cents"),
    "pue": (1, 3, "wall power / IT power; the Uptime Institute's 2023 survey averages 1.58"),
    "utilisation": (0, 1, "a fraction of the hours"),
}


@dataclass(frozen=True)
class CostAssumptions:
    years: float = 3.0  # depreciation period; the critiques of Feb 2024 used 3 years
    usd_per_kwh: float = 0.10  # US industrial electricity was ~$0.08-0.09/kWh in 2023 (EIA); + margin
    pue: float = 1.3  # power usage effectiveness; Uptime Institute 2023 survey average 1.58, new builds ~1.2-1.4
    utilisation: float = 0.5  # fraction of the hours the system serves at its modelled throughput

    def __post_init__(self):
        for f, (least, most, what) in ASSUMPTION_RANGES.items():  # named with plan's flag for each
            v, named = getattr(self, f), f"cost assumption {f} (--{f.replace('_', '-')})"
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise OpenLPUError(f"{named} must be a positive, finite number, got {v!r}")
            if not least <= v <= most:
                span = f"at least {least:.4g}" if v < least else f"at most {most:g}"
                raise OpenLPUError(f"{named} must be {span} ({what}), got {v!r}")


@dataclass(frozen=True)
class Capex:
    accelerators_usd: float  # LPU cards, or GPU servers (NVIDIA sells the GPUs in 8-GPU boards)
    hosts_usd: float  # LPU host servers; included in the GPU server price
    racks_usd: float
    network_usd: float

    @property
    def total_usd(self) -> float:
        return self.accelerators_usd + self.hosts_usd + self.racks_usd + self.network_usd


@dataclass(frozen=True)
class Cost:
    capex: Capex
    it_power_w: float
    wall_power_w: float
    energy_usd_per_year: float
    tco_usd: float  # capex + energy over `years`
    tokens_per_year: float
    usd_per_million_tokens: float


def paid_for(filled: float, whole: int | None = None) -> float:
    """Units (nodes, servers, racks) a deployment pays for, filling `filled` of them: a share of one it fills in
    part (the rest serve other models), else the `whole` ones it stands in (default: as few as hold it)."""
    whole = math.ceil(filled) if whole is None else whole
    return filled if whole <= 1 else float(whole)


def lpu_nodes_held(system, chips: int, nodes: int) -> float:
    """Nodes a deployment of `chips` chips standing in `nodes` nodes pays for: their hosts and the hosts' power."""
    return paid_for(chips / system.node.chips, nodes)


def lpu_capex(system, chips: int, nodes: int | None = None, racks: int | None = None) -> Capex:
    """`system`: hardware.lpu.SystemSpec. Nodes (default: as few as hold the chips) and racks (default: as few
    as hold the nodes, or those a Program's chips stand in, which TP groups spanning nodes may leave in part
    empty), each paid_for."""
    nodes = math.ceil(chips / system.node.chips) if nodes is None else nodes
    racks = math.ceil(nodes / system.rack.nodes) if racks is None else racks
    held = lpu_nodes_held(system, chips, nodes)
    return Capex(accelerators_usd=chips * system.chip.price_usd,
                 hosts_usd=held * system.node.host_price_usd,
                 racks_usd=paid_for(held / system.rack.nodes, racks) * RACK_USD,
                 network_usd=nodes * LPU_CABLES_USD_PER_NODE if nodes > 1 else 0.0)


def gpu_servers(gpu, gpus: int) -> float:
    """Servers a deployment of `gpus` GPUs pays for (paid_for)."""
    return paid_for(gpus / gpu.gpus_per_server)


def gpu_capex(gpu, gpus: int) -> Capex:
    """`gpu`: hardware.gpu.GpuSpec. NVIDIA sells these GPUs on 8-GPU boards inside servers."""
    servers = gpu_servers(gpu, gpus)
    return Capex(accelerators_usd=servers * gpu.server_price_usd, hosts_usd=0.0,
                 racks_usd=paid_for(servers / GPU_SERVERS_PER_RACK) * RACK_USD,
                 network_usd=servers * GPU_FABRIC_USD_PER_SERVER if servers > 1 else 0.0)


def energy_usd(it_power_w: float, years: float, a: CostAssumptions) -> float:
    """Electricity for `years` of round-the-clock operation at `it_power_w`, PUE included."""
    return it_power_w * a.pue / 1000 * HOURS_PER_YEAR * years * a.usd_per_kwh


def cost(capex: Capex, it_power_w: float, throughput_tokens_per_s: float,
         a: CostAssumptions = CostAssumptions()) -> Cost:
    """TCO over a.years and $ per million tokens served at a.utilisation of the modelled throughput.
    Power is drawn round the clock (an idle inference system is still powered)."""
    if not throughput_tokens_per_s > 0:
        raise OpenLPUError("throughput must be positive to price tokens")
    per_year = energy_usd(it_power_w, 1.0, a)
    tco = capex.total_usd + per_year * a.years
    tokens_per_year = throughput_tokens_per_s * a.utilisation * SECONDS_PER_YEAR
    usd_per_million_tokens = tco / (tokens_per_year * a.years) * 1e6
    if not (math.isfinite(tco) and 0 < usd_per_million_tokens < math.inf):
        given = ", ".join(f"{f} {getattr(a, f)!r}" for f in ASSUMPTION_RANGES)
        raise OpenLPUError(f"the cost assumptions ({given}) price no finite cost per token; give values a deployment "
                           f"could have")
    return Cost(capex=capex, it_power_w=it_power_w, wall_power_w=it_power_w * a.pue,
                energy_usd_per_year=per_year, tco_usd=tco, tokens_per_year=tokens_per_year,
                usd_per_million_tokens=usd_per_million_tokens)
