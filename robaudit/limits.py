"""Resource limits set through the environment, read each time they are used (not at import),
so that a test or a long-lived process may change them with ``os.environ``.

A value that is not an integer is a usage error (exit 2, one line naming the variable).
"""

from __future__ import annotations

import os

from robaudit.errors import OptionError


def _integer(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"{name} must be an integer, got '{text}'") from None


def max_model_bytes() -> int:
    """Largest model file accepted, ``ROBAUDIT_MAX_MODEL_BYTES`` (protobuf itself cannot exceed 2 GiB)."""
    return _integer("ROBAUDIT_MAX_MODEL_BYTES", 2**31 - 1)


def max_external_bytes() -> int:
    """Largest total of external data accepted, ``ROBAUDIT_MAX_EXTERNAL_BYTES`` (default 8 GiB)."""
    return _integer("ROBAUDIT_MAX_EXTERNAL_BYTES", 8 * 2**30)


def max_inputs_bytes() -> int:
    """Largest inputs/labels file accepted, ``ROBAUDIT_MAX_INPUTS_BYTES`` (default 2 GiB)."""
    return _integer("ROBAUDIT_MAX_INPUTS_BYTES", 2**31)


def tight_memory_bytes() -> int:
    """Memory the tight sensitivities may take, ``ROBAUDIT_TIGHT_MEMORY_MB`` (default 2 GiB)."""
    return _integer("ROBAUDIT_TIGHT_MEMORY_MB", 2048) * 2**20
