"""YAML and JSON serializers of report dicts."""

from __future__ import annotations

import json
import math

import yaml


def _clean(value):
    """Make floats JSON-safe (inf/nan as strings) and tuples lists."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, flow style for short lists of scalars ([0.0, 1.0])."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(not isinstance(v, dict | list) for v in data) and len(data) <= 16
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def to_json(report: dict) -> str:
    """JSON text, indented, newline-terminated."""
    return json.dumps(_clean(report), indent=2) + "\n"


def to_yaml(report: dict) -> str:
    """YAML text, keys in report order."""
    return yaml.dump(_clean(report), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
