"""The figures of the official SQuAD v2.0 script's ``--out-image-dir``: precision-recall curves
and histograms of the no-answer probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from macsc.errors import ConfigError
from macsc.squad.metric import PrecisionRecall

PR_TITLES = {
    "pr_exact": "Precision-Recall curve for Exact Match score",
    "pr_f1": "Precision-Recall curve for F1 score",
    "pr_oracle": "Oracle Precision-Recall curve (binary task of HasAns vs. NoAns)",
}


def _new_figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure()
    FigureCanvasAgg(figure)  # Agg: no display needed, and pyplot's global state stays untouched
    return figure


def plot_precision_recall(curve: PrecisionRecall, path: Path, title: str) -> None:
    """The curve as a filled step plot (precision held until the next recall), PNG at ``path``."""
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.step(curve.recalls, curve.precisions, where="post", color="b", alpha=0.2)
    axes.fill_between(curve.recalls, curve.precisions, step="post", color="b", alpha=0.2)
    axes.set(xlabel="Recall", ylabel="Precision", xlim=(0.0, 1.05), ylim=(0.0, 1.05), title=title)
    figure.savefig(path)


def plot_na_prob_histogram(values: Sequence[float], path: Path, name: str) -> None:
    """Share of questions per no-answer probability bin (20 bins over [0, 1]; values outside
    are not drawn, as in the official script), PNG at ``path``."""
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(values, bins=20, range=(0.0, 1.0), weights=[1.0 / len(values)] * len(values))
    axes.set(
        xlabel="Model probability of no-answer",
        ylabel="Proportion of dataset",
        title=f"Histogram of no-answer probability: {name}",
    )
    figure.savefig(path)


def write_images(
    image_dir: str,
    curves: Mapping[str, PrecisionRecall],
    golds: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float],
) -> list[Path]:
    """``pr_exact.png``, ``pr_f1.png``, ``pr_oracle.png`` (when there are curves) and
    ``na_prob_hist_hasAns.png`` / ``na_prob_hist_noAns.png`` (when the group has questions with a
    no-answer probability) into ``image_dir`` (created); returns the files written."""
    folder = Path(image_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"-p/--out-image-dir {image_dir!r} cannot be created: {err}") from err
    written = []
    for name, curve in curves.items():
        written.append(folder / f"{name}.png")
        plot_precision_recall(curve, written[-1], PR_TITLES[name])
    for name, answerable in (("hasAns", True), ("noAns", False)):
        values = [
            na_probs[q] for q, gold in golds.items() if bool(gold) == answerable and q in na_probs
        ]
        if values:
            written.append(folder / f"na_prob_hist_{name}.png")
            plot_na_prob_histogram(values, written[-1], name)
    return written
