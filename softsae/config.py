"""Run configuration files: ``softsae train --config run.yaml|run.json`` (range checks: softsae.settings).

A config file is a mapping of ``TrainConfig`` field names to values (``k: 32``, ``hard_frac: 0.2``,
``log: tensorboard`` ...). Unknown keys, values of the wrong type, non-finite numbers and values out of
range are errors (ValueError naming the file, or the flag on the command line); YAML needs PyYAML.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from softsae.settings import (  # noqa: F401  (re-exported: the range checks used to live here)
    _FLAGS,
    MAX_BATCH_SIZE,
    check_device,
    check_ranges,
    setting_name,
)

_YAML_SUFFIXES = (".yaml", ".yml")


def _field_types() -> dict[str, tuple[type, ...]]:
    """Allowed Python types per TrainConfig field (float fields also take ints; None where Optional)."""
    from softsae.trainer import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint) or (hint,)
        types = tuple(a for a in args if isinstance(a, type))
        if float in types:
            types = (*types, int)
        out[f.name] = types
    return out


def check_config(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check that ``values`` holds only TrainConfig fields with values of the right type; return it."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of TrainConfig fields, got {type(values).__name__}")
    types = _field_types()
    unknown = sorted(str(k) for k in values if k not in types)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys are TrainConfig fields: {sorted(types)}")
    for key, value in values.items():
        allowed = types[key]
        bad = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        if bad:
            names = " | ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{source}: {setting_name(key, source)} must be {names}, got {value!r}")
    check_ranges(values, source)
    return dict(values)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) run config into a dict of TrainConfig fields."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {p}: not UTF-8 text ({err})") from None
    if p.suffix.lower() in _YAML_SUFFIXES:
        try:
            import yaml
        except ImportError:
            raise ValueError(f"config file {p}: reading YAML needs PyYAML: pip install pyyaml "
                             "(or write the config as .json)") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {p}: invalid YAML: {err}") from None
        except RecursionError:
            raise ValueError(f"config file {p}: invalid YAML: nested too deeply") from None
    elif p.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"config file {p}: invalid JSON: {err}") from None
    else:
        raise ValueError(f"config file {p}: expected a .json, .yaml or .yml file")
    return check_config({} if values is None else values, source=f"config file {p}")
