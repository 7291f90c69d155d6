"""Resource limits set through the environment, read each time they are used (not at import),
so that a test or a long-lived process may change them with ``os.environ``.

A value that is not an integer is a usage error (exit 2, one line naming the variable).
"""

from __future__ import annotations

import os

from robaudit.errors import OptionError


def _integer(name: str, default: int, minimum: int) -> int:
    """``name``'s integer value (``default`` when unset or empty).

    Raises:
        OptionError: the value is not an integer ≥ ``minimum``.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise OptionError(f"{name} must be an integer ≥ {minimum}, got '{text}'")
    return value


def _multiply_adds(name: str, default: float) -> float:
    """A work budget in multiply-adds: a number ≥ 0 (``3e9``, ``0`` turns the pass off)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also NaN
        raise OptionError(f"{name} must be a number of multiply-adds ≥ 0 (e.g. 3e9), got '{text}'")
    return value


def max_model_bytes() -> int:
    """Largest model file accepted, ``ROBAUDIT_MAX_MODEL_BYTES`` (protobuf itself cannot exceed 2 GiB)."""
    return _integer("ROBAUDIT_MAX_MODEL_BYTES", 2**31 - 1, 1)


def max_external_bytes() -> int:
    """Largest total of external data accepted, ``ROBAUDIT_MAX_EXTERNAL_BYTES`` (default 8 GiB)."""
    return _integer("ROBAUDIT_MAX_EXTERNAL_BYTES", 8 * 2**30, 0)


def max_inputs_bytes() -> int:
    """Largest inputs/labels file accepted, ``ROBAUDIT_MAX_INPUTS_BYTES`` (default 2 GiB)."""
    return _integer("ROBAUDIT_MAX_INPUTS_BYTES", 2**31, 1)


def tight_memory_bytes() -> int:
    """Memory the tight sensitivities may take, ``ROBAUDIT_TIGHT_MEMORY_MB`` (default 2 GiB; 0: the least the pass
    can work in, one output row at a time and the fewest kept values, a looser bound at most)."""
    return _integer("ROBAUDIT_TIGHT_MEMORY_MB", 2048, 0) * 2**20


def crown_budget() -> float:
    """Multiply-adds all back-substitutions of one range pass may take, ``ROBAUDIT_CROWN_BUDGET``
    (default 3·10⁹; docs/method.md §5.2)."""
    return _multiply_adds("ROBAUDIT_CROWN_BUDGET", 3e9)


def alpha_budget() -> float:
    """Multiply-adds of the repeated back-substitutions with other lower slopes in one range pass,
    ``ROBAUDIT_ALPHA_BUDGET`` (default 3·10⁹, 0: plain CROWN; docs/method.md §5.2)."""
    return _multiply_adds("ROBAUDIT_ALPHA_BUDGET", 3e9)


def signed_budget() -> float:
    """Multiply-adds the two signed passes may take, ``ROBAUDIT_SIGNED_BUDGET`` (default 2·10⁸;
    docs/method.md §4.1)."""
    return _multiply_adds("ROBAUDIT_SIGNED_BUDGET", 2e8)


def domain_certificate_budget() -> float:
    """Multiply-adds of the certificate over the whole domain that ``bound`` and ``inject`` take for one failure
    vector, ``ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET`` (default 3·10⁹, 0 turns it off; docs/method.md §7.8)."""
    return _multiply_adds("ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET", 3e9)


def relational_budget() -> float:
    """Multiply-adds of the relaxed signed coefficients, ``ROBAUDIT_RELATIONAL_BUDGET`` (default 5·10⁹,
    0 turns them off; docs/method.md §4.5)."""
    return _multiply_adds("ROBAUDIT_RELATIONAL_BUDGET", 5e9)


def zeroed_budget() -> float:
    """Multiply-adds of one reported vector's signed terms with the later failed neurons counted,
    ``ROBAUDIT_ZEROED_BUDGET`` (default 5·10⁹, 0 turns them off; docs/method.md §5.5)."""
    return _multiply_adds("ROBAUDIT_ZEROED_BUDGET", 5e9)


def split_budget() -> float:
    """Multiply-adds of one reported vector's clean ranges refined by splitting the input box,
    ``ROBAUDIT_SPLIT_BUDGET`` (default 3·10⁹, 0 turns it off; docs/method.md §5.8)."""
    return _multiply_adds("ROBAUDIT_SPLIT_BUDGET", 3e9)


def shared_budget() -> float:
    """Multiply-adds of one reported vector's first-layer term over one shared input,
    ``ROBAUDIT_SHARED_BUDGET`` (default 2·10⁸, 0 turns it off; docs/method.md §5.9)."""
    return _multiply_adds("ROBAUDIT_SHARED_BUDGET", 2e8)


def tightened_budget() -> float:
    """Multiply-adds of one reported vector's tightened pre-gate boxes, ``ROBAUDIT_TIGHTENED_BUDGET``
    (default 6·10¹⁰, 0 turns them off; docs/method.md §5.6, §5.7)."""
    return _multiply_adds("ROBAUDIT_TIGHTENED_BUDGET", 6e10)


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: Most threads :func:`bound_threads` takes by default: each thread's chunk gets budget ÷ threads, so a large
#: machine's default would otherwise cut the memory budget into chunks of a few rows (only 2 cores were
#: measured: benchmarks/bench_trained.py --part deep).
DEFAULT_MAX_THREADS = 8


def bound_threads() -> int:
    """Threads that back-propagate chunks of outputs at once in the tight sensitivity pass,
    ``ROBAUDIT_THREADS`` (default: the CPUs this process may run on, at most ``DEFAULT_MAX_THREADS``;
    docs/method.md §4.4). Each thread's chunk gets its share of ``ROBAUDIT_TIGHT_MEMORY_MB``.

    Raises:
        OptionError: the variable is not an integer ≥ 1.
    """
    return _integer("ROBAUDIT_THREADS", min(DEFAULT_MAX_THREADS, usable_cores()), 1)
