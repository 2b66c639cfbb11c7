"""Shared builders for the MIL tests: small models and random bags with grid coordinates."""

from __future__ import annotations

import pytest
import torch

import needlework

# small widths so every model runs in milliseconds on one core
SMALL_KWARGS: dict[str, dict] = {
    "transmil": {"dim": 32, "heads": 4, "num_landmarks": 8, "dropout": 0.0},
    "abmil": {"embed_dim": 32, "attention_dim": 16},
    "abmil.gated": {"embed_dim": 32, "attention_dim": 16},
    "clam_sb": {"dropout": 0.0},
    "sparseconvmil": {"channels": (16, 16), "cell_size": 256},
    "zoommil": {"num_levels": 3, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "k": 3,
                "n_samples": 20, "sigma": 0.05},
}
CHILDREN = 4  # children per parent of the multi-level inputs


def level_inputs(name: str, bag: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Extra inputs of multi-level models: depth-first children features derived from each parent
    (so padding and permutations of the parents carry over to their descendants)."""
    if name != "zoommil":
        return {}
    levels, x = {}, bag
    for level in (1, 2):
        x = torch.stack([torch.sin((j + 1) * x + level) for j in range(CHILDREN)], dim=2).flatten(1, 2)
        levels[f"bag_{level}"] = x
        if mask is not None:
            levels[f"mask_{level}"] = mask.repeat_interleave(CHILDREN**level, dim=1)
    return levels


def run(model, bag, coords=None, mask=None, name: str | None = None) -> dict:
    """Call a zoo model with the extra inputs its family needs."""
    name = name or getattr(model, "registry_name", "")
    return model(bag, coords, mask, **level_inputs(name, bag, mask))


def make_model(name: str, in_dim: int = 12, num_classes: int = 3, **extra) -> torch.nn.Module:
    if name == "zoommil":  # zooming needs the perturbed top-K operator (branch topk)
        pytest.importorskip("needlework.topk", reason="needlework.topk (perturbed_topk) not available")
    kwargs = {**SMALL_KWARGS.get(name, {}), **extra}
    model = needlework.create_model(name, in_dim=in_dim, num_classes=num_classes, **kwargs)
    model.registry_name = name
    return model


def grid_coords(b: int, n: int, side: int = 12, stride: int = 256, generator=None) -> torch.Tensor:
    """``(b, n, 2)`` int64 distinct tile positions on a ``side × side`` grid of ``stride``-px tiles."""
    cells = torch.stack([torch.randperm(side * side, generator=generator)[:n] for _ in range(b)])
    return torch.stack([cells % side, cells // side], dim=-1) * stride


def planted_bags(b: int, n: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags whose label (0/1) says whether one instance carries a +3 shift on feature 0."""
    bag = torch.randn(b, n, d, generator=generator)
    label = torch.arange(b) % 2
    where = torch.randint(0, n, (b,), generator=generator)
    bag[torch.arange(b), where, 0] += 3.0 * label
    return bag, label


def pad_bags(samples: list[dict]) -> dict:
    """Padding collate for every bag kind of these tests (pixel bags, several levels, extra per-instance
    keys): ``pad_bag_levels`` (the library's ``pad_bags`` takes ``(N, D)`` feature bags only)."""
    from needlework.data.level_collate import pad_bag_levels

    return pad_bag_levels(samples)


@pytest.fixture(autouse=True)
def one_thread():
    """MIL tests use tiny tensors: one thread avoids the synchronisation cost of two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
