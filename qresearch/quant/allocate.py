"""Bit allocation under an average bits-per-weight budget (mixed precision). Pure functions on plain numbers.

Each layer has candidate widths b with a storage cost c_b (bits, counting codes, scales, zeros, palettes as the
footprint does) and an error e_b (a sensitivity proxy). `allocate_greedy` minimises sum e subject to
sum c <= budget * sum n_weights: every layer starts at its cheapest width, then the upgrade with the largest error
drop per added bit that still fits is taken, repeatedly, along each layer's lower convex hull of (cost, error) (the
standard greedy for this multiple-choice knapsack; optimal at the hull's breakpoints). `allocate_random` spends the
same budget on random upgrades (a control: what the sensitivity ranking is worth).
"""
from __future__ import annotations

import random

from ..errors import ConfigError


def lower_hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """(cost, error, bits) points -> the lower convex hull from the cheapest point, error strictly decreasing."""
    pts = sorted(points)
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more, no better
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            if (e1 - e2) * (p[0] - c2) <= (e2 - p[1]) * (c2 - c1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _start(costs: dict[str, dict[int, float]], n_weights: dict[str, int], budget: float) -> tuple[dict, float, float]:
    limit = budget * sum(n_weights.values())
    cheapest = {k: min(c, key=lambda b: c[b]) for k, c in costs.items()}
    used = sum(costs[k][b] for k, b in cheapest.items())
    if used > limit * (1 + 1e-12):
        raise ConfigError(f"budget={budget} bits/weight is below the cheapest allocation "
                          f"({used / sum(n_weights.values()):.3f} bits/weight); raise it or add smaller candidates")
    return cheapest, used, limit


def allocate_greedy(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]],
                    n_weights: dict[str, int], budget: float) -> dict[str, int]:
    """{layer: bits} minimising the summed error within the budget (see module docstring)."""
    hulls = {k: lower_hull([(costs[k][b], errors[k][b], b) for b in costs[k]]) for k in costs}
    pos = {k: 0 for k in hulls}
    _, used, limit = _start(costs, n_weights, budget)
    used = sum(h[0][0] for h in hulls.values())
    while True:
        best, best_gain = None, 0.0
        for k, h in hulls.items():
            i = pos[k]
            if i + 1 < len(h) and used + h[i + 1][0] - h[i][0] <= limit * (1 + 1e-12):
                gain = (h[i][1] - h[i + 1][1]) / max(h[i + 1][0] - h[i][0], 1e-30)
                if gain > best_gain:
                    best, best_gain = k, gain
        if best is None:
            break
        i = pos[best]
        used += hulls[best][i + 1][0] - hulls[best][i][0]
        pos[best] = i + 1
    return {k: hulls[k][pos[k]][2] for k in hulls}


def allocate_random(costs: dict[str, dict[int, float]], n_weights: dict[str, int], budget: float,
                    seed: int = 0) -> dict[str, int]:
    """{layer: bits} from random one-step upgrades (seeded) until none fits the budget."""
    rng = random.Random(seed)
    alloc, used, limit = _start(costs, n_weights, budget)
    widths = {k: sorted(c, key=lambda b: c[b]) for k, c in costs.items()}
    while True:
        options = []
        for k, ws in widths.items():
            i = ws.index(alloc[k])
            if i + 1 < len(ws) and used + costs[k][ws[i + 1]] - costs[k][alloc[k]] <= limit * (1 + 1e-12):
                options.append(k)
        if not options:
            return alloc
        k = rng.choice(sorted(options))
        nxt = widths[k][widths[k].index(alloc[k]) + 1]
        used += costs[k][nxt] - costs[k][alloc[k]]
        alloc[k] = nxt


def bits_per_weight(alloc: dict[str, int], costs: dict[str, dict[int, float]], n_weights: dict[str, int]) -> float:
    """Effective bits per weight of an allocation (storage bits over weights)."""
    return sum(costs[k][b] for k, b in alloc.items()) / sum(n_weights[k] for k in alloc)
