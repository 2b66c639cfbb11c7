"""Poisson-disk sampling (Bridson, SIGGRAPH sketches 2007) in a rectangle.

Used by the MNIST-hard and Gabor-noise generators to place objects at random with a minimum spacing.

Example:
    >>> import numpy as np
    >>> pts = poisson_disk((10.0, 10.0, 70.0, 70.0), 14.0, np.random.default_rng(0))
    >>> bool(pts.shape[1] == 2 and len(pts) > 9)
    True
"""

from __future__ import annotations

import math

import numpy as np


def poisson_disk(
    bounds: tuple[float, float, float, float],
    radius: float,
    rng: np.random.Generator,
    candidates: int = 30,
) -> np.ndarray:
    """Points of ``[x0, x1] × [y0, y1]`` no two of which are closer than ``radius``.

    Bridson's algorithm: start from a uniform point; repeatedly pick a random active point and try
    ``candidates`` uniform points of the annulus ``[radius, 2·radius)`` around it; accept the first one
    far enough from every accepted point (checked on a background grid of cell ``radius/√2``), retire the
    active point when all its candidates fail.

    Args:
        bounds: ``(x0, y0, x1, y1)`` of the domain (inclusive of the lower, exclusive of the upper edge).
        radius: minimum distance between points (> 0).
        rng: the random generator (the result is a pure function of its state).
        candidates: tries per active point (Bridson's k, 30 by default).

    Returns:
        ``(n, 2)`` float64 array of ``(x, y)`` points in generation order.
    """
    x0, y0, x1, y1 = (float(b) for b in bounds)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bounds must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {bounds}")
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    cell = radius / math.sqrt(2.0)
    nx, ny = max(1, math.ceil((x1 - x0) / cell)), max(1, math.ceil((y1 - y0) / cell))
    grid = -np.ones((ny, nx), dtype=np.int64)  # index of the point in each cell, -1 if empty
    points: list[tuple[float, float]] = []

    def cell_of(p: tuple[float, float]) -> tuple[int, int]:
        return min(int((p[1] - y0) / cell), ny - 1), min(int((p[0] - x0) / cell), nx - 1)

    def far_enough(p: tuple[float, float]) -> bool:
        r, c = cell_of(p)
        # a point closer than radius lies at most 2 cells away (cell diagonal = radius)
        for rr in range(max(r - 2, 0), min(r + 3, ny)):
            for cc in range(max(c - 2, 0), min(c + 3, nx)):
                j = grid[rr, cc]
                if j >= 0 and (points[j][0] - p[0]) ** 2 + (points[j][1] - p[1]) ** 2 < radius**2:
                    return False
        return True

    def add(p: tuple[float, float]) -> None:
        grid[cell_of(p)] = len(points)
        points.append(p)
        active.append(len(points) - 1)

    active: list[int] = []
    add((float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))))
    while active:
        slot = int(rng.integers(len(active)))
        base = points[active[slot]]
        for _ in range(candidates):
            rho = radius * math.sqrt(float(rng.uniform(1.0, 4.0)))  # uniform over the annulus area
            theta = float(rng.uniform(0.0, 2.0 * math.pi))
            p = (base[0] + rho * math.cos(theta), base[1] + rho * math.sin(theta))
            if x0 <= p[0] < x1 and y0 <= p[1] < y1 and far_enough(p):
                add(p)
                break
        else:
            active[slot] = active[-1]
            active.pop()
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)
