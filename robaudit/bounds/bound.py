"""One interface for "the bound of ``--method``", and the one factory that builds it.

Every command that decides "tolerated or not" (``bound``, ``inject``, ``check`` and its
remedy, the applications) asks :func:`make_bound` for the bound of the selected
method and uses the :class:`Bound` protocol; none combines the two methods itself.

* ``paper`` is the Forward Error Propagation recursion (docs/method.md §3);
* ``tight`` is min(paper, sensitivity bound): both are sound for every failure set,
  so their minimum is too (docs/method.md §4.1). The sensitivities are computed in
  chunks within ``ROBAUDIT_TIGHT_MEMORY_MB`` (docs/method.md §4.4): no stand-in.

Both are capped at the width of a bounded output (docs/method.md §3.4): every figure is
min(bound, hi − lo), and when hi − lo ≤ ε every count is tolerated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from robaudit import limits
from robaudit.bounds.certify import domain_certificate, domain_certificate_cost
from robaudit.bounds.fep import (
    Analysis,
    FepBound,
    PaperBound,
    max_single_layer,
    max_total,
    max_uniform,
)
from robaudit.bounds.slack import within
from robaudit.bounds.tight import TightBound
from robaudit.options import Method

#: How far past what one method proves alone the exact min(paper, tight) is scanned.
MAX_EXTENSION_SCAN = 4096


class Bound(FepBound, Protocol):
    """The bound of one ``--method`` with its inverse problems (docs/method.md §6)."""

    @property
    def method(self) -> Method:
        """The method this is the bound of."""
        ...

    @property
    def note(self) -> str | None:
        """Why the figures are not those of the method as asked (memory), or None."""
        ...

    def fep_vector(self, failures: Sequence[int]) -> float:
        """The bound of exactly this one vector, as reported for it (at most :meth:`fep`)."""
        ...

    def max_single(self, index: int, neurons: int, epsilon: float) -> int:
        """Largest f such that every count 0..f in hidden layer ``index`` alone is tolerated (−1: none)."""
        ...

    def max_uniform(self, epsilon: float) -> int:
        """Largest f such that every vector ≤ (f, …, f) (capped at N_l) is tolerated (−1: none)."""
        ...

    def max_total(self, epsilon: float) -> tuple[int, bool]:
        """Largest F such that every distribution of F failures is tolerated; (F, exact?)."""
        ...


class PaperMethod:
    """``--method paper``: the Forward Error Propagation recursion alone (docs/method.md §3)."""

    method = Method.PAPER
    note: str | None = None

    def __init__(self, paper: PaperBound):
        self.paper = paper
        self._totals: dict[float, tuple[int, bool]] = {}
        #: hi − lo of a bounded output (+inf otherwise): no figure exceeds it (docs/method.md §3.4) —
        #: unless a failure may send ±Inf/NaN (a float exponent bit flip), which no output range holds.
        unbounded = bool(paper.analysis.unbounded())
        self.cap = math.inf if unbounded else paper.analysis.network.output_width

    @property
    def analysis(self) -> Analysis:
        """The shared per-network quantities."""
        return self.paper.analysis

    def fep(self, failures: Sequence[int]) -> float:
        """The paper bound for exactly these failures."""
        return min(self.paper.fep(failures), self.cap)

    def fep_upto(self, failures: Sequence[int]) -> float:
        """The paper bound over every vector ≤ failures."""
        return min(self.paper.fep_upto(failures), self.cap)

    def fep_vector(self, failures: Sequence[int]) -> float:
        """The paper bound of this one vector (:meth:`fep`)."""
        return self.fep(failures)

    def total_curve(self, budget: int) -> np.ndarray:
        """The paper method's DP over layers (docs/method.md §6.3)."""
        return np.minimum(self.paper.total_curve(budget), self.cap)

    def max_single(self, index: int, neurons: int, epsilon: float) -> int:
        """Binary search on the monotone envelope (docs/method.md §6.1)."""
        if within(self.cap, epsilon):
            return neurons
        return max_single_layer(self.paper, index, neurons, epsilon)

    def max_uniform(self, epsilon: float) -> int:
        """Binary search on the monotone envelope (docs/method.md §6.2)."""
        if within(self.cap, epsilon):
            return max(la.neurons for la in self.analysis.hidden)
        return max_uniform(self.paper, epsilon)

    def max_total(self, epsilon: float) -> tuple[int, bool]:
        """The DP's budget search (docs/method.md §6.3); computed once per ε."""
        if within(self.cap, epsilon):
            return sum(la.neurons for la in self.analysis.hidden), True
        if epsilon not in self._totals:
            total, exact = max_total(self.paper, epsilon)
            self._totals[epsilon] = (at_least_implied(self, total, epsilon), exact)
        return self._totals[epsilon]


class CombinedBound:
    """``--method tight``: min(paper, sensitivity bound); both are sound, so is their minimum
    (docs/method.md §4.1)."""

    method = Method.TIGHT

    def __init__(self, paper: PaperMethod, tight: TightBound, note: str | None = None):
        self.paper_method = paper
        self.paper = paper.paper
        #: The sensitivity bound (docs/method.md §4.1).
        self.tight = tight
        self.note = note
        self.cap = paper.cap
        #: multiply-adds of the certificates the searches took (:meth:`_certified_extension`)
        self._extension_spent = 0.0
        #: the certificates of the whole domain computed so far, per failure vector (:meth:`_certificate`)
        self._certificates: dict[tuple[int, ...], float | None] = {}
        #: the refined bounds computed so far, per failure vector (:meth:`fep_vector`)
        self._refined: dict[tuple[int, ...], float] = {}

    @property
    def analysis(self) -> Analysis:
        """The shared per-network quantities."""
        return self.tight.analysis

    @property
    def sensitivity(self) -> TightBound:
        """The sensitivity bound itself."""
        return self.tight

    def fep(self, failures: Sequence[int]) -> float:
        """min of the two bounds (and the output's width) for exactly these failures."""
        return min(self.paper.fep(failures), self.tight.fep(failures), self.cap)

    def fep_upto(self, failures: Sequence[int]) -> float:
        """min of the two bounds over all vectors ≤ failures (both are upper envelopes)."""
        return min(self.paper.fep_upto(failures), self.tight.fep_upto(failures), self.cap)

    def fep_vector(self, failures: Sequence[int]) -> float:
        """:meth:`fep` with the sensitivity bound refined for this one vector (docs/method.md §4.1, "The
        output cut"), and the certificate of the whole domain for it where that applies and is cheap
        (docs/method.md §7.8). Computed once per vector: ``bound`` and ``inject`` ask for their vector's figure
        more than once (the Fep line, the search's bound), and the refinement may take seconds (§5.6, §5.8)."""
        key = tuple(int(f) for f in failures)
        if key not in self._refined:
            self._refined[key] = min(self.paper.fep(failures), self.tight.refined(failures), self.cap)
        refined = self._refined[key]
        certificate = self._certificate(failures)
        return refined if certificate is None else min(refined, certificate)

    def _certificate(self, failures: Sequence[int]) -> float | None:
        """:func:`domain_certificate` of this vector, computed once (a report asks for its vector's figure more
        than once: the Fep line, the search's bound)."""
        key = tuple(int(f) for f in failures)
        if key not in self._certificates:
            self._certificates[key] = domain_certificate(self.analysis, key)
        return self._certificates[key]

    def total_curve(self, budget: int) -> np.ndarray:
        """min of the two curves (each bounds every distribution of ≤ F failures; the minimum is
        non-decreasing too)."""
        return np.minimum(np.minimum(self.paper.total_curve(budget), self.tight.total_curve(budget)), self.cap)

    def max_single(self, index: int, neurons: int, epsilon: float) -> int:
        """Largest f such that min(paper, tight) ≤ ε for every count 0..f in layer ``index`` alone."""
        count = len(self.analysis.hidden)
        if within(self.cap, epsilon):
            return neurons

        def vector(f: int) -> list[int]:
            failures = [0] * count
            failures[index] = f
            return failures

        proven = max(
            max_single_layer(self.paper, index, neurons, epsilon), max_single_layer(self.tight, index, neurons, epsilon)
        )
        proven = _extend(proven, neurons, lambda f: within(self.fep(vector(f)), epsilon))
        return self._certified_extension(proven, neurons, vector, epsilon)

    def max_uniform(self, epsilon: float) -> int:
        """The larger uniform count either method proves for every vector ≤ (f, …, f), extended by the certificate
        of the whole domain (:meth:`_certified_extension`).

        Not extended by the minimum of the two bounds count by count as ``max_single`` is: that minimum is not
        monotone, so a safe uniform vector does not make every smaller vector safe; the certificate is.
        """
        hidden = self.analysis.hidden
        widest = max(la.neurons for la in hidden)
        if within(self.cap, epsilon):
            return widest
        proven = max(max_uniform(self.paper, epsilon), max_uniform(self.tight, epsilon))
        return self._certified_extension(
            proven, widest, lambda f: [min(f, la.neurons) for la in hidden], epsilon
        )

    def _certified_extension(
        self, proven: int, limit: int, vector: Callable[[int], list[int]], epsilon: float
    ) -> int:
        """``proven`` grown one count at a time while the certificate of the whole domain (docs/method.md §7.8)
        of ``vector(count)`` stays within ε. That certificate never decreases when a count grows, so each count it
        allows allows every vector below it too; it is taken while the counts tried by every search of this bound
        cost at most a tenth of ``ROBAUDIT_DOMAIN_CERTIFICATE_BUDGET`` multiply-adds in all (a report runs one such
        search per layer and one for the uniform count, mostly in vain: on LeNet, where a certificate of every layer
        costs 2·10⁹, they tripled the time of ``bound`` for counts of 0)."""
        if proven < 0 or proven >= limit:  # < 0: the failed synapses alone exceed ε, which it does not model
            return proven
        start, budget = proven, limits.domain_certificate_budget() / 10
        while proven < limit and proven - start < MAX_EXTENSION_SCAN:
            counts = vector(proven + 1)
            cost = domain_certificate_cost(self.analysis.network, counts)
            if self._extension_spent + cost > budget:
                break
            self._extension_spent += cost
            certificate = self._certificate(counts)
            if certificate is None or not within(min(certificate, self.cap), epsilon):
                break
            proven += 1
        return proven

    def max_total(self, epsilon: float) -> tuple[int, bool]:
        """The larger budget of the two methods; exact, since the sensitivity curve is searched
        to the end (docs/method.md §6.3)."""
        paper_total = self.paper_method.max_total(epsilon)[0]
        if within(self.cap, epsilon):
            return paper_total, True
        tight_total = max_total(self.tight, epsilon)[0]
        return at_least_implied(self, max(paper_total, tight_total), epsilon), True


def at_least_implied(bound: PaperMethod | CombinedBound, total: int, epsilon: float) -> int:
    """The total budget ``total`` of the DP over layers (docs/method.md §6.3), raised to what the other inverse
    problems prove: every distribution of F ≤ uniform failures is a vector ≤ (F, …, F), and every distribution of
    one failure is one layer's single count. The DP bounds every distribution by one per-layer sum, looser than the
    bound of one vector that the uniform search uses, so it could answer less (a total below the uniform count,
    which contradicted it: found by a new-user trial)."""
    hidden = bound.analysis.hidden
    uniform = bound.max_uniform(epsilon)
    if uniform >= max(la.neurons for la in hidden):
        return sum(la.neurons for la in hidden)  # every vector at all is tolerated
    total = max(total, uniform)
    if total == 0 and all(bound.max_single(i, la.neurons, epsilon) >= 1 for i, la in enumerate(hidden)):
        total = 1
    return total


def _extend(proven: int, limit: int, safe: Callable[[int], bool]) -> int:
    """Grow the safe prefix [0..proven] one count at a time while ``safe`` holds.

    Each method alone proves a prefix (its bound is monotone up to there); beyond it
    the minimum of the two may still be ≤ ε, which is checked count by count.
    """
    count = proven
    while count < limit and count - proven < MAX_EXTENSION_SCAN and safe(count + 1):
        count += 1
    return count


def make_bound(analysis: Analysis, method: Method | str, *, strict: bool = False) -> PaperMethod | CombinedBound:
    """The bound of ``method`` on ``analysis`` (docs/method.md §3, §4).

    ``strict`` is kept for callers that need the sensitivities themselves; the tight bound
    is always computed (in chunks, docs/method.md §4.4).

    Raises:
        OptionError: ``method`` is not a :class:`Method`.
    """
    chosen = Method.parse(method, "--method")
    paper = PaperMethod(PaperBound(analysis))
    if chosen is Method.PAPER:
        return paper
    return tight_of(paper, strict=strict)


def make_bounds(analysis: Analysis) -> tuple[PaperMethod, CombinedBound]:
    """Both methods' bounds, sharing one paper computation (reports give both figures)."""
    paper = PaperMethod(PaperBound(analysis))
    return paper, tight_of(paper)


def tight_of(paper: PaperMethod, *, strict: bool = False) -> CombinedBound:
    """``tight`` on the analysis of ``paper``."""
    return CombinedBound(paper, sensitivity_bound(paper.analysis))


def sensitivity_bound(analysis: Analysis) -> TightBound:
    """The sensitivity bound itself (docs/method.md §4.1, computed in chunks: §4.4), its dominated outputs left
    unfinished where the figures over all outputs allow (§4.4, "Dominated outputs")."""
    return TightBound(analysis, skip_dominated=True)


#: Most vectors below a uniform count whose bounds ``vectors_within`` refines one by one (each may take seconds).
MAX_REFINED_VECTORS = 64
#: Most vectors below a uniform count it looks at (the cheap bound of each).
MAX_LISTED_VECTORS = 4096


def vectors_within(method: Bound, count: int, epsilon: float) -> tuple[bool | None, int]:
    """Whether every vector ≤ (count, …, count) (capped at N_l) has its own bound (:meth:`Bound.fep_vector`, refined
    for it) within ε — what a uniform count shows (docs/method.md §6.2), here vector by vector: the searched count
    reads bounds that never decrease as a count grows, which the refinements of one vector do not enter.

    Returns (True or False, the vectors refined), or (None, 0) when there are more than
    :data:`MAX_LISTED_VECTORS` vectors or more than :data:`MAX_REFINED_VECTORS` of them need their own refinement
    (their plain bound exceeds ε). The largest vector is refined first: it fails most often.
    """
    counts = [min(count, la.neurons) for la in method.analysis.hidden]
    if math.prod(c + 1 for c in counts) > MAX_LISTED_VECTORS:
        return None, 0
    pending = [v for v in itertools.product(*(range(c + 1) for c in counts)) if not within(method.fep(v), epsilon)]
    if len(pending) > MAX_REFINED_VECTORS:
        return None, 0
    refined = 0
    for vector in sorted(pending, key=sum, reverse=True):
        refined += 1
        if not within(method.fep_vector(vector), epsilon):
            return False, refined
    return True, refined
