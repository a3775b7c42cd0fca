"""The UTIO surrogate importance score and its components, vectorized in torch.

All components are deterministic and in [0, 1]; higher means "more important", so a
request with a high score is sent deeper. They are computed from the previous step of
each request (its output distribution and hidden states), so routing can be decided
before the step runs. Formulas (V = vocabulary size, p = softmax(logits)):

- entropy:      H(p) / log V,                 H(p) = -sum_i p_i log p_i
- varentropy:   min(1, Var_p[-log p] / (log V)^2),  Var_p[-log p] = sum_i p_i (log p_i + H)^2
- outlier:      (1 - cos(h_r, mean_b h_b)) / 2, h = the final-normed hidden state (LM-head input),
                mean over the requests of that step's batch
- attention_heat: (1 - cos(o_r, v_r)) / 2 at the routing layer, where o_r is the token's
                attention output and v_r its own value vector (both head-averaged over the
                query heads sharing a KV head). A token that mostly attends to itself (or
                whose context carries what it already has) gets o ~ v and a low heat; one
                that pulls in other positions' content gets a high heat. It is read from the
                real attention computation of the previous step, at no extra kernel cost.
- score = sum_c w_c * c / sum_c w_c with the configured weights.

Entropy and varentropy are computed in one compiled pass over the vocabulary, from the
log-partition and the first two moments of the logits (equal to the formulas above up to
float32 rounding, below 1e-5 of each normalised component; routing/entropy.py), unless
`entropy_pass` is "exact".
"""

from __future__ import annotations

import math

import torch

from vllm_utio.config import SignalWeights
from vllm_utio.routing import entropy

COMPONENTS = ("entropy", "attention_heat", "outlier", "varentropy")


def entropy_and_varentropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized entropy and varentropy of softmax(logits) per row; [N, V] -> 2 x [N]."""
    if not entropy.enabled():  # entropy_pass: "exact"
        return entropy_and_varentropy_exact(logits)
    h, var = entropy.entropy_varentropy_nats(logits)
    log_v = math.log(logits.shape[-1])
    return (h / log_v).clamp(0.0, 1.0), (var / log_v**2).clamp(0.0, 1.0)


def entropy_and_varentropy_exact(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of :func:`entropy_and_varentropy`: the log_softmax form, eager."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    var = (p * (logp + h[:, None]) ** 2).sum(-1)
    log_v = math.log(logits.shape[-1])
    return (h / log_v).clamp(0.0, 1.0), (var / log_v**2).clamp(0.0, 1.0)


def outlierness(hidden: torch.Tensor) -> torch.Tensor:
    """(1 - cos(h_r, batch mean)) / 2 per row; a batch of one gets 0."""
    h = hidden.float()
    mean = h.mean(0, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(h, mean.expand_as(h), dim=-1, eps=1e-6)
    return ((1.0 - cos) / 2.0).clamp(0.0, 1.0)


def attention_heat(attn_out: torch.Tensor, value: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(1 - cos(o, v)) / 2 averaged over KV heads; attn_out [N, Hq*D], value [N, Hkv*D]."""
    n = attn_out.shape[0]
    o = attn_out.float().view(n, num_kv_heads, -1, value.shape[-1] // num_kv_heads).mean(2)
    v = value.float().view(n, num_kv_heads, -1)
    cos = torch.nn.functional.cosine_similarity(o, v, dim=-1, eps=1e-6).mean(-1)
    return ((1.0 - cos) / 2.0).clamp(0.0, 1.0)


def combine(components: dict[str, torch.Tensor], weights: SignalWeights) -> torch.Tensor:
    """Weighted mean per row of the components present; NaN marks a missing value.

    A row's missing components drop out of its mean; a row with none gets NaN.
    """
    total = norm = None
    for name in COMPONENTS:
        w = float(getattr(weights, name))
        if w == 0.0 or name not in components:
            continue
        c = components[name].float()
        present = ~torch.isnan(c)
        term, mass = w * torch.nan_to_num(c), w * present.float()
        total = term if total is None else total + term
        norm = mass if norm is None else norm + mass
    if total is None:
        raise ValueError("no weighted signal component is available")
    return torch.where(norm > 0, total / norm.clamp_min(1e-12), torch.nan).clamp(0.0, 1.0)
