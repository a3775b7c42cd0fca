"""Nested layer plans: which decoder layers each depth level runs.

Levels are numbered deepest first: level 0 is full depth, level ``k`` (k >= 1) is the
k-th deepest configured bucket. Because plans nest, the levels that run a given layer
are always ``0..n-1`` for some ``n`` (a prefix), so with requests ordered by level
the rows running a layer are a contiguous prefix of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_utio.config import UtioConfig


@dataclass(frozen=True)
class LayerPlan:
    """Run layers ``[0, keep_first)`` and ``[num_layers - keep_last, num_layers)``."""

    name: str
    num_layers: int
    keep_first: int
    keep_last: int

    def runs(self, layer: int) -> bool:
        return layer < self.keep_first or layer >= self.num_layers - self.keep_last

    @property
    def skip_start(self) -> int:
        return self.keep_first

    @property
    def skip_stop(self) -> int:
        return max(self.keep_first, self.num_layers - self.keep_last)

    @property
    def num_run(self) -> int:
        return self.num_layers - (self.skip_stop - self.skip_start)

    @property
    def is_full(self) -> bool:
        return self.skip_stop == self.skip_start


@dataclass(frozen=True)
class PlanSet:
    """All levels' plans, deepest first, plus the per-layer prefix sizes."""

    plans: tuple[LayerPlan, ...]

    @classmethod
    def from_config(cls, cfg: UtioConfig, num_layers: int) -> PlanSet:
        full = LayerPlan("full", num_layers, num_layers, 0)
        shallow = [
            LayerPlan(b.name, num_layers, min(b.keep_first, num_layers), b.keep_last)
            for b in reversed(cfg.buckets)
        ]
        plan_set = cls((full, *shallow))
        plan_set.check_nested()
        return plan_set

    @property
    def num_layers(self) -> int:
        return self.plans[0].num_layers

    @property
    def num_levels(self) -> int:
        return len(self.plans)

    def levels_running(self, layer: int) -> int:
        """How many levels (a prefix of the deepest-first order) run ``layer``."""
        n = 0
        while n < len(self.plans) and self.plans[n].runs(layer):
            n += 1
        return n

    def check_nested(self) -> None:
        for layer in range(self.num_layers):
            n = self.levels_running(layer)
            if any(p.runs(layer) for p in self.plans[n:]):
                raise ValueError(f"plans are not nested at layer {layer}: {self.plans}")

    def layer_tokens(self, tokens_per_level: list[int]) -> tuple[int, int]:
        """(layer-tokens run, layer-tokens of a full-depth step) for these level sizes."""
        run = sum(n * p.num_run for n, p in zip(tokens_per_level, self.plans, strict=True))
        return run, sum(tokens_per_level) * self.num_layers
