"""Slide label CSVs and patient-grouped, label-stratified k-fold splits (CLAM-compatible files).

Splits are made over **patients** (``case_id``), never slides, stratified by label
(``sklearn.model_selection.StratifiedGroupKFold``) with a fixed seed. Fold ``i`` tests on group-fold ``i``,
validates on group-fold ``i + 1 (mod k)`` and trains on the rest. Written files, per fold:
``splits_<i>.csv`` (columns ``train, val, test`` listing slide ids), ``splits_<i>_bool.csv`` and
``splits_<i>_descriptor.csv`` (class counts per split).

Example:
    >>> rows = [{"case_id": f"p{i // 2}", "slide_id": f"s{i}", "label": i // 2 % 2} for i in range(24)]
    >>> folds = make_splits(rows, k=3, seed=0)
    >>> sorted(len(f["test"]) for f in folds), sum(len(f["train"]) for f in folds)
    ([8, 8, 8], 24)
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from needlework.errors import ConfigError, InputNotFoundError

SPLITS = ("train", "val", "test")


def read_label_csv(
    path: str | Path,
    case_column: str = "case_id",
    slide_column: str = "slide_id",
    label_column: str = "label",
) -> list[dict[str, Any]]:
    """Rows ``{"case_id", "slide_id", "label"}`` (label kept as the file's string) of a slide-label CSV."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"label CSV not found: {path}; check the path (--labels_csv, labels_csv=)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in (case_column, slide_column, label_column) if c not in fields]
        if missing:
            raise ConfigError(
                f"{path}: missing column(s) {missing}; found {fields}. Columns are configurable "
                "(case_column=, slide_column=, label_column=)"
            )
        rows = []
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            rows.append(
                {"case_id": row[case_column], "slide_id": row[slide_column], "label": row[label_column]}
            )
    ids = [r["slide_id"] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: slide ids listed twice: {dup[:10]}")
    return rows


def build_label_map(labels: list[Any], label_map: dict[str, int] | None = None) -> dict[str, int]:
    """``{label string: class index}``: the given map, integers as themselves, else sorted strings
    → 0..C-1."""
    values = sorted({str(v) for v in labels})
    if label_map is not None:
        unknown = [v for v in values if v not in label_map]
        if unknown:
            raise ValueError(f"labels {unknown} are not in label_map {label_map}")
        return dict(label_map)
    try:
        return {v: int(v) for v in values}
    except ValueError:
        return {v: i for i, v in enumerate(values)}


def make_splits(
    rows: list[dict[str, Any]], k: int = 5, seed: int = 0, val: bool = True, label_frac: float = 1.0
) -> list[dict[str, list[str]]]:
    """Patient-grouped stratified k-fold splits: a list of ``{"train", "val", "test": [slide ids]}``.

    ``val=False`` leaves ``val`` empty (train on k−1 folds). ``label_frac < 1`` keeps that fraction of the
    training patients (learning curves), chosen with ``seed``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if k < (3 if val else 2):
        raise ValueError(
            f"k must be >= {3 if val else 2} (one test fold{', one validation fold' if val else ''})"
        )
    slides = np.array([r["slide_id"] for r in rows])
    groups = np.array([r["case_id"] for r in rows])
    labels = np.array([str(r["label"]) for r in rows])
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise ValueError(f"{n_groups} patients cannot be split into {k} folds; lower k")
    fold_of = np.empty(len(rows), np.int64)
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        for fold, (_, test_idx) in enumerate(skf.split(slides, labels, groups)):
            fold_of[test_idx] = fold
    except ValueError as exc:
        counts = dict(Counter(labels.tolist()))
        raise ValueError(
            f"cannot make {k} stratified folds from label counts {counts} ({exc}); lower k"
        ) from exc
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        test = fold_of == i
        valid = (fold_of == (i + 1) % k) if val else np.zeros(len(rows), bool)
        train = ~test & ~valid
        if label_frac < 1.0:
            cases = sorted(set(groups[train].tolist()))
            keep = set(rng.permutation(cases)[: max(1, round(label_frac * len(cases)))].tolist())
            train &= np.isin(groups, list(keep))
        out.append(
            {"train": slides[train].tolist(), "val": slides[valid].tolist(), "test": slides[test].tolist()}
        )
    return out


def _write_rows(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def save_splits(
    folds: list[dict[str, list[str]]], rows: list[dict[str, Any]], out_dir: str | Path
) -> list[Path]:
    """Write CLAM-style ``splits_<i>.csv``, ``splits_<i>_bool.csv``, ``splits_<i>_descriptor.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_of = {r["slide_id"]: str(r["label"]) for r in rows}
    classes = sorted(set(label_of.values()))
    paths = []
    for i, fold in enumerate(folds):
        n = max(len(fold[s]) for s in SPLITS)
        table = [[j] + [fold[s][j] if j < len(fold[s]) else "" for s in SPLITS] for j in range(n)]
        _write_rows(out / f"splits_{i}.csv", ["", *SPLITS], table)
        everyone = [r["slide_id"] for r in rows]
        member = {s: set(fold[s]) for s in SPLITS}
        _write_rows(
            out / f"splits_{i}_bool.csv",
            ["", *SPLITS],
            [[sid] + [sid in member[s] for s in SPLITS] for sid in everyone],
        )
        counts = {s: Counter(label_of[sid] for sid in fold[s]) for s in SPLITS}
        _write_rows(
            out / f"splits_{i}_descriptor.csv",
            ["", *SPLITS],
            [[c] + [counts[s].get(c, 0) for s in SPLITS] for c in classes],
        )
        paths.append(out / f"splits_{i}.csv")
    return paths


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """``{"train", "val", "test": [slide ids]}`` from a CLAM-style ``splits_<i>.csv``."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"split file not found: {path} (create one with `needlework slides splits`)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if not set(SPLITS) & set(fields):
            raise ConfigError(f"{path}: a split file needs columns train/val/test, found {fields}")
        out: dict[str, list[str]] = {s: [] for s in SPLITS}
        for row in reader:
            for s in SPLITS:
                value = (row.get(s) or "").strip()
                if value:
                    out[s].append(value)
    return out


def select_split(
    rows: list[dict[str, Any]],
    split: str,
    split_file: str | Path | None,
    splits_dir: str | Path | None,
    fold: int,
    labels_csv: str | Path,
) -> list[dict[str, Any]]:
    """The label-CSV ``rows`` of one split, in the split file's order (``split="all"``: every row).

    The split file is ``split_file`` or ``<splits_dir>/splits_<fold>.csv`` (``needlework slides splits``).
    A slide of the split missing from the label CSV is an error naming both files.
    """
    if split == "all":
        return rows
    if split_file is None and splits_dir is not None:
        split_file = Path(splits_dir) / f"splits_{fold}.csv"
    if split_file is None:
        raise ConfigError(
            f"split {split!r} needs split_file= or splits_dir= + fold= "
            "(make them with `needlework slides splits`), or use split='all'"
        )
    wanted = read_split_file(split_file)[split]
    by_id = {r["slide_id"]: r for r in rows}
    unknown = [s for s in wanted if s not in by_id]
    if unknown:
        raise ConfigError(f"{split_file}: slides {unknown[:10]} of split {split!r} are not in {labels_csv}")
    return [by_id[s] for s in wanted]


def create_splits(
    labels_csv: str | Path,
    out_dir: str | Path,
    k: int = 5,
    seed: int = 0,
    val: bool = True,
    label_frac: float = 1.0,
    case_column: str = "case_id",
    slide_column: str = "slide_id",
    label_column: str = "label",
) -> list[Path]:
    """Read a label CSV, make patient-grouped stratified folds and save them; returns the split files.

    Args:
        labels_csv: slide-label CSV (columns ``case_id, slide_id, label``).
        out_dir: folder for ``splits_<i>.csv``, ``splits_<i>_bool.csv``, ``splits_<i>_descriptor.csv``.
        k: number of folds.
        seed: seed of the fold assignment.
        val: hold out a validation fold (``false``: train on k − 1 folds).
        label_frac: fraction of the training slides to keep (learning curves).
        case_column: patient column of the CSV.
        slide_column: slide-id column of the CSV.
        label_column: label column of the CSV.
    """
    rows = read_label_csv(labels_csv, case_column, slide_column, label_column)
    return save_splits(make_splits(rows, k, seed, val, label_frac), rows, out_dir)
