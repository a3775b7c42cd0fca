"""The sparse attention policies compared at long context, and the engines that run them.

Shared by ``vllm-utio bench-long`` (speed) and ``vllm-utio eval-long`` (quality).
:data:`POLICIES` is the data: a name and its ``AttentionPolicy`` JSON; adding a policy is
one line. A policy this build's config rejects (``vslash`` before it lands) is skipped
with a note, so the tools run either way.

Engines (UTIO configs that differ only in attention):

- ``vanilla``: UTIO off.
- ``utio``: forced router, one *full-depth* bucket per policy (``keep_first`` = every
  layer, nothing skipped) whose ``attention`` is that policy. A request pinned to bucket
  ``throttle`` runs every layer and every decode step with throttled attention: the same
  code path as ``attention_all`` (the runner picks the policy of a decode row's level; a
  pinned level's policy or the global one, then restricts the block table alike). One
  engine then serves dense-through-UTIO (unpinned requests) and every "applied to all
  tokens" policy, interleaved on the same KV and prefix cache; separate
  ``attention_all`` engines would each need their own 6+ GB KV cache at 32 x 8k.
- ``routed-<policy>``: surrogate router, one full-depth bucket with that policy under
  ``max_score``: the importance score decides per token and step only whether its
  attention is sparse. Depth never changes (a bucket may keep all layers: the config
  only forbids keeping more), so this routes the attention policy alone.
- ``routed-<low>+<high>``: an importance-scaled budget: tokens scoring under
  ``max_score`` get policy ``low``, the others ``high`` (e.g. ``sparq512+sparq1024``:
  high-importance tokens read more blocks), none dense.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# name -> AttentionPolicy JSON (see docs/config.md); one line per policy
POLICIES: dict[str, dict[str, Any]] = {
    "throttle": {"policy": "throttle", "sink_tokens": 128, "recent_tokens": 512},
    "vslash": {"policy": "vslash", "sink_tokens": 128, "recent_tokens": 512},
    # query-aware: sinks + window + the best blocks per layer, up to the budget; measured with
    # --block-size 32 (a simulation found 128-token bounds too loose to find facts)
    "select512": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 512,
    },
    "select1024": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 1024,
    },
    # query-aware by approximate per-key scores (SparQ: 16 of 64 channels per KV head)
    "sparq512": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 512,
        "scoring": "sparq",
    },
    "sparq768": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 768,
        "scoring": "sparq",
    },
    "sparq1024": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 1024,
        "scoring": "sparq",
    },
    # a layer chooses every 4th decode step only (its last choice between): choosing costs a
    # quarter, which pays for the larger budget that keeps perplexity within +1% at 4k
    "sparq1536s4": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 1536,
        "scoring": "sparq",
        "select_every_steps": 4,
    },
    # every 8th step: choosing within 10% of a step at 8k too, but reused choices lost 3 of
    # 12 facts there (docs/results/2026-12-05/steps-8k)
    "sparq1536s8": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 1536,
        "scoring": "sparq",
        "select_every_steps": 8,
    },
    # adaptive: stop once the kept blocks hold 90% of the estimated attention mass
    "select1024p90": {
        "policy": "select",
        "sink_tokens": 128,
        "recent_tokens": 256,
        "budget_tokens": 1024,
        "top_p": 0.9,
    },
}
# every 8th step, but a row whose choice finds a far block holding >= 40% (30%) of a
# head's attention chooses at every layer while it reads there (a fact, a copy): at 8k
# they kept 11 (12) of dense's 12 facts where sparq1536s8 kept 9
# (docs/results/2026-12-05/focus)
POLICIES["sparq1536s8f4"] = {**POLICIES["sparq1536s8"], "focus_mass": 0.4}
POLICIES["sparq1536s8f3"] = {**POLICIES["sparq1536s8"], "focus_mass": 0.3}
# the same with a larger budget: reused choices cost perplexity at 8k with 1536 (+1.2% over
# 8 documents); 2048 kept it at +0.5% and all 12 facts (docs/results/2026-12-05/budget8k)
POLICIES["sparq2048s8f4"] = {**POLICIES["sparq1536s8f4"], "budget_tokens": 2048}
POLICIES["sparq2560s8f4"] = {**POLICIES["sparq1536s8f4"], "budget_tokens": 2560}
SMALL_PAGES = "utio-small-pages"  # engine key: the forced engine, kv_huge_pages off
SMALL_PAGES_SUFFIX = "-small-pages"  # its cases: the forced engine's, renamed
DEFAULT_BLOCK_SIZE = 128  # vLLM CPU default; select finds facts better with 32 (--block-size)
# tokens per prefill step: a step must end within vLLM's 300 s limit; 8192 tokens at 4k-8k
# positions took about 3 min on one AVX2 core in float32 (bf16 there ran past the limit)
PREFILL_CHUNK_TOKENS = 8192
DTYPES = ("auto", "bfloat16", "float32")
ROUTED = ("throttle",)  # policies also measured under importance routing
# Surrogate scores of decode tokens on 1k-token Wikipedia prompts (8 x 127 tokens,
# measured once): 39% below 0.10, 72% below 0.15, 85% below 0.20; 0.12 sends about half
# of the decode tokens to the sparse policy. Runs report the share they really got.
ROUTE_MAX_SCORE = 0.12
QUICK_RECENT_TOKENS = 128  # quick runs use ~600-token contexts: a 512 window would cut nothing


@dataclass(frozen=True)
class Case:
    """One measured configuration: an engine and, on the forced engine, a pinned bucket."""

    name: str
    engine: str
    pin: str | None
    description: str


def parse_policy_args(values: list[str] | None) -> dict[str, dict[str, Any]]:
    """``NAME`` (a built-in) or ``NAME=JSON`` per value; None: every built-in policy."""
    if not values:
        return dict(POLICIES)
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        name, _, raw = value.partition("=")
        if raw:
            out[name] = json.loads(raw)
        elif name in POLICIES:
            out[name] = POLICIES[name]
        else:
            raise SystemExit(f"--policy {name!r}: not built in ({sorted(POLICIES)}); use NAME=JSON")
    return out


def available(policies: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(the policies this build accepts, a note per policy skipped and why)."""
    from vllm_utio.config import AttentionPolicy, UtioConfigError

    ok: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for name, spec in policies.items():
        try:
            AttentionPolicy.model_validate(spec)
        except (ValueError, UtioConfigError) as err:
            first = str(err).splitlines()[0]
            notes.append(f"policy {name!r} skipped: this build's config rejects {spec} ({first})")
            continue
        ok[name] = spec
    return ok, notes


def with_recent(policies: dict[str, dict[str, Any]], recent: int) -> dict[str, dict[str, Any]]:
    return {n: {**p, "recent_tokens": recent} for n, p in policies.items()}


def quick_engine_configs(num_layers: int) -> dict[str, dict[str, Any] | None]:
    """The engines both tools build with ``--quick`` and default policy options."""
    policies = with_recent(available(POLICIES)[0], QUICK_RECENT_TOKENS)
    routed = routable(ROUTED, policies)[0]
    return engine_configs(policies, routed, num_layers, ROUTE_MAX_SCORE)


def routable(
    names: list[str] | tuple[str, ...], policies: dict[str, dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """(the ``--routed`` names whose policies are run: ``NAME`` or ``LOW+HIGH``, a note
    per name skipped)."""
    ok = [n for n in names if len(n.split("+")) <= 2 and all(p in policies for p in n.split("+"))]
    notes = [
        f"routed policy {n!r} skipped: not among the policies run" for n in names if n not in ok
    ]
    return ok, notes


def routed_buckets(
    name: str, policies: dict[str, dict[str, Any]], num_layers: int, max_score: float
) -> list[dict[str, Any]]:
    """The surrogate engine's buckets of ``--routed`` ``name``: ``NAME`` (scores under
    ``max_score`` sparse, the rest dense) or ``LOW+HIGH`` (under it ``LOW``, the rest
    ``HIGH``: an importance-scaled budget)."""
    low, _, high = name.partition("+")
    buckets = [_full_bucket(low, num_layers, max_score, policies[low])]
    if high:  # every score a bucket can take (max_score <= 1) goes to one of the two
        buckets.append(_full_bucket(high, num_layers, 1.0, policies[high]))
    return buckets


def _full_bucket(name: str, num_layers: int, max_score: float, attention: dict) -> dict:
    return {
        "name": name,
        "max_score": max_score,
        "keep_first": num_layers,
        "keep_last": 0,
        "attention": attention,
    }


def engine_configs(
    policies: dict[str, dict[str, Any]],
    routed: list[str],
    num_layers: int,
    route_max_score: float,
    small_pages: bool = False,
) -> dict[str, dict[str, Any] | None]:
    """Engine key -> UTIO config (None: UTIO off); ``small_pages``: also the forced engine
    with its KV cache left on 4 KiB pages (``kv_huge_pages`` off), to measure that alone."""
    # forced routing ignores max_score, but the config wants it increasing
    buckets = [
        _full_bucket(name, num_layers, (i + 1) / (len(policies) + 1), spec)
        for i, (name, spec) in enumerate(policies.items())
    ]
    out: dict[str, dict[str, Any] | None] = {
        "vanilla": None,
        "utio": {"enabled": True, "router": "forced", "buckets": buckets},
    }
    for name in routed:
        buckets = routed_buckets(name, policies, num_layers, route_max_score)
        out[f"routed-{name}"] = {"enabled": True, "router": "surrogate", "buckets": buckets}
    if small_pages:
        out[SMALL_PAGES] = {**out["utio"], "kv_huge_pages": False}
    return out


def cases(
    policies: dict[str, dict[str, Any]],
    routed: list[str],
    route_max_score: float,
    small_pages: bool = False,
) -> list[Case]:
    out = [
        Case("vanilla", "vanilla", None, "vLLM, UTIO off"),
        Case("utio-dense", "utio", None, "UTIO on, every token full depth, dense attention"),
    ]
    for name, spec in policies.items():
        out.append(Case(f"{name}-all", "utio", name, f"every decode token: {_describe(spec)}"))
    for name in routed:
        low, _, high = name.partition("+")
        rest = f"the others {_describe(policies[high])}" if high else "the others dense"
        out.append(
            Case(
                f"{name}-routed",
                f"routed-{name}",
                None,
                f"decode tokens with surrogate importance < {route_max_score}: "
                f"{_describe(policies[low])}; {rest} (all full depth)",
            )
        )
    if small_pages:
        small = [c for c in out if c.engine == "utio"]
        for c in small:
            note = f"{c.description}; KV cache on 4 KiB pages"
            out.append(Case(f"{c.name}{SMALL_PAGES_SUFFIX}", SMALL_PAGES, c.pin, note))
    return out


def _describe(spec: dict[str, Any]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "policy")
    return f"{spec.get('policy')} ({rest})" if rest else str(spec.get("policy"))


def model_shape(model: str | Path) -> dict[str, int]:
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {
        "num_layers": cfg["num_hidden_layers"],
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim", cfg["hidden_size"] // heads),
        "max_positions": cfg.get("max_position_embeddings", 0),
    }


def kv_bytes_per_token(model: str | Path, dtype: str = "bfloat16") -> int:
    """K and V of one token over every layer, in ``dtype``."""
    import torch

    s = model_shape(model)
    itemsize = getattr(torch, dtype).itemsize
    return s["num_layers"] * 2 * s["kv_heads"] * s["head_dim"] * itemsize


def engine_kwargs(
    max_len: int,
    max_batch: int,
    kv_bytes: int,
    eager: bool,
    forcing: bool = False,
    timing: bool = False,
    utio: dict[str, Any] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """``LLM(...)`` keyword arguments shared by the long-context tools."""
    from vllm_utio.integration.attention_timer import EXTENSION

    kw: dict[str, Any] = {
        "dtype": dtype,
        "block_size": block_size,  # every engine of a run, vanilla too: same kernel layout
        "max_model_len": max_len,
        "max_num_seqs": max(max_batch, 2),
        # chunked prefill: 32 x 8k prompt tokens need not be one activation batch
        "max_num_batched_tokens": max(PREFILL_CHUNK_TOKENS, max_len),
        "kv_cache_memory_bytes": kv_bytes,
        # prompts' K/V are written by dense full-depth prefill whatever the policy, so
        # cases on one engine may share them (see the tools for why this stays exact)
        "enable_prefix_caching": True,
        "enforce_eager": eager,
        "disable_log_stats": False,  # per-request timestamps (decode time) need stats
        "seed": 0,
    }
    if forcing:
        from vllm_utio.evaluation.quality import ENGINE_DEFAULTS

        kw["logprobs_mode"] = ENGINE_DEFAULTS["logprobs_mode"]
        kw["logits_processors"] = ENGINE_DEFAULTS["logits_processors"]
    if timing:
        kw["worker_extension_cls"] = EXTENSION
    if utio is not None:
        kw["additional_config"] = {"utio": utio}
    return kw


def mem_available_bytes() -> int | None:
    """Memory engines can use: the system's MemAvailable, capped by NUMA node 0's free
    memory (vLLM's CPU worker binds its KV cache to one node and refuses a cache larger
    than that node's free memory, whatever the system total)."""
    found = [
        _meminfo_kb(Path("/proc/meminfo"), "MemAvailable:"),
        _meminfo_kb(Path("/sys/devices/system/node/node0/meminfo"), "MemFree:"),
    ]
    known = [kb * 1024 for kb in found if kb is not None]
    return min(known) if known else None


def _meminfo_kb(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if key in parts:
                return int(parts[parts.index(key) + 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def shutdown(llm: Any) -> None:
    from vllm_utio.benchmarking.offline import _shutdown

    _shutdown(llm)


def add_policy_arguments(parser: Any) -> None:
    """``--policy``, ``--routed`` and ``--route-max-score``, shared by both tools."""
    parser.add_argument(
        "--policy",
        nargs="+",
        default=None,
        metavar="NAME[=JSON]",
        help=f"attention policies (default: {', '.join(POLICIES)}); NAME=JSON for your own",
    )
    parser.add_argument(
        "--routed",
        nargs="*",
        default=list(ROUTED),
        help="policies also applied by importance routing (surrogate score), one engine "
        "each; LOW+HIGH: LOW under the score, HIGH above (an importance-scaled budget)",
    )
    parser.add_argument(
        "--route-max-score",
        type=float,
        default=ROUTE_MAX_SCORE,
        help="routed cases: decode tokens scoring below this get the sparse policy",
    )


def add_block_size_argument(parser: Any) -> None:
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help="KV-cache block size of every engine (a multiple of 32 on CPU; 'select' needs "
        "fine blocks to find facts)",
    )


def native_dtype() -> str:
    """bfloat16 where the CPU computes it natively (AVX-512 BF16 or AMX), else float32.

    Measured on a 2-core AVX2 EPYC (no AVX-512): bf16 prefill of a 4k prompt ran at 29
    tok/s, float32 at 98 tok/s (no bf16 arithmetic in hardware), so bf16 there would
    measure the emulation, not the attention policies.
    """
    import torch

    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "bfloat16"
    return "float32"


def add_dtype_argument(parser: Any) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="model and KV-cache dtype of every engine (auto: bfloat16 where the CPU has "
        "AVX-512 BF16 or AMX, else float32, which such CPUs run several times faster)",
    )


def resolve_dtype(value: str) -> str:
    return native_dtype() if value == "auto" else value


def engine_dtype(llm: Any) -> str:
    """The dtype a ready engine runs in ('bfloat16', 'float32', ...)."""
    return str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


def run_dtype(value: str, llms: dict[str, Any] | None) -> str:
    """The dtype a run records: that of its ready engines if given, else ``value``
    with 'auto' resolved for this CPU."""
    if llms:
        return engine_dtype(next(iter(llms.values())))
    return resolve_dtype(value)
