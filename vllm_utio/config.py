"""The validated UTIO configuration.

Users pass it as ``additional_config={"utio": {...}}`` (offline ``LLM``) or through
``vllm serve --enable-utio --utio-config JSON-or-path``. It is parsed once, in the
process that builds the engine config, and again (cheaply) in each worker. Every
error names the field, the bad value and what is allowed.

Layer plans: the model has ``L`` decoder layers. A bucket runs its first ``keep_first``
layers and its last ``keep_last`` layers and skips the span in between. Truncation
("exit after layer a") is ``keep_last = 0``. Buckets are listed shallowest first;
a request whose importance score is below a bucket's ``max_score`` goes to the first
(shallowest) such bucket, otherwise to full depth. Plans must nest: a shallower
bucket keeps no more head and no more tail layers than a deeper one, so at every
layer the requests still running are a prefix of the deepest-first order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

UTIO_KEY = "utio"


class UtioConfigError(ValueError):
    """A UTIO setting is invalid; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionPolicy(_Strict):
    """Which cached positions a decode token attends to (block-granular over the cache)."""

    policy: Literal["dense", "throttle", "vslash", "select"] = Field(
        default="dense",
        description="'dense': every cached position; 'throttle': sinks + recent window only; "
        "'vslash': throttle's blocks + slash blocks + the most-attended ('vertical') blocks; "
        "'select': per layer, sinks + recent window + the blocks whose key summaries bound "
        "q.k highest for that layer's own query (query-aware, Quest-style).",
    )
    sink_tokens: int = Field(
        default=128,
        ge=0,
        description="Leading positions always kept (a multiple of the block size).",
    )
    recent_tokens: int = Field(
        default=512, ge=1, description="Most recent positions kept (widened to whole blocks)."
    )
    vertical_blocks: int = Field(
        default=4,
        ge=0,
        description="vslash: extra blocks kept, those with the highest attention mass "
        "estimated at the routing layer on the request's previous step.",
    )
    slash_offsets: tuple[int, ...] = Field(
        default=(),
        description="vslash: distinct offsets o >= 0 (tokens back from the current position); "
        "the block holding position seq_len - 1 - o is kept.",
    )
    budget_tokens: int = Field(
        default=1024,
        ge=1,
        description="select: positions read per decode token and layer, sinks and recent "
        "window included (whole blocks; never fewer than sinks + window).",
    )
    dense_layers: int = Field(
        default=2,
        ge=0,
        description="select: the first layers read every position (their queries are too "
        "diffuse to select by).",
    )
    select_every: int = Field(
        default=1,
        ge=1,
        description="select: a fresh choice every this many layers, from dense_layers on; "
        "the layers between read the blocks the last choosing layer picked (neighbouring "
        "layers attend to much the same positions, as in TidalDecode), so choosing costs "
        "1/select_every as much. 1: every layer chooses from its own query.",
    )
    select_every_steps: int = Field(
        default=1,
        ge=1,
        description="select with scoring 'sparq': a row chooses afresh at a layer only every "
        "this many of its decode steps (staggered over the choosing layers, so each step "
        "about 1/select_every_steps of them choose); between, the layer reads the blocks of "
        "its own last choice plus the current sinks and recent window (at most one block over the "
        "budget). Consecutive queries of a layer attend to much the same blocks, so "
        "choosing costs 1/select_every_steps as much. 1: every step chooses.",
    )
    focus_mass: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="select with select_every_steps > 1: when a layer's choice finds a block "
        "outside the sinks and recent window estimated to take at least this share of a "
        "query head's attention (the row is reading something far back: a fact, a copy's "
        "source), the row chooses afresh at every layer for the rest of that step and the "
        "next, and keeps doing so while choices find such a block; between, reused choices "
        "can miss the block a copy moves on to. Unset: off.",
    )
    top_p: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="select: stop adding blocks once the kept blocks hold this share of the "
        "attention mass estimated from the bounds (capped by budget_tokens); unset: fill the "
        "budget.",
    )
    heads: Literal["bound", "share"] = Field(
        default="bound",
        description="select: how the query heads' views of a block combine into its rank "
        "(one block table serves every head). 'bound': the highest q.k bound over the "
        "heads; 'share': the highest share of a head's attention the block is estimated to "
        "take (each head's bounds softmaxed over the row's blocks), so a head whose queries "
        "are small still gets its sharpest block in.",
    )
    hold_steps: int = Field(
        default=0,
        ge=0,
        description="select: a block ranked into the budget stays read for this many more "
        "decode steps of the request at that layer, on top of the budget (a multi-token copy "
        "keeps reading its source); 0: off.",
    )

    scoring: Literal["bound", "sparq"] = Field(
        default="bound",
        description="select: how blocks are ranked. 'bound': Quest's upper bound of q.k from "
        "per-block key min/max summaries (reads 1/block_size of the K bytes); 'sparq': every "
        "cached key scored on the query's strongest channels (sparq_channels of them, per KV "
        "head) and each head's scores softmaxed, a block ranked by the largest share of one "
        "head's attention it takes (SparQ; reads sparq_channels/head_size of the K bytes, "
        "through a C++ op over the paged cache).",
    )
    sparq_channels: int = Field(
        default=16,
        ge=1,
        description="select with scoring 'sparq': channels per KV head each key is scored on "
        "(at most the model's head size).",
    )
    kernel: Literal["utio", "vllm"] = Field(
        default="utio",
        description="select: the attention kernel of decode sub-batches whose rows all have "
        "a select policy (every layer, restricted or not; a dense or opted-out neighbour "
        "keeps vLLM's kernel for its sub-batch). 'utio': UTIO's own AVX-512 kernel over "
        "vLLM's CPU cache ('vec' layout, bf16/fp16, head size 64 or 128; elsewhere vLLM's "
        "runs); it reads a block of a KV head once for all its query heads, 1.5x faster "
        "than vLLM's here. 'vllm': vLLM's own CPU attention kernel.",
    )

    @model_validator(mode="after")
    def _policy_fields(self) -> AttentionPolicy:
        own = {
            "vslash": {"vertical_blocks", "slash_offsets"},
            "select": {
                "budget_tokens",
                "dense_layers",
                "select_every",
                "select_every_steps",
                "focus_mass",
                "top_p",
                "hold_steps",
                "heads",
                "scoring",
                "sparq_channels",
                "kernel",
            },
        }
        for policy, fields in own.items():
            stray = sorted(fields & self.model_fields_set) if self.policy != policy else []
            if stray:
                raise ValueError(
                    f"{' and '.join(stray)} only apply to policy {policy!r}, not "
                    f"{self.policy!r}; set policy={policy!r} or remove them"
                )
        if self.top_p is not None and self.heads == "share":
            raise ValueError(
                "top_p estimates attention mass from q.k bounds and needs heads='bound'; "
                "with heads='share' leave top_p unset"
            )
        if self.scoring == "sparq":
            bound_only = sorted({"top_p", "heads"} & self.model_fields_set)
            if bound_only:
                verb, them = ("apply", "them") if len(bound_only) > 1 else ("applies", "it")
                raise ValueError(
                    f"{' and '.join(bound_only)} only {verb} to scoring 'bound', not 'sparq' "
                    f"(sparq ranks blocks by each head's own attention share); remove {them}"
                )
            if self.focus_mass is not None and self.select_every_steps == 1:
                raise ValueError(
                    "focus_mass only applies with select_every_steps > 1 (a row choosing at "
                    "every step is always focused); set select_every_steps or remove it"
                )
            if self.select_every_steps > 1 and self.hold_steps:
                raise ValueError(
                    "select_every_steps and hold_steps both keep earlier steps' blocks; "
                    "set one of them (select_every_steps > 1 or hold_steps > 0), not both"
                )
        elif self.select_every_steps > 1 or self.focus_mass is not None:
            field = "select_every_steps" if self.select_every_steps > 1 else "focus_mass"
            raise ValueError(
                f"{field} only applies to scoring 'sparq' (its op keeps each layer's last "
                "choice); set scoring='sparq', or select_every_steps=1 and no focus_mass"
            )
        elif "sparq_channels" in self.model_fields_set:
            raise ValueError("sparq_channels only applies to scoring 'sparq'; set scoring='sparq'")
        return self

    @field_validator("slash_offsets")
    @classmethod
    def _valid_offsets(cls, offsets: tuple[int, ...]) -> tuple[int, ...]:
        if any(o < 0 for o in offsets):
            raise ValueError("offsets must be >= 0 (0 is the current token)")
        if len(set(offsets)) != len(offsets):
            raise ValueError("offsets must be distinct")
        return offsets


class BucketSpec(_Strict):
    """One depth bucket: which layers its requests run, and which scores it takes."""

    name: str = Field(min_length=1, description="Label used in stats and forced routing.")
    max_score: float = Field(
        gt=0.0, le=1.0, description="Requests with an importance score below this go here."
    )
    keep_first: int = Field(ge=1, description="Leading decoder layers this bucket runs.")
    keep_last: int = Field(
        default=0, ge=0, description="Trailing decoder layers this bucket runs (0 = truncation)."
    )
    correction: str | None = Field(
        default=None,
        description="Exit-correction file applied where the stream rejoins (identity if unset).",
    )
    attention: AttentionPolicy = Field(
        default=AttentionPolicy(),
        description="Attention policy of this bucket's decode tokens (router='probe': in "
        "the layers after the routing layer; those up to it run before the decision, dense).",
    )

    def skipped(self, num_layers: int) -> range:
        return range(self.keep_first, num_layers - self.keep_last)


class SignalWeights(_Strict):
    """Weights of the surrogate importance score's components (normalized by their sum)."""

    entropy: float = Field(default=0.4, ge=0.0, description="Previous-step output entropy.")
    attention_heat: float = Field(
        default=0.3, ge=0.0, description="How much the token's attention pulls in context."
    )
    outlier: float = Field(
        default=0.3, ge=0.0, description="Hidden state's distance from the batch mean."
    )
    varentropy: float = Field(
        default=0.0, ge=0.0, description="Variance of the previous step's surprisal."
    )

    @model_validator(mode="after")
    def _some_weight(self) -> SignalWeights:
        if self.entropy + self.attention_heat + self.outlier + self.varentropy <= 0.0:
            raise ValueError("at least one signal weight must be > 0")
        return self


class DraftPlan(_Strict):
    """What the cheap draft pass of self-speculation runs: the same model, same KV cache."""

    attention: AttentionPolicy = Field(
        default=AttentionPolicy(policy="throttle"),
        description="Attention policy of every draft token (any policy; the verification "
        "pass is always dense).",
    )
    bucket: str | None = Field(
        default=None,
        description="Name of a bucket in 'buckets' whose depth plan the draft runs (unset: "
        "every layer). With 'speculate' the buckets are draft plans only: target steps run "
        "full depth.",
    )
    vocab: int | None = Field(
        default=None,
        ge=256,
        description="Draft only among the first this many token ids (a byte-level BPE "
        "numbers tokens in merge order, most frequent first): the draft's LM head reads that "
        "many rows instead of the whole vocabulary (on the default model the head is 21% of "
        "the weights). A token past it is never drafted, so its position is rejected and "
        "verification supplies it. Unset: the whole vocabulary.",
    )


class SpeculateConfig(_Strict):
    """Lossless self-speculation: a UTIO plan drafts, the full dense model verifies, through
    vLLM's own speculative decoding (scheduler, KV slots, rejection sampler)."""

    tokens: int = Field(
        default=4, ge=1, le=16, description="Most draft tokens proposed per request and step."
    )
    draft: DraftPlan = Field(default=DraftPlan(), description="The draft pass's plan.")
    adaptive: bool = Field(
        default=True,
        description="Per request, draft only as many tokens as its measured acceptance and "
        "the draft's cost make worth it (0: a plain decode step).",
    )
    row_cost_tokens: int = Field(
        default=450,
        ge=0,
        description="adaptive: a row's non-attention work per token, in KV positions read "
        "(cost model of a draft vs a full step; 450 measured at batch 32 on the default "
        "model, where attention is 90% of a 4k step).",
    )
    verify_token_cost: float | None = Field(
        default=None,
        ge=0.0,
        description="adaptive: what each draft token adds to its verification step, as a "
        "share of a plain decode step. Unset: 0.75 with decode_kernel 'vllm' (measured with "
        "vLLM 0.32's CPU attention at 4k context, where speculation then never pays), 0.2 "
        "with 'utio' (its kernel at 4k, 5 query tokens per row); near 0 where verification "
        "is memory-bound, as on a GPU.",
    )
    min_gain: float = Field(
        default=1.05,
        ge=1.0,
        description="adaptive: draft only where the cost model predicts at least this "
        "speed-up over a plain decode step, and (payoff 'measured') only while drafting "
        "steps have measured at least this much faster per token than plain ones: a step's "
        "own time misses some of drafting's cost (rows that accept different counts finish "
        "at different steps, leaving a batch's last steps with few rows).",
    )
    payoff: Literal["measured", "always"] = Field(
        default="measured",
        description="adaptive: 'measured' lets rows draft only while steps that drafted "
        "have yielded tokens faster by min_gain (wall time per token, drafting included; "
        "steps that also prefilled are not timed) than steps that did not, per batch "
        "size, re-measuring the other way every 8-128 steps (each measurement the median of "
        "up to 3 steps or 0.1 s of them; a batch size seen for the first time starts on the "
        "verdict of the nearest size measured, as drafting itself makes new sizes: rows "
        "that accept different counts finish apart): the cost model's costs are "
        "estimates, and on a machine where a draft step costs more than they say drafting "
        "loses. 'always': the cost model alone decides.",
    )

    def token_cost(self, decode_kernel: str) -> float:
        """``verify_token_cost``, or the measured default of the engine's decode kernel."""
        if self.verify_token_cost is not None:
            return self.verify_token_cost
        return 0.2 if decode_kernel == "utio" else 0.75


class UtioConfig(_Strict):
    """Every UTIO setting, with its default. Unknown keys are rejected."""

    enabled: bool = Field(default=False, description="Turn UTIO on (`--enable-utio`).")
    buckets: tuple[BucketSpec, ...] = Field(
        default=(), description="Shallow buckets, shallowest first; full depth is implicit."
    )
    router: Literal["surrogate", "forced", "probe"] = Field(
        default="surrogate",
        description="'surrogate': UTIO importance score; 'forced': a request's "
        "SamplingParams.extra_args['utio_bucket'] names its bucket (tests, pinning); "
        "'probe': a learned probe scores each token mid-forward (needs probe_path).",
    )
    probe_path: str | None = Field(
        default=None,
        description="Probe weights file for router='probe' (utio-probe or utio-router format).",
    )
    artifact: str | None = Field(
        default=None,
        description="Calibration artifact directory from `vllm-utio calibrate` ('default': "
        "the embedded model's, built at set-up). It provides buckets (with exit corrections), "
        "the calibrated router (probe if present, else surrogate thresholds) and signal "
        "settings; 'router', 'signal' and 'routing_layer' set here win. Checked against the "
        "served model.",
    )
    signal: SignalWeights = Field(
        default=SignalWeights(), description="Weights of the surrogate score's components."
    )
    entropy_pass: Literal["compiled", "exact"] = Field(
        default="compiled",
        description="How the surrogate score's entropy and varentropy are computed: "
        "'compiled', one torch.compile'd pass over the vocabulary (same values within 1e-5; "
        "5-15x faster at batch 32-128 on CPU; compiled while the engine loads, which adds "
        "~10-30 s to its start on 2 busy cores, a minute or more the first time on a "
        "machine); 'exact', the eager log_softmax form (no compiling).",
    )
    routing_layer: int | None = Field(
        default=None,
        ge=0,
        description="Layer whose attention output feeds the attention-heat term "
        "(default: the last layer every bucket runs, keep_first - 1 of the shallowest).",
    )
    min_bucket_size: int = Field(
        default=1, ge=1, description="Smaller buckets merge into the next deeper one."
    )
    depth_floor: int = Field(default=1, ge=1, description="No bucket may run fewer layers.")
    min_batch_size: int = Field(
        default=1, ge=1, description="Steps with fewer running requests use full depth."
    )
    min_saved_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Steps whose plan saves a smaller share of layer-tokens use full depth "
        "(the split's own overhead would eat the gain).",
    )
    routing_payoff: Literal["measured", "always"] = Field(
        default="measured",
        description="router='probe': 'measured' routes a step (runs the layer loop so the "
        "probe can route mid-forward) only while routed steps of its size have run faster "
        "per token than vLLM's model, re-measuring the other path every 8-128 steps; "
        "otherwise vLLM's model runs every row at full depth (pinned buckets still apply). "
        "'always': every step with a routable row routes. Under 'measured' which steps "
        "route depends on timings, so a probe's (lossy) outputs can differ run to run; "
        "'always' keeps them reproducible.",
    )
    schedule: Literal["nested", "per_bucket"] = Field(
        default="nested",
        description="'nested': shared layers run once over a shrinking prefix; "
        "'per_bucket': each bucket runs separately from layer 0 (the paper's schedule).",
    )
    execution: Literal["auto", "prefix", "gather"] = Field(
        default="auto",
        description="'prefix': deepest-first batch order, contiguous sub-batches; "
        "'gather': gather/scatter rows in any order (for backends that fix the order).",
    )
    layer_loop: Literal["auto", "compiled", "eager"] = Field(
        default="auto",
        description="How the layer loop (steps with a row below full depth or a signal "
        "taken mid-forward) runs decoder layers: 'compiled', each run of layers on the same "
        "rows as one torch.compile'd graph (attention inside it as an op calling vLLM's "
        "attention module), shared by all runs of the same length; compiled while the "
        "engine loads: ~11 s with inductor's cache warm, ~60 s cold on 2 cores; 'eager', "
        "vLLM's layer modules as they are; 'auto', compiled unless vLLM's own model runs "
        "eagerly (enforce_eager). Models whose layers change the Llama forward, or differ "
        "from each other, run eagerly (logged).",
    )
    kv_policy: Literal["frozen_state"] = Field(
        default="frozen_state",
        description="What skipped layers write into the paged KV cache.",
    )
    attention_all: AttentionPolicy | None = Field(
        default=None,
        description="If set, this attention policy applies to every decode token, whatever "
        "its bucket (for comparison with importance-gated sparse attention).",
    )
    kv_huge_pages: bool = Field(
        default=True,
        description="CPU: put vLLM's KV cache on 2 MiB transparent huge pages at start "
        "(MADV_COLLAPSE, 0.3-1.5 s per GiB): decode reads blocks scattered over the "
        "cache, and on 4 KiB pages each costs a TLB miss (sparse policies' reads most). No "
        "value changes; off, or where the kernel refuses, the cache stays on 4 KiB pages.",
    )
    decode_kernel: Literal["vllm", "utio"] = Field(
        default="vllm",
        description="The attention kernel of every step whose rows carry at most 16 query "
        "vectors per KV head (query tokens x query heads of a group: decode steps, and "
        "speculation's drafts and verifications). 'vllm': vLLM's own; greedy output is "
        "exactly vanilla vLLM's. 'utio': UTIO's decode kernel (CPU with AVX-512, the "
        "backend's 'vec' block layout, bf16/fp16, head size 64 or 128; elsewhere vLLM's "
        "runs, logged): it reads each cached block once for all query heads of a group and "
        "all query tokens of a row, where vLLM's CPU kernel reads it once per query token; "
        "2x vanilla's decode tok/s at 4k context here. Its float rounding differs from "
        "vLLM's, so greedy output is vanilla's except where two tokens are (near-)tied.",
    )
    route_prefill: bool = Field(
        default=False, description="Route prefill tokens too (evaluation mode)."
    )
    stats_log_interval_s: float = Field(
        default=10.0, ge=0.0, description="Seconds between stats log lines (0 = off)."
    )
    speculate: SpeculateConfig | None = Field(
        default=None,
        description="Lossless self-speculative decoding (see SpeculateConfig); unset: off.",
    )

    @model_validator(mode="after")
    def _probe_needs(self) -> UtioConfig:
        if self.artifact is not None:
            for name in ("buckets", "probe_path"):
                if getattr(self, name):
                    raise ValueError(
                        f"'{name}' conflicts with 'artifact' (the artifact provides buckets "
                        "and probe_path); remove one of them"
                    )
            return self  # the rest is checked once the artifact is expanded
        if self.router == "probe":
            if self.probe_path is None:
                raise ValueError("router='probe' needs probe_path (a utio-probe weights file)")
            if not self.buckets:
                raise ValueError("router='probe' needs at least one bucket")
            if self.execution == "prefix":
                raise ValueError(
                    "router='probe' routes mid-forward, after the batch order is fixed: "
                    "execution must be 'gather' or 'auto', not 'prefix'"
                )
            if self.schedule != "nested":
                raise ValueError("router='probe' needs schedule='nested'")
        return self

    @model_validator(mode="after")
    def _buckets_nest(self) -> UtioConfig:
        names = [b.name for b in self.buckets]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket names must be unique, got {names}")
        for i, (shallow, deep) in enumerate(zip(self.buckets, self.buckets[1:], strict=False)):
            if not shallow.max_score < deep.max_score:
                raise ValueError(
                    f"buckets must be listed shallowest first with increasing max_score; "
                    f"buckets[{i}].max_score={shallow.max_score} >= "
                    f"buckets[{i + 1}].max_score={deep.max_score}"
                )
            if shallow.keep_first > deep.keep_first or shallow.keep_last > deep.keep_last:
                raise ValueError(
                    f"plans must nest: buckets[{i}] keeps ({shallow.keep_first} first, "
                    f"{shallow.keep_last} last) layers but the deeper buckets[{i + 1}] keeps "
                    f"({deep.keep_first}, {deep.keep_last}); a shallower bucket may keep no "
                    "more head or tail layers than a deeper one"
                )
        return self

    @model_validator(mode="after")
    def _speculate_fits(self) -> UtioConfig:
        spec = self.speculate
        if spec is None:
            return self
        if self.attention_all is not None:
            raise ValueError(
                "'attention_all' conflicts with 'speculate' (verification is always dense); "
                "set the draft's policy in speculate.draft.attention instead"
            )
        if self.router == "probe":
            raise ValueError("'speculate' needs router 'surrogate' or 'forced', not 'probe'")
        names = [b.name for b in self.buckets]
        if spec.draft.bucket is not None and spec.draft.bucket not in names and not self.artifact:
            raise ValueError(
                f"speculate.draft.bucket: {spec.draft.bucket!r} is not a bucket; allowed: "
                f"{names or 'none configured (add it to buckets)'}"
            )
        return self

    def policies(self) -> list[tuple[str, AttentionPolicy]]:
        """Every configured attention policy and the field it sits in."""
        out = [(f"buckets[{i}].attention", b.attention) for i, b in enumerate(self.buckets)]
        if self.attention_all is not None:
            out.append(("attention_all", self.attention_all))
        if self.speculate is not None:
            out.append(("speculate.draft.attention", self.speculate.draft.attention))
        return out

    def first_select_layer(self) -> int | None:
        """The first layer any 'select' policy selects in (None: no 'select' policy)."""
        layers = [p.dense_layers for _, p in self.policies() if p.policy == "select"]
        return min(layers) if layers else None

    def check_against_model(self, num_layers: int, block_size: int | None = None) -> None:
        """Checks that need the model's depth (and KV block size); raises UtioConfigError."""
        if block_size is not None:
            self._check_attention(block_size, num_layers)
        self._check_vslash_estimate(num_layers)
        for i, b in enumerate(self.buckets):
            kept = b.keep_first + b.keep_last
            if kept > num_layers:
                raise UtioConfigError(
                    f"UTIO config field 'buckets[{i}]' ({b.name!r}): keep_first + keep_last = "
                    f"{kept} exceeds the model's {num_layers} decoder layers; allowed: at most "
                    f"{num_layers}"
                )
            if kept < self.depth_floor:
                raise UtioConfigError(
                    f"UTIO config field 'buckets[{i}]' ({b.name!r}): runs {kept} layers, below "
                    f"depth_floor={self.depth_floor}; allowed: keep_first + keep_last >= "
                    f"{self.depth_floor}"
                )
        if self.routing_layer is not None and self.routing_layer >= num_layers:
            raise UtioConfigError(
                f"UTIO config field 'routing_layer': value {self.routing_layer} is beyond the "
                f"model's {num_layers} layers; allowed: 0..{num_layers - 1}"
            )
        if self.depth_floor > num_layers:
            raise UtioConfigError(
                f"UTIO config field 'depth_floor': value {self.depth_floor} exceeds the model's "
                f"{num_layers} layers; allowed: 1..{num_layers}"
            )

    def _check_attention(self, block_size: int, num_layers: int) -> None:
        for where, pol in self.policies():
            if pol.policy != "dense" and pol.sink_tokens % block_size:
                raise UtioConfigError(
                    f"UTIO config field '{where}.sink_tokens': value {pol.sink_tokens} is not a "
                    f"multiple of the KV-cache block size {block_size}; allowed: 0, "
                    f"{block_size}, {2 * block_size}, ..."
                )
            if pol.policy == "select" and pol.dense_layers >= num_layers:
                raise UtioConfigError(
                    f"UTIO config field '{where}.dense_layers': value {pol.dense_layers} leaves "
                    f"no layer to select in; allowed: 0..{num_layers - 1} (the model has "
                    f"{num_layers} layers)"
                )

    def _check_vslash_estimate(self, num_layers: int) -> None:
        """vslash rows must run the layer where their verticals are estimated."""
        if self.routing_layer is None:
            return  # the default (keep_first - 1 of the shallowest bucket) runs everywhere
        layer = self.routing_layer
        for i, b in enumerate(self.buckets):
            pol = self.attention_all or b.attention
            if pol.policy == "vslash" and layer in b.skipped(num_layers):
                where = "attention_all" if self.attention_all else f"buckets[{i}].attention"
                raise UtioConfigError(
                    f"UTIO config field '{where}.policy': value 'vslash' estimates its vertical "
                    f"blocks at routing_layer={layer}, which bucket {b.name!r} skips (layers "
                    f"{b.keep_first}..{num_layers - b.keep_last - 1}); allowed: a routing_layer "
                    f"below {b.keep_first} or from {num_layers - b.keep_last}, or policy "
                    "'throttle'"
                )


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in e["loc"])
        loc = loc.replace(".[", "[")
        where = f"field '{loc}'" if loc else "config"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1])
            lines.append(f"{where}: unknown key; allowed keys: {', '.join(allowed)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: value {e.get('input')!r} is invalid: {msg}")
    return "Invalid UTIO config: " + "; ".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = UtioConfig
    for part in loc:
        if isinstance(part, int):
            continue
        ann = model.model_fields[part].annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if _is_model(a)), None)
        if sub is None:
            break
        model = sub
    return sorted(model.model_fields)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def parse_utio_config(raw: Any) -> UtioConfig:
    """Parse a dict (or None) into a UtioConfig, raising UtioConfigError on bad input."""
    if raw is None:
        return UtioConfig()
    if isinstance(raw, UtioConfig):
        return raw
    if not isinstance(raw, dict):
        raise UtioConfigError(
            f"Invalid UTIO config: expected a JSON object, got {type(raw).__name__}: {raw!r}"
        )
    try:
        return UtioConfig.model_validate(raw)
    except ValidationError as err:
        raise UtioConfigError(_format_validation_error(err)) from None


def load_utio_config_arg(value: str) -> dict[str, Any]:
    """The --utio-config value: inline JSON, or a path to a JSON file."""
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UtioConfigError(
                f"--utio-config: {value!r} is neither inline JSON (starting with '{{') nor "
                "an existing JSON file"
            )
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UtioConfigError(f"--utio-config: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UtioConfigError("--utio-config: expected a JSON object")
    return data


def utio_config_from_additional(additional_config: dict[str, Any] | None) -> UtioConfig:
    """The UTIO config inside vLLM's ``additional_config`` (disabled if absent)."""
    return parse_utio_config((additional_config or {}).get(UTIO_KEY))
