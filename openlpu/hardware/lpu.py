"""LPU systems as dataclasses that mirror the physical tree: system -> racks -> nodes -> chips -> units/links.

A preset (presets/<name>.json, "kind": "lpu") gives every figure as {"value", "source", "confidence"}
so each number carries where it came from. Loading checks every field: a missing, unknown or
mistyped one is one clear OpenLPUError naming it.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from openlpu.errors import OpenLPUError
from openlpu.hardware.spec_file import build, check_energy_per_op, read_hardware

LINK_KINDS = ("local", "rack", "system")  # inside a node, between nodes of a rack, between racks
TOPOLOGIES = ("dragonfly",)  # networks the cabling and route() below model
# figures that may be 0: a node of one chip has no local links
MAY_BE_ZERO = frozenset({("NodeSpec", "local_links_per_chip")})


@dataclass(frozen=True)
class ChipSpec:
    name: str
    clock_hz: float
    sram_bytes: int
    sram_bandwidth_bytes_per_s: float
    matrix_macs_per_cycle: dict[str, float]  # by operand precision the matrix unit supports natively
    # Weight bytes per cycle the matrix unit can install into its weight buffers, all planes together. A
    # weight-stationary MXM must install a tile before it multiplies with it; at batch 1 each installed
    # byte serves one vector, so this rate, not the MAC rate or the SRAM bandwidth, bounds decode.
    matrix_install_bytes_per_cycle: float
    # Rows (= columns) of one weight tile of the matrix unit. The compiler cuts an MLP between stages at
    # whole tiles of d_ff rows, a tile part empty wasting installs, but for the last part of an MLP cut
    # where stages fill, which keeps the rows left (partition).
    matrix_tile_rows: int
    vector_ops_per_cycle: float
    switch_bytes_per_cycle: float
    idle_power_w: float
    busy_power_w: float  # sustained with its units busy: at most the chip's TDP (a peak above it is not sustained)
    price_usd: float

    @property
    def sram_bytes_per_cycle(self) -> float:
        return self.sram_bandwidth_bytes_per_s / self.clock_hz


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_bytes_per_s: float  # one direction
    latency_s: float  # one hop


@dataclass(frozen=True)
class NodeSpec:
    chips: int
    local_links_per_chip: int  # full mesh inside the node
    global_links_per_chip: int  # to other nodes and racks
    host_power_w: float
    host_price_usd: float


@dataclass(frozen=True)
class RackSpec:
    nodes: int


@dataclass(frozen=True)
class NetworkSpec:
    topology: str
    max_racks: int


@dataclass(frozen=True)
class SystemSpec:
    name: str
    description: str
    chip: ChipSpec
    node: NodeSpec
    rack: RackSpec
    network: NetworkSpec
    links: dict[str, LinkSpec]  # by LINK_KINDS
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # "lpu-v1.chip.clock_hz" -> source

    def __post_init__(self):
        if (cabling := self.cabling_error()) is not None:
            raise OpenLPUError(f"{self.name}: {cabling}")

    @property
    def chips_per_rack(self) -> int:
        return self.node.chips * self.rack.nodes

    @property
    def max_chips(self) -> int:
        return self.chips_per_rack * self.network.max_racks

    def node_of(self, chip: int) -> int:
        return chip // self.node.chips

    def rack_of(self, chip: int) -> int:
        return chip // self.chips_per_rack

    def link_kind(self, a: int, b: int) -> str:
        """Which kind of link a single hop between chips a and b uses."""
        if self.node_of(a) == self.node_of(b):
            return "local"
        return "rack" if self.rack_of(a) == self.rack_of(b) else "system"

    # ---- cabling: which chip holds each link between nodes -----------------------------------------
    # Inside a node the chips form a full mesh. Inside a rack every pair of nodes has one link, and every
    # pair of racks (up to network.max_racks) has one: a Dragonfly with racks as its groups (ISCA 2022).
    # Which chip holds which link is not published; here a node's links to the other nodes of its rack
    # take its chips' first global ports, a link per chip in turn, the previous nodes (n - 1, n - 2, ...)
    # from its first chip on, the next nodes (n + 1, n + 2, ...) from its last chip back, and a rack's
    # links to other racks the ports left, forward neighbours (rack r + 1, r + 2, ...) from the rack's last
    # chip back, backward neighbours (r - 1, ...) from its first chip on. So a pipeline running through
    # consecutive nodes and racks crosses each boundary in one global hop, from the last chip of a node or
    # rack to the first of the next, and a deployment that ends in part of a node still holds that node's
    # link to the node before it.
    @property
    def rack_links_per_chip(self) -> int:
        return -(-(self.rack.nodes - 1) // self.node.chips)

    @property
    def system_links_per_chip(self) -> int:
        return self.node.global_links_per_chip - self.rack_links_per_chip

    @property
    def system_ports_per_rack(self) -> int:
        """Global links a rack has left for the other racks."""
        return self.chips_per_rack * self.system_links_per_chip

    def cabling_error(self) -> str | None:
        """Why the global links cannot cable the rack and the racks as above, or None."""
        if self.system_links_per_chip < 0:
            return (f"a rack of {self.rack.nodes} nodes needs {self.rack_links_per_chip} global links per chip to join "
                    f"its nodes pairwise, but node.global_links_per_chip is {self.node.global_links_per_chip}")
        ports = self.system_ports_per_rack
        if self.network.max_racks - 1 > ports:
            return (f"network.max_racks {self.network.max_racks} needs {self.network.max_racks - 1} links from each "
                    f"rack to the others, but its {self.chips_per_rack} chips have {ports} global links left after "
                    f"joining the rack's nodes; lower network.max_racks to at most {ports + 1} or raise "
                    f"node.global_links_per_chip")
        return None

    def _rack_gateway(self, node: int, to_node: int) -> int:
        """The chip of `node` holding its link to `to_node`, a node of the same rack."""
        chips = self.node.chips
        if to_node < node:  # the k-th node before takes port k - 1, from the first chip on
            slot = node - to_node - 1
        else:  # the k-th node after takes the k-th port from the last, from the last chip back
            slot = chips * self.rack_links_per_chip - (to_node - node)
        return node * chips + slot % chips

    def _system_gateway(self, rack: int, to_rack: int) -> int:
        """The chip of `rack` holding its link to `to_rack`."""
        racks = self.network.max_racks
        offset = (to_rack - rack) % racks
        port = self.system_ports_per_rack - offset if offset <= racks // 2 else racks - offset - 1
        return rack * self.chips_per_rack + port // self.system_links_per_chip

    def route(self, src: int, dst: int) -> tuple[int, ...]:
        """Chips a vector visits from src to dst, over the cabling above: direct inside a node; between
        nodes of a rack, through the chip of each node that holds their link; between racks, to the chip
        holding the link between the racks and from the chip at its other end on to dst."""
        if src == dst:
            return (src,)
        if self.node_of(src) == self.node_of(dst):
            return (src, dst)
        if self.rack_of(src) == self.rack_of(dst):
            hops = (src, self._rack_gateway(self.node_of(src), self.node_of(dst)),
                    self._rack_gateway(self.node_of(dst), self.node_of(src)), dst)
            return tuple(c for i, c in enumerate(hops) if i == 0 or c != hops[i - 1])
        exit_chip = self._system_gateway(self.rack_of(src), self.rack_of(dst))
        entry_chip = self._system_gateway(self.rack_of(dst), self.rack_of(src))
        return self.route(src, exit_chip) + self.route(entry_chip, dst)

    def route_via(self, src: int, dst: int, node: int) -> tuple[int, ...]:
        """Chips a vector visits from src to dst, two nodes of a rack, through a third node of it."""
        entry = self._rack_gateway(node, self.node_of(src))
        return self.route(src, entry) + self.route(entry, dst)[1:]

    def linked_chips(self, chip: int) -> list[int]:
        """The chips `chip` has a link to: the rest of its node, and those at the other end of its global links."""
        node, rack = self.node_of(chip), self.rack_of(chip)
        first_node = rack * self.rack.nodes
        out = [c for c in range(node * self.node.chips, (node + 1) * self.node.chips) if c != chip]
        out += [self._rack_gateway(other, node) for other in range(first_node, first_node + self.rack.nodes)
                if other != node and self._rack_gateway(node, other) == chip]
        racks, ports, half = self.network.max_racks, self.system_ports_per_rack, self.network.max_racks // 2
        for port in range((chip - rack * self.chips_per_rack) * self.system_links_per_chip,
                          (chip - rack * self.chips_per_rack + 1) * self.system_links_per_chip):
            # _system_gateway inverted: forward neighbours from the last port back, backward from the first on
            if port >= ports - half:
                out.append(self._system_gateway((rack + ports - port) % racks, rack))
            elif port < racks - 1 - half:
                out.append(self._system_gateway((rack + racks - 1 - port) % racks, rack))
        return out

    def route_within(self, src: int, dst: int, held: frozenset[int]) -> tuple[int, ...] | None:
        """The route from src to dst of least latency over links between chips in `held` (None if there is
        none): where route() would pass a chip a deployment lacks, such as a missing card of a node it holds
        in part."""
        best, heap = {src: 0.0}, [(0.0, src, (src,))]
        while heap:
            latency, chip, path = heapq.heappop(heap)
            if chip == dst:
                return path
            if latency > best[chip]:
                continue
            for other in self.linked_chips(chip):
                step = latency + self.links[self.link_kind(chip, other)].latency_s
                if other in held and step < best.get(other, math.inf):
                    best[other] = step
                    heapq.heappush(heap, (step, other, path + (other,)))
        return None

    def route_latency_s(self, route: tuple[int, ...]) -> float:
        """The latency of a route's hops (route(): the chips visited), each its link kind's."""
        return sum(self.links[self.link_kind(a, b)].latency_s for a, b in itertools.pairwise(route))


# ---- loading ------------------------------------------------------------------------------------
def load_system(name_or_path: str | Path) -> SystemSpec:
    """An LPU system from a preset name (e.g. "lpu-v1") or a path to a hardware JSON file."""
    return system_from(*read_hardware(name_or_path, "lpu"))


def system_from(data: dict, name: str, figures: bool = True) -> SystemSpec:
    """An LPU system from a hardware file's fields (`figures`: each {"value", "source", "confidence"}; else
    values alone, as a Program keeps them), every one checked; errors name `name`."""
    sources: dict[str, str] = {}
    system = build(SystemSpec, data, name, sources, MAY_BE_ZERO, {"links": LINK_KINDS}, figures)
    if system.chip.busy_power_w < system.chip.idle_power_w:
        raise OpenLPUError(f"{name}: chip.busy_power_w must be at least chip.idle_power_w")
    chip = system.chip
    check_energy_per_op(f"{name}.chip.busy_power_w", chip.busy_power_w,
                        2 * max(chip.matrix_macs_per_cycle.values()) * chip.clock_hz)
    if system.network.topology not in TOPOLOGIES:
        raise OpenLPUError(f"{name}: network.topology {system.network.topology!r} is not a network OpenLPU models; "
                           f"its links are cabled and routed as a Dragonfly with racks as its groups (ISCA 2022): "
                           f"use one of {', '.join(map(repr, TOPOLOGIES))}")
    if system.node.local_links_per_chip != system.node.chips - 1:  # route() joins a node's chips directly
        raise OpenLPUError(f"{name}: node.local_links_per_chip must be node.chips - 1 "
                           f"({system.node.chips - 1}): the chips of a node form a full mesh")
    return dataclasses.replace(system, sources=sources)
