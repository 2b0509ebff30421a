"""LPU hardware presets: published figures, and one clear error per bad hardware file."""

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest

from openlpu.compiler import Workload, compile_program
from openlpu.compiler.verify import verify
from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import load_system
from openlpu.hardware.spec_file import PRESETS_DIR
from openlpu.models.spec import load_preset

V1 = json.loads((PRESETS_DIR / "lpu-v1.json").read_text())


def test_lpu_v1_matches_published_figures():
    s = load_system("lpu-v1")
    clock = s.chip.clock_hz
    # product brief: 750 TOPS INT8 and 188 TFLOPS FP16 at 900 MHz (a MAC is 2 ops)
    assert 2 * s.chip.matrix_macs_per_cycle["int8"] * clock == pytest.approx(750e12, rel=0.02)
    assert 2 * s.chip.matrix_macs_per_cycle["fp16"] * clock == pytest.approx(188e12, rel=0.03)
    # ISCA 2022: up to 10,440 chips; ALCF: 72 chips per rack
    assert s.max_chips == 10440 and s.chips_per_rack == 72
    assert s.chip.sram_bytes == 230_000_000


def test_install_rate_lies_within_its_published_bounds():
    """The fitted weight-install rate: at least one 320-byte vector per MXM plane (4 planes) per cycle
    (ISCA 2020), at most what the SRAM can deliver (80 TB/s product brief)."""
    chip = load_system("lpu-v1").chip
    assert 4 * 320 <= chip.matrix_install_bytes_per_cycle <= chip.sram_bytes_per_cycle
    assert "fitted" in load_system("lpu-v1").sources["lpu-v1.chip.matrix_install_bytes_per_cycle"]


def test_every_figure_carries_a_source():
    s = load_system("lpu-v1")
    figures = [f"chip.{k}" for k in V1["chip"] if k != "name"] + [f"node.{k}" for k in V1["node"]]
    figures += [f"links.{kind}.{k}" for kind in V1["links"] for k in V1["links"][kind]]
    assert all(f"lpu-v1.{f}" in s.sources for f in figures)
    for f, src in s.sources.items():
        if src.endswith(("[ESTIMATE]", "[L]")):
            assert "ESTIMATE" in src, f  # a guess says it is one


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_field_is_named(tmp_path):
    data = json.loads(json.dumps(V1))
    del data["chip"]["sram_bytes"]
    with pytest.raises(OpenLPUError, match=r"chip: missing field 'sram_bytes'"):
        load_system(_write(tmp_path, data))


def test_misspelt_field_suggests_the_closest(tmp_path):
    data = json.loads(json.dumps(V1))
    data["chip"]["clok_hz"] = data["chip"].pop("clock_hz")
    with pytest.raises(OpenLPUError, match=r"unknown field 'clok_hz'; did you mean 'clock_hz'"):
        load_system(_write(tmp_path, data))


@pytest.mark.parametrize("value", ["fast", -5, 0, True, None])
def test_mistyped_value_is_named(tmp_path, value):
    data = json.loads(json.dumps(V1))
    data["links"]["local"]["bandwidth_bytes_per_s"]["value"] = value
    with pytest.raises(OpenLPUError, match=r"links\.local\.bandwidth_bytes_per_s must be a positive number"):
        load_system(_write(tmp_path, data))


@pytest.mark.parametrize("value", [1e308, 1e-300, 10**400])
def test_a_figure_beyond_any_hardware_is_named(tmp_path, value):
    """A latency of 1e308 s passed as positive and overflowed the schedule's cycle count (a random mutation
    of the preset found it); an integer of 400 digits, which no float holds, is named the same way."""
    data = json.loads(json.dumps(V1))
    data["links"]["local"]["latency_s"]["value"] = value
    with pytest.raises(OpenLPUError, match=r"links\.local\.latency_s = .* s is outside the range a hardware "
                                           r"figure in s takes here \(1e-11 to 1\); check that it is given in s"):
        load_system(_write(tmp_path, data))


@pytest.mark.parametrize("field, value, unit", [
    (("chip", "clock_hz"), 900, "Hz"),  # MHz
    (("chip", "sram_bytes"), 230, "bytes"),  # MB
    (("chip", "sram_bandwidth_bytes_per_s"), 80, "bytes/s"),  # TB/s
    (("links", "local", "latency_s"), 100, "s"),  # ns
    (("links", "local", "bandwidth_bytes_per_s"), 14, "bytes/s"),  # GB/s
    (("node", "host_power_w"), 2e7, "W"),  # mW
])
def test_a_figure_in_a_larger_unit_is_named(tmp_path, field, value, unit):
    """A figure written in the unit a datasheet gives (a clock of 900 for 900 MHz) passed as a positive number
    and planned at a clock of 900 Hz: 0 tok/s per user, TTFT 904,911 ms (a review). Each is refused by the
    range of the unit its field's name ends in."""
    data = json.loads(json.dumps(V1))
    figure = data
    for key in field:
        figure = figure[key]
    figure["value"] = value
    with pytest.raises(OpenLPUError, match=rf"{re.escape('.'.join(field))} = {value!r} {re.escape(unit)} is outside "
                                           rf"the range a hardware figure in {re.escape(unit)} takes here \("):
        load_system(_write(tmp_path, data))


def test_a_chip_power_in_kilowatts_is_named(tmp_path):
    """lpu-v1's 215 W written as 0.215 (kW) passed the W range, which edge chips need, and planned 0.0 kW for
    40 chips (a review): 0.215 W for its 737 TOPS would be 0.29 fJ an operation, a thousandth of its own."""
    data = json.loads(json.dumps(V1))
    data["chip"]["busy_power_w"]["value"], data["chip"]["idle_power_w"]["value"] = 0.215, 0.1
    with pytest.raises(OpenLPUError, match=r"^hw\.chip\.busy_power_w = 0\.215 W for 7\.37e\+14 matrix operations per "
                                           r"second is 0\.29 fJ per operation, below the 1 fJ any chip spends; check "
                                           r"that it is given in W \(not kW\)$"):
        load_system(_write(tmp_path, data))


def test_a_field_given_twice_is_named(tmp_path):
    """JSON keeps the last of a key given twice: a chip with two clocks planned at the second, silently (a
    review)."""
    text = json.dumps(V1)
    clock = '"clock_hz": ' + json.dumps(V1["chip"]["clock_hz"])
    twice = text.replace(clock, clock.replace("900000000", "1800000000") + ", " + clock)
    assert twice.count('"clock_hz"') == 2
    path = tmp_path / "hw.json"
    path.write_text(twice)
    with pytest.raises(OpenLPUError, match=r"^hardware file hw\.json: field 'clock_hz' is given twice in one object; "
                                           r"keep one$"):
        load_system(path)


def test_every_preset_figure_is_in_its_units_range(tmp_path):
    """The ranges leave room for every figure OpenLPU ships, the projected chip's included, and for real chips
    far from them: a wafer-scale chip's 21 PB/s of SRAM bandwidth (Cerebras WSE-3), an edge chip's 64 KB of
    SRAM at half a watt and 80 cents, a link across sites of 20 ms (each refused at first; a review)."""
    from openlpu.hardware.gpu import load_gpu
    from openlpu.hardware.spec_file import preset_names

    for name in preset_names("lpu"):
        load_system(name)
    for name in preset_names("gpu"):
        load_gpu(name)
    data = json.loads(json.dumps(V1))
    data["chip"]["sram_bandwidth_bytes_per_s"]["value"] = 2.1e16
    data["links"]["system"]["latency_s"]["value"] = 0.02
    load_system(_write(tmp_path, data))
    edge = json.loads(json.dumps(V1))  # and at half a watt, a 64 x 64 int8 array (4 TOPS/W, 0.12 pJ an operation)
    for figure, value in (("sram_bytes", 65536), ("busy_power_w", 0.5), ("idle_power_w", 0.05), ("price_usd", 0.8),
                          ("matrix_macs_per_cycle", {"int8": 4096})):
        edge["chip"][figure]["value"] = value
    load_system(_write(tmp_path, edge))


def test_a_copy_of_a_preset_is_told_apart_from_it(tmp_path):
    """A copy of lpu-v1 at other prices keeps its "name": its columns and errors were headed 'lpu-v1', as the
    preset's are (a review). Now its file is named beside it."""
    data = json.loads(json.dumps(V1))
    data["chip"]["price_usd"]["value"] = 5000
    path = tmp_path / "mylpu.json"
    path.write_text(json.dumps(data))
    assert load_system(path).name == "lpu-v1 (mylpu.json)"
    assert load_system("lpu-v1").name == "lpu-v1"
    data["node"]["chips"]["value"] = 4
    data["node"]["local_links_per_chip"]["value"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(OpenLPUError, match=r"^lpu-v1 \(mylpu\.json\): "):
        load_system(path)


def test_a_broken_copy_named_like_a_preset_is_named_with_its_path(tmp_path):
    """A copy kept as lpu-v1.json in another folder, broken, was refused as 'lpu-v1.chip.clock_hz ...', as if the
    shipped preset were (a review): its path says which file to mend."""
    data = json.loads(json.dumps(V1))
    data["chip"]["clock_hz"]["value"] = 900
    path = tmp_path / "lpu-v1.json"
    path.write_text(json.dumps(data))
    with pytest.raises(OpenLPUError, match=rf"^lpu-v1 \({re.escape(str(path))}\)\.chip\.clock_hz = 900 Hz is outside"):
        load_system(path)
    assert load_system("lpu-v1").name == "lpu-v1"


def test_mistyped_precision_of_the_matrix_unit_is_named(tmp_path):
    data = json.loads(json.dumps(V1))
    data["chip"]["matrix_macs_per_cycle"]["value"]["int9"] = 409600
    with pytest.raises(OpenLPUError, match=r"chip\.matrix_macs_per_cycle: unknown precision 'int9'; did you mean"):
        load_system(_write(tmp_path, data))


def test_a_node_that_is_not_a_full_mesh_is_refused(tmp_path):
    data = json.loads(json.dumps(V1))
    data["node"]["chips"]["value"] = 4
    data["network"]["max_racks"]["value"] = 73  # 36 chips with 2 global links left each cable 72 other racks
    with pytest.raises(OpenLPUError, match=r"node\.local_links_per_chip must be node\.chips - 1 \(3\)"):
        load_system(_write(tmp_path, data))
    data["node"]["local_links_per_chip"]["value"] = 3
    assert load_system(_write(tmp_path, data)).node.chips == 4


def test_a_node_of_one_chip_has_no_local_links(tmp_path):
    """One card per host: the node's full mesh has no links, so 0 local links is the one valid count, and
    the file compiles (TP groups span nodes); a negative count is refused."""
    data = json.loads(json.dumps(V1))
    data["node"]["chips"]["value"], data["node"]["local_links_per_chip"]["value"] = 1, 0
    data["node"]["global_links_per_chip"]["value"] = 24  # 8 to join a rack's 9 nodes, 16 to other racks
    data["network"]["max_racks"]["value"] = 16
    system = load_system(_write(tmp_path, data))
    assert (system.node.chips, system.node.local_links_per_chip, system.max_chips) == (1, 0, 144)
    program = compile_program(load_preset("gemma-3-270m"), system, Workload(context_length=512, prompt_len=64), tp=2)
    assert program.placement.tp == 2 and verify(program) == []
    data["node"]["local_links_per_chip"]["value"] = -1
    with pytest.raises(OpenLPUError, match=r"node\.local_links_per_chip must be a non-negative number, got -1"):
        load_system(_write(tmp_path, data))


def test_global_links_too_few_to_cable_the_racks_are_refused(tmp_path):
    """With 1 global link per chip, a rack's 8 chips per node spend theirs joining the rack's 9 nodes
    pairwise, and nothing is left to join 145 racks."""
    data = json.loads(json.dumps(V1))
    data["node"]["global_links_per_chip"]["value"] = 1
    with pytest.raises(OpenLPUError, match=r"network\.max_racks 145 needs 144 links from each rack to the others, "
                                           r"but its 72 chips have 0 global links left .* at most 1 or raise"):
        load_system(_write(tmp_path, data))
    data["rack"]["nodes"]["value"] = 10
    with pytest.raises(OpenLPUError, match=r"a rack of 10 nodes needs 2 global links per chip"):
        load_system(_write(tmp_path, data))
    data["rack"]["nodes"]["value"], data["network"]["max_racks"]["value"] = 9, 1
    assert load_system(_write(tmp_path, data)).max_chips == 72


def test_a_network_other_than_a_dragonfly_is_refused(tmp_path):
    """The links are cabled and routed as a Dragonfly (SystemSpec.route); a file naming another network
    would be timed as a Dragonfly all the same, so it is refused, naming the one it may say."""
    data = json.loads(json.dumps(V1))
    data["network"]["topology"]["value"] = "torus"
    with pytest.raises(OpenLPUError, match=r"network\.topology 'torus' is not a network OpenLPU models.*'dragonfly'"):
        load_system(_write(tmp_path, data))
    data["network"]["topology"]["value"] = "dragonfly"
    assert load_system(_write(tmp_path, data)).network.topology == "dragonfly"


def test_figure_without_source_is_refused(tmp_path):
    data = json.loads(json.dumps(V1))
    data["node"]["chips"] = 8
    with pytest.raises(OpenLPUError, match=r"node\.chips must be an object with exactly value, source"):
        load_system(_write(tmp_path, data))


def test_unknown_system_name_suggests_the_closest():
    with pytest.raises(OpenLPUError, match=r"unknown LPU system 'lpu-v2'; did you mean lpu-v1"):
        load_system("lpu-v2")
    with pytest.raises(OpenLPUError, match=r"'h100-sxm' is a GPU, not an LPU system: give it with --compare"):
        load_system("h100-sxm")  # a GPU preset is not an LPU system


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OpenLPUError, match="not valid JSON"):
        load_system(bad)
    with pytest.raises(OpenLPUError, match="not found"):
        load_system(tmp_path / "missing.json")
    notes = tmp_path / "chips.txt"
    notes.write_text("230 MB of SRAM")
    with pytest.raises(OpenLPUError, match="is a file but not a hardware JSON file: give a .json file"):
        load_system(notes)
    with pytest.raises(OpenLPUError, match="cannot read hardware file .*: Not a directory"):
        load_system(notes / "lpu.json")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OpenLPUError, match="nested deeper than any hardware file is"):
        load_system(deep)


def test_routes_follow_the_topology():
    """Routes run over the Dragonfly's cables only: every chip reaches at most its 4 global links' worth
    of chips in other nodes, whatever pairs talk; a route crosses at most one rack link at each end and
    one link between racks; consecutive nodes, the hand-off of a pipeline, are one global hop apart."""
    s = load_system("lpu-v1")
    n, per_rack, racks = s.node.chips, s.chips_per_rack, s.network.max_racks
    assert s.route(0, 7) == (0, 7)  # full mesh inside a node
    assert s.link_kind(0, 9) == "rack" and s.link_kind(0, 72) == "system"
    nodes_of_some_racks = [c for r in (0, 1, 72, racks - 1) for c in range(r * per_rack, (r + 1) * per_rack, n)]
    pairs = [(a, b) for a in nodes_of_some_racks for b in nodes_of_some_racks]
    pairs += [(r * per_rack + 3, q * per_rack + 5) for r in range(racks) for q in range(racks)]
    peers: dict[int, set[int]] = {}
    for src, dst in pairs:
        path = s.route(src, dst)
        assert path[0] == src and path[-1] == dst and all(a != b for a, b in itertools.pairwise(path))
        kinds = [s.link_kind(a, b) for a, b in itertools.pairwise(path)]
        assert kinds.count("rack") <= 2 and kinds.count("system") <= 1
        assert kinds.count("system") == (s.rack_of(src) != s.rack_of(dst))
        for a, b in itertools.pairwise(path):
            if s.node_of(a) != s.node_of(b):
                peers.setdefault(a, set()).add(b)
                peers.setdefault(b, set()).add(a)
    assert max(len(p) for p in peers.values()) == s.node.global_links_per_chip
    for node in range(s.max_chips // n - 1):
        path = s.route(node * n, (node + 1) * n)
        assert sum(s.node_of(a) != s.node_of(b) for a, b in itertools.pairwise(path)) == 1


def _shaped(nodes: int, chips: int, global_links: int):
    """lpu-v1 with racks of `nodes` nodes of `chips` chips, each with `global_links` global links, 4 racks at most."""
    s = load_system("lpu-v1")
    return dataclasses.replace(s, rack=dataclasses.replace(s.rack, nodes=nodes),
                               node=dataclasses.replace(s.node, chips=chips, local_links_per_chip=chips - 1,
                                                        global_links_per_chip=global_links),
                               network=dataclasses.replace(s.network, max_racks=4))


@pytest.mark.parametrize("system", [
    load_system("lpu-v1"), load_system("lpu-v3-projected"), _shaped(2, 8, 4), _shaped(3, 8, 4), _shaped(20, 8, 4),
    _shaped(6, 4, 4), _shaped(5, 1, 24)], ids=lambda s: f"{s.rack.nodes}x{s.node.chips}")
def test_a_pipeline_hands_off_from_the_last_chip_of_a_node_to_the_first_of_the_next(system):
    """A pipeline running through consecutive nodes and racks crosses each boundary in one hop, from the last
    chip of one to the first of the next, whether a rack's nodes outnumber a node's chips by one (lpu-v1: 9
    nodes of 8), by more (lpu-v3-projected: 32 nodes of 8, each chip holding 4 of a node's 31 rack links: the
    link to the next node had landed on chip 6, a local hop from the last) or by fewer (2, 3, 6 nodes), or a
    node is one chip; and no chip holds more of its rack's links than its share."""
    n, nodes = system.node.chips, system.rack.nodes
    for boundary in range(n, 3 * system.chips_per_rack, n):
        assert system.route(boundary - 1, boundary) == (boundary - 1, boundary)
    rack_links = [sum(system.link_kind(c, d) == "rack" for d in system.linked_chips(c))
                  for c in range(system.chips_per_rack)]
    assert sum(rack_links) == nodes * (nodes - 1) and max(rack_links) == system.rack_links_per_chip


def test_linked_chips_are_the_single_hops_of_routes():
    """linked_chips inverts the cabling: d is linked to c exactly when the route from c to d is the one hop
    (c, d), for every pair of chips in two racks and between chips of racks far apart; the links pair up,
    and each chip has its node's 7 local links and at most its 4 global ones."""
    s = load_system("lpu-v1")
    per_rack, racks = s.chips_per_rack, s.network.max_racks
    chips = list(range(2 * per_rack)) + [r * per_rack + c for r in (40, 72, racks - 1) for c in (0, 1, 35, 70, 71)]
    for c in chips:
        linked = set(s.linked_chips(c))
        assert linked & set(chips) == {d for d in chips if d != c and s.route(c, d) == (c, d)}
        assert all(s.route(c, d) == (c, d) and c in s.linked_chips(d) for d in linked)
        outside = [d for d in linked if s.node_of(d) != s.node_of(c)]
        assert len(linked) - len(outside) == 7 and len(outside) <= s.node.global_links_per_chip


def test_routes_within_a_deployment_keep_to_its_chips():
    """Where every chip is held, the route within them is as fast as the network's; where the network's
    route passes a chip the deployment lacks (the last node held in part), the route within takes a
    longer way over held chips only, and there is none to a chip no held link reaches."""
    s = load_system("lpu-v1")
    everything = frozenset(range(3 * s.chips_per_rack))
    for src, dst in ((0, 7), (3, 20), (5, 150), (200, 1)):
        assert s.route_latency_s(s.route_within(src, dst, everything)) == s.route_latency_s(s.route(src, dst))
    held = frozenset(range(68))  # nodes 0-7 and half of node 8
    assert 71 in s.route(64, 0)
    detour = s.route_within(64, 0, held)
    assert set(detour) <= held and all(b in s.linked_chips(a) for a, b in itertools.pairwise(detour))
    assert s.route_latency_s(detour) > s.route_latency_s(s.route(64, 0))
    assert s.route_within(0, 9, frozenset({0, 9})) is None  # chip 9 is not where node 1's link to node 0 lands
