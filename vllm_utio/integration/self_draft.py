"""Self-speculation inside vLLM's speculative decoding: the UTIO runner drafts.

vLLM stays in charge of everything but the proposal. The engine is configured with
speculative method ``custom_class`` (:func:`speculative_config`), so the scheduler
schedules each request's draft tokens as extra query tokens, the verification step is an
ordinary (dense, full-depth) step of the target model, and vLLM's rejection sampler keeps
exactly the tokens the target would have produced. Where vLLM asks its proposer for the
next drafts (``propose_draft_token_ids``, after the step's bookkeeping), the UTIO runner
runs :class:`SelfDrafter`: ``k`` single-token forwards of the same model under the draft
plan (a sparse attention policy and/or a bucket's depth plan), over the same paged cache.

KV slots: draft ``j`` of a request whose last sampled token sits at position ``p`` is
computed at position ``p + j`` and writes its K/V there. Those are exactly the positions the
verification step recomputes (it runs the last token and the ``k`` drafts at ``p..p+k``),
so every position that is accepted holds the full model's K/V afterwards, and rejected
ones are rewritten before they are read. Drafts only use slots the request already owns
(vLLM reserves no lookahead for custom proposers), so a request near the end of its last
block drafts fewer tokens; no other request's block is ever written.

A draft's greedy token comes from vLLM's own ``compute_logits``, or, with ``draft.vocab``,
from the first ``vocab`` rows of the LM head (:class:`DraftHead`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from vllm_utio.config import AttentionPolicy, SpeculateConfig
from vllm_utio.path_payoff import PathPayoff
from vllm_utio.request_controls import wants_no_speculation
from vllm_utio.speculation import Acceptance, SpeculationStats, best_draft_count, draft_cost

PROPOSER_CLASS = "vllm_utio.integration.self_draft.UtioDraftProposer"
# batch sizes up to this are timed each on their own: a CPU decode step's fixed cost (the
# weights read once for all rows) is most of a small batch's, so its time per token falls
# steeply with the rows (at 4k: 35 ms for 1 row, 70 ms for 8), and a shared class 5-8 once
# set plain steps timed at 5 rows against drafting timed at 8
EXACT_ROWS = 32
# a measurement of a path: up to 3 cycles (their median) or 0.1 s. At batch 1 a plain cycle
# lasts ~35 ms, and one slow one (46 ms, 4k) once decided drafting for the next 8-128;
# a batch-32 cycle (~0.25 s) is steady, and 3 of them on the losing path cost ~4%
MEASURE_CYCLES = 3
MEASURE_S = 0.1


def speculative_config(spec: SpeculateConfig) -> dict[str, Any]:
    """The engine's ``speculative_config`` for UTIO self-speculation."""
    return {
        "method": "custom_class",
        "model": PROPOSER_CLASS,
        "num_speculative_tokens": spec.tokens,
    }


class UtioDraftProposer:
    """What vLLM instantiates as the ``custom_class`` proposer. The drafts come from the
    UTIO runner (it overrides ``propose_draft_token_ids``); this object only satisfies the
    proposer interface, and refuses to be used by any other runner."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config

    def load_model(self, model: Any) -> None:  # the draft is the target model itself
        del model

    def propose(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        raise RuntimeError(
            "UTIO self-speculation drafts in the UTIO model runner; this engine runs another "
            "runner (start it with --enable-utio and UTIO's worker class)"
        )


class DraftHead:
    """The draft's LM head over the first ``rows`` token ids: a view of the model's head
    weight (no copy), for models whose greedy token is ``argmax(hidden @ weight.T)``."""

    def __init__(self, model: Any, rows: int) -> None:
        head = getattr(model, "lm_head", None)
        weight = getattr(head, "weight", None)
        proc = getattr(model, "logits_processor", None)
        why = _head_unsupported(head, weight, proc)
        if why:
            raise ValueError(f"speculate.draft.vocab: this model's LM head {why}; unset it")
        vocab = int(getattr(proc, "org_vocab_size", weight.shape[0]))  # without padding rows
        if rows > vocab:
            raise ValueError(
                f"speculate.draft.vocab is {rows}, more than the model's {vocab} token ids"
            )
        self.weight = weight[:rows]
        total = sum(p.numel() for p in model.parameters())
        # share of the weights one draft step no longer reads
        self.saved_share = weight[rows:].numel() / total
        self._linear = _platform_linear(self.weight)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy token ids (all below the head's row count)."""
        return self._linear(hidden).argmax(dim=-1)


def _platform_linear(weight: torch.Tensor) -> Any:
    """``x @ weight.T`` through the GEMM vLLM's CPU platform gives its own linear layers
    (oneDNN here: 2-4x faster than ``F.linear`` for a decode batch against this head);
    ``F.linear`` elsewhere."""
    if weight.device.type != "cpu":
        return lambda x: torch.nn.functional.linear(x, weight)
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return lambda x: holder.cpu_linear(x, holder.weight, None)


def _head_unsupported(head: Any, weight: Any, proc: Any) -> str | None:
    if head is None or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return "is not a plain weight matrix"
    if not weight.dtype.is_floating_point:
        return "is quantised"
    if getattr(head, "bias", None) is not None:
        return "has a bias"
    if proc is None or getattr(proc, "logits_as_input", False):
        return "is not applied by vLLM's LogitsProcessor"
    # a soft cap (tanh) and a positive scale keep the argmax; a negative scale would not
    if float(getattr(proc, "scale", 1.0)) <= 0.0:
        return "scales its logits by a non-positive factor"
    if getattr(head, "tp_size", 1) != 1:
        return "is split over tensor-parallel ranks"
    return None


def draft_read(policy: AttentionPolicy, seq_len: int, block_size: int, layers: int) -> int:
    """KV positions a draft token of ``policy`` reads per layer (averaged over layers)."""
    if policy.policy == "dense":
        return seq_len
    window = policy.sink_tokens + policy.recent_tokens + block_size
    if policy.policy == "throttle":
        return min(seq_len, window)
    if policy.policy == "vslash":
        extra = (policy.vertical_blocks + len(policy.slash_offsets)) * block_size
        return min(seq_len, window + extra)
    dense = min(policy.dense_layers, layers)
    kept = min(seq_len, max(policy.budget_tokens, window - block_size))
    return (dense * seq_len + (layers - dense) * kept) // layers


class SelfDrafter:
    """Proposes each request's drafts by running the runner's own model under the draft
    plan; keeps per-request acceptance for the adaptive draft count."""

    def __init__(self, runner: Any, spec: SpeculateConfig, draft_level: int) -> None:
        self.runner = runner
        self.spec = spec
        self.level = draft_level
        self.stats = SpeculationStats()
        self.acceptance: dict[str, Acceptance] = {}
        # drafting against not drafting, timed from one proposal to the next; drafting must
        # win by min_gain, as in the cost model: a cycle's own time misses what drafting
        # costs later (rows that accept different counts finish at different steps, and a
        # batch's last steps then run few rows, at a higher cost per token)
        self.payoff = PathPayoff(
            spec.payoff,
            base="plain",
            alt="draft",
            margin=spec.min_gain,
            exact_upto=EXACT_ROWS,
            measure_steps=MEASURE_CYCLES,
            measure_s=MEASURE_S,
            # drafting makes a batch's ragged last steps (new sizes): they start on the
            # verdict of the nearest measured size instead of drafting first (2k, 32 rows
            # with a cost model that offered losing drafts: 0.94-1.03 of the kernel alone,
            # the draft tokens tripling from one repeat to the next as new sizes came up)
            seed_nearest=True,
        )
        self._cycle: tuple[float, bool, set[str]] | None = None  # start, drafted, rows
        stack = runner._utio_executor.stack
        self._layers = stack.num_layers
        plan = runner.utio_plans.plans[draft_level]
        self._run_fraction = plan.num_run / stack.num_layers
        vocab = spec.draft.vocab
        self._head = DraftHead(runner.model, vocab) if vocab is not None else None
        # the adaptive rule's non-attention cost of a draft row: less the head rows skipped
        saved = self._head.saved_share if self._head is not None else 0.0
        self._draft_row_cost = round(spec.row_cost_tokens * (1.0 - saved))

    # --- per-request state ----------------------------------------------------------
    def forget(self, req_id: str) -> None:
        self.acceptance.pop(req_id, None)

    def request_ids(self) -> set[str]:
        return set(self.acceptance)

    # --- the proposal ---------------------------------------------------------------
    def propose(self, scheduler_output: Any, sampled: list[list[int]]) -> list[list[int]]:
        start = time.perf_counter()
        runner = self.runner
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: len(sampled)])
        self._observe(scheduler_output, req_ids, sampled)
        self._time_cycle(start, req_ids, sampled, _decode_only(scheduler_output))
        counts = self._draft_counts(req_ids, sampled)
        drafted = bool(counts.any())
        if drafted and self.spec.adaptive and not self.payoff.choose(len(req_ids)):
            self.stats.skipped_rows += int((counts > 0).sum())
            self.stats.declined_steps += 1
            counts[:] = 0
            drafted = False
        self._cycle = (start, drafted, set(req_ids))
        drafts: list[list[int]] = [[] for _ in req_ids]
        for req_id, k in zip(req_ids, counts.tolist(), strict=True):
            self.acceptance.setdefault(req_id, Acceptance()).proposed = k
        if not counts.any():
            return drafts
        t0 = time.perf_counter()
        rows = np.flatnonzero(counts)
        last = batch.num_tokens_no_spec[rows].astype(np.int64) - 1  # the newest token's position
        tokens = torch.from_numpy(batch.token_ids_cpu[rows, last].astype(np.int64))
        for j in range(int(counts.max())):
            live = counts[rows] > j
            rows, last, tokens = rows[live], last[live], tokens[torch.from_numpy(live)]
            tokens = self._forward(rows, last + j, tokens)
            for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
                drafts[row].append(int(token))
            self.stats.draft_steps += 1
        self.stats.draft_s += time.perf_counter() - t0
        self.stats.proposals += int((counts > 0).sum())
        self.stats.drafted_tokens += int(counts.sum())
        return drafts

    def _observe(self, scheduler_output: Any, req_ids: list[str], sampled: list[list[int]]):
        """Fold in what this step's verification kept of each request's drafts."""
        scheduled = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
        for req_id, got in zip(req_ids, sampled, strict=True):
            acc = self.acceptance.get(req_id)
            if acc is None or not got:
                continue
            verified = len(scheduled.get(req_id, ()))
            acc.proposed = verified  # what the scheduler kept of the proposal
            accepted = min(len(got) - 1, verified)
            if verified:
                self.stats.verifications += 1
                self.stats.verified_tokens += verified
                self.stats.accepted_tokens += accepted
            acc.observe(accepted)

    def _time_cycle(
        self, now: float, req_ids: list[str], sampled: list[list[int]], decode_only: bool
    ) -> None:
        """Close the cycle the last proposal opened (its drafting, then the step that
        verified or just decoded) with the tokens that step yielded to the proposal's rows.
        Dropped: a cycle none of whose rows got a token (the engine sat idle between two
        batches, so its time is not a step's), and one whose step also prefilled (mostly
        prefill time, which neither path changes)."""
        if self._cycle is None:
            return
        start, drafted, rows = self._cycle
        self._cycle = None
        if not decode_only:
            return
        tokens = sum(
            len(got) for req_id, got in zip(req_ids, sampled, strict=True) if req_id in rows
        )
        if tokens:
            self.payoff.observe(len(rows), drafted, now - start, tokens)

    def _draft_counts(self, req_ids: list[str], sampled: list[list[int]]) -> np.ndarray:
        """Drafts per row: adaptive choice, capped by owned KV slots and remaining tokens."""
        runner = self.runner
        batch = runner.input_batch
        spec = self.spec
        bs = runner.cache_config.block_size
        owned = batch.block_table[0].num_blocks_per_row[: len(req_ids)].astype(np.int64) * bs
        counts = np.zeros(len(req_ids), dtype=np.int64)
        policy = spec.draft.attention
        for row, (req_id, got) in enumerate(zip(req_ids, sampled, strict=True)):
            state = runner.requests.get(req_id)
            if not got or state is None:
                continue  # a partial prefill, or a discarded request: nothing sampled
            params = state.sampling_params
            if params is None or wants_no_speculation(params.extra_args):
                self.stats.skipped_rows += 1
                continue
            last = int(batch.num_tokens_no_spec[row]) - 1
            room = min(
                int(owned[row]) - last,  # slots last..last+k-1 must be the request's own
                runner.max_model_len - 1 - last,  # verification computes up to last + k
                int(params.max_tokens or spec.tokens) - len(state.output_token_ids),
                spec.tokens,
            )
            k = spec.tokens
            if spec.adaptive:
                read = draft_read(policy, last, bs, self._layers)
                k = best_draft_count(
                    self.acceptance.get(req_id, Acceptance()).rate,
                    last,
                    draft_cost(read, self._draft_row_cost, self._run_fraction),
                    spec.row_cost_tokens,
                    spec.tokens,
                    spec.min_gain,
                    spec.token_cost(self.runner.utio_cfg.decode_kernel),
                )
            counts[row] = max(0, min(k, room))
            if counts[row] == 0:
                self.stats.skipped_rows += 1
        return counts

    def _forward(self, rows: np.ndarray, positions: np.ndarray, tokens: torch.Tensor):
        """One draft token for each of ``rows`` (greedy under the draft plan); writes its
        K/V at ``positions`` of the request's own blocks."""
        from vllm.forward_context import set_forward_context

        runner = self.runner
        cm = self._common_metadata(rows, positions)
        attn_metadata = _build(runner, cm)
        slots = {name: cm.slot_mapping for name in attn_metadata}
        positions_t = torch.from_numpy(positions).to(runner.positions.dtype)
        # vLLM's compiled model drops dynamo's guards: it was traced with the runner's own
        # int32 token buffer and reads whatever it is given as that dtype (int64 ids read
        # as int32 gave every row after the first token id 0)
        tokens = tokens.to(runner.input_ids.gpu.dtype)
        req_ids = [runner.input_batch.req_ids[r] for r in rows.tolist()]
        with (
            set_forward_context(
                attn_metadata, runner.vllm_config, num_tokens=len(rows), slot_mapping=slots
            ),
            runner._utio_drafting(cm, np.full(len(rows), self.level), req_ids),
        ):
            hidden = runner._model_forward(input_ids=tokens, positions=positions_t)
        if self._head is not None:
            return self._head(hidden)
        return runner.model.compute_logits(hidden).argmax(dim=-1)

    def _common_metadata(self, rows: np.ndarray, positions: np.ndarray) -> Any:
        """vLLM's CommonAttentionMetadata for one decode token per row at ``positions``,
        over the rows' own block tables (derived from the step's recorded one)."""
        runner = self.runner
        base = runner._utio_recorder.common
        bs = runner.cache_config.block_size
        table = runner.input_batch.block_table[0].get_cpu_tensor()[torch.from_numpy(rows)]
        blocks = table[torch.arange(len(rows)), torch.from_numpy(positions // bs)]
        slot = (blocks.to(torch.int64) * bs + torch.from_numpy(positions % bs)).to(
            base.slot_mapping.dtype
        )
        n = len(rows)
        qsl = torch.arange(n + 1, dtype=base.query_start_loc_cpu.dtype)
        seq_lens = torch.from_numpy(positions + 1).to(base.seq_lens.dtype)
        return _replace(
            base,
            query_start_loc=qsl.to(base.query_start_loc.device),
            query_start_loc_cpu=qsl,
            seq_lens=seq_lens.to(base.seq_lens.device),
            seq_lens_cpu_upper_bound=seq_lens,
            num_reqs=n,
            num_actual_tokens=n,
            max_query_len=1,
            max_seq_len=int(positions.max()) + 1,
            block_table_tensor=table.to(base.block_table_tensor.device),
            slot_mapping=slot.to(base.slot_mapping.device),
            positions=torch.from_numpy(positions).to(base.slot_mapping.device),
            is_prefilling=torch.zeros(n, dtype=torch.bool),
            req_idx=rows.copy(),
            logits_indices_padded=None,
            num_logits_indices=None,
            max_logits_per_req=None,
        )


def _decode_only(scheduler_output: Any) -> bool:
    """Did the step run only decode rows (each its last token plus its drafts)?"""
    spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
    return all(
        n == 1 + len(spec.get(req_id, ()))
        for req_id, n in scheduler_output.num_scheduled_tokens.items()
    )


def _replace(cm: Any, **fields: Any) -> Any:
    known = {f.name for f in dataclasses.fields(cm)}
    return dataclasses.replace(cm, **{k: v for k, v in fields.items() if k in known})


def _build(runner: Any, cm: Any) -> dict[str, Any]:
    from vllm_utio.integration.attention import build_metadata

    with runner._utio_recorder.paused():
        return build_metadata(cm, runner.attn_groups)
