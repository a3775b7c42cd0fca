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
is measured again now and then (:mod:`vllm_utio.path_payoff`).
"""

from __future__ import annotations

from typing import Literal

from vllm_utio.path_payoff import FIRST_RECHECK, LAST_RECHECK, PathPayoff, size_class

__all__ = ["FIRST_RECHECK", "LAST_RECHECK", "RoutingPayoff", "size_class"]


class RoutingPayoff(PathPayoff):
    """Decides, before each step with a routable row, whether to route it (see the doc)."""

    def __init__(self, mode: Literal["measured", "always"]) -> None:
        super().__init__(mode, base="model", alt="loop")

    def route(self, num_tokens: int) -> bool:
        """Route this step (layer loop with the probe) or not (vLLM's model)?"""
        return self.choose(num_tokens)

    def observe_step(self, num_tokens: int, routed: bool, forward_s: float) -> None:
        """A decided step's forward time, on the path ``route`` chose."""
        self.observe(num_tokens, routed, forward_s, num_tokens)
