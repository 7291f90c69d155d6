"""The Python API: ``robaudit.bound``, ``robaudit.inject``, ``robaudit.certify``, ``robaudit.check``
(docs/api.md).

Each function takes a model as a path or an in-memory :class:`onnx.ModelProto`, runs what the
command of the same name runs, and returns the same typed, frozen result the command renders
(``result.to_dict()`` is its YAML/JSON report). Bad input raises a subclass of
:class:`robaudit.errors.RobauditError`; nothing here prints or exits.

Heavy modules (onnxruntime, the injection and the CI gate) are imported inside the functions,
so ``import robaudit`` stays as cheap as the command line's start-up.
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from robaudit.options import DEFAULT_TRIALS

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from robaudit.bounds.certify import CertifyResult
    from robaudit.bounds.results import BoundResult
    from robaudit.gate.gate import CheckResult
    from robaudit.injection.results import InjectResult

#: A model: a path to an ``.onnx`` file or an in-memory ``onnx.ModelProto``.
Model = Union[str, "os.PathLike[str]", "onnx.ModelProto"]
#: Failure counts: one count for every hidden layer, or one per hidden layer.
Counts = int | Sequence[int] | None

#: How an in-memory model is named in reports.
IN_MEMORY = "<in-memory model>"


@contextmanager
def _model_path(model: Model) -> Iterator[tuple[Path, bool]]:
    """A file path for ``model`` (an in-memory model is written to a private temporary folder)."""
    if isinstance(model, (str, os.PathLike)):
        yield Path(model), False
        return
    if not hasattr(model, "SerializeToString"):
        from robaudit.errors import OptionError

        raise OptionError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="robaudit-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        yield path, True


def _renamed(result: Any, in_memory: bool) -> Any:
    """Name an in-memory model in the result instead of its temporary file."""
    if not in_memory:
        return result
    return replace(result, model=replace(result.model, path=IN_MEMORY))


def _counts(value: Counts, name: str) -> tuple[int, ...] | None:
    """One count, or one per hidden layer, as ints (numpy integers too); anything else is an OptionError."""
    from robaudit.errors import OptionError

    if value is None:
        return None
    if hasattr(value, "tolist") and not isinstance(value, numbers.Integral):  # a numpy array of counts
        value = value.tolist()
    values = (value,) if isinstance(value, numbers.Integral) or not isinstance(value, Sequence) else value
    counts = tuple(values) if not isinstance(values, str) else ()
    if not counts or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts):
        raise OptionError(f"{name} takes an int or a sequence of ints, got {value!r}")
    return tuple(int(c) for c in counts)


def _number(value: Any, name: str) -> float:
    """``value`` as a float (a real number, not a bool), else an OptionError naming the argument."""
    from robaudit.errors import OptionError

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} takes a number, got {value!r}")
    return float(value)


def _failure(
    crash: Counts,
    byzantine: Counts,
    capacity: float | None,
    failure_range: tuple[float, float] | None,
    activation_bound: float | None,
    bit_flip: Counts = None,
    bit: int | None = None,
    stuck_at: int | None = None,
):
    """(FailureModel, counts) from the failure arguments, as the command line resolves its flags: ``bit_flip``,
    ``bit`` or ``stuck_at`` mean stored-value faults (docs/method.md §2.3)."""
    from robaudit.bounds.fep import FailureModel
    from robaudit.errors import OptionError

    if bit_flip is not None or bit is not None or stuck_at is not None:
        if crash is not None or byzantine is not None or capacity is not None or failure_range is not None:
            raise OptionError("give either bit_flip (with bit / stuck_at) or crash / byzantine, not both")
        if stuck_at is not None:
            return FailureModel.stuck_at(stuck_at, bit, activation_bound), _counts(bit_flip, "bit_flip")
        return FailureModel.bit_flip(bit, activation_bound), _counts(bit_flip, "bit_flip")
    if crash is not None and byzantine is not None:
        raise OptionError("give either crash or byzantine, not both")
    if byzantine is not None or capacity is not None or failure_range is not None:
        if capacity is not None and failure_range is not None:
            raise OptionError("give either capacity or failure_range, not both")
        if crash is not None:
            raise OptionError("capacity and failure_range apply to byzantine failures")
        failure = FailureModel.byzantine(capacity, failure_range, activation_bound)
        return failure, _counts(byzantine, "byzantine")
    return FailureModel.crash(activation_bound), _counts(crash, "crash")


def _network_options(input_range: Sequence[float], input_shape: Sequence[int] | None, output: str | None):
    from robaudit.errors import OptionError
    from robaudit.graph.network import NetworkOptions

    if hasattr(input_range, "tolist"):  # a numpy pair
        input_range = input_range.tolist()
    if isinstance(input_range, (str, bytes)) or not isinstance(input_range, Sequence) or len(input_range) != 2:
        raise OptionError(f"input_range takes (lo, hi), got {input_range!r}")
    lo, hi = (_number(v, "input_range") for v in input_range)
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    return NetworkOptions(input_shape=shape, output=output, input_range=(lo, hi))


def bound(
    model: Model,
    epsilon: float = 0.1,
    *,
    crash: Counts = None,
    byzantine: Counts = None,
    capacity: float | None = None,
    failure_range: tuple[float, float] | None = None,
    bit_flip: Counts = None,
    bit: int | None = None,
    stuck_at: int | None = None,
    synapse: Counts = None,
    method: str = "tight",
    input_range: Sequence[float] = (0.0, 1.0),
    input_shape: Sequence[int] | None = None,
    activation_bound: float | None = None,
    output: str | None = None,
    include_output_layer: bool = False,
) -> BoundResult:
    """``robaudit bound``: tolerated failures per hidden layer, uniform and in total (docs/method.md §3, §4, §6).

    ``crash=2`` (or ``crash=[2, 1, 0]``) also gives ``fep`` for that failure vector;
    ``byzantine`` needs ``capacity`` C or ``failure_range`` (A, B); ``bit_flip`` (with ``bit`` B, or
    ``stuck_at`` 0/1) fails stored bits (docs/method.md §2.3). Returns a
    :class:`~robaudit.bounds.results.BoundResult`. Raises
    :class:`~robaudit.errors.RobauditError` subclasses (ModelFileError, UnsupportedModelError,
    OptionError, ShapeError, ...).
    """
    from robaudit.bounds.audit import BoundOptions, compute_bound

    failure, counts = _failure(crash, byzantine, capacity, failure_range, activation_bound, bit_flip, bit, stuck_at)
    options = BoundOptions(
        epsilon=_number(epsilon, "epsilon"),
        failure=failure,
        method=method,
        network=_network_options(input_range, input_shape, output),
        failures=counts,
        synapses=_counts(synapse, "synapse"),
        include_output_layer=include_output_layer,
    )
    with _model_path(model) as (path, in_memory):
        return _renamed(compute_bound(path, options, capacity), in_memory)


def inject(
    model: Model,
    epsilon: float = 0.1,
    *,
    crash: Counts = None,
    byzantine: Counts = None,
    capacity: float | None = None,
    failure_range: tuple[float, float] | None = None,
    bit_flip: Counts = None,
    bit: int | None = None,
    stuck_at: int | None = None,
    layers: Sequence[str] = (),
    search: str = "random",
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    inputs: np.ndarray | str | os.PathLike[str] | None = None,
    labels: np.ndarray | str | os.PathLike[str] | None = None,
    samples: int = 64,
    method: str = "tight",
    input_range: Sequence[float] = (0.0, 1.0),
    input_shape: Sequence[int] | None = None,
    output: str | None = None,
    isolate: bool = True,
) -> InjectResult:
    """``robaudit inject``: fault injection with onnxruntime beside the bound (docs/method.md §8).

    Fails ``crash`` (default 1), ``byzantine`` or ``bit_flip`` (``bit``, ``stuck_at``) neurons in each hidden
    layer (or in ``layers``) on ``inputs`` (an array [M, *input shape] or a ``.npy``/``.npz`` file) or on
    ``samples`` draws from ``input_range``. Returns an
    :class:`~robaudit.injection.results.InjectResult`: per vector ``measured``, ``bound``,
    ``violation`` (measured above the bound) and ``exceeds_epsilon`` (measured above ε).
    ``isolate=False`` runs onnxruntime in this process. Raises
    :class:`~robaudit.errors.RobauditError` subclasses.
    """
    import numpy as np

    from robaudit.bounds.audit import load_network, model_info
    from robaudit.injection.campaign import failure_vector, run_injection
    from robaudit.injection.instrument import load_feed
    from robaudit.injection.results import InjectOptions
    from robaudit.injection.sandbox import Limits, default_memory_bytes
    from robaudit.inputs import load_labels

    failure, counts = _failure(crash, byzantine, capacity, failure_range, None, bit_flip, bit, stuck_at)
    with _model_path(model) as (path, in_memory):
        loaded, network = load_network(path, _network_options(input_range, input_shape, output))
        named = (layers,) if isinstance(layers, str) else tuple(layers)  # one name, not its letters
        vector = failure_vector(network, counts or (1,), None, named, failure.count_flag)
        x, source = (None, "")
        if isinstance(inputs, (str, os.PathLike)):
            x, source = load_feed(inputs, network)
        elif inputs is not None:
            x, source = np.asarray(inputs), "array"
        y = None
        if labels is not None:
            if x is None:
                from robaudit.errors import OptionError

                raise OptionError("labels need inputs (labels of sampled inputs are unknown)")
            classes = int(np.prod(network.clean[network.output_name].shape[1:]))
            if isinstance(labels, (str, os.PathLike)):
                y = load_labels(labels, len(x), classes)[0]
            else:
                y = np.asarray(labels)
        options = InjectOptions(
            failure=failure,
            vectors=(vector,),
            epsilon=_number(epsilon, "epsilon"),
            method=method,
            search=search,
            trials=trials,
            seed=seed,
            inputs=x,
            labels=y,
            inputs_source=source,
            samples=samples,
            capacity=capacity,
            isolate=isolate,
            limits=Limits(memory_bytes=default_memory_bytes()),
        )
        return _renamed(run_injection(network, options, model_info(loaded)), in_memory)


def check(
    models: Model | Sequence[Model] = (),
    epsilon: float | None = None,
    *,
    require_crash: int | None = None,
    require_byzantine: int | None = None,
    require_total: int | None = None,
    require_layers: Mapping[str, int] | None = None,
    mode: str | None = None,
    method: str | None = None,
    capacity: float | None = None,
    input_range: Sequence[float] | None = None,
    policy: str | os.PathLike[str] | None = None,
    baseline: str | os.PathLike[str] | None = None,
    allow_skipped: bool = False,
) -> CheckResult:
    """``robaudit check``: a fault-tolerance policy on models (docs/ci.md).

    ``models`` are paths, globs or in-memory models; the requirements come from the
    arguments, from ``policy`` (a ``robaudit.yaml`` or ``pyproject.toml``), or from the
    policy file in the working directory. ``result.passed`` says whether the policy holds
    (a skipped requirement counts only with ``allow_skipped``). Raises
    :class:`~robaudit.errors.PolicyError` for a bad policy and other
    :class:`~robaudit.errors.RobauditError` subclasses for unusable models.
    """
    from robaudit.gate.gate import run_check
    from robaudit.gate.policy import Overrides, load_policy

    given = [models] if isinstance(models, (str, os.PathLike)) or hasattr(models, "SerializeToString") else models
    with tempfile.TemporaryDirectory(prefix="robaudit-") as folder:
        paths = []
        for i, model in enumerate(given):
            if hasattr(model, "SerializeToString"):
                path = Path(folder) / f"model{i}.onnx"
                path.write_bytes(model.SerializeToString())
                paths.append(str(path))
            else:
                paths.append(str(model))
        overrides = Overrides(
            models=tuple(paths),
            epsilon=epsilon,
            mode=mode,
            method=method,
            input_range=None if input_range is None else (float(input_range[0]), float(input_range[1])),
            capacity=capacity,
            require_crash=require_crash,
            require_byzantine=require_byzantine,
            require_total=require_total,
            require_layers=tuple((str(k), int(v)) for k, v in (require_layers or {}).items()),
            has_baseline=baseline is not None,
        )
        loaded = load_policy(None if policy is None else Path(policy), overrides)
        return run_check(loaded, None if baseline is None else Path(baseline), allow_skipped=allow_skipped)


def certify(
    model: Model,
    inputs: np.ndarray | str | os.PathLike[str],
    *,
    labels: np.ndarray | str | os.PathLike[str] | None = None,
    crash: Counts = None,
    byzantine: Counts = None,
    capacity: float | None = None,
    failure_range: tuple[float, float] | None = None,
    bit_flip: Counts = None,
    bit: int | None = None,
    stuck_at: int | None = None,
    epsilon: float = 0.1,
    radius: float | None = None,
    input_range: Sequence[float] = (0.0, 1.0),
    input_shape: Sequence[int] | None = None,
    output: str | None = None,
    include_output_layer: bool = False,
    layer_counts: bool = True,
    workers: int = 1,
    classes: bool | None = None,
) -> CertifyResult:
    """``robaudit certify``: per-input certificates (docs/method.md §7).

    ``inputs`` is an array [M, *input shape] or a ``.npy``/``.npz`` file; ``crash=1`` (the default
    when no count is given) or ``byzantine=N`` with ``capacity``/``failure_range``, or ``bit_flip=N`` with ``bit``
    / ``stuck_at``; ``radius``
    certifies every input within that ∞-norm distance of each given one; ``workers`` > 1 certifies
    slices of the inputs in that many processes (the same result); ``classes`` says whether the
    output's elements are class scores (None: a vector output has classes, §7.4). Returns a
    :class:`~robaudit.bounds.certify.CertifyResult` (per input ``bound``/``certified``,
    ``max_bound``, ``certified_fraction``, ``certified_accuracy`` with labels, per layer
    ``max_failures_certified``). Raises :class:`~robaudit.errors.RobauditError` subclasses.
    """
    import numpy as np

    from robaudit.bounds.audit import certify_settings, check_counts_fit, expand_counts, load_network, model_info
    from robaudit.bounds.certify import certify_inputs
    from robaudit.errors import OptionError
    from robaudit.injection.instrument import feed_shape
    from robaudit.inputs import check_inputs, check_labels, load_inputs, load_labels

    if radius is not None and not radius > 0:
        raise OptionError(f"radius must be > 0, got {radius:g}")
    eps = _number(epsilon, "epsilon")
    failure, counts = _failure(crash, byzantine, capacity, failure_range, None, bit_flip, bit, stuck_at)
    with _model_path(model) as (path, in_memory):
        loaded, network = load_network(path, _network_options(input_range, input_shape, output), include_output_layer)
        what = "bit_flip" if failure.stored else "crash" if failure.mode == "crash" else "byzantine"
        failures = expand_counts(counts or (1,), len(network.hidden_layers), what)
        assert failures is not None
        check_counts_fit(failures, network.hidden_layers, what)
        shape = feed_shape(network)
        if isinstance(inputs, (str, os.PathLike)):
            x, source = load_inputs(inputs, shape)
        else:
            x, source = check_inputs(np.asarray(inputs), shape, "given"), "array"
        outputs = int(network.clean[network.tail_start].lo.size)
        y = None
        if isinstance(labels, (str, os.PathLike)):
            y, _ = load_labels(labels, len(x), outputs)
        elif labels is not None:
            y = check_labels(np.asarray(labels), len(x), outputs, "given")
        result = certify_inputs(
            network, failure, x, failures, eps, radius, y, None, layer_counts, workers, classes
        )
        settings = certify_settings(network, failure, eps, capacity)
        result = replace(result, model=model_info(loaded), settings=settings, inputs_file=source)
        return _renamed(result, in_memory)
