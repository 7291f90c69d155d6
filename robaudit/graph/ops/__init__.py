"""Per-op propagation rules, looked up by op type (see ``base.lookup``).

Every module of this package is imported here (:func:`discover`), and each rule module
registers its rules when imported: adding an op is adding one module, and no list of
imports can forget it.
"""

from __future__ import annotations

import importlib
import pkgutil

from robaudit.graph.ops.base import Interval, OpRule, PropagationContext, Role, lookup, supported_op_types


def discover() -> list[str]:
    """Import every module on this package's ``__path__`` not imported yet; their names.

    Run once when the package is imported; call it again after adding a directory to
    ``__path__`` (tests add a toy op that way).
    """
    found = []
    for module in pkgutil.iter_modules(__path__):
        name = f"{__name__}.{module.name}"
        importlib.import_module(name)
        found.append(name)
    return found


discover()

__all__ = ["Interval", "OpRule", "PropagationContext", "Role", "discover", "lookup", "supported_op_types"]
