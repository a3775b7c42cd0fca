"""Greedy tokens under load vs the same request sent alone.

vLLM's CPU kernels are not batch-invariant: in bf16, the logits of a request depend a
little on which requests share its step (measured with UTIO off: 18 of 32 greedy
answers of 48 tokens equal when sent 32 at a time and alone, every first difference at
a position whose two best tokens were 0 or one bf16 step, 0.125, apart). So an answer
that differs is judged at its first differing position ``k``, where both runs still
had the same prefix:

- ``exact``: the same tokens;
- ``tie``: at ``k`` the two chosen tokens were within ``tolerance`` of each other in
  the log-probs of either run (a near-tie that numerical noise decides; the alone run
  asks for the top 20, so a tie of three or more tokens is seen too);
- ``differs``: anything else (a token that was clearly not the model's best in the
  other run): what a corrupted cache or a skipped layer would do. The check allows none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vllm_utio.soak.client import Choice

EXACT = "exact"
TIE = "tie"
DIFFERS = "differs"
# Two bf16 steps of a logit in [16, 32): further apart is no numerical accident.
DEFAULT_TOLERANCE = 0.25


@dataclass
class Verdict:
    kind: str  # EXACT | TIE | DIFFERS
    position: int | None = None  # first differing position
    margin: float | None = None  # smallest log-prob gap between the two tokens seen
    loaded_token: int | None = None
    alone_token: int | None = None
    # the best log-probs at the first differing position, for the report
    loaded_top: dict[int, float] | None = None
    alone_top: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(loaded: Choice, alone: Choice, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    a, b = loaded.token_ids, alone.token_ids
    if a == b:
        return Verdict(EXACT)
    pairs = enumerate(zip(a, b, strict=False))
    k = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    if k >= len(a) or k >= len(b):
        # one answer is a strict prefix of the other: both stopped by the same rule
        # (max_tokens equal), so this cannot be noise at a single position
        return Verdict(DIFFERS, k)
    margins = [
        abs(top[a[k]] - top[b[k]])
        for top in (_top_at(loaded, k), _top_at(alone, k))
        if a[k] in top and b[k] in top
    ]
    margin = min(margins) if margins else None
    kind = TIE if margin is not None and margin <= tolerance else DIFFERS
    return Verdict(kind, k, margin, a[k], b[k], _best(loaded, k), _best(alone, k))


def _best(choice: Choice, k: int, n: int = 5) -> dict[int, float]:
    top = _top_at(choice, k)
    return dict(sorted(top.items(), key=lambda kv: -kv[1])[:n])


def _top_at(choice: Choice, k: int) -> dict[int, float]:
    return choice.top[k] if k < len(choice.top) else {}


def tally(verdicts: list[Verdict]) -> dict[str, int]:
    out = {EXACT: 0, TIE: 0, DIFFERS: 0}
    for v in verdicts:
        out[v.kind] += 1
    return out
