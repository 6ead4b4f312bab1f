"""Choosing one option per item (a bit width per linear, say) to minimize the summed predicted loss within a byte
budget: the multiple-choice knapsack, solved greedily on each item's lower convex hull of (bytes, loss), the
classic near-optimal method (Sinha and Zoltners 1979): start every item at its cheapest option, then take the
upgrades with the best loss saved per byte while they fit. Pure arithmetic on lists."""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    bytes: int
    loss: float


def _hull(options: list[Option]) -> list[int]:
    """Indices of the options on the lower convex hull of (bytes, loss), cheapest first (dominated ones dropped)."""
    order = sorted(range(len(options)), key=lambda i: (options[i].bytes, options[i].loss))
    hull: list[int] = []
    for i in order:
        if hull and options[i].loss >= options[hull[-1]].loss:
            continue  # costs more and loses no less
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[i]
            # drop b when the step a->c saves at least as much per byte as a->b
            if (a.loss - c.loss) * (b.bytes - a.bytes) >= (a.loss - b.loss) * (c.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(items: list[list[Option]], budget: int) -> list[int] | None:
    """The option index chosen for each item, the summed bytes within budget; None when even the cheapest options
    of all items exceed it."""
    hulls = [_hull(options) for options in items]
    choice = [h[0] for h in hulls]
    used = sum(items[k][c].bytes for k, c in enumerate(choice))
    if used > budget:
        return None
    step = [0] * len(items)
    heap: list[tuple[float, int]] = []

    def push(k: int) -> None:
        if step[k] + 1 < len(hulls[k]):
            a, b = items[k][hulls[k][step[k]]], items[k][hulls[k][step[k] + 1]]
            heapq.heappush(heap, (-(a.loss - b.loss) / max(b.bytes - a.bytes, 1), k))

    for k in range(len(items)):
        push(k)
    while heap:
        _, k = heapq.heappop(heap)
        a, b = items[k][hulls[k][step[k]]], items[k][hulls[k][step[k] + 1]]
        if used + b.bytes - a.bytes > budget:
            continue  # does not fit; a cheaper upgrade of another item may still
        used += b.bytes - a.bytes
        step[k] += 1
        choice[k] = hulls[k][step[k]]
        push(k)
    return choice
