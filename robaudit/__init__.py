"""robaudit: how many neurons of each layer may fail before the output moves by more than ε.

The core (loading, layer graph, bounds, injection) is a library; ``robaudit.cli`` is
the only module that imports Typer.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("robaudit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0"

__all__ = ["__version__"]
