"""Figures of ``benchmarks/ats_ablations.py`` (written atomically, matplotlib Agg).

* ``ats_entropy.png`` / ``ats_patches.png``: the supplement's Figures 1 and 2 — rows are the runs
  (λ or number of patches), columns epochs, each cell the attention on the first probe image over it;
* ``ats_vs_mil.png``: ATS beside attention-MIL (last epoch) on three probe images with the digits' boxes;
* ``ats_curves.png``: entropy, attention mass on the digits, test accuracy and the distance to the
  study's reference run against epoch, one row per study in the results file;
* ``ats_variance.png``: trace of the gradient covariance and the bias against the number of patches.

``tiny=True`` writes ``*_tiny.png`` so test runs never overwrite the committed figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

FIGURE_NAMES = {
    "entropy": "ats_entropy",
    "patches": "ats_patches",
    "mil": "ats_vs_mil",
    "variance": "ats_variance",
}


def ordered(runs: dict[str, dict]) -> dict[str, dict]:
    """Runs in the order of their setting (λ, then the number of patches; ATS before attention-MIL), not
    in the order they finished."""
    key = lambda item: (item[1].get("kind") != "ats", item[1].get("entropy_weight", 0.0),  # noqa: E731
                        item[1].get("n_patches", 0))  # fmt: skip
    return dict(sorted(runs.items(), key=key))


def _suffix(entry: dict[str, Any]) -> str:
    """Needle-MNIST studies get their own files (``ats_entropy_needle256.png``)."""
    setup = entry["setup"]
    name = "" if setup["dataset"] == "megapixel_mnist" else f"_needle{setup['canvas']}"
    if setup.get("recipe", "reference") != "reference":
        name += f"_{setup['recipe']}"
    return name + (f"_cell{setup['cell_size']}" if setup.get("cell_size") else "")


def _save(fig, folder: Path, name: str, tiny: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'_tiny' if tiny else ''}.png"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _map(run: dict[str, Any], epoch: str, probe: int) -> np.ndarray:
    side = run["figure_side"]
    return np.asarray(run["figure_maps"][epoch][probe], dtype=float).reshape(side, -1)


def _show(ax, image: np.ndarray | None, amap: np.ndarray, canvas: int, boxes=None) -> None:
    if image is not None:
        ax.imshow(image, cmap="gray", extent=(0, canvas, canvas, 0))
    # vmin 0: a uniform map reads as uniform, not as amplified rounding noise
    ax.imshow(amap, cmap="magma", alpha=0.65 if image is not None else 1.0, extent=(0, canvas, canvas, 0),
              vmin=0.0, vmax=max(float(amap.max()), 1e-12))  # fmt: skip
    for x0, y0, x1, y1 in boxes or []:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=0.8))
    ax.set_xticks([])
    ax.set_yticks([])


def plot_grid(entry: dict[str, Any], image: np.ndarray, folder: Path, name: str, tiny: bool) -> Path:
    """Rows = runs, columns = epochs (those kept for every run, at most 6), attention over probe 0."""
    runs = ordered(entry["runs"])
    common = sorted(set.intersection(*(set(r["figure_maps"]) for r in runs.values())), key=int)
    if len(common) > 6:
        picks = np.unique(np.linspace(0, len(common) - 1, 6).round().astype(int))
        common = [common[i] for i in picks]
    canvas = entry["setup"]["canvas"]
    boxes = entry["probe_boxes"][0]
    fig, axes = plt.subplots(len(runs), len(common) + 1, figsize=(1.8 * (len(common) + 1), 1.8 * len(runs)),
                             squeeze=False)  # fmt: skip
    for r, (run_name, run) in enumerate(runs.items()):
        _show(axes[r, 0], image, np.zeros((1, 1)), canvas, boxes)
        axes[r, 0].set_ylabel(run_name, fontsize=9)
        for c, epoch in enumerate(common, start=1):
            _show(axes[r, c], None, _map(run, epoch, 0), canvas)
            if r == 0:
                axes[r, c].set_title(f"epoch {epoch}", fontsize=9)
    axes[0, 0].set_title("probe image", fontsize=9)
    return _save(fig, folder, name, tiny)


def plot_vs_mil(entry: dict[str, Any], images: np.ndarray, folder: Path, tiny: bool) -> Path:
    """Columns = probe images, rows = ATS and attention-MIL attention (last epoch) with the digits' boxes."""
    runs = entry["runs"]
    canvas = entry["setup"]["canvas"]
    n = min(len(images), len(entry["probe_boxes"]))
    fig, axes = plt.subplots(len(runs), n, figsize=(2.6 * n, 2.6 * len(runs)), squeeze=False)
    for r, (run_name, run) in enumerate(runs.items()):
        last = max(run["figure_maps"], key=int)
        for c in range(n):
            _show(axes[r, c], images[c], _map(run, last, c), canvas, entry["probe_boxes"][c])
        axes[r, 0].set_ylabel(f"{run_name} (epoch {last})", fontsize=9)
    return _save(fig, folder, "ats_vs_mil" + _suffix(entry), tiny)


def plot_curves(entries: list[dict[str, Any]], folder: Path, tiny: bool) -> Path:
    """One row per training study: entropy/log N, object mass, test accuracy, JS distance to the reference."""
    cols = ("entropy_grid", "object_mass", "test_acc", "js_to_reference")
    labels = ("entropy (grid, nats)", "attention mass on digits", "test accuracy", "JS distance to reference")
    fig, axes = plt.subplots(len(entries), 4, figsize=(14, 2.8 * len(entries)), squeeze=False)
    for r, entry in enumerate(entries):
        ref = entry["reference"]
        for name, run in ordered(entry["runs"]).items():
            ep = [e["epoch"] for e in run["epochs"]]
            for c, col in enumerate(cols[:3]):
                axes[r, c].plot(ep, [e[col] for e in run["epochs"]], marker=".", label=name)
            d = [x for x in entry.get("distances", []) if {x["a"], x["b"]} == {name, ref}]
            if d:
                axes[r, 3].plot([x["epoch"] for x in d], [x["js"] for x in d], marker=".", label=name)
        for c, lab in enumerate(labels):
            axes[r, c].set_xlabel("epoch")
            axes[r, c].set_ylabel(lab, fontsize=9)
        setup = entry["setup"]
        title = f"{entry['study']} study ({setup['dataset']} {setup['canvas']}²)"
        axes[r, 0].set_title(title, fontsize=10, loc="left")
        axes[r, 0].legend(fontsize=8)
        axes[r, 3].set_title(f"reference: {ref}", fontsize=9)
    fig.tight_layout()
    return _save(fig, folder, "ats_curves" + _suffix(entries[0]), tiny)


def plot_variance(entry: dict[str, Any], folder: Path, tiny: bool) -> Path:
    """Log-log trace of the gradient covariance against n, with a 1/n guide; bias relative to ‖exact‖."""
    rows = entry["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (replace, loss, group), style in zip(
        sorted({(r["replace"], r["loss"], r["group"]) for r in rows}), plt.rcParams["axes.prop_cycle"]
    ):
        sel = sorted((r for r in rows if (r["replace"], r["loss"], r["group"]) == (replace, loss, group)),
                     key=lambda r: r["n"])  # fmt: skip
        ns = np.array([r["n"] for r in sel], dtype=float)
        label = f"{group}, {loss}, {'with' if replace else 'without'} repl."
        trace = np.array([r["trace"] for r in sel])
        axes[0].loglog(ns, trace, marker="o", color=style["color"], label=label)
        if group == "features" and loss == "linear" and not replace:
            axes[0].loglog(ns, trace[0] * ns[0] / ns, "k--", linewidth=0.8, label="∝ 1/n")
        axes[1].semilogx(ns, [r["bias"] / r["exact_norm"] for r in sel], marker="o", color=style["color"])
    for ax in axes:  # label the measured n only (log-axis minor labels overlap)
        ax.set_xticks(sorted({r["n"] for r in rows}), [str(n) for n in sorted({r["n"] for r in rows})])
        ax.minorticks_off()
    axes[0].set_xlabel("patches n")
    axes[0].set_ylabel("trace of gradient covariance")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("patches n")
    axes[1].set_ylabel("‖mean − exact‖ / ‖exact‖")
    axes[1].set_title(f"{entry['draws']} draws per n", fontsize=9)
    fig.tight_layout()
    return _save(fig, folder, "ats_variance" + _suffix(entry), tiny)


def plot_study(
    entry: dict[str, Any],
    images: Any,
    folder: Path,
    tiny: bool = False,
    curves: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """Write the figures of one study entry; ``curves``: the training-study entries for ``ats_curves.png``
    (default: this one)."""
    if entry["study"] == "variance":
        return [plot_variance(entry, folder, tiny)]
    imgs = None if images is None else np.asarray(images[:, 0], dtype=float)  # (k, H, W)
    paths = []
    if entry["study"] == "mil":
        paths.append(plot_vs_mil(entry, imgs, folder, tiny))
    else:
        paths.append(plot_grid(entry, imgs[0], folder, FIGURE_NAMES[entry["study"]] + _suffix(entry), tiny))
    paths.append(plot_curves(curves or [entry], folder, tiny))
    return paths
