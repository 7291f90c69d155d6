"""YAML and JSON serializers of report dicts, and the reader of report files given back to robaudit."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from robaudit.errors import RobauditError


def _clean(value):
    """Make floats JSON-safe (inf/nan as strings), tuples lists and str enums plain strings."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


@cache
def _dumper() -> type:
    """A SafeDumper with block style for mappings and flow style for short lists of scalars ([0.0, 1.0]).

    Built on first use: PyYAML is imported only by commands that write YAML (~10 ms of start-up).
    """
    import yaml

    def represent_list(dumper: yaml.SafeDumper, data: list):
        flow = all(not isinstance(v, dict | list) for v in data) and len(data) <= 16
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    class _Dumper(yaml.SafeDumper):
        pass

    _Dumper.add_representer(list, represent_list)
    return _Dumper


def to_json(report: dict) -> str:
    """JSON text, indented, newline-terminated."""
    return json.dumps(_clean(report), indent=2) + "\n"


def to_yaml(report: dict) -> str:
    """YAML text, keys in report order."""
    import yaml

    return yaml.dump(_clean(report), Dumper=_dumper(), sort_keys=False, width=120, allow_unicode=True)


def read_report_file(path: Path, flag: str, error: type[RobauditError]) -> Any:
    """The mapping of a YAML or JSON report file given to ``flag``; ``error`` with one line when unreadable."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{flag}: file '{path}' does not exist") from None
    except UnicodeDecodeError:  # e.g. an .npz inputs file given where a report is expected
        raise error(f"{flag}: '{path}' is not a YAML or JSON report (it is not text)") from None
    except OSError as exc:
        raise error(f"{flag}: cannot read '{path}': {exc}") from None
    except yaml.YAMLError:
        raise error(f"{flag}: '{path}' is not a YAML or JSON report") from None
