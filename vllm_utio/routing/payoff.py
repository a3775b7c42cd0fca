"""Whether routing a step pays for itself: the probe's layer loop against vLLM's model,
measured per step size.

With router 'probe', a step with a routable row runs UTIO's layer loop, so that the probe
can route rows mid-forward (``step_path.MID_FORWARD_ROUTING``). The loop costs more than
vLLM's compiled model (per-call overhead, sub-batch metadata, gathers, K/V fills), so
routing pays only when the probe saves more layer-tokens than that. How much it saves
depends on the text and the artifact; what the loop costs depends on the machine and the
batch (on a GPU a layer costs about the same for 1 row or 64). Both are measured: the
runner reports every decided step's forward time, and a step routes only while routed
steps of its size class have run faster per token than vLLM's model. The path not taken
is measured again now and then: after 8 steps of that class, doubling up to 128 while the
verdict holds, back to 8 when it flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FIRST_RECHECK = 8  # steps of a size class before the losing path is measured again
LAST_RECHECK = 128
EMA_WEIGHT = 0.25  # weight of the newest step in a path's running time per token


@dataclass
class PathTimes:
    """Running seconds per token of one size class on each path (None: not yet run)."""

    model_s: float | None = None  # vLLM's model, no routing
    loop_s: float | None = None  # the layer loop, routed mid-forward
    since_check: int = 0  # steps since the losing path last ran
    recheck_every: int = FIRST_RECHECK
    checking: bool = False  # the step in flight runs the losing path to re-measure it

    def loop_wins(self) -> bool | None:
        if self.model_s is None or self.loop_s is None:
            return None
        return self.loop_s < self.model_s


def size_class(num_tokens: int) -> int:
    """Steps of 2^(k-1)+1 .. 2^k tokens share class k."""
    return max(num_tokens - 1, 0).bit_length()


class RoutingPayoff:
    """Decides, before each step with a routable row, whether to route it (see the doc)."""

    def __init__(self, mode: Literal["measured", "always"]) -> None:
        self.mode = mode
        self.classes: dict[int, PathTimes] = {}
        self.declined_steps = 0  # steps run without routing because it did not pay
        self.recheck_steps = 0  # steps run on a path to measure it (first time or again)

    def route(self, num_tokens: int) -> bool:
        """Route this step (layer loop with the probe) or not (vLLM's model)?"""
        if self.mode == "always":
            return True
        times = self.classes.setdefault(size_class(num_tokens), PathTimes())
        if times.loop_s is None:
            return True  # measure routing first, then the model
        if times.model_s is None:
            self.recheck_steps += 1
            return False
        wins = bool(times.loop_wins())
        times.since_check += 1
        times.checking = times.since_check >= times.recheck_every
        if times.checking:
            times.since_check = 0
            self.recheck_steps += 1
            return not wins
        self.declined_steps += int(not wins)
        return wins

    def observe(self, num_tokens: int, routed: bool, forward_s: float) -> None:
        """A decided step's forward time, on the path ``route`` chose."""
        if self.mode == "always" or num_tokens <= 0:
            return
        times = self.classes.setdefault(size_class(num_tokens), PathTimes())
        before = times.loop_wins()
        per_token = forward_s / num_tokens
        attr = "loop_s" if routed else "model_s"
        old = getattr(times, attr)
        if old is None or times.checking:
            # a path not run for a while: its old time is stale (the batch's contexts, the
            # probe's decisions and the machine's load have moved on since)
            setattr(times, attr, per_token)
        else:
            setattr(times, attr, (1 - EMA_WEIGHT) * old + EMA_WEIGHT * per_token)
        if times.checking:  # a re-measured losing path: back off while the verdict holds
            times.checking = False
            held = times.loop_wins() == before
            times.recheck_every = (
                min(2 * times.recheck_every, LAST_RECHECK) if held else FIRST_RECHECK
            )

    def as_dict(self) -> dict[str, object]:
        """Counters and per size class (largest step size) µs per token on each path."""
        per_class = {
            str(1 << k): {
                "model_us_per_token": None if t.model_s is None else 1e6 * t.model_s,
                "loop_us_per_token": None if t.loop_s is None else 1e6 * t.loop_s,
                "recheck_every": t.recheck_every,
            }
            for k, t in sorted(self.classes.items())
        }
        return {
            "mode": self.mode,
            "declined_steps": self.declined_steps,
            "recheck_steps": self.recheck_steps,
            "size_classes": per_class,
        }
