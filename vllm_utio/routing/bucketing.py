"""From desired levels to the levels a step really runs (pure numpy, no engine).

Rules, in order: rows that may not be routed (prefill, no previous distribution) run
full depth; a step with fewer rows than ``min_batch_size`` runs full depth; a level
with fewer rows than ``min_bucket_size`` merges into the next deeper level (repeated
from the shallowest level down); a step whose plan would save less than
``min_saved_fraction`` of its layer-tokens runs full depth.
"""

from __future__ import annotations

import numpy as np

from vllm_utio.config import UtioConfig
from vllm_utio.plans import PlanSet


def levels_from_scores(scores: np.ndarray, max_scores: list[float]) -> np.ndarray:
    """Level per score for buckets listed shallowest first (increasing max_score).

    A score goes to the shallowest bucket whose ``max_score`` exceeds it; the level of
    bucket ``i`` of ``n`` is ``n - i`` (level 0 is full depth).
    """
    n = len(max_scores)
    levels = np.zeros(len(scores), dtype=np.int64)
    for i in reversed(range(n)):  # deepest bucket first, shallower ones overwrite
        levels[scores < max_scores[i]] = n - i
    return levels


def finalize_levels(
    desired: np.ndarray,
    routable: np.ndarray,
    tokens: np.ndarray,
    plan_set: PlanSet,
    cfg: UtioConfig,
) -> np.ndarray:
    """The level each row runs at this step; ``tokens`` is scheduled tokens per row."""
    levels = np.where(routable, desired, 0).astype(np.int64)
    if len(levels) < cfg.min_batch_size:
        return np.zeros_like(levels)
    for level in range(plan_set.num_levels - 1, 0, -1):
        members = levels == level
        if 0 < members.sum() < cfg.min_bucket_size:
            levels[members] = level - 1
    if cfg.min_saved_fraction > 0.0 and levels.any():
        run, full = plan_set.layer_tokens(tokens_per_level(levels, tokens, plan_set))
        if full == 0 or 1.0 - run / full < cfg.min_saved_fraction:
            return np.zeros_like(levels)
    return levels


def tokens_per_level(levels: np.ndarray, tokens: np.ndarray, plan_set: PlanSet) -> list[int]:
    return [int(tokens[levels == k].sum()) for k in range(plan_set.num_levels)]


def deepest_first_order(levels: np.ndarray) -> np.ndarray:
    """Stable permutation putting rows in increasing level (deepest first)."""
    return np.argsort(levels, kind="stable")


def swaps_for_permutation(order: np.ndarray) -> list[tuple[int, int]]:
    """Swaps that turn a row layout into ``new[i] = old[order[i]]``.

    Applying the swaps in sequence to a list (swap positions a and b) yields the
    permuted list; used to reorder vLLM's persistent batch with its own swap.
    """
    pos_of = list(range(len(order)))  # current position of each original row
    row_at = list(range(len(order)))  # original row currently at each position
    swaps = []
    for target, row in enumerate(order.tolist()):
        src = pos_of[row]
        if src != target:
            swaps.append((target, src))
            other = row_at[target]
            row_at[target], row_at[src] = row, other
            pos_of[row], pos_of[other] = target, src
    return swaps
