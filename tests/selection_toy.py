"""A tiny synthetic "needle" task for selection models: one bar pattern in a noisy image.

Class 0: a horizontal bar, class 1: a vertical bar, drawn in one random ``cell × cell`` grid cell of a
``size × size`` image of faint noise. Solvable only by looking at that cell.
"""

from __future__ import annotations

import torch


def bars_batch(n: int, size: int = 64, cell: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 1, size, size, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    cells = torch.randint(0, size // cell, (n, 2), generator=g)
    for i in range(n):
        r, c = (cells[i] * cell).tolist()
        block = torch.zeros(cell, cell)
        if labels[i] == 0:
            block[cell // 2 - 1 : cell // 2 + 1, 1:-1] = 1.0
        else:
            block[1:-1, cell // 2 - 1 : cell // 2 + 1] = 1.0
        images[i, 0, r : r + cell, c : c + cell] += block
    return images, labels


def train_losses(model, batches, lr: float = 3e-3, steps: int = 30, forward=None) -> list[float]:
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
