"""robaudit: how many neurons of each layer may fail before the output moves by more than ε.

The core (loading, layer graph, bounds, injection) is a library; ``robaudit.cli`` is
the only module that imports Typer.
"""

#: The package version; tests check that it equals ``pyproject.toml``'s and the installed
#: distribution's. A literal, not ``importlib.metadata.version``: importing
#: importlib.metadata costs ~20 ms at every command's start.
__version__ = "0.1.0"

__all__ = ["__version__"]
