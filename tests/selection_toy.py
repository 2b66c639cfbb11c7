"""A tiny synthetic "needle" task for selection models: one bar pattern in a noisy image.

Class 0: horizontal bars, class 1: vertical bars, each drawn in a random ``cell × cell`` grid cell of a
``size × size`` image of faint noise. Solvable only by looking at those cells.
"""

from __future__ import annotations

import torch


def bars_batch(
    n: int, size: int = 64, cell: int = 8, seed: int = 0, n_bars: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, size, size)`` and labels; ``n_bars`` bars of the class in distinct cells."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 1, size, size, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    grid = size // cell
    cells = torch.stack([torch.randperm(grid * grid, generator=g)[:n_bars] for _ in range(n)])
    for i, j in ((i, j) for i in range(n) for j in range(n_bars)):
        r, c = int(cells[i, j] // grid) * cell, int(cells[i, j] % grid) * cell
        block = torch.zeros(cell, cell)
        if labels[i] == 0:
            block[cell // 2 - 1 : cell // 2 + 1, 1:-1] = 1.0
        else:
            block[1:-1, cell // 2 - 1 : cell // 2 + 1] = 1.0
        images[i, 0, r : r + cell, c : c + cell] += block
    return images, labels


def train_losses(model, batches, lr: float = 3e-3, steps: int = 30) -> list[float]:
    """Adam steps on the given list of (inputs dict, labels); returns the loss of each step."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        inputs, labels = batches[step % len(batches)]
        out = model(**inputs)
        loss, _ = model.compute_loss(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
