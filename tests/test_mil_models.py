"""Contract tests run over every registered MIL model (shapes, masking, invariances, learning)."""

from __future__ import annotations

import pytest
import torch

import needlework
from mil_helpers import (
    grid_coords,
    level_inputs,
    make_model,
    one_thread,  # noqa: F401  (autouse fixture)
    planted_bags,
    run,
)
from needlework.models.mil import list_mil_models

MODELS = list_mil_models()


def test_zoo_is_complete():
    expected = {"instance.max", "instance.mean", "instance.lse", "embedding.max", "embedding.mean",
                "embedding.lse", "abmil", "abmil.gated", "clam_sb", "transmil", "dsmil", "sparseconvmil"}
    assert expected <= set(MODELS)
    assert expected <= set(needlework.list_models())


def _check_attention(att: torch.Tensor, mask: torch.Tensor) -> None:
    m = mask if att.dim() == 2 else mask[:, None, :].expand_as(att)
    assert (att[~m] == 0).all(), "attention must be exactly 0 at padded positions"
    assert torch.allclose(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5)
    assert (att >= 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_attention(name):
    torch.manual_seed(0)
    model = make_model(name).eval()
    b, n = 3, 9
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 1:] = False  # a bag with a single instance
    out = run(model, torch.randn(b, n, 12), grid_coords(b, n), mask)
    assert out["logits"].shape == (b, 3)
    assert torch.isfinite(out["logits"]).all()
    att = out["attention"]
    assert att.shape in {(b, n), (b, 3, n)}
    _check_attention(att, mask)
    if "instance_logits" in out:
        assert out["instance_logits"].shape == (b, n, 3)


@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance(name):
    """A bag alone and the same bag padded with garbage inside a batch give the same output."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = make_model(name).eval()
    n1, n2 = 7, 11
    bag1, bag2 = torch.randn(1, n1, 12, generator=g), torch.randn(1, n2, 12, generator=g)
    c1, c2 = grid_coords(1, n1, generator=g), grid_coords(1, n2, generator=g)
    with torch.no_grad():
        alone = run(model, bag1, c1)
        padded_bag = torch.cat([torch.cat([bag1, 1e3 * torch.randn(1, n2 - n1, 12, generator=g)], 1), bag2])
        padded_coords = torch.cat([torch.cat([c1, grid_coords(1, n2 - n1, generator=g) + 10**6], 1), c2])
        mask = torch.ones(2, n2, dtype=torch.bool)
        mask[0, n1:] = False
        batched = run(model, padded_bag, padded_coords, mask)
        second = run(model, bag2, c2)
    torch.testing.assert_close(batched["logits"][:1], alone["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched["logits"][1:], second["logits"], atol=1e-5, rtol=1e-4)
    att = batched["attention"]
    torch.testing.assert_close(att[:1, ..., :n1], alone["attention"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_permutation_invariance(name):
    torch.manual_seed(2)
    model = make_model(name).eval()
    if not model.permutation_invariant:
        pytest.skip(f"{name} does not claim permutation invariance (sequence-order layers)")
    bag, coords = torch.randn(2, 10, 12), grid_coords(2, 10)
    perm = torch.randperm(10)
    with torch.no_grad():
        out, out_p = run(model, bag, coords), run(model, bag[:, perm], coords[:, perm])
    torch.testing.assert_close(out_p["logits"], out["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_p["attention"], out["attention"][..., perm], atol=1e-5, rtol=1e-4)


def test_transmil_is_order_sensitive():
    """Negative control: the permutation test has power on a model that is not invariant."""
    torch.manual_seed(2)
    model = make_model("transmil").eval()
    bag, perm = torch.randn(1, 10, 12), torch.randperm(10)
    with torch.no_grad():
        assert not torch.allclose(model(bag)["logits"], model(bag[:, perm])["logits"], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_few_steps_decrease_the_loss(name):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = make_model(name, num_classes=2)
    bag, label = planted_bags(8, 10, 12, g)
    coords = grid_coords(8, 10, generator=g)
    mask = torch.ones(8, 10, dtype=torch.bool)
    mask[::3, 7:] = False
    bag[~mask] = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = {"bag": bag, "coords": coords, "mask": mask, "label": label, **level_inputs(name, bag, mask)}

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return float(model.compute_loss(model.forward_batch(batch), label)[0])

    before = loss_now()
    for _ in range(40):
        model.train()
        total, parts = model.compute_loss(model.forward_batch(batch), label)
        assert "task" in parts and torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert loss_now() < 0.8 * before


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(4)
    model = make_model(name, num_classes=2).train()
    bag, coords = torch.randn(4, 20, 12), grid_coords(4, 20)
    total, _ = model.compute_loss(run(model, bag, coords), torch.tensor([0, 1, 1, 0]))
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("name", MODELS)
def test_bad_inputs_raise_clear_errors(name):
    model = make_model(name).eval()
    coords = grid_coords(2, 5)
    with pytest.raises(ValueError, match="in_dim=12"):
        run(model, torch.randn(2, 5, 7), coords)
    with pytest.raises(ValueError, match="bag"):
        run(model, torch.randn(5, 12), coords)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"no real instance in bag\(s\) \[1\]"):
        run(model, torch.randn(2, 5, 12), coords, mask)


@pytest.mark.parametrize("name", MODELS)
def test_predict_and_state_dict_round_trip(name):
    torch.manual_seed(5)
    model = make_model(name).eval()
    clone = make_model(name).eval()
    clone.load_state_dict(model.state_dict())
    bag, coords = torch.randn(2, 6, 12), grid_coords(2, 6)
    inputs = {"bag": bag, "coords": coords, **level_inputs(name, bag)}
    p1, p2 = model.predict(**inputs), clone.predict(**inputs)
    torch.testing.assert_close(p1["probs"], p2["probs"])
    torch.testing.assert_close(p1["probs"].sum(-1), torch.ones(2))
