"""``--plot FILE.png`` of ``bound`` and ``inject``: Fep curves per layer with measured points.

Glue only: the curves come from ``robaudit.applications.failure_curves`` (the bound of
the selected method against f failures in one layer alone), the drawing from
``robaudit.formats.plot``; measured errors are placed on a layer's curve when only that layer
failed.
"""

from __future__ import annotations

from pathlib import Path

from robaudit.bounds.audit import BoundOptions
from robaudit.bounds.results import EmpiricalLayer
from robaudit.cli.common import wrote
from robaudit.errors import OptionError
from robaudit.graph.layers import layer_label
from robaudit.graph.network import Network


def check_png(path: Path | None) -> None:
    """Refuse a --plot target that is not a .png before any work is done."""
    if path is not None and path.suffix.lower() != ".png":
        raise OptionError(f"--plot writes PNG files; give a name ending in .png, got '{path}'")
    if path is not None and not path.parent.is_dir():
        raise OptionError(f"--plot '{path}': the folder '{path.parent}' does not exist")


def _save(
    network: Network, options: BoundOptions, measured: dict, title: str, path: Path, joint: dict | None = None
) -> None:
    from robaudit.applications import failure_curves
    from robaudit.formats.plot import plot_failure_curves, save_png

    top = max((max(counts) for counts, _ in measured.values() if counts), default=0)
    curves = failure_curves(network, options, max_count=max(10, 2 * top) if top else None)
    curves.update(joint or {})
    labels = {la.name: layer_label(la.index, la.name) for la in network.hidden_layers}
    curves = {labels.get(name, name): curve for name, curve in curves.items()}
    measured = {labels.get(name, name): points for name, points in measured.items()}
    save_png(plot_failure_curves(curves, options.epsilon, measured or None, title), path)
    wrote("plot", path)


def plot_bound(network: Network, options: BoundOptions, empirical: dict[str, EmpiricalLayer], path: Path) -> None:
    """Curves of ``bound``; with ``--empirical``, the worst measured error at each tested count."""
    measured = {
        name: ([c.failures for c in layer.counts], [c.measured for c in layer.counts])
        for name, layer in empirical.items()
    }
    _save(network, options, measured, f"{network.graph_name} — bound ({options.method})", path)


def plot_inject(network: Network, options: BoundOptions, result, path: Path) -> list[str]:
    """Curves of the failing layers and each single-layer vector's worst measured error; notes."""
    names = [la.name for la in network.hidden_layers]
    measured: dict[str, tuple[list[int], list[float]]] = {}
    joint: dict[str, tuple[list[int], list[float]]] = {}
    notes = []
    for vector in result.vectors:
        failing = [(names[i], f) for i, f in enumerate(vector.failures) if f]
        if len(failing) == 1:
            counts, errors = measured.setdefault(failing[0][0], ([], []))
            counts.append(failing[0][1])
            errors.append(vector.measured.max)
        elif failing and len({f for _, f in failing}) == 1:
            # The same count in several layers: a curve of those layers failing together.
            label = _joint_curve(network, options, [i for i, f in enumerate(vector.failures) if f], joint)
            counts, errors = measured.setdefault(label, ([], []))
            counts.append(failing[0][1])
            errors.append(vector.measured.max)
        elif failing:
            notes.append(
                f"--plot: failures in {len(failing)} layers at once (measured {vector.measured.max:.4g}, bound "
                f"{vector.bound:.4g}) have no single-layer curve; use --layer NAME to plot a layer's points"
            )
    title = f"{network.graph_name} — measured vs bound ({options.method})"
    _save(network, options, measured, title, path, joint)
    return notes


def _joint_curve(network: Network, options: BoundOptions, layers: list[int], joint: dict, top: int = 10) -> str:
    """Add the bound of f failures in each of ``layers`` at once (f = 1..top) to ``joint``; its label."""
    from robaudit.applications.analysis import select_method
    from robaudit.bounds.fep import Analysis

    hidden = network.hidden_layers
    label = "all layers together" if len(layers) == len(hidden) else "#" + ",#".join(str(i + 1) for i in layers)
    if label not in joint:
        method = select_method(Analysis(network, options.failure), options.method)
        counts = list(range(1, min([top] + [hidden[i].neurons for i in layers]) + 1))
        values = [float(method.fep_upto([f if i in layers else 0 for i in range(len(hidden))])) for f in counts]
        joint[label] = (counts, values)
    return label
