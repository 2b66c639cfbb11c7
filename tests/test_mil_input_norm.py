"""Input standardisation of ZoomMIL and SparseConvMIL (issue 14, item 6).

On raw features with a tiny spread around large means (like ``color_stats`` in ``[0, 1]``), SparseConvMIL
and ZoomMIL stayed at the constant prediction on the synthetic-slide bags of ``benchmarks/mil.py``
(accuracy 0.50). The bag problem below has the same character: 8×8 tiles at 0.5 ± 0.01, positive bags with a
2×2-tile lesion shifted by +0.05 in half of the features. With ``input_norm`` both models fit it.
"""

from __future__ import annotations

import pytest
import torch

import needlework
from needlework.models.mil.common import MaskedStandardize

SIDE, DIM, N_BAGS = 8, 8, 16


def raw_feature_bags(seed: int = 0) -> dict[str, torch.Tensor]:
    """Bags of ``SIDE²`` tiles stored depth-first by 2×2 parent (``bag_1``) with their level-0
    coordinates (``coords``, 64-px grid), and their parents' means (``bag``, a 4×4 grid)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(N_BAGS) % 2
    grid = 0.5 + 0.01 * torch.randn(N_BAGS, SIDE, SIDE, DIM, generator=g)
    for b in range(N_BAGS):
        if label[b]:
            py, px = torch.randint(0, SIDE // 2, (2,), generator=g).tolist()
            grid[b, 2 * py : 2 * py + 2, 2 * px : 2 * px + 2, : DIM // 2] += 0.05
    # depth-first: parent (py, px) of the 4×4 grid, then its 2×2 children
    half = SIDE // 2
    children = grid.view(N_BAGS, half, 2, half, 2, DIM).permute(0, 1, 3, 2, 4, 5).reshape(N_BAGS, -1, DIM)
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    coords = torch.stack([xs, ys], -1).view(half, 2, half, 2, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
    return {
        "bag": children.view(N_BAGS, half * half, 4, DIM).mean(2),
        "bag_1": children,
        "coords": (coords * 64).expand(N_BAGS, -1, -1).contiguous(),
        "label": label,
    }


def train_accuracy(model: torch.nn.Module, batch: dict, steps: int, lr: float) -> tuple[float, int]:
    """Full-batch Adam for ``steps``; evaluation-mode accuracy on the training bags and the number of
    distinct predicted classes."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss, _ = model.compute_loss(model.forward_batch(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model.forward_batch(batch)["logits"].argmax(-1)
    return float((pred == batch["label"]).float().mean()), len(pred.unique())


def sparseconvmil(input_norm: bool) -> torch.nn.Module:
    return needlework.create_model(
        "sparseconvmil",
        in_dim=DIM,
        num_classes=2,
        cell_size=64,
        rotation="right_angles",
        scale=None,
        input_norm=input_norm,
    )


def test_masked_standardize_uses_only_real_instances_and_running_stats_in_eval():
    norm = MaskedStandardize(3)
    x = torch.randn(2, 5, 3) * 4 + 7
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    x_padded = x.clone()
    x_padded[~mask] = 1e6  # garbage in the padding must not change the statistics
    y = norm(x_padded, mask)
    real = x[mask]
    ref = (real - real.mean(0)) / real.var(0, unbiased=False).add(1e-5).sqrt()
    torch.testing.assert_close(y[mask], ref, atol=1e-5, rtol=1e-5)
    assert (y[~mask] == 0).all()
    # running statistics: momentum 0.1 from (0, 1), unbiased variance, as BatchNorm1d
    torch.testing.assert_close(norm.norm.running_mean, 0.1 * real.mean(0))
    torch.testing.assert_close(norm.norm.running_var, 0.9 + 0.1 * real.var(0))
    norm.eval()
    ev = norm(x, mask)
    m, v = norm.norm.running_mean, norm.norm.running_var
    torch.testing.assert_close(ev[mask], (real - m) / (v + 1e-5).sqrt())
    # a single real instance in training falls back to the running statistics instead of failing
    norm.train()
    one = norm(x[:1, :1], mask[:1, :1])
    torch.testing.assert_close(one[0, 0], (x[0, 0] - m) / (v + 1e-5).sqrt())


@pytest.mark.parametrize("seed", [0, 1])
def test_sparseconvmil_with_input_norm_fits_raw_feature_bags_without_it_is_constant(seed):
    bags = raw_feature_bags(seed)
    batch = {"bag": bags["bag_1"], "coords": bags["coords"], "label": bags["label"]}
    torch.manual_seed(seed)
    acc, _ = train_accuracy(sparseconvmil(True), batch, steps=60, lr=1e-3)
    assert acc == 1.0
    torch.manual_seed(seed)
    acc, n_classes = train_accuracy(sparseconvmil(False), batch, steps=60, lr=1e-3)
    assert n_classes == 1 and acc == 0.5  # the bug: one class for every bag


@pytest.mark.parametrize("seed", [0, 1])
def test_zoommil_with_input_norm_fits_raw_feature_bags(seed):
    bags = raw_feature_bags(seed)
    batch = {k: bags[k] for k in ("bag", "bag_1", "label")}
    torch.manual_seed(seed)
    model = needlework.create_model(
        "zoommil",
        in_dim=DIM,
        num_classes=2,
        num_levels=2,
        k=4,
        hidden_dim=32,
        attention_dim=16,
        dropout=0.0,
        sigma=0.05,
        n_samples=20,
        input_norm=True,
    )
    acc, _ = train_accuracy(model, batch, steps=100, lr=3e-3)
    assert acc == 1.0
