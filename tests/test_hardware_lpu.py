"""LPU hardware presets: published figures, and one clear error per bad hardware file."""

import json
from pathlib import Path

import pytest

from openlpu.errors import OpenLPUError
from openlpu.hardware.lpu import PRESETS_DIR, load_system

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


def test_mistyped_precision_of_the_matrix_unit_is_named(tmp_path):
    data = json.loads(json.dumps(V1))
    data["chip"]["matrix_macs_per_cycle"]["value"]["int9"] = 409600
    with pytest.raises(OpenLPUError, match=r"chip\.matrix_macs_per_cycle: unknown precision 'int9'; did you mean"):
        load_system(_write(tmp_path, data))


def test_a_node_that_is_not_a_full_mesh_is_refused(tmp_path):
    data = json.loads(json.dumps(V1))
    data["node"]["chips"]["value"] = 4
    with pytest.raises(OpenLPUError, match=r"node\.local_links_per_chip must be node\.chips - 1 \(3\)"):
        load_system(_write(tmp_path, data))
    data["node"]["local_links_per_chip"]["value"] = 3
    assert load_system(_write(tmp_path, data)).node.chips == 4


def test_figure_without_source_is_refused(tmp_path):
    data = json.loads(json.dumps(V1))
    data["node"]["chips"] = 8
    with pytest.raises(OpenLPUError, match=r"node\.chips must be an object with exactly value, source"):
        load_system(_write(tmp_path, data))


def test_unknown_system_name_suggests_the_closest():
    with pytest.raises(OpenLPUError, match=r"unknown LPU system 'lpu-v2'; did you mean lpu-v1"):
        load_system("lpu-v2")
    with pytest.raises(OpenLPUError, match=r"unknown LPU system 'h100-sxm'"):
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


def test_routes_follow_the_topology():
    s = load_system("lpu-v1")
    assert s.route(0, 7) == (0, 7)  # full mesh inside a node
    for src, dst in ((0, 9), (3, 100), (5, 5000), (71, 72)):
        path = s.route(src, dst)
        assert path[0] == src and path[-1] == dst and len(path) <= 4
        kinds = [s.link_kind(a, b) for a, b in zip(path, path[1:])]
        assert sum(k != "local" for k in kinds) == 1  # exactly one global hop between two nodes
    assert s.link_kind(0, 9) == "rack" and s.link_kind(0, 72) == "system"
