"""Route ordering: priority tiers first, weights inside a tier."""

from __future__ import annotations

import random
from collections import Counter

from app.domain.jobs import ImageJob, ImageResult
from app.upstream.registry import Route
from app.upstream.router import order_routes


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    async def generate(self, job: ImageJob, *, upstream_model: str) -> ImageResult:
        raise AssertionError("not called")

    async def probe(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def route(name: str, weight: int = 1, priority: int = 0) -> Route:
    return Route(Named(name), name, weight, priority)


def test_priority_tiers_come_in_order() -> None:
    routes = [route("backup", priority=5), route("a"), route("b"), route("last", priority=9)]
    for seed in range(20):
        names = [r.name for r in order_routes(routes, random.Random(seed))]
        assert set(names[:2]) == {"a", "b"} and names[2:] == ["backup", "last"]


def test_weights_shape_the_first_choice() -> None:
    routes = [route("heavy", weight=3), route("light", weight=1)]
    rng = random.Random(1234)
    firsts = Counter(order_routes(routes, rng)[0].name for _ in range(4000))
    share = firsts["heavy"] / 4000
    assert 0.72 < share < 0.78
