"""How many draft tokens each request gets: measured acceptance against the draft's cost.

Self-speculation pays when the tokens a verification keeps outweigh what the drafts cost.
Per request we keep an acceptance estimate ``a`` (an exponential average of accepted over
tried draft positions) and predict, for ``k`` drafts,

    tokens per verification  E(k) = (1 - a^(k+1)) / (1 - a)
    cost                     k * draft_row + verify_row(k)

in KV positions read per row: a plain decode step of a row with ``S`` cached positions
costs ``S + C`` (``C``: the row's non-attention work, ``row_cost_tokens``), a draft step
``f * (kept + C) + (1 - f) * C / 2`` (``kept``: positions its policy reads; ``f``: the
share of layers it runs, a skipped layer still fills its K/V for about half a layer's
work), and a verification of ``k`` drafts ``(1 + v * k) * (S + C)``: each extra query
token costs ``v`` (``verify_token_cost``) of a plain step. On vLLM 0.32's CPU attention
``v`` is about 0.75 (a 5-token verification at 4k context costs about 4 plain steps;
measured, see the README), so there no draft pays and the rule drafts nothing; UTIO's own
decode kernel (``decode_kernel: "utio"``) reads each block once for all of a row's query
tokens, and ``v`` falls to about 0.2; a GPU's verification is nearly free (``v`` near 0).
The gain of ``k`` is ``E(k) * (S + C) / cost(k)``; a request drafts the ``k`` with the
best gain, and none unless that gain reaches ``min_gain`` (then the step is a plain decode
step, so a request whose drafts are rejected costs what it did without speculation). A
request that stops drafting drifts back towards the prior, so it retries.

The costs above are estimates; what a draft step really costs depends on the machine, the
kernel and the batch. With ``payoff`` 'measured' the drafter also times itself: a step
drafts only while steps that drafted have yielded tokens faster, wall time per token, than
steps that did not, by ``min_gain`` again (``vllm_utio.path_payoff``, per batch size; steps
that also prefilled are not timed).
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_ACCEPTANCE = 0.7
SMOOTHING = 0.3  # weight of the newest verification in the estimate
DRIFT = 0.05  # per step without drafts, towards the prior


def expected_tokens(acceptance: float, drafts: int) -> float:
    """Tokens one verification yields with ``drafts`` drafts (bonus token included)."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1.0 - a ** (drafts + 1)) / (1.0 - a)


def draft_cost(kept: int, row_cost: int, run_fraction: float) -> float:
    """A draft token's cost for one row, in KV positions read (see the module doc)."""
    return run_fraction * (kept + row_cost) + (1.0 - run_fraction) * row_cost / 2


def best_draft_count(
    acceptance: float,
    seq_len: int,
    draft: float,
    row_cost: int,
    most: int,
    min_gain: float,
    verify_token_cost: float,
) -> int:
    """The draft count (0..most) with the best predicted gain; 0 below ``min_gain``.
    ``draft``: one draft token's cost (:func:`draft_cost`)."""
    plain = seq_len + row_cost
    best, best_gain = 0, 1.0
    for k in range(1, most + 1):
        cost = k * draft + (1.0 + verify_token_cost * k) * plain
        gain = expected_tokens(acceptance, k) * plain / cost
        if gain > best_gain:
            best, best_gain = k, gain
    return best if best_gain >= min_gain else 0


@dataclass
class Acceptance:
    """One request's acceptance estimate and its last proposal."""

    rate: float = PRIOR_ACCEPTANCE
    proposed: int = 0  # drafts proposed at the last step (verified at this one)

    def observe(self, accepted: int) -> None:
        """Fold in the verification of ``self.proposed`` drafts, ``accepted`` kept."""
        if self.proposed == 0:
            self.rate += DRIFT * (PRIOR_ACCEPTANCE - self.rate)
            return
        # geometric trials: every accepted draft, plus the rejected one if any
        tried = accepted + (1 if accepted < self.proposed else 0)
        self.rate += SMOOTHING * (accepted / tried - self.rate)


@dataclass
class SpeculationStats:
    """Counters of the draft pass and what verification kept (cumulative)."""

    proposals: int = 0  # requests x steps that got at least one draft
    drafted_tokens: int = 0
    verified_tokens: int = 0  # drafts the scheduler sent to verification
    accepted_tokens: int = 0
    verifications: int = 0  # proposals verified so far
    draft_steps: int = 0  # draft forwards (one per draft position and step)
    draft_s: float = 0.0
    skipped_rows: int = 0  # decode rows given no draft (adaptive, payoff, opt-out, no slot)
    plain_sampled_steps: int = 0  # steps without any draft, sampled by the plain sampler
    declined_steps: int = 0  # steps whose drafts the measured payoff declined
    drafts_fetched: int = 0  # steps whose drafts the scheduler fetched by a separate RPC

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "spec_proposals": self.proposals,
            "spec_drafted_tokens": self.drafted_tokens,
            "spec_verified_tokens": self.verified_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_verifications": self.verifications,
            "spec_draft_steps": self.draft_steps,
            "spec_draft_s": self.draft_s,
            "spec_skipped_rows": self.skipped_rows,
            "spec_plain_sampled_steps": self.plain_sampled_steps,
            "spec_declined_steps": self.declined_steps,
            "spec_drafts_fetched": self.drafts_fetched,
        }
        out["spec_acceptance_rate"] = (
            self.accepted_tokens / self.verified_tokens if self.verified_tokens else 0.0
        )
        out["spec_tokens_per_verification"] = (
            1.0 + self.accepted_tokens / self.verifications if self.verifications else 0.0
        )
        return out
