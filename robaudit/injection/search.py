"""Searching fault sets for one failure vector: the random and worst searches over a batched
evaluator (docs/method.md §8.2)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from robaudit.bounds.bound import CombinedBound, make_bounds
from robaudit.bounds.fep import UNBOUNDED_REPORTED, Analysis
from robaudit.bounds.slack import FLOAT32_ABSOLUTE, FLOAT32_RELATIVE
from robaudit.errors import InjectionRuntimeError, OptionError
from robaudit.graph.inputs import feed_box
from robaudit.injection.instrument import CODE_BITS, FaultBatch, FaultSite
from robaudit.injection.results import (
    ErrorStats,
    FailureVector,
    FaultSet,
    InjectOptions,
    LayerFaults,
    MovedInput,
    ShardData,
    VectorResult,
    best_found,
    exceeds_epsilon,
)
from robaudit.injection.statistics import failure_rate
from robaudit.injection.workers import evaluate_parts, split_evenly
from robaudit.inputs import inside_domain

#: Violation margin: relative to the bound, and absolute relative to the output scale (float32).
MARGIN_RELATIVE = FLOAT32_RELATIVE
MARGIN_ABSOLUTE = FLOAT32_ABSOLUTE


#: Worst search: inputs used for ranking and search (the final sets are measured on all inputs).
SEARCH_INPUTS = 8


#: Worst search: single-failure evaluations (candidates × inputs) for ranking, shared by the sites,
#: for a model of REFERENCE_MACS multiply-adds per input (LeNet); scaled down for costlier models.
RANK_BUDGET = 2**15


REFERENCE_MACS = 4e5


MIN_RANK_BUDGET = 2**11


#: Worst search: greedy construction only when the vector fails at most this many elements.
GREEDY_LIMIT = 16


#: Fault sets kept per vector for the report (replayable).
KEEP_WORST = 5


@dataclass
class Tally:
    configurations: int = 0
    evaluations: int = 0


class Campaign:
    """Searches fault sets for each vector with one evaluator."""

    def __init__(self, network, sites, options: InjectOptions, inputs, labels, rng, progress):
        self.network, self.sites, self.options = network, sites, options
        self.inputs, self.labels, self.rng = inputs, labels, rng
        self.progress = progress or (lambda phase, done, total: None)
        self.failure = options.failure
        self._impact: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._bounds: dict[tuple[int, ...], CombinedBound] = {}
        #: Opens an evaluator on other inputs (the joint search's confirmation where the evaluator has no
        #: ``evaluate_at``: worker pools, Ray); set by the caller.
        self.reopen: Callable[[np.ndarray], Any] | None = None
        self._moved: MovedInput | None = None
        #: The errors [sets, inputs] of every set the last search evaluated on all inputs (:meth:`_inside_found`).
        self._final_errors: np.ndarray | None = None
        #: Why the worst search kept the given inputs (once per reason, in the order met).
        self.kept_inputs: list[str] = []
        #: Why the worst search moved the input by measurements alone (:meth:`_climb_measured`; once per reason).
        self.climbed_inputs: list[str] = []
        #: The worst search's best final fault set (per site: ids, values), where the input climb starts.
        self._best_chosen: list | None = None

    def start(self, evaluator) -> None:
        """Attach the evaluator and derive the clean-output figures."""
        self.evaluator = evaluator
        clean = evaluator.clean_run.outputs
        self.clean_argmax = clean.argmax(axis=-1)
        self.margin_absolute = MARGIN_ABSOLUTE * max(1.0, float(np.abs(clean).max(initial=0.0)))
        rows = max(1, evaluator.clean_run.rows_per_run)
        self.request_rows = 32 * rows  # a few runs per request: pipe round trips stay negligible

    def clean_accuracy(self) -> float | None:
        """Accuracy of the clean model with labels."""
        if self.labels is None:
            return None
        return float(np.mean(self.clean_argmax == self.labels))

    # ---- evaluation helpers

    def _evaluate(self, batch: FaultBatch, index: np.ndarray | None, tally: Tally, phase: str):
        """Evaluate a batch in requests sized to keep the child(ren) busy; report progress."""
        m = len(self.inputs) if index is None else len(index)
        per_request = self._request_size(batch.count, m)
        starts = range(0, batch.count, per_request)
        parts = [batch.take(slice(start, start + per_request)) for start in starts]
        errors, argmax = [], []
        for start, result in zip(starts, evaluate_parts(self.evaluator, parts, index), strict=True):
            errors.append(result.errors)
            argmax.append(result.argmax)
            self.progress(phase, min(start + per_request, batch.count), batch.count)
        tally.configurations += batch.count
        tally.evaluations += batch.count * m
        return np.concatenate(errors), np.concatenate(argmax)

    def _counts(self, vector: FailureVector) -> list[int]:
        synapses = vector.synapse_counts()
        return [vector.neurons[s.hidden_index] if s.kind == "neuron" else synapses[s.hidden_index] for s in self.sites]

    def share_bounds(self, bounds: Sequence[CombinedBound]) -> None:
        """Take bounds built elsewhere on this campaign's network and failure model instead of building them again."""
        for bound in bounds:
            analysis = bound.analysis
            if analysis.network is self.network and analysis.failure == self.failure:
                self._bounds[tuple(int(s) for s in analysis.synapses)] = bound

    def _tight(self, synapses: tuple[int, ...]) -> CombinedBound:
        """The tight bound (with the paper bound inside) for a synapse-failure vector, built once."""
        if synapses not in self._bounds:
            self._bounds[synapses] = make_bounds(Analysis(self.network, self.failure, list(synapses)))[1]
        return self._bounds[synapses]

    def _bound(self, vector: FailureVector) -> tuple[float, float]:
        """(fep_paper, fep_tight = min(tight, paper)) for exactly this vector (docs/method.md §3.1), the tight one
        refined for it as ``bound --crash`` refines it (§4.1 "The output cut"): the campaign's sets have exactly
        these counts. An unbounded one (a float bit flip, docs/method.md §2.3) is +inf."""
        tight = self._tight(vector.synapse_counts())
        paper, fep = min(tight.paper.fep(vector.neurons), tight.cap), tight.fep_vector(vector.neurons)
        return (paper if paper < UNBOUNDED_REPORTED else math.inf), (fep if fep < UNBOUNDED_REPORTED else math.inf)

    # ---- one vector

    def measure(self, vector: FailureVector) -> VectorResult:
        """Search fault sets for ``vector`` and set the measurement beside its bound."""
        counts = self._counts(vector)
        tally = Tally()
        self._moved = None
        start = 0
        if self.options.search == "random":
            errors, argmax, sets, start = self._random(counts, tally)
            self._final_errors = errors
        else:
            errors, argmax, sets = self._worst(counts, tally)
            if self.options.move_inputs and any(counts):
                self._moved = self._move_input(counts, sets[0] if sets else None, tally.evaluations)
        paper, tight = self._bound(vector)
        bound = paper if self.options.method == "paper" else tight
        flips = argmax != self.clean_argmax[None, :]
        correct = None if self.labels is None else argmax == self.labels[None, :]
        stats = error_stats(errors)
        moved = None if self._moved is None else self._moved.error
        found = best_found(stats.max, moved)
        ratio, violation = judge(found, bound, self.margin_absolute)
        outside_only = violation and not judge(self._inside_found(errors, moved), bound, self.margin_absolute)[1]
        rate = None
        if self.options.search == "random":
            rate = failure_rate(exceeding(errors, self.options.epsilon), len(errors), self.options.confidence)
        shard = None
        if self.options.runner.shard is not None:
            shard = ShardData(start, start + len(errors), errors, flips, correct)
        return VectorResult(
            failures=tuple(vector.neurons),
            synapses=tuple(vector.synapse_counts()),
            measured=stats,
            flip_rate=float(np.mean(flips)) if self.network.has_classes else None,  # an image has no arg-max
            accuracy=None if correct is None else float(np.mean(correct)),
            bound=bound,
            fep_paper=paper,
            fep_tight=tight,
            ratio=ratio,
            violation=violation,
            outside_only=outside_only,
            configurations=tally.configurations,
            evaluations=tally.evaluations,
            worst=sets,
            exceeds_epsilon=exceeds_epsilon(found, self.options.epsilon),
            failure_rate=rate,
            shard_data=shard,
            moved=self._moved,
        )

    def _inside_found(self, errors: np.ndarray, moved: float | None) -> float:
        """The best found on inputs inside the input domain: over every set the search evaluated on all inputs
        (``_final_errors`` [sets, inputs], else ``errors``), the inputs inside, and the moved input (always inside).
        A violation only above this is one measured on inputs outside the domain, where the bound makes no claim
        (docs/method.md §10.2)."""
        measured = self._final_errors if self._final_errors is not None else errors
        inside = inside_domain(self.inputs, feed_box(self.network.inputs, self.network.packed))
        largest = float(measured[:, inside].max()) if measured.size and inside.any() else 0.0
        return best_found(largest, moved)

    # ---- random search

    def _random(self, counts: list[int], tally: Tally):
        """Draw every set first (the draw never depends on the split), then evaluate this shard's."""
        drawn = [self._random_set(counts) for _ in range(self.options.trials)]
        lo, hi = self._shard_range(len(drawn), self._per_run(len(self.inputs)))
        mine = drawn[lo:hi]
        batch = stack_fault_sets(mine, self.sites, counts)
        errors, argmax = self._evaluate(batch, None, tally, "random fault sets")
        if tally.configurations != len(mine):  # never report fewer sets than asked
            raise InjectionRuntimeError(f"{tally.configurations} of {len(mine)} fault sets were evaluated")
        order = np.argsort(-errors.max(axis=1), kind="stable")
        kept = _unique_indices([mine[int(c)] for c in order], KEEP_WORST)  # a set drawn twice is reported once
        sets = tuple(self._fault_set(mine[int(order[k])], errors[order[k]]) for k in kept)
        return errors, argmax, sets, lo

    def _per_run(self, m: int) -> int:
        """Fault sets per onnxruntime run on m inputs (as the evaluator cuts its runs)."""
        rows = max(1, self.evaluator.clean_run.rows_per_run)
        return max(1, rows // min(max(m, 1), rows))

    def _request_size(self, count: int, m: int) -> int:
        """Fault sets per request: whole runs, so every onnxruntime run holds the same (set × input)
        rows whatever the requests, workers or shards (docs/method.md §8.3); with several workers,
        small enough that each gets about four requests."""
        per_run = self._per_run(m)
        runs_per_request = max(1, self.request_rows // (per_run * max(m, 1)))
        workers = self.options.runner.workers
        if workers > 1:
            runs = -(-count // per_run)
            runs_per_request = max(1, min(runs_per_request, -(-runs // (4 * workers))))
        return per_run * runs_per_request

    def _shard_range(self, total: int, per_run: int) -> tuple[int, int]:
        """Fault sets [lo, hi) of this shard: the I-th of N even slices of the runs."""
        if self.options.runner.shard is None:
            return 0, total
        index, count = self.options.runner.shard
        runs = -(-total // per_run)
        if count > runs:
            raise OptionError(
                f"--shard {index}/{count}: this campaign's {total} fault sets fill {runs} onnxruntime run(s) of up "
                f"to {per_run}, and shards split whole runs; use at most {runs} shard(s) (or more --trials)"
            )
        part = split_evenly(runs, count)[index]
        return part.start * per_run, min(part.stop * per_run, total)

    def _random_set(self, counts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        chosen = []
        for s, (site, count) in enumerate(zip(self.sites, counts, strict=True)):
            size = site.neurons if site.kind == "neuron" else site.neurons * site.fan_in
            ids = np.sort(self.rng.choice(size, count, replace=False)) if count else np.zeros(0, np.int64)
            chosen.append((ids.astype(np.int64), self._random_values(count, s)))
        return chosen

    def _random_values(self, count: int, s: int | None = None) -> np.ndarray:
        a, b = self.failure.failure_range
        if self.failure.stored and count:
            return self.rng.choice(self._extremes(s), count)
        if self.failure.mode == "crash" or count == 0:
            return np.zeros(count)
        u = self.rng.random(count)
        drawn = self.rng.uniform(a, b, count)
        return np.where(u < 0.25, a, np.where(u < 0.5, b, drawn))

    # ---- worst search

    def _worst(self, counts: list[int], tally: Tally):
        m = len(self.inputs)
        search_index = np.sort(self.rng.choice(m, min(m, SEARCH_INPUTS), replace=False))
        budget = self._rank_budget() // max(1, sum(1 for c in counts if c))
        for s, count in enumerate(counts):
            if count and s not in self._impact:
                self._impact[s] = self._rank(s, search_index, tally, budget)
        seed = self._top_set(counts)
        every = self._every_set(counts, m)
        if every is not None:  # few enough to try them all: the search is exact over sets and extreme values
            index = None if len(every) * m <= self._rank_budget() else search_index
            scores = _Objective(self, counts, index, tally).scores(every)
            finals = _unique([seed, *(every[int(i)] for i in np.argsort(-scores, kind="stable")[:KEEP_WORST])])
        else:
            objective = _Objective(self, counts, search_index, tally)
            found = [seed]
            if 0 < sum(counts) <= GREEDY_LIMIT:
                found.append(self._greedy(counts, objective))
            best = max(found, key=objective.score)
            found.append(self._swaps(best, counts, objective))
            finals = _unique(found)
        batch = stack_fault_sets(finals, self.sites, counts)
        errors, argmax = self._evaluate(batch, None, tally, "worst sets on all inputs")
        self._final_errors = errors  # every final set's errors: a violation on an input inside the domain may be in any
        pick = int(np.argmax(errors.max(axis=1)))
        self._best_chosen = finals[pick]
        order = np.argsort(-errors.max(axis=1), kind="stable")[:KEEP_WORST]
        sets = tuple(self._fault_set(finals[int(c)], errors[c]) for c in order)
        return errors[pick : pick + 1], argmax[pick : pick + 1], sets

    def _every_set(self, counts: list[int], m: int) -> list | None:
        """Every fault set of ``counts`` (each failed element sending each extreme value), or None when there are
        more than the ranking's budget allows on the search inputs (docs/method.md §8.2)."""
        per_site = []
        total = 1
        for s, count in enumerate(counts):
            values = self._extremes(s)
            candidates = len(self._impact[s][0]) if count else 0
            total *= math.comb(candidates, count) * len(values) ** count
            if total * min(m, SEARCH_INPUTS) > self._rank_budget():
                return None
            per_site.append((candidates, count, values))
        choices = [
            [
                (np.array(ids, dtype=np.int64), np.array(sent, dtype=np.float64))
                for ids in itertools.combinations(range(candidates), count)
                for sent in itertools.product(values, repeat=count)
            ]
            for candidates, count, values in per_site
        ]
        return [list(chosen) for chosen in itertools.product(*choices)]

    def _rank_budget(self) -> int:
        """RANK_BUDGET scaled by the model's cost: Σ_l N_l·fan-in_l multiply-adds per input."""
        macs = sum(layer.neurons * layer.fan_in for layer in self.network.layers)
        scaled = RANK_BUDGET * min(1.0, REFERENCE_MACS / max(macs, 1))
        return int(max(MIN_RANK_BUDGET, scaled))

    def _extremes(self, s: int | None = None) -> np.ndarray:
        if self.failure.stored:  # bit flips: the candidate values are 2^B, one per bit position of site s
            width = CODE_BITS if s is None else self.sites[s].bits
            bits = [self.failure.bit] if self.failure.bit is not None else range(width)
            return np.array([2.0**b for b in bits])
        a, b = self.failure.failure_range
        return np.array([0.0]) if self.failure.mode == "crash" else np.array(sorted({a, b}))

    def _rank(self, s: int, search_index: np.ndarray, tally: Tally, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Impact score and best value per candidate of site s (single failures, one batched pass).

        When the site has more candidates than ``budget`` evaluations allow, the ones the
        tight bound weighs most (max_k P[k, i]·δ_i) are measured; the others keep that
        prior order behind every measured candidate.
        """
        site = self.sites[s]
        if site.kind == "synapse":
            return self._rank_synapses(s, search_index, tally, budget)
        n, values = site.neurons, self._extremes(s)
        inputs = search_index[: int(np.clip(budget // (n * len(values)), 1, len(search_index)))]
        measured = min(n, max(1, budget // (len(inputs) * len(values))))
        prior = self._prior(site)
        chosen = np.arange(n) if measured == n else np.sort(np.argsort(-prior, kind="stable")[:measured])
        ids = np.tile(chosen, len(values))
        sent = np.repeat(values, len(chosen))
        counts = [1 if k == s else 0 for k in range(len(self.sites))]
        batch = _stack_arrays({s: (ids[:, None], sent[:, None])}, len(ids), self.sites, counts)
        errors, _ = self._evaluate(batch, inputs, tally, f"ranking {site.layer}")
        impact = errors.max(axis=1).reshape(len(values), len(chosen))
        score = prior / (prior.max() + 1.0) - 1.0
        score[chosen] = impact.max(axis=0)
        best = np.full(n, values[-1])
        best[chosen] = values[impact.argmax(axis=0)]
        return score, best

    def _prior(self, site: FaultSite) -> np.ndarray:
        """max_k P[k, i]·δ_i of the tight bound: how much neuron i may move the output."""
        tight = self._tight((0,) * len(self.network.hidden_layers)).sensitivity
        return tight.neuron_max[site.hidden_index]

    def _rank_synapses(self, s: int, search_index: np.ndarray, tally: Tally, budget: int):
        """Synapse impact: measure the heaviest synapse into each neuron, scale by |w_ji|·max|y_i|."""
        site = self.sites[s]
        out, fan_in = site.weight.shape
        magnitude = np.abs(site.weight) * self.network.clean[site.source].abs_max().reshape(1, -1)
        heaviest = magnitude.argmax(axis=1)
        values = self._extremes()
        inputs = search_index[: int(np.clip(budget // (out * len(values)), 1, len(search_index)))]
        ids = np.tile(np.arange(out) * fan_in + heaviest, len(values))
        sent = np.repeat(values, out)
        counts = [1 if k == s else 0 for k in range(len(self.sites))]
        batch = _stack_arrays({s: (ids[:, None], sent[:, None])}, len(ids), self.sites, counts)
        errors, _ = self._evaluate(batch, inputs, tally, f"ranking {site.layer} synapses")
        impact = errors.max(axis=1).reshape(len(values), out)
        per_neuron = impact.max(axis=0)
        top = magnitude[np.arange(out), heaviest]
        scale = np.divide(magnitude, top[:, None], out=np.zeros_like(magnitude), where=top[:, None] > 0)
        score = (per_neuron[:, None] * scale).reshape(-1)
        value = np.repeat(values[impact.argmax(axis=0)], fan_in)
        return score, value

    def _pool(self, s: int, count: int) -> np.ndarray:
        """The best candidates of site s by impact (stable order)."""
        score = self._impact[s][0]
        size = min(len(score), 2 * count + 8)
        return np.argsort(-score, kind="stable")[:size]

    def _top_set(self, counts: list[int]) -> list:
        chosen = []
        for s, count in enumerate(counts):
            if not count:
                chosen.append((np.zeros(0, np.int64), np.zeros(0)))
                continue
            ids = np.sort(self._pool(s, count)[:count])
            chosen.append((ids, self._impact[s][1][ids]))
        return chosen

    def _greedy(self, counts: list[int], objective: _Objective) -> list:
        """Add, one at a time, the candidate that raises the search objective most."""
        current = [(np.zeros(0, np.int64), np.zeros(0)) for _ in counts]
        for _ in range(sum(counts)):
            proposals = []
            for s, count in enumerate(counts):
                if len(current[s][0]) >= count:
                    continue
                for c in self._pool(s, count):
                    if c not in current[s][0]:
                        proposals.append(_with(current, s, int(c), self._impact[s][1][c]))
            scores = objective.scores(proposals, grouped=True)
            current = proposals[int(np.argmax(scores))]
        return current

    def _swaps(self, start: list, counts: list[int], objective: _Objective) -> list:
        """Swap members for pool candidates (byzantine: also flip values); keep improvements."""
        best, best_score = start, objective.score(start)
        budget, stale = self.options.trials, 0
        active = [s for s, c in enumerate(counts) if c]
        values = self._extremes()
        while budget > 0 and active and stale < 3:
            proposals = []
            for _ in range(min(32, budget)):
                s = active[int(self.rng.integers(len(active)))]
                choices = self._extremes(s) if self.failure.stored else values
                proposals.append(self._neighbour(best, s, counts[s], choices))
            budget -= len(proposals)
            scores = objective.scores(proposals)
            top = int(np.argmax(scores))
            if scores[top] > best_score:
                best, best_score, stale = proposals[top], float(scores[top]), 0
            else:
                stale += 1
        return best

    def _neighbour(self, current: list, s: int, count: int, values: np.ndarray) -> list:
        ids, sent = current[s]
        position = int(self.rng.integers(len(ids)))
        pool = [int(c) for c in self._pool(s, count) if c not in ids]
        if len(values) > 1 and (not pool or self.rng.random() < 0.25):
            flipped = sent.copy()
            if self.failure.stored:  # another bit position
                flipped[position] = values[int(self.rng.integers(len(values)))]
            else:
                flipped[position] = values[1] if sent[position] == values[0] else values[0]
            return _replace(current, s, ids, flipped)
        if not pool:
            return current
        new = pool[int(self.rng.integers(len(pool)))]
        ids2, sent2 = ids.copy(), sent.copy()
        ids2[position], sent2[position] = new, self._impact[s][1][new]
        order = np.argsort(ids2)
        return _replace(current, s, ids2[order], sent2[order])

    # ---- joint search over inputs

    def _move_input(self, counts: list[int], best: FaultSet | None, spent: int) -> MovedInput | None:
        """The joint search's configuration, or None with the reason kept for :attr:`notes` where it cannot run."""
        obstacle = self._joint_obstacle(counts)
        if obstacle is None:
            return self._joint(counts, best)
        climbed = self._climb_measured(counts, best, spent)
        reasons = self.kept_inputs if climbed is None else self.climbed_inputs
        if obstacle not in reasons:
            reasons.append(obstacle)
        return climbed

    def _climb_measured(self, counts: list[int], best: FaultSet | None, spent: int) -> MovedInput | None:
        """The input moved by onnxruntime's measurements alone, with the best fault set kept (docs/method.md §8.2,
        "Where the numpy model cannot follow"): from the given input where that set was found and, on the whole
        domain, from its top corner and a random point — as many of these climbs as half the ``spent`` evaluations
        of the fault-set search pay for, at least one. None where it cannot run or gain: no fault set, an infinite
        error already, token-id inputs (integers), an evaluator in other processes (each input would open new
        sessions)."""
        from robaudit.graph.inputs import FLOAT
        from robaudit.injection.input_climb import CLIMB_MEASUREMENTS, climb_input

        chosen = self._best_chosen
        if chosen is None or best is None or not hasattr(self.evaluator, "evaluate_at"):
            return None
        if not math.isfinite(best.error):  # nothing is larger (a flipped exponent bit's Inf or NaN)
            return None
        if any(spec.kind != FLOAT for spec in self.network.variable_inputs):
            return None
        shape = tuple(self.inputs.shape[1:])
        low, high = (np.broadcast_to(np.asarray(e, np.float64), shape) for e in feed_box(self.network.inputs,
                                                                                          self.network.packed))
        batch = stack_fault_sets([chosen], self.sites, counts)

        def error_at(inputs: np.ndarray) -> np.ndarray:
            return self.evaluator.evaluate_at(inputs, batch).errors[0]

        radius = self.options.radius
        starts: list[tuple[np.ndarray, str]] = []
        if best.input_index >= 0:
            starts.append((np.asarray(self.inputs[best.input_index], np.float64), f"given input {best.input_index}"))
        if radius is None:
            starts += [(high.copy(), "corner"), (self.rng.uniform(low, high), "random point")]
        affordable = max(1, (spent // 2) // CLIMB_MEASUREMENTS)
        found: tuple[np.ndarray, float, str] | None = None
        for x0, where in starts[:affordable]:
            lo, hi = (low, high) if radius is None else (np.maximum(low, x0 - radius), np.minimum(high, x0 + radius))
            x, error = climb_input(error_at, x0, lo, hi, self.rng)
            if found is None or error > found[1]:
                found = (x, error, where)
        if found is None:
            return None
        x, error, where = found
        fault_set = self._fault_set(chosen, np.array([error]))
        return MovedInput(error, tuple(float(v) for v in x.reshape(-1)), FaultSet(fault_set.faults, error, -1), where,
                          radius)

    def _joint_obstacle(self, counts: list[int]) -> str | None:
        """Why the input cannot move with this vector's faults (None: it can), as the end of "not supported for"."""
        from robaudit.injection.joint import flips_obstacle, joint_obstacle

        flips = flips_obstacle(self.network, self.failure)
        if flips is not None:
            return flips
        if any(site.kind != "neuron" for site, c in zip(self.sites, counts, strict=True) if c):
            return "synapse failures"
        return joint_obstacle(self.network)

    @property
    def notes(self) -> tuple[str, ...]:
        """One note per reason the worst search kept the given inputs, or moved them by measurements alone (README
        "Fault injection")."""
        kept = tuple(
            f"the worst search kept the given inputs: moving the input is not supported for {reason} "
            "(best found is the largest error on them)"
            for reason in self.kept_inputs
        )
        return kept + tuple(
            f"the worst search moved the input by onnxruntime's measurements alone, with the fault set it found kept "
            f"(sign ascent along random directions): its gradient is not followed through {reason}"
            for reason in self.climbed_inputs
        )

    def _joint(self, counts: list[int], best: FaultSet | None) -> MovedInput:
        """Move the input jointly with the fault set and values (docs/method.md §8.2); confirm in onnxruntime."""
        from robaudit.injection.joint import JointSearch

        hidden = self.network.hidden_layers
        per_layer = [0] * len(hidden)
        for site, count in zip(self.sites, counts, strict=True):
            per_layer[site.hidden_index] = count
        seeds = []
        if best is not None:
            seed = [(np.zeros(0, np.int64), np.zeros(0)) for _ in hidden]
            by_name = {la.name: i for i, la in enumerate(hidden)}
            for layer in best.faults:
                seed[by_name[layer.layer]] = (np.array(layer.neurons, np.int64), np.array(layer.values, np.float64))
            seeds.append(seed)
        search = JointSearch(self.network, self.failure, self.rng)
        first = best.input_index if best is not None and best.input_index >= 0 else None
        found = search.search(per_layer, self.inputs, seeds, self.options.radius, first=first)
        chosen = [found.chosen[site.hidden_index] for site in self.sites]
        error = found.error
        batch = stack_fault_sets([chosen], self.sites, counts)
        if hasattr(self.evaluator, "evaluate_at"):  # the campaign's own session, on the moved input
            error = float(self.evaluator.evaluate_at(found.x[None], batch).errors.max())
        elif self.reopen is not None:  # a pool of workers or Ray: one more evaluator on that input
            evaluator = self.reopen(found.x[None])
            try:
                error = float(evaluator.evaluate(batch, None).errors.max())
            finally:
                evaluator.close()
        fault_set = self._fault_set(chosen, np.array([error]))
        fault_set = FaultSet(fault_set.faults, error, -1)
        values = tuple(float(v) for v in found.x.reshape(-1))
        return MovedInput(error, values, fault_set, found.start, self.options.radius)

    # ---- reporting

    def _fault_set(self, chosen: list, errors: np.ndarray) -> FaultSet:
        faults = []
        for site, (ids, sent) in zip(self.sites, chosen, strict=True):
            if not len(ids):
                continue
            values = tuple(float(v) for v in sent)
            if site.kind == "neuron":
                neurons = tuple(int(i) for i in ids)
                faults.append(
                    LayerFaults(site.layer, neurons, values, index=site.hidden_index + 1, shape=tuple(site.shape))
                )
            else:
                pairs = tuple((int(i % site.fan_in), int(i // site.fan_in)) for i in ids)
                faults.append(
                    LayerFaults(site.layer, synapses=pairs, synapse_values=values, index=site.hidden_index + 1)
                )
        return FaultSet(tuple(faults), float(errors.max()), int(np.argmax(errors)))


def error_stats(errors: np.ndarray) -> ErrorStats:
    """max, mean and 95th percentile over every (set, input) pair of ``errors`` [C, M]. An infinite error (a flipped
    float exponent bit) has no interpolated percentile beside it (inf − inf): the percentile is then the order
    statistic at or above it."""
    finite = bool(np.isfinite(errors).all())
    p95 = np.percentile(errors, 95) if finite else np.percentile(errors, 95, method="higher")
    return ErrorStats(float(errors.max()), float(errors.mean()), float(p95))


def judge(measured: float, bound: float, margin_absolute: float) -> tuple[float | None, bool]:
    """(measured / bound, violation): a violation is above bound·(1 + MARGIN_RELATIVE) + margin_absolute.

    An unbounded bound (+inf: a float bit flip, docs/method.md §2.3) has no ratio and no violation.
    """
    if bound == float("inf"):
        return None, False
    ratio = measured / bound if bound > 0 else (None if measured == 0 else float("inf"))
    return ratio, bool(measured > bound * (1 + MARGIN_RELATIVE) + margin_absolute)


def exceeding(errors: np.ndarray, epsilon: float) -> int:
    """Fault sets (rows of ``errors`` [C, M]) whose largest error over the inputs exceeds ε."""
    return int(np.count_nonzero(errors.max(axis=1) > epsilon))


class _Objective:
    """The worst search's objective: the largest error over the search inputs."""

    def __init__(self, campaign: Campaign, counts, index, tally):
        self.campaign, self.counts, self.index, self.tally = campaign, counts, index, tally

    def scores(self, sets: list, grouped: bool = False) -> np.ndarray:
        """Objective of each set; ``grouped``: sets may differ in their counts per site."""
        if not sets:
            return np.zeros(0)
        out = np.zeros(len(sets))
        keys = [tuple(len(ids) for ids, _ in chosen) for chosen in sets] if grouped else [None] * len(sets)
        for key in dict.fromkeys(keys):
            members = [i for i, k in enumerate(keys) if k == key]
            counts = list(key) if key is not None else self.counts
            batch = stack_fault_sets([sets[i] for i in members], self.campaign.sites, counts)
            errors, _ = self.campaign._evaluate(batch, self.index, self.tally, "worst-case search")
            out[members] = errors.max(axis=1)
        return out

    def score(self, chosen: list) -> float:
        """Objective of one set."""
        return float(self.scores([chosen], grouped=True)[0])


def _with(current: list, s: int, candidate: int, value: float) -> list:
    ids, sent = current[s]
    ids2 = np.append(ids, candidate)
    sent2 = np.append(sent, value)
    order = np.argsort(ids2)
    return _replace(current, s, ids2[order], sent2[order])


def _replace(current: list, s: int, ids: np.ndarray, sent: np.ndarray) -> list:
    copy = list(current)
    copy[s] = (ids, sent)
    return copy


def _unique(sets: list) -> list:
    return [sets[k] for k in _unique_indices(sets)]


def _unique_indices(sets: list, limit: int | None = None) -> list[int]:
    """Positions of the first occurrence of each fault set in ``sets`` (at most ``limit`` of them)."""
    seen, out = set(), []
    for k, chosen in enumerate(sets):
        key = tuple((tuple(ids.tolist()), tuple(sent.tolist())) for ids, sent in chosen)
        if key not in seen:
            seen.add(key)
            out.append(k)
            if limit is not None and len(out) == limit:
                break
    return out


def stack_fault_sets(sets: list, sites: tuple[FaultSite, ...], counts: list[int]) -> FaultBatch:
    """A batch from fault sets (per site: ids, values) that share ``counts``."""
    arrays = {}
    for s, count in enumerate(counts):
        if count:
            ids = np.stack([chosen[s][0] for chosen in sets]).astype(np.int64)
            sent = np.stack([chosen[s][1] for chosen in sets]).astype(np.float64)
            arrays[s] = (ids, sent)
    return _stack_arrays(arrays, len(sets), sites, counts)


def _stack_arrays(arrays: dict, count: int, sites: tuple[FaultSite, ...], counts: list[int]) -> FaultBatch:
    neurons, synapses = {}, {}
    for s, (ids, sent) in arrays.items():
        if sites[s].kind == "neuron":
            neurons[s] = (ids, sent)
        else:
            fan_in = sites[s].fan_in
            synapses[s] = (ids % fan_in, ids // fan_in, sent)
    return FaultBatch(count, neurons, synapses)
