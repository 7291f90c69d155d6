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


def to_json(report: dict) -> str:
    """JSON text, indented, newline-terminated."""
    return json.dumps(_clean(report), indent=2) + "\n"


def to_yaml(report: dict) -> str:
    """YAML text in block style, keys in report order."""
    return yaml.safe_dump(_clean(report), sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)
