"""Attention metrics against hand-computed values; the ATS ablation script on a tiny grid (issue #18)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from needlework.metrics import attention_entropy, js_distance, object_mass, pool_attention, total_variation

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


# -- metrics ---------------------------------------------------------------------------------------------
def test_entropy_hand_values():
    a = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert attention_entropy(a).tolist() == pytest.approx([math.log(2), math.log(4), 0.0])
    assert attention_entropy(a, normalised=True).tolist() == pytest.approx([0.5, 1.0, 0.0])
    # a (B, h, w) map is the same distribution as its flattening
    assert attention_entropy(a.view(3, 2, 2)).tolist() == pytest.approx(attention_entropy(a).tolist())


def test_total_variation_and_js_hand_values():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5]])
    assert total_variation(p, q).tolist() == pytest.approx([0.5, 1.0, 0.0])
    # m = (¼, ½, ¼): KL(p‖m) = ½·log2(2) = ½ = KL(q‖m), so JSD = ½ and the distance is √½
    assert js_distance(p, q).tolist() == pytest.approx([math.sqrt(0.5), 1.0, 0.0], abs=1e-7)
    assert js_distance(q, p).tolist() == pytest.approx(js_distance(p, q).tolist())


def test_distances_reject_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        total_variation(torch.ones(1, 4) / 4, torch.ones(1, 5) / 5)


def test_object_mass_hand_values():
    a = torch.tensor([[[0.4, 0.1], [0.2, 0.3]]]).repeat(4, 1, 1)  # 2×2 cells of 2×2 px over a 4×4 image
    boxes = [
        torch.tensor([[0.0, 0.0, 2.0, 2.0]]),  # exactly the top-left cell
        torch.tensor([[1.0, 1.0, 3.0, 3.0]]),  # one pixel of each cell: ¼ of every cell's mass
        torch.tensor([[2.0, 0.0, 4.0, 2.0], [2.0, 0.0, 4.0, 2.0], [-5.0, 2.0, 2.0, 9.0]]),  # dup + clipped
        torch.zeros(0, 4),  # no object
    ]
    got = object_mass(a, boxes, (4, 4)).tolist()
    assert got == pytest.approx([0.4, 0.25, 0.1 + 0.2, 0.0])


def test_object_mass_of_uniform_attention_is_the_box_area_fraction():
    a = torch.full((1, 10, 10), 0.01)
    box = torch.tensor([[30.0, 40.0, 58.0, 68.0]])  # 28² digit in a 100² image
    assert object_mass(a, [box], (100, 100)).item() == pytest.approx(28 * 28 / 100**2)


def test_object_mass_errors_name_the_problem():
    with pytest.raises(ValueError, match="box lists"):
        object_mass(torch.ones(2, 2, 2) / 4, [torch.zeros(0, 4)], (4, 4))
    with pytest.raises(ValueError, match="smaller than the attention map"):
        object_mass(torch.ones(1, 8, 8) / 64, [torch.zeros(0, 4)], (4, 4))


def test_pool_attention_sums_blocks():
    a = torch.arange(16.0).view(1, 4, 4)
    pooled = pool_attention(a, (2, 2))
    assert pooled.tolist() == [[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]]
    assert pooled.sum().item() == pytest.approx(a.sum().item())
    with pytest.raises(ValueError, match="must divide"):
        pool_attention(a, (3, 3))


# -- the script on a tiny grid ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ablations():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("ats_ablations")
    finally:
        sys.path.remove(str(BENCH))


def _run(mod, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "ats.json"
    mod.main([*args, "--tiny", "--out", str(out), "--figures", str(tmp_path / "fig")])
    return json.loads(out.read_text())


def test_entropy_study_tiny_writes_json_and_figures_and_resumes(ablations, tmp_path, capsys):
    data = _run(ablations, tmp_path, "--study", "entropy")
    entry = data["studies"]["entropy/megapixel_mnist300/tiny"]
    assert sorted(entry["runs"]) == ["lambda=0", "lambda=0.01", "lambda=0.1", "lambda=1"]
    grid = entry["setup"]["canvas"] // 50
    for run in entry["runs"].values():
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert 0.0 <= e["test_acc"] <= 1.0 and 0.0 <= e["object_mass"] <= 1.0
            assert 0.0 < e["entropy_norm"] <= 1.0 + 1e-6  # float32 attention
            assert len(e["maps"]) == entry["setup"]["probes"] and len(e["maps"][0]) == grid * grid
            assert sum(e["maps"][0]) == pytest.approx(1.0, abs=1e-4)
    # every pair of the 4 runs at both epochs, distances in [0, 1]
    assert len(entry["distances"]) == 6 * 2
    assert all(0.0 <= d["tv"] <= 1.0 and 0.0 <= d["js"] <= 1.0 for d in entry["distances"])
    for name in ("ats_entropy_tiny.png", "ats_curves_tiny.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:4] == b"\x89PNG"
    # a second call finds every run done and leaves them untouched
    capsys.readouterr()
    again = _run(ablations, tmp_path, "--study", "entropy")
    assert capsys.readouterr().out.count("skip") == 4
    assert again["studies"]["entropy/megapixel_mnist300/tiny"]["runs"] == entry["runs"]


def test_mil_study_tiny_on_needle_mnist_views(ablations, tmp_path):
    data = _run(ablations, tmp_path, "--study", "mil", "--canvas", "128", "--epochs", "1")
    entry = data["studies"]["mil/needle_mnist128/tiny"]
    assert sorted(entry["runs"]) == ["ATS", "attention-MIL"]
    assert len(entry["runs"]["attention-MIL"]["epochs"][0]["maps"][0]) == (128 // 64) ** 2
    assert (tmp_path / "fig" / "ats_vs_mil_needle128_tiny.png").exists()


def test_variance_study_tiny(ablations, tmp_path):
    data = _run(ablations, tmp_path, "--study", "variance", "--draws", "8", "--attention-std", "1")
    entry = data["studies"]["variance/megapixel_mnist300/tiny"]
    rows = entry["rows"]
    assert {r["n"] for r in rows} == {2, 5} and {r["loss"] for r in rows} == {"linear", "cross_entropy"}
    assert all(r["trace"] > 0 and math.isfinite(r["bias_z"]) for r in rows)
    assert (tmp_path / "fig" / "ats_variance_tiny.png").exists()


def test_corrupt_results_file_is_a_clear_error(ablations, tmp_path):
    (tmp_path / "ats.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        _run(ablations, tmp_path, "--study", "entropy")


def test_bad_needle_canvas_is_a_clear_error(ablations, tmp_path):
    with pytest.raises(SystemExit, match="multiple of 64"):
        _run(ablations, tmp_path, "--study", "entropy", "--canvas", "100")


def test_studies_written_at_once_keep_each_other(ablations, tmp_path):
    """Two studies (processes) writing one results file: the second write keeps the first's entry."""
    out = tmp_path / "ats.json"
    stale = ablations.load(out)  # what a second process read before the first one wrote
    ablations.update(out, "entropy/x/cpu", {"study": "entropy", "runs": {"lambda=0": {}}})
    stale["studies"]["patches/x/cpu"] = {"study": "patches", "runs": {"n=2": {}}}
    ablations.update(out, "patches/x/cpu", stale["studies"]["patches/x/cpu"])
    assert sorted(json.loads(out.read_text())["studies"]) == ["entropy/x/cpu", "patches/x/cpu"]


def test_needle_recipe_tiny_uses_the_curriculum_and_32px_cells(ablations, tmp_path):
    args = ("--study", "mil", "--canvas", "128", "--recipe", "needle", "--cell", "32", "--epochs", "3")
    data = _run(ablations, tmp_path, *args)
    entry = data["studies"]["mil/needle_mnist128/tiny-needle-cell32"]
    assert entry["setup"]["recipe"] == "needle" and entry["setup"]["lr"] == 3e-3
    for run in entry["runs"].values():
        # epochs by fraction of the run: 0, 1/3 and 2/3 → the 64-px stage first, then the target canvas
        assert [e["canvas"] for e in run["epochs"]] == [64, 128, 128]
        assert len(run["epochs"][0]["maps"][0]) == (128 // 32) ** 2
    assert (tmp_path / "fig" / "ats_vs_mil_needle128_needle_cell32_tiny.png").exists()


def test_stage_canvas_follows_the_budget_and_caps_at_the_target(ablations):
    setup = ablations.Setup("needle_mnist", 512, 8, 8, 4, 2, 4, 4, 2, 1.0, recipe="needle")
    assert [ablations.stage_canvas(setup, f) for f in (0.0, 0.1, 0.5, 0.9)] == [64, 128, 256, 512]
    small = ablations.Setup("needle_mnist", 128, 8, 8, 4, 2, 4, 4, 2, 1.0, recipe="needle")
    assert [ablations.stage_canvas(small, f) for f in (0.0, 0.5, 0.9)] == [64, 128, 128]
    plain = ablations.Setup("needle_mnist", 512, 8, 8, 4, 2, 4, 4, 2, 1.0)
    assert ablations.stage_canvas(plain, 0.0) == 512  # the reference recipe has no curriculum


def test_all_patches_mil_sees_the_patches_ats_samples(ablations):
    """Its patch corners are those of cells_to_offsets for every cell (ATS with n = every cell)."""
    from needlework.ats import cells_to_offsets, extract_patches

    seen = []

    class Record(torch.nn.Module):
        def forward(self, p):
            seen.append(p)
            return p.flatten(1)[:, :4]

    mil = ablations.AllPatchesMIL(Record(), 4, 2, patch=64, cell=32)
    x = torch.rand(1, 1, 128, 128)
    out = mil(x)
    idx = torch.arange(16)[None]
    offsets = cells_to_offsets(idx, (4, 4), (32, 32), (128, 128), 64)
    assert torch.equal(seen[0], extract_patches(x, offsets, 64).flatten(0, 1))
    assert out["attention_map"].shape == (1, 4, 4) and out["logits"].shape == (1, 2)


def test_needle_recipe_on_megapixel_mnist_starts_on_a_crowded_canvas(ablations, tmp_path):
    data = _run(ablations, tmp_path, "--study", "mil", "--recipe", "needle", "--epochs", "3")
    entry = data["studies"]["mil/megapixel_mnist300/tiny-needle"]
    assert entry["setup"]["lr"] == 3e-3 and sorted(entry["runs"]) == ["ATS", "attention-MIL"]
    for run in entry["runs"].values():
        # epochs at 0, 1/3 and 2/3 of the run: the 200² stage, then 350² capped at the 300² target
        assert [e["canvas"] for e in run["epochs"]] == [200, 300, 300]
        assert len(run["epochs"][0]["maps"][0]) == (300 // 50) ** 2
    setup = ablations.Setup("megapixel_mnist", 500, 8, 8, 4, 2, 4, 4, 2, 1.0, recipe="needle")
    assert [ablations.stage_canvas(setup, f) for f in (0.0, 0.2, 0.5)] == [200, 350, 500]


def test_a_time_budget_is_not_cut_short_by_the_preset_epochs(ablations):
    parse = ablations.argparse.Namespace
    base = dict(tiny=False, canvas=None, recipe="reference", cell=0, lr=None, epoch_images=None, test=None,
                probes=None, channels=None, batch=None)  # fmt: skip
    assert ablations.make_setup(parse(**base, minutes=50.0, epochs=None)).epochs > 10**6
    assert ablations.make_setup(parse(**base, minutes=50.0, epochs=30)).epochs == 30
    assert ablations.make_setup(parse(**base, minutes=0.0, epochs=None)).epochs == 200


def test_needle_recipe_needs_needle_mnist_and_a_known_cell(ablations, tmp_path):
    with pytest.raises(SystemExit, match="--cell needs --canvas"):
        _run(ablations, tmp_path, "--study", "entropy", "--cell", "32")
    with pytest.raises(SystemExit, match="--cell 48"):
        _run(ablations, tmp_path, "--study", "entropy", "--canvas", "128", "--cell", "48")


def test_a_study_split_over_processes_keeps_every_run(ablations, tmp_path):
    """``--runs`` splits a study's runs over processes writing one file: the last write holds all runs."""
    base = ("--study", "mil", "--canvas", "128", "--epochs", "1")
    first = _run(ablations, tmp_path, *base, "--runs", "attention-MIL")
    key = "mil/needle_mnist128/tiny"
    assert sorted(first["studies"][key]["runs"]) == ["attention-MIL"]
    assert first["studies"][key]["distances"] == []
    # the second process read the file before the first wrote (a stale, empty entry): its write still keeps
    stale = {"study": "mil", "runs": {}}
    ablations.update(tmp_path / "ats.json", key, stale)
    both = _run(ablations, tmp_path, *base, "--runs", "ATS")
    entry = both["studies"][key]
    assert sorted(entry["runs"]) == ["ATS", "attention-MIL"]
    assert [(d["a"], d["b"], d["epoch"]) for d in entry["distances"]] == [("ATS", "attention-MIL", 1)]
    with pytest.raises(SystemExit, match="--runs"):
        _run(ablations, tmp_path, *base, "--runs", "nope")
