"""Routers: one interface from a step's requests to desired depth levels.

A router sees a :class:`RoutingBatch` (per-row request data of the persistent batch)
and returns a desired level per row (0 = full depth). Bucketing rules (prefill, min
sizes, fallbacks) are applied afterwards by :mod:`.bucketing`, so a router only
expresses preference. New routers (learned probes) implement the same ``route``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from vllm_utio.config import UtioConfig
from vllm_utio.log import get_logger
from vllm_utio.request_controls import BUCKET_KEY, FULL_DEPTH
from vllm_utio.routing import entropy
from vllm_utio.routing.bucketing import levels_from_scores

logger = get_logger(__name__)


@dataclass
class RoutingBatch:
    """What a router may look at for one step, one entry per row of the batch."""

    req_ids: list[str]
    scores: np.ndarray  # surrogate score per row (NaN where unknown)
    extra_args: list[dict[str, Any] | None] = field(default_factory=list)


class Router(Protocol):
    def route(self, batch: RoutingBatch) -> np.ndarray: ...


class SurrogateRouter:
    """UTIO's rule: a low surrogate importance score sends a request shallower."""

    def __init__(self, cfg: UtioConfig) -> None:
        self.max_scores = [b.max_score for b in cfg.buckets]

    def route(self, batch: RoutingBatch) -> np.ndarray:
        scores = np.nan_to_num(batch.scores, nan=np.inf)  # unknown -> full depth
        return levels_from_scores(scores, self.max_scores)


class ForcedRouter:
    """Each request names its bucket in ``SamplingParams.extra_args['utio_bucket']``.

    For tests and for pinning a request's depth; unnamed requests run full depth.
    """

    def __init__(self, cfg: UtioConfig) -> None:
        self.level_of = levels_by_name(cfg)
        self._warned: set[str] = set()

    def route(self, batch: RoutingBatch) -> np.ndarray:
        levels = np.zeros(len(batch.req_ids), dtype=np.int64)
        for row, extra in enumerate(batch.extra_args):
            name = (extra or {}).get(BUCKET_KEY)
            if name is None:
                continue
            level = self.level_of.get(str(name))
            if level is None:
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning(
                        "UTIO forced router: unknown bucket %r (allowed: %s); running full depth",
                        name,
                        sorted(self.level_of),
                    )
                continue
            levels[row] = level
        return levels


def levels_by_name(cfg: UtioConfig) -> dict[str, int]:
    """Level of each bucket name a request may pin ("full": 0, the shallowest: highest)."""
    n = len(cfg.buckets)
    return {FULL_DEPTH: 0, **{b.name: n - i for i, b in enumerate(cfg.buckets)}}


def make_router(cfg: UtioConfig) -> Router:
    """The pre-step router ('probe' routes mid-forward instead, see routing/probe.py)."""
    if cfg.router == "forced":
        return ForcedRouter(cfg)
    w = cfg.signal
    uses_entropy = cfg.router == "surrogate" and (w.entropy or w.varentropy)
    if uses_entropy and cfg.buckets and not cfg.speculate:
        entropy.configure(cfg.entropy_pass == "compiled")  # compiles now, while loading
    return SurrogateRouter(cfg)
