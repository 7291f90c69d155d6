"""The choices a user makes by name (``--method``, ``--mode``, ``--search``), in one place.

The CLI, the policy reader (:mod:`robaudit.gate.policy`) and the core all validate
against these enums, so a new method or search is added here once. Members are
``str`` (:class:`enum.StrEnum`): they compare equal to their value, format as it and
serialize as it, so reports keep plain strings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from robaudit.errors import OptionError


class _Choice(StrEnum):
    """A named choice; :meth:`parse` turns user text into a member or one clear error."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Every accepted value, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value: object, flag: str) -> Self:
        """The member whose value is ``value``.

        Raises:
            OptionError: ``value`` is not one of :meth:`values` (the message names ``flag``).
        """
        if isinstance(value, str) and value in cls.values():
            return cls(value)
        raise OptionError(f"{flag} must be one of {', '.join(cls.values())}, got '{value}'")

    @classmethod
    def coerce(cls, value: object) -> object:
        """``value`` as a member when it is a valid value, else unchanged (validated later by ``check``)."""
        return cls(value) if isinstance(value, str) and value in cls.values() else value


class Method(_Choice):
    """Which bound decides (docs/method.md §3, §4)."""

    #: The Forward Error Propagation recursion alone (docs/method.md §3).
    PAPER = "paper"
    #: min(paper, sensitivity bound): both are sound, so is their minimum (docs/method.md §4).
    TIGHT = "tight"


class Mode(_Choice):
    """What a failed neuron sends (docs/method.md §2.1)."""

    CRASH = "crash"
    BYZANTINE = "byzantine"
    #: One bit of the stored value flipped (docs/method.md §2.3).
    BIT_FLIP = "bit_flip"
    #: One bit of the stored value stuck at 0 or 1 (docs/method.md §2.3).
    STUCK_AT = "stuck_at"


class Search(_Choice):
    """How ``inject`` chooses fault sets (docs/method.md §8.2)."""

    #: Uniform random failure sets.
    RANDOM = "random"
    #: Directed search for the worst set.
    WORST = "worst"


#: Fault sets a campaign tries per input unless told (random: sets drawn; worst: swap proposals after the greedy
#: phase) — ``inject --trials`` and a ``check`` policy's ``empirical.trials`` alike, so that both measure the same.
DEFAULT_TRIALS = 200
