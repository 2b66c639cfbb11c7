"""Multi-magnification slide bags (slide_bags_multimag) for ZoomMIL: index, items, collate, training."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import needlework
from needlework.data.level_collate import pad_bag_levels
from needlework.data.planted_bags import PlantedBags
from needlework.data.zoom_index import build_zoom_index
from needlework.io.h5 import write_features_h5

TILE = 16  # level-0 px of a highest-magnification planted tile
MAGS = (10, 20, 40)


def _planted(n: int, **kw) -> PlantedBags:
    kw = {"grid": 4, "levels": 3, "scale": 2, "dim": 8, "tissue_fraction": 0.6, "lesion_size": 2,
          "signal": 3.0, "tile_size": TILE, "seed": 1, **kw}
    return PlantedBags(split="train", size=n, **kw)


def write_cohort(root, planted: PlantedBags, drop: float = 0.0, shift=(0, 0), sizes=None, mags=MAGS):
    """Planted bags written as one features folder per magnification (a share ``drop`` of the children
    removed, level ≥ 1 rows shuffled and shifted by ``shift``). Returns (dirs, labels_csv, kept)."""
    rng = np.random.default_rng(0)
    sizes = sizes or [TILE * 4, TILE * 2, TILE]
    dirs = [root / f"{m}x" for m in mags]
    rows, kept = [], {}
    for i in range(len(planted)):
        item, sid = planted[i], f"s{i:02d}"
        rows.append({"case_id": f"p{i // 2}", "slide_id": sid, "label": item["label"]})
        for level, d in enumerate(dirs):
            suffix = "" if level == 0 else f"_{level}"
            feats, coords = item[f"bag{suffix}"].numpy(), item[f"coords{suffix}"].numpy()
            keep = np.ones(len(feats), bool) if level == 0 else rng.random(len(feats)) >= drop
            order = np.flatnonzero(keep)
            order = order if level == 0 else rng.permutation(order)  # the bag's row order is level 0's
            kept[sid, level] = keep
            xy = coords[order] + (np.asarray(shift) if level else 0)
            attrs = {"patch_size_level0": sizes[level], "target_magnification": float(mags[level]),
                     "overlap": 0}
            write_features_h5(d / f"{sid}.h5", feats[order], xy, attrs)
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, ["case_id", "slide_id", "label"])
        w.writeheader()
        w.writerows(rows)
    return [str(d) for d in dirs], str(labels), kept


def _dataset(dirs, labels, **kw):
    return needlework.create_dataset("slide_bags_multimag", split="all", features_dirs=dirs,
                                     labels_csv=labels, **kw)


def test_index_on_a_hand_built_grid_with_missing_children_and_orphans():
    parents = np.array([[0, 0], [128, 0]])  # two 128-px tiles side by side
    children = np.array([[192, 64], [0, 0], [64, 0], [300, 300]])  # last: centre in no parent
    grand = np.array([[96, 32], [160, 96]])  # 32-px tiles
    idx = build_zoom_index([parents, children, grand], [128, 64, 32])
    assert idx.factors == [1, 2, 2] and idx.orphans == [0, 1, 0] and idx.collisions == [0, 0, 0]
    # parent 0: slots (0,0)->child 1, (1,0)->child 2; parent 1: slot (1,1) -> child 0
    assert idx.rows[1].tolist() == [1, 2, -1, -1, -1, -1, -1, 0]
    assert idx.slot_coords[1][3].tolist() == [64, 64] and idx.slot_coords[1][4].tolist() == [128, 0]
    # (96, 32): parent 0, child slot 1 (x 64..128, y 0..64), grandchild (y 1, x 1) in it → 1·4 + 3
    # (160, 96): parent 1, child slot 2 (x 128..192, y 64..128), grandchild (y 1, x 1) → 16 + 2·4 + 3
    expected = np.full(32, -1)
    expected[[7, 27]] = [0, 1]
    assert idx.rows[2].tolist() == expected.tolist()
    # two tiles of an irregular grid in one slot: the one nearest the slot centre is kept
    clash = build_zoom_index([np.array([[0, 0]]), np.array([[6, 6], [1, 0]])], [128, 64])
    assert clash.rows[1].tolist() == [1, -1, -1, -1] and clash.collisions == [0, 1]
    # an irregular level 0 (not one grid) falls back to plain containment
    odd = build_zoom_index([np.array([[0, 0], [100, 30]]), np.array([[110, 40], [0, 0]])], [64, 32])
    assert odd.rows[1].tolist() == [1, -1, -1, -1, 0, -1, -1, -1]


def test_index_reproduces_the_planted_depth_first_layout():
    item = _planted(1)[0]
    coords = [item[k].numpy() for k in ("coords", "coords_1", "coords_2")]
    rng = np.random.default_rng(3)
    perms = [np.arange(len(coords[0]))] + [rng.permutation(len(c)) for c in coords[1:]]
    idx = build_zoom_index([c[p] for c, p in zip(coords, perms)], [4 * TILE, 2 * TILE, TILE])
    for level in range(3):
        assert (coords[level][perms[level]][idx.rows[level]] == coords[level]).all()
        assert (idx.slot_coords[level] == coords[level]).all()


def test_misaligned_origins_assign_by_centre():
    item = _planted(1)[0]
    coords = [item[k].numpy() for k in ("coords", "coords_1", "coords_2")]
    shifted = [coords[0]] + [c + np.array([5, -7]) for c in coords[1:]]  # |shift| < half the finest tile
    idx = build_zoom_index(shifted, [4 * TILE, 2 * TILE, TILE])
    for level in (1, 2):
        assert (idx.rows[level] == np.arange(len(coords[level]))).all()
        assert (idx.slot_coords[level] == shifted[level]).all()  # a filled slot keeps its tile's coords
    # shifted by more than half a tile, a child's centre moves into the neighbouring slot (or parent)
    moved = build_zoom_index([np.array([[0, 0]]), np.array([[20, 0]])], [64, 32])
    assert moved.rows[1].tolist() == [-1, 0, -1, -1]


def test_items_match_planted_items_and_missing_children_are_masked(tmp_path):
    planted = _planted(3)
    dirs, labels, kept = write_cohort(tmp_path, planted, drop=0.3)
    ds = _dataset(dirs, labels)
    assert len(ds) == 3 and ds.num_levels == 3
    for i in range(3):
        ref, item = planted[i], ds[i]
        extra = {"mask_1", "mask_2", "slide_id", "case_id"}
        assert set(item) - extra == set(ref) - {"instance_labels", "instance_labels_1", "instance_labels_2"}
        for key in ("bag", "coords", "bag_1", "coords_1", "bag_2", "coords_2"):
            assert item[key].shape == ref[key].shape and item[key].dtype == ref[key].dtype, key
        assert torch.equal(item["bag"], ref["bag"]) and item["label"] == ref["label"]
        for level in (1, 2):
            mask = item[f"mask_{level}"]
            assert mask.tolist() == kept[f"s{i:02d}", level].tolist()
            assert torch.equal(item[f"coords_{level}"], ref[f"coords_{level}"])  # slots, present or not
            assert torch.equal(item[f"bag_{level}"][mask], ref[f"bag_{level}"][mask])
            assert (item[f"bag_{level}"][~mask] == 0).all()


def test_collate_pads_levels_and_zoommil_respects_child_masks(tmp_path):
    dirs, labels, _ = write_cohort(tmp_path, _planted(2, tissue_fraction=0.4, grid=5), drop=0.4)
    ds = _dataset(dirs, labels)
    items = [ds[0], ds[1]]
    batch = pad_bag_levels(items)
    n0 = max(len(it["bag"]) for it in items)
    for level, r in ((1, 4), (2, 16)):
        assert batch[f"bag_{level}"].shape == (2, n0 * r, 8)
        for b, it in enumerate(items):
            n = len(it[f"mask_{level}"])
            assert batch[f"mask_{level}"][b, :n].tolist() == it[f"mask_{level}"].tolist()
            assert not batch[f"mask_{level}"][b, n:].any()
    model = needlework.create_model("zoommil", in_dim=8, num_levels=3, hidden_dim=16, attention_dim=8,
                                    k=2, n_samples=5).eval()
    out = model.forward_batch(batch)
    assert out["logits"].shape == (2, 2)
    for level in (1, 2):  # missing children get no attention
        att = out["attention_levels"][level]
        assert torch.isfinite(att).all()
    # the same bags through the planted-bag path give the same logits when no child is missing
    dirs2, labels2, _ = write_cohort(tmp_path / "full", _planted(2), drop=0.0)
    full = pad_bag_levels([_dataset(dirs2, labels2)[i] for i in range(2)])
    ref = pad_bag_levels([_planted(2)[i] for i in range(2)])
    torch.testing.assert_close(model.forward_batch(full)["logits"], model.forward_batch(ref)["logits"])


def test_a_few_zoommil_steps_decrease_the_loss(tmp_path):
    torch.manual_seed(0)
    dirs, labels, _ = write_cohort(tmp_path, _planted(8, signal=4.0), drop=0.2)
    batch = pad_bag_levels([_dataset(dirs, labels, cache=True)[i] for i in range(8)])
    model = needlework.create_model("zoommil", in_dim=8, num_levels=3, hidden_dim=16, attention_dim=8,
                                    k=2, sigma=0.05, n_samples=4, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.compute_loss(model.forward_batch(batch), batch["label"])[0])

    before = eval_loss()
    for _ in range(15):
        model.train()
        loss, _ = model.compute_loss(model.forward_batch(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_clear_errors(tmp_path):
    planted = _planted(2)
    dirs, labels, _ = write_cohort(tmp_path / "ok", planted)
    with pytest.raises(ValueError, match=r"s00: .*low to high magnification, got 40x.*20x.*10x"):
        _dataset(dirs[::-1], labels)
    (tmp_path / "ok" / "20x" / "s01.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"s01 \(no .*20x/s01.h5"):
        _dataset(dirs, labels)
    with pytest.warns(UserWarning, match="miss a magnification"):
        assert len(_dataset(dirs, labels, on_missing="skip")) == 1
    with pytest.raises(ValueError, match="one folder per magnification"):
        _dataset(dirs[:1], labels)
    dirs, labels, _ = write_cohort(tmp_path / "nest", planted, sizes=[80, 2 * TILE, TILE])
    with pytest.raises(ValueError, match=r"s00: .*10x/s00.h5 \(80 level-0 px\).*do not nest.*2\.5"):
        _dataset(dirs, labels)


def test_real_pipeline_three_magnifications(tmp_path):
    """synth → tile at 10×/20×/40× → embed (color_stats) → bags whose children lie in their parents."""
    from needlework.slides.embed_job import EmbedJobConfig, run_embedding
    from needlework.slides.jobs import TileJobConfig, run_tiling
    from needlework.slides.synthetic import make_synthetic_cohort
    from needlework.slides.tiling import TilingConfig
    from needlework.slides.tissue import TissueParams

    cohort = make_synthetic_cohort(tmp_path / "cohort", n_slides=2, width=256, height=192, seed=1,
                                   slides_per_patient=1, n_lesions=1, lesion_radius=(10, 20), no_mpp_slides=0)
    tissue = TissueParams(seg_mpp=0.5, median_um=2, close_um=2, open_um=1, min_area_um2=10)
    dirs = []
    for mag in MAGS:
        tiling = TilingConfig(target_magnification=mag, patch_size=16)
        run_tiling(cohort["slides_dir"], TileJobConfig(str(tmp_path / "job"), tiling, tissue, progress=False,
                                                       qc_max_side=64))
        run_embedding(cohort["slides_dir"], EmbedJobConfig(str(tmp_path / "job"), tiling.dir_name(),
                                                           encoder="color_stats", device="cpu",
                                                           num_workers=0, progress=False))
        dirs.append(str(tmp_path / "job" / tiling.dir_name() / "features_color_stats"))
    ds = _dataset(dirs, str(cohort["labels_csv"]))
    for i in range(len(ds)):
        item = ds[i]
        parents = item["coords"]
        assert item["bag"].shape[1] == 39 and item["mask_2"].any()
        for level, size in ((1, 32), (2, 16)):
            r = 4**level
            centre = item[f"coords_{level}"][item[f"mask_{level}"]] + size // 2
            owner = parents.repeat_interleave(r, 0)[item[f"mask_{level}"]]
            assert ((centre >= owner) & (centre < owner + 64)).all()


def test_index_errors_name_the_levels():
    xy = np.zeros((1, 2), np.int64)
    with pytest.raises(ValueError, match=r"low to high magnification: a\.h5 has tiles of 32.*b\.h5"):
        build_zoom_index([xy, xy], [32, 64], ["a.h5", "b.h5"])
    with pytest.raises(ValueError, match="do not nest"):
        build_zoom_index([xy, xy], [64, 48])
