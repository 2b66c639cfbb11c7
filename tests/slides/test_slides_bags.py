"""Bags of embeddings: padding collate, patient-grouped splits, the slide_bags dataset, MIL training."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from slide_helpers import TILING

from needlework.data.collate import pad_bags
from needlework.data.splits import create_splits, make_splits, read_label_csv, read_split_file
from needlework.io.h5 import read_features
from needlework.registry import create_dataset


def test_pad_bags_shapes_mask_and_content():
    bags = [torch.randn(3, 4), torch.randn(5, 4), torch.randn(1, 4)]
    samples = [
        {"bag": b, "coords": torch.arange(2 * len(b)).view(-1, 2), "label": i % 2} for i, b in enumerate(bags)
    ]
    out = pad_bags(samples)
    assert set(out) == {"bag", "coords", "mask", "label"}
    assert out["bag"].shape == (3, 5, 4) and out["bag"].dtype == torch.float32
    assert out["coords"].shape == (3, 5, 2) and out["coords"].dtype == torch.int64
    assert out["mask"].dtype == torch.bool and out["mask"].sum(1).tolist() == [3, 5, 1]
    assert out["label"].tolist() == [0, 1, 0] and out["label"].dtype == torch.int64
    for i, b in enumerate(bags):
        torch.testing.assert_close(out["bag"][i, : len(b)], b)
        assert (out["bag"][i, len(b) :] == 0).all() and (out["coords"][i, len(b) :] == 0).all()
    multi = pad_bags(
        [{"bag": bags[0], "label": torch.tensor([1, 0, 1])}, {"bag": bags[1], "label": [0, 1, 1]}]
    )
    assert multi["label"].shape == (2, 3) and multi["label"].dtype == torch.float32
    assert (multi["coords"] == 0).all()
    idx = pad_bags(
        [
            {"bag": bags[0], "label": 0, "slide_index": [0, 0, 1]},
            {"bag": bags[2], "label": 1, "slide_index": [2]},
        ]
    )
    assert idx["slide_index"].tolist() == [[0, 0, 1], [2, 0, 0]]
    with pytest.raises(ValueError, match="feature widths"):
        pad_bags([{"bag": torch.zeros(2, 3), "label": 0}, {"bag": torch.zeros(2, 4), "label": 0}])


def _rows(n_patients=30, slides_per_patient=2, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.35)
        for s in range(slides_per_patient):
            rows.append({"case_id": f"p{p:02d}", "slide_id": f"p{p:02d}_s{s}", "label": label})
    return rows


def test_splits_are_grouped_by_patient_and_stratified():
    rows = _rows()
    case_of = {r["slide_id"]: r["case_id"] for r in rows}
    label_of = {r["slide_id"]: r["label"] for r in rows}
    folds = make_splits(rows, k=5, seed=0)
    tests = [s for f in folds for s in f["test"]]
    assert sorted(tests) == sorted(case_of)  # every slide is tested exactly once
    overall = np.mean(list(label_of.values()))
    for fold in folds:
        cases = {s: {case_of[x] for x in fold[s]} for s in ("train", "val", "test")}
        assert not (cases["train"] & cases["val"]) and not (cases["train"] & cases["test"])
        assert not (cases["val"] & cases["test"])
        assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == len(rows)
        assert abs(np.mean([label_of[s] for s in fold["test"]]) - overall) < 0.2
    assert make_splits(rows, k=5, seed=0) == folds and make_splits(rows, k=5, seed=1) != folds
    few = make_splits(rows, k=5, seed=0, label_frac=0.5)
    assert len({case_of[s] for s in few[0]["train"]}) == round(
        0.5 * len({case_of[s] for s in folds[0]["train"]})
    )
    assert make_splits(rows, k=3, val=False)[0]["val"] == []
    with pytest.raises(ValueError, match="patients"):
        make_splits(rows[:4], k=3)


def test_split_files_are_clam_style(tmp_path):
    rows = _rows(12, 1)
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "slide_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    paths = create_splits(tmp_path / "labels.csv", tmp_path / "splits", k=3, seed=0)
    assert [p.name for p in paths] == ["splits_0.csv", "splits_1.csv", "splits_2.csv"]
    folds = make_splits(read_label_csv(tmp_path / "labels.csv"), k=3, seed=0)
    assert read_split_file(paths[1]) == folds[1]
    header = (tmp_path / "splits" / "splits_0.csv").read_text().splitlines()[0]
    assert header == ",train,val,test"
    with (tmp_path / "splits" / "splits_0_bool.csv").open() as f:
        bools = list(csv.DictReader(f))
    assert all([r["train"], r["val"], r["test"]].count("True") == 1 for r in bools)
    with (tmp_path / "splits" / "splits_0_descriptor.csv").open() as f:
        desc = {r[""]: r for r in csv.DictReader(f)}
    assert sum(int(d["test"]) for d in desc.values()) == len(folds[0]["test"])
    (tmp_path / "bad.csv").write_text("patient,slide,y\n")
    with pytest.raises(ValueError, match="missing column"):
        read_label_csv(tmp_path / "bad.csv")


@pytest.fixture(scope="module")
def bag_data(cohort, job, tmp_path_factory):
    """8 bags: the cohort's 4 feature files and a copy of each under another slide/patient id, so that
    4 stratified patient folds exist; labels CSV and split files to match."""
    out = tmp_path_factory.mktemp("bags")
    feats = out / "features"
    feats.mkdir()
    rows = read_label_csv(cohort["labels_csv"])
    src = job["tiling_dir"] / "features_color_stats"
    all_rows = []
    for r in rows:
        for prefix in ("", "copy_"):
            sid = prefix + r["slide_id"]
            (feats / f"{sid}.h5").write_bytes((src / f"{r['slide_id']}.h5").read_bytes())
            all_rows.append({"case_id": prefix + r["case_id"], "slide_id": sid, "label": r["label"]})
    with (out / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case_id", "slide_id", "label"])
        writer.writeheader()
        writer.writerows(all_rows)
    create_splits(out / "labels.csv", out / "splits", k=4, seed=0)
    return {"features_dir": feats, "labels_csv": out / "labels.csv", "splits_dir": out / "splits"}


def test_slide_bags_dataset(bag_data):
    features = bag_data["features_dir"]
    kw = dict(
        features_dir=str(features),
        labels_csv=str(bag_data["labels_csv"]),
        splits_dir=str(bag_data["splits_dir"]),
        fold=0,
    )
    split = read_split_file(bag_data["splits_dir"] / "splits_0.csv")
    labels = {r["slide_id"]: int(r["label"]) for r in read_label_csv(bag_data["labels_csv"])}
    for name in ("train", "val", "test"):
        ds = create_dataset("slide_bags", split=name, **kw)
        assert len(ds) == len(split[name])
        for i in range(len(ds)):
            item = ds[i]
            feats, coords, _ = read_features(features / f"{item['slide_id']}.h5")
            torch.testing.assert_close(item["bag"], torch.from_numpy(feats))
            assert item["coords"].dtype == torch.int64 and item["coords"].tolist() == coords.tolist()
            assert int(item["label"]) == labels[item["slide_id"]] and item["slide_id"] in split[name]
    everything = create_dataset("slide_bags", split="all", **kw)
    assert len(everything) == len(labels)
    with pytest.raises(ValueError, match="split_file"):
        create_dataset(
            "slide_bags", split="train", features_dir=str(features), labels_csv=str(bag_data["labels_csv"])
        )


def test_sub_sampling_is_for_training_only(bag_data):
    kw = dict(
        features_dir=str(bag_data["features_dir"]),
        labels_csv=str(bag_data["labels_csv"]),
        splits_dir=str(bag_data["splits_dir"]),
        max_instances=5,
    )
    for split in ("val", "test"):
        ds = create_dataset("slide_bags", split=split, **kw)
        assert all(len(ds[i]["bag"]) == len(read_features(ds.items[i]["path"])[0]) for i in range(len(ds)))
    ds = create_dataset("slide_bags", split="train", **kw)
    a, b = ds[0], ds[0]
    full = read_features(ds.items[0]["path"])[0]
    assert len(a["bag"]) == 5 and (a["coords"][1:, 1] >= a["coords"][:-1, 1]).all()  # original order kept
    rows = {tuple(r) for r in full.tolist()}
    assert all(tuple(r) in rows for r in a["bag"].tolist())
    assert not torch.equal(a["bag"], b["bag"])  # a fresh draw per access


def test_missing_features_error_or_skip(cohort, job, tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    src = job["tiling_dir"] / "features_color_stats"
    for name in ("slide_000.h5", "slide_001.h5"):
        (feats / name).write_bytes((src / name).read_bytes())
    kw = dict(features_dir=str(feats), labels_csv=str(cohort["labels_csv"]), split="all")
    with pytest.raises(FileNotFoundError, match="on_missing='skip'"):
        create_dataset("slide_bags", **kw)
    with pytest.warns(UserWarning, match="left out"):
        ds = create_dataset("slide_bags", on_missing="skip", **kw)
    assert len(ds) == 2


def test_a_mil_model_trains_on_the_bags(bag_data, cohort, job, tmp_path):
    """Done-criterion of the pipeline: tile → embed → bags → a MIL model trains (Lightning, CPU)."""
    import lightning as L

    from needlework.models.base import NeedleworkModel
    from needlework.registry import MODELS, register_model
    from needlework.training import ClassificationTask, DatasetDataModule

    if "test_slides_toy_abmil" not in MODELS:

        @register_model("test_slides_toy_abmil")
        class ToyABMIL(NeedleworkModel):
            def __init__(self, in_dim: int, num_classes: int = 2):
                super().__init__()
                self.proj = torch.nn.Linear(in_dim, 16)
                self.att = torch.nn.Linear(16, 1)
                self.head = torch.nn.Linear(16, num_classes)

            def forward(self, bag, mask=None, coords=None):
                h = torch.relu(self.proj(bag))
                a = self.att(h).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(-1)
                return {"logits": self.head(torch.einsum("bn,bnd->bd", a, h)), "attention": a}

    data = DatasetDataModule(
        "slide_bags",
        dataset_kwargs={
            "features_dir": str(bag_data["features_dir"]),
            "labels_csv": str(bag_data["labels_csv"]),
            "splits_dir": str(bag_data["splits_dir"]),
            "fold": 0,
        },
        train_kwargs={"max_instances": 32},
        batch_size=2,
        collate="pad_bags",
    )
    task = ClassificationTask("test_slides_toy_abmil", {"in_dim": 39}, num_classes=2, lr=1e-2)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # A Lightning checkpoint of the trained task turns back into attention heatmaps.
    from needlework.cli import main

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    slide_id = "slide_001"  # any slide with features; the copies have no slide file
    assert (
        main(
            [
                "slides",
                "heatmap",
                "--slides",
                str(cohort["slides_dir"]),
                "--features",
                str(bag_data["features_dir"] / f"{slide_id}.h5"),
                "--checkpoint",
                str(tmp_path / "last.ckpt"),
                "--out_dir",
                str(tmp_path / "heat"),
                "--formats",
                "[h5, png]",
                "--max_side",
                "256",
            ]
        )
        == 0
    )
    import h5py

    with h5py.File(tmp_path / "heat" / f"{slide_id}_scores.h5") as f:
        assert f["scores"].attrs["score_name"] == "attention"
        assert float(f["scores"][...].sum()) == pytest.approx(1.0, abs=1e-4)
    batch = next(iter(data.val_dataloader()))
    assert batch["bag"].shape[-1] == 39 and batch["mask"].any(1).all()
    assert TILING.dir_name() in str(job["tiling_dir"])
