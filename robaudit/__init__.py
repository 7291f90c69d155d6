"""robaudit: how many neurons of each layer may fail before the output moves by more than ε.

The core (loading, layer graph, bounds, injection) is a library; ``robaudit.cli`` is
the only module that imports Typer. The public Python API (docs/api.md)::

    import robaudit

    result = robaudit.bound("model.onnx", epsilon=0.5, crash=1)   # or an onnx.ModelProto
    result.layers[0].max_failures, result.fep, result.to_dict()
    robaudit.inject(model, epsilon=0.5, crash=1, inputs=x)         # measured beside the bound
    robaudit.check(model, epsilon=0.5, require_crash=1).passed     # the CI gate

Every error is a :class:`RobauditError` (subclasses in :mod:`robaudit.errors`). The API
is imported on first use, so ``import robaudit`` and the command line start fast.
"""

from __future__ import annotations

from typing import Any

#: The package version; tests check that it equals ``pyproject.toml``'s and the installed
#: distribution's. A literal, not ``importlib.metadata.version``: importing
#: importlib.metadata costs ~20 ms at every command's start.
__version__ = "0.1.0"

#: Public names and the module that defines each (imported when first used).
_LAZY = {
    "bound": "robaudit.api",
    "inject": "robaudit.api",
    "check": "robaudit.api",
    "certify": "robaudit.api",
    "RobauditError": "robaudit.errors",
    "ModelFileError": "robaudit.errors",
    "ExternalDataError": "robaudit.errors",
    "ModelStructureError": "robaudit.errors",
    "UnsupportedModelError": "robaudit.errors",
    "ShapeError": "robaudit.errors",
    "OptionError": "robaudit.errors",
    "InputDataError": "robaudit.errors",
    "PolicyError": "robaudit.errors",
    "ReportError": "robaudit.errors",
    "PlotError": "robaudit.errors",
    "InjectionRuntimeError": "robaudit.errors",
    "BoundResult": "robaudit.bounds.results",
    "CertifyResult": "robaudit.bounds.certify",
    "InjectResult": "robaudit.injection.results",
    "CheckResult": "robaudit.gate.gate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'robaudit' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
