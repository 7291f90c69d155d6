"""Fault injection with onnxruntime: instrumenting the model, the contained child process,
campaigns and searches, and replaying a report's fault sets (docs/method.md §7)."""

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """``robaudit.inject`` is both this package and the API function: importing the package
    replaces the ``robaudit.inject`` attribute, so the package forwards calls to
    :func:`robaudit.api.inject`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from robaudit.api import inject

        return inject(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
