"""PNG plots of bounds against failures or bits (matplotlib, the optional extra ``robaudit[plot]``).

The functions take plain numbers (no robaudit objects) and return a
:class:`matplotlib.figure.Figure`; :func:`save_png` writes it. matplotlib is imported
inside the functions, so robaudit works without it until a plot is asked for.

    curves   = {"fc1": ([1, 2, 3], [0.02, 0.04, 0.06]), "fc2": (...)}
    measured = {"fc1": ([1, 2, 3], [0.003, 0.01, 0.02])}      # optional
    fig = plot_failure_curves(curves, epsilon=0.05, measured=measured, title="model.onnx, crash")
    save_png(fig, "bound.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from robaudit.errors import PlotError

#: Figure size in inches and resolution: PNGs are 960 × 600 pixels.
FIGSIZE = (9.6, 6.0)
DPI = 100

Series = tuple[Sequence[float], Sequence[float]]


def _figure_class():
    """matplotlib's Figure (the object-oriented API: no pyplot state, no display backend)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed; pip install 'robaudit[plot]'") from None
    return Figure


#: Dash patterns of successive curves (solid, dashed, dotted, dash-dot).
LINESTYLES = ("-", "--", ":", "-.")


def plot_curves(
    curves: Mapping[str, Series],
    epsilon: float,
    measured: Mapping[str, Series] | None = None,
    *,
    title: str = "",
    xlabel: str,
    ylabel: str = "bound on the output error (∞-norm)",
    bound_label: str = "bound",
):
    """Bound curves (lines) on a log y axis, ε as a horizontal line, measured errors as points.

    A series named in both ``curves`` and ``measured`` shares its colour. Values ≤ 0
    cannot sit on a log axis: a zero bound is left out of its line, and a measured 0
    is drawn as a ▽ on the bottom edge so that it is seen, not dropped.
    """
    figure = _figure_class()(figsize=FIGSIZE, dpi=DPI)
    ax = figure.add_subplot()
    measured = measured or {}
    positive = [y for _, ys in [*curves.values(), *measured.values()] for y in ys if y > 0] + [epsilon]
    floor = min(positive) / 3
    colours = {}
    for index, (name, (xs, ys)) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        colours[name] = colour
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
        if points:
            px, py = zip(*points, strict=True)
            # Curves may coincide (one layer dominating the joint curve): each gets its own dash
            # pattern, and later curves are drawn under earlier ones, so none hides another.
            ax.plot(
                px,
                py,
                LINESTYLES[index % len(LINESTYLES)],
                color=colour,
                linewidth=1.8 + 1.2 * (index == len(curves) - 1 and len(curves) > 1),
                zorder=2.0 - index / (len(curves) + 1),
                label=f"{name} {bound_label}",
            )
    _draw_measured(ax, measured, colours, floor, len(curves))
    ax.axhline(epsilon, color="black", linestyle="--", linewidth=1.2, label=f"ε = {epsilon:g}")
    ax.set_yscale("log")
    if all(float(x).is_integer() for xs, _ in [*curves.values(), *measured.values()] for x in xs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=floor)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 7:  # many layers: beside the plot, not over the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)
    else:
        ax.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return figure


def _draw_measured(ax, measured: Mapping[str, Series], colours: dict, floor: float, offset: int) -> None:
    zero_drawn = False
    for index, (name, (xs, ys)) in enumerate(measured.items()):
        colour = colours.get(name, f"C{(offset + index) % 10}")
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
        zeros = [x for x, y in zip(xs, ys, strict=True) if y <= 0]
        if points:
            px, py = zip(*points, strict=True)
            ax.plot(px, py, "o", color=colour, markersize=6, markeredgecolor="black", label=f"{name} measured")
        if zeros:
            label = "measured 0 (drawn at the bottom)" if not zero_drawn else None
            ax.plot(zeros, [floor] * len(zeros), "v", color=colour, markersize=7, clip_on=False, label=label)
            zero_drawn = True


def plot_failure_curves(
    curves: Mapping[str, Series],
    epsilon: float,
    measured: Mapping[str, Series] | None = None,
    title: str = "",
):
    """Fep against the number of failed neurons in each layer (that layer alone) — for ``bound``/``inject``.

    ``curves[layer] = (counts, bounds)``, ``measured[layer] = (counts, worst errors)``.
    """
    return plot_curves(
        curves,
        epsilon,
        measured,
        title=title,
        xlabel="failed neurons in each failing layer (other layers intact)",
        bound_label="Fep",
    )


def plot_precision_curves(
    curves: Mapping[str, Series],
    epsilon: float,
    measured: Mapping[str, Series] | None = None,
    title: str = "",
):
    """The rounding bound against bits per stored value — for ``precision``.

    ``curves[layer] = (bits, bound with only that layer rounded)``, plus any joint curve
    such as ``"all layers"``; ``measured`` from ``--check`` at the chosen bits.
    """
    return plot_curves(curves, epsilon, measured, title=title, xlabel="bits per stored value")


def save_png(figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG of FIGSIZE × DPI pixels."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PlotError(f"--plot writes PNG files; give a name ending in .png, got '{path}'")
    try:
        figure.savefig(path, format="png", dpi=DPI)
    except OSError as exc:
        raise PlotError(f"cannot write plot '{path}': {exc.strerror}") from None
    return path
