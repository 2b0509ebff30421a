"""Reading hardware JSON files, LPU systems and GPUs alike: a preset name or a path, then every figure
as {"value", "source", "confidence"}, each checked against its dataclass field (the system a Program
keeps gives values alone, checked the same way). A missing, unknown or mistyped field is one clear
OpenLPUError naming it."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from pathlib import Path

from openlpu.errors import OpenLPUError

PRESETS_DIR = Path(__file__).parent / "presets"
CONFIDENCES = ("H", "M", "L", "DERIVED", "ESTIMATE")
TEXT_FIELDS = ("name", "description")  # plain strings, not figures


def preset_names(kind: str) -> list[str]:
    """The presets of one kind ("lpu" or "gpu"), which share the presets folder."""
    names = []
    for path in sorted(PRESETS_DIR.glob("*.json")):
        try:
            if json.loads(path.read_text()).get("kind") == kind:
                names.append(path.stem)
        except (OSError, json.JSONDecodeError):
            continue
    return names


class DuplicateField(ValueError):
    """A JSON object giving one key twice, which json.loads would resolve silently to the last."""


def _refusing_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise DuplicateField(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return dict(pairs)


# kind -> (its name in errors, with its article, the flag `plan`, `run` and `serve` take it with)
KINDS = {"lpu": ("LPU system", "an LPU system", "--system"), "gpu": ("GPU", "a GPU", "--compare")}


def read_hardware(name_or_path: str | Path, kind: str) -> tuple[dict, str]:
    """(the file's fields but "kind", the name its errors give) for a preset of `kind` (a key of KINDS) named
    `name_or_path` or a .json file at that path. A file whose "name" is a preset's, as a copy of one at other
    prices keeps, is named with its file too in tables, and one whose file name is a preset's with its path in
    errors, so that each is told apart from the preset."""
    names, path, (what, a_what, _) = preset_names(kind), Path(name_or_path), KINDS[kind]
    if path.suffix != ".json":
        example = PRESETS_DIR / f"{names[0]}.json"
        if path.is_file() and str(name_or_path) not in names:
            raise OpenLPUError(f"{str(name_or_path)!r} is a file but not a hardware JSON file: give a .json file shaped "
                               f"like {example}, or a preset ({', '.join(names)})")
        other = next((k for k in KINDS if k != kind and str(name_or_path) in preset_names(k)), None)
        if other is not None:
            raise OpenLPUError(f"{str(name_or_path)!r} is {KINDS[other][1]}, not {a_what}: give it with "
                               f"{KINDS[other][2]} (known {what}s: {', '.join(names)})")
        if str(name_or_path) not in names:
            given = str(name_or_path).lower()  # a name it begins (h100: h100-sxm) first, then the most alike
            close = list(dict.fromkeys([n for n in names if n.startswith(given)]
                                       + difflib.get_close_matches(given, names, n=2, cutoff=0.4)))[:2]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise OpenLPUError(f"unknown {what} {str(name_or_path)!r}{hint} (known: {', '.join(names)}; or give a "
                               f"JSON file shaped like {example})")
        path = PRESETS_DIR / f"{name_or_path}.json"
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_refusing_duplicates)
    except FileNotFoundError:
        raise OpenLPUError(f"hardware file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise OpenLPUError(f"hardware file {str(path)!r} is a folder; give a .json file") from None
    except OSError as e:
        raise OpenLPUError(f"cannot read hardware file {str(path)!r}: {e.strerror or e}") from None
    except RecursionError:
        raise OpenLPUError(f"hardware file {path.name}: nested deeper than any hardware file is") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenLPUError(f"hardware file {path.name}: not valid JSON ({e})") from None
    except DuplicateField as e:
        raise OpenLPUError(f"hardware file {path.name}: field {e.args[0]!r} is given twice in one object; keep "
                           f"one") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise OpenLPUError(f"hardware file {path.name}: expected \"kind\": \"{kind}\" at the top level ({a_what})")
    fields = {k: v for k, v in data.items() if k != "kind"}
    if fields.get("name") in names and path.resolve() != (PRESETS_DIR / f"{fields['name']}.json").resolve():
        fields["name"] = f"{fields['name']} ({path.name})"
    a_copy = path.stem in names and path.resolve() != (PRESETS_DIR / path.name).resolve()
    return fields, f"{path.stem} ({path})" if a_copy else path.stem


# Far beyond real hardware either way, and narrow enough that products of figures stay finite: a figure whose
# field names no unit (a count)
FIGURE_RANGE = (1e-18, 1e18)
# By the unit a field's name ends in (the first that matches): (the unit's name, the least, the most), wide enough
# for edge chips and wafer-scale ones (Cerebras WSE-3: 21 PB/s of SRAM bandwidth), links across sites, parts of a
# dollar or a watt, yet narrow enough to catch a figure written in a larger unit: a clock of 900 (MHz), an HBM
# bandwidth of 3.35 (TB/s), 80 bytes of HBM (GB), a latency of 100 (ns)
UNIT_RANGES = (
    ("_bytes_per_s", "bytes/s", 1e6, 1e18),
    ("_flops_per_s", "FLOP/s", 1e6, 1e20),
    ("_hz", "Hz", 1e6, 1e11),
    ("_bytes", "bytes", 1e3, 1e15),
    ("_per_cycle", "per cycle", 1.0, 1e9),
    ("_s", "s", 1e-11, 1.0),
    ("_w", "W", 1e-3, 1e7),
    ("_usd", "USD", 1e-2, 1e10),
)


# The least energy a chip spends on one operation of its fastest matrix format: 1 fJ (1,000 TOPS/W), over 100x
# below B200's FP4 (1,000 W for 9 PFLOP/s dense: 0.11 pJ) and lpu-v1's int8 (215 W for 737 TOPS: 0.29 pJ). A power
# figure in kW (0.7 for a 700 W H100) falls far below it, where the W range alone, open to edge chips, takes it.
MIN_JOULES_PER_OP = 1e-15


def check_energy_per_op(where: str, power_w: float, ops_per_s: float) -> None:
    """Refuse a chip whose power `power_w` (the figure at `where`) is too little for `ops_per_s` matrix
    operations per second to be real: a figure in a larger unit than W."""
    if power_w / ops_per_s < MIN_JOULES_PER_OP:
        raise OpenLPUError(f"{where} = {power_w:g} W for {ops_per_s:.3g} matrix operations per second is "
                           f"{power_w / ops_per_s * 1e15:.2g} fJ per operation, below the {MIN_JOULES_PER_OP * 1e15:g} "
                           f"fJ any chip spends; check that it is given in W (not kW)")


def figure_range(field: str) -> tuple[str, float, float]:
    """(the unit, the least and the most) a figure of the field named `field` can be, by the unit its name ends
    in (UNIT_RANGES; a count: no unit)."""
    return next(((unit, low, high) for suffix, unit, low, high in UNIT_RANGES if field.endswith(suffix)),
                ("", *FIGURE_RANGE))


def positive_number(v, where: str, zero_ok: bool = False, field: str = "") -> None:
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not math.isfinite(v)
            or not (v >= 0 if zero_ok else v > 0)):  # an int is finite, however long (math.isfinite would overflow)
        raise OpenLPUError(f"{where} must be a {'non-negative' if zero_ok else 'positive'} number, got {v!r}")
    unit, low, high = figure_range(field)
    if v and not low <= v <= high:
        if not unit:
            raise OpenLPUError(f"{where} = {v!r} is outside the range of any hardware figure ({low:g} to "
                               f"{high:g}); check its units")
        raise OpenLPUError(f"{where} = {v!r} {unit} is outside the range a hardware figure in {unit} takes here "
                           f"({low:g} to {high:g}); check that it is given in {unit}")


def check_figure(raw, where: str, kind, sources: dict, zero_ok: bool = False) -> object:
    """One {"value", "source", "confidence"} figure, checked against the field's type: a number
    positive (or, `zero_ok`, not negative) and in its unit's range, or a number per operand precision."""
    if not isinstance(raw, dict) or set(raw) != {"value", "source", "confidence"}:
        raise OpenLPUError(f"{where} must be an object with exactly value, source and confidence")
    if raw["confidence"] not in CONFIDENCES:
        raise OpenLPUError(f"{where}.confidence must be one of {', '.join(CONFIDENCES)}")
    if not isinstance(raw["source"], str) or not raw["source"].strip():
        raise OpenLPUError(f"{where}.source must say where the figure comes from")
    sources[where] = f"{raw['source']} [{raw['confidence']}]"
    return check_value(raw["value"], where, kind, zero_ok)


def check_value(value, where: str, kind, zero_ok: bool = False) -> object:
    """A figure's value checked against the field's type and the unit its name (`where`'s last part) ends in
    (check_figure)."""
    field = where.rsplit(".", 1)[-1]
    if kind is str:
        if not isinstance(value, str):
            raise OpenLPUError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(kind) is dict:  # a figure per operand precision
        from openlpu.graph.lower import as_precision

        if not isinstance(value, dict) or not value:
            raise OpenLPUError(f"{where} must be a non-empty object of numbers, got {value!r}")
        for k, v in value.items():
            try:
                as_precision(k)
            except OpenLPUError as e:
                raise OpenLPUError(f"{where}: {e}") from None
            positive_number(v, f"{where}.{k}", field=field)
        return dict(sorted(value.items()))
    positive_number(value, where, zero_ok, field)
    if kind is int:
        if value != int(value):
            raise OpenLPUError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def build(cls, raw, where: str, sources: dict, zero_ok: frozenset = frozenset(), keys: dict | None = None,
          figures: bool = True):
    """A dataclass from a JSON object: every field present, none unknown, each of the right type. A
    field of dataclasses by name (dict[str, X]) must give exactly the names `keys` lists for it; figures
    (class name, field) in `zero_ok` may be 0. `figures`: each figure is {"value", "source", "confidence"},
    as in a hardware file, not its value alone (as a Program keeps its system)."""
    if not isinstance(raw, dict):
        raise OpenLPUError(f"{where} must be a JSON object")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "sources"]
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OpenLPUError(f"{where}: unknown field {key!r}{hint}")
    values = {}
    for name in fields:
        if name not in raw:
            raise OpenLPUError(f"{where}: missing field {name!r}")
        kind, sub = hints[name], f"{where}.{name}"
        args = typing.get_args(kind)
        if dataclasses.is_dataclass(kind):
            values[name] = build(kind, raw[name], sub, sources, zero_ok, keys, figures)
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(args[1]):
            named = (keys or {})[name]
            if not isinstance(raw[name], dict) or sorted(raw[name]) != sorted(named):
                raise OpenLPUError(f"{sub} must give exactly the {name} {', '.join(named)}")
            values[name] = {k: build(args[1], raw[name][k], f"{sub}.{k}", sources, zero_ok, keys, figures)
                            for k in named}
        elif name in TEXT_FIELDS:
            if not isinstance(raw[name], str):
                raise OpenLPUError(f"{sub} must be a string")
            values[name] = raw[name]
        else:
            zero = (cls.__name__, name) in zero_ok
            values[name] = (check_figure(raw[name], sub, kind, sources, zero) if figures
                            else check_value(raw[name], sub, kind, zero))
    return cls(**values)
