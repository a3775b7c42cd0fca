"""Which path a step takes: vLLM's own model (compiled unless ``enforce_eager``) or
UTIO's layer loop.

UTIO's layer loop runs segments of layers on sub-batches (each segment one compiled
graph, ``integration/layer_body.py``); vLLM's model on CPU is one ``torch.compile``d
graph. A step needs the loop only when it does something vLLM's model cannot: run a row
below full depth, or observe a signal inside the forward (a vslash estimate, attention
heat, a probe). Every other step runs vLLM's model, so UTIO costs nothing there. Sparse rows run
there too: a restriction that is the same at every layer
(throttle, vslash without an estimate to take) through the step's attention metadata
rebuilt from the restricted block tables; 'select', which chooses per layer from the
layer's own query, inside the attention call (vLLM's attention op calls the backend impl
at run time, also from the compiled graph; ``integration/select_attention.py`` wraps it).

Where each router's signals come from:

| router | signal | where it is taken | vLLM's model? |
|---|---|---|---|
| ``surrogate`` | entropy, varentropy | the step's logits (before sampling) | yes |
| ``surrogate`` | outlier-ness | the final hidden states (before sampling) | yes |
| ``surrogate`` | attention heat | the heat layer's attention output and values | no: layer loop |
| ``probe`` | residual stream | the routing layer, mid-forward | no, if routable and it pays |
| ``forced`` | none | (the request's pinned bucket) | yes |

"It pays": ``routing_payoff`` (``routing/payoff.py``) lets a probe step route only while
routed steps of its size have run faster per token than vLLM's model.

So a surrogate router with ``attention_heat`` > 0 keeps every step of a routing engine in
the loop (its next-step scores would change otherwise); with weight 0 only steps that
route a row below full depth do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_utio.config import UtioConfig

# why a step runs UTIO's layer loop (None: vLLM's model)
BELOW_FULL_DEPTH = "a row runs below full depth"
QUERY_READ = "a vslash row's verticals are estimated from a layer's captured query"
MID_FORWARD_ROUTING = "a routable row is routed mid-forward (probe)"
HEAT_SIGNAL = "the surrogate score needs the heat layer's attention"


@dataclass(frozen=True)
class StepFacts:
    """What the runner knows about a step once its rows are routed."""

    shallow: np.ndarray  # per row: its level's plan skips layers (a full-depth bucket does not)
    query_read: bool  # a vslash row whose verticals are estimated from a captured query
    routable: np.ndarray  # per row: may a router move it below full depth


def needs_heat(cfg: UtioConfig) -> bool:
    """Whether the router reads the heat layer's attention (only the loop captures it)."""
    return cfg.router == "surrogate" and cfg.signal.attention_heat > 0.0


def layer_loop_reason(cfg: UtioConfig, facts: StepFacts) -> str | None:
    """Why this step must run UTIO's layer loop, or None if vLLM's model computes exactly
    what the loop would (every row full depth, dense, no signal taken mid-forward)."""
    if facts.shallow.any():
        return BELOW_FULL_DEPTH
    if facts.query_read:
        return QUERY_READ
    if not cfg.buckets:
        return None  # nothing to route: no signal is read
    if cfg.router == "probe" and facts.routable.any():
        return MID_FORWARD_ROUTING
    if needs_heat(cfg):
        return HEAT_SIGNAL
    return None
