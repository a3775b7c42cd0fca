"""Decode attention on a GPU: every UTIO policy vs torch SDPA dense, plus the HBM byte limit.

    python benchmarks/gpu_decode_attention.py --out results/gpu_decode      # CUDA, < 3 min
    python benchmarks/gpu_decode_attention.py --tiny --out /tmp/gpu_decode  # CPU interpreter

Needs only torch and triton (the repository's vllm_utio.kernels, which imports nothing
from vLLM; run from anywhere, the repository root is put on sys.path). Llama-3-8B's
attention shape (32 q heads, 8 KV heads, head_dim 128, bf16) over a paged cache of
16-token pages in vLLM 0.32's FlashAttention layout, batch {1, 8, 32, 64} x context
{4k, 16k, 32k}. First every policy is checked against the torch reference on the device
(and CUDA-graph replay against the eager call); then each is timed as CUDA-graph replays
(the primary figure: vLLM decodes under CUDA graphs) and eagerly, with the L2 cache
flushed before each timed call; the query-aware policy's time includes scoring and
top-k. SDPA reads contiguous K/V. FlashAttention (``flash_attn``) and FlashInfer are
timed too when importable (untested here: neither is installed on this project's
machines). Writes ``results.json`` and ``results.md`` (table + targets) to ``--out``.

``--tiny`` runs the same code on CPU under TRITON_INTERPRET=1 with tiny sizes (the test
suite does): a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HBM_BYTES_PER_S = 4.8e12  # H200
SPARSE_FLOOR_S = 15e-6


@dataclass(frozen=True)
class Grid:
    """Sizes and policies of one run."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    sink: int
    recent: tuple[int, int]  # the two throttle windows
    budget: int  # query-aware tokens
    slash_offsets: tuple[int, ...]
    vertical_blocks: int
    ranked: int  # length of vslash's vertical ranking per row
    check_lens: tuple[int, ...]  # the correctness check's sequences
    reps: int
    sweep_points: tuple[tuple[str, int, int], ...]  # (policy, batch, context)


FULL = Grid(
    batches=(1, 8, 32, 64),
    contexts=(4096, 16384, 32768),
    q_heads=32,
    kv_heads=8,
    head_dim=128,
    block_size=16,
    sink=128,
    recent=(512, 2048),
    budget=2048,
    slash_offsets=(1024, 4096, 8192, 16384),
    vertical_blocks=16,
    ranked=64,
    check_lens=(1, 700, 2500, 4111),
    reps=25,
    sweep_points=(("dense", 1, 32768), ("dense", 64, 32768), ("query_aware", 8, 32768)),
)
TINY = Grid(
    batches=(1, 2),
    contexts=(48,),
    q_heads=4,
    kv_heads=2,
    head_dim=32,
    block_size=4,
    sink=4,
    recent=(8, 16),
    budget=24,
    slash_offsets=(9, 30),
    vertical_blocks=2,
    ranked=4,
    check_lens=(1, 23, 50),
    reps=1,
    sweep_points=(("dense", 2, 48),),
)
SWEEP_FULL = [(bn, nw, dot) for dot in (True, False) for bn in (32, 64, 128) for nw in (4, 8)]
SWEEP_TINY = [(16, 4, True), (16, 4, False)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu_decode_attention"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU interpreter if no GPU)")
    p.add_argument("--no-sweep", action="store_true", help="skip the tiling sweep")
    p.add_argument("--batches", type=int, nargs="*", help="override the batch sizes")
    p.add_argument("--contexts", type=int, nargs="*", help="override the context lengths")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> torch.device:
    """The device; on CPU the interpreter, chosen before the kernels are defined."""
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.tiny:
            raise SystemExit("no CUDA device: only --tiny runs on CPU (Triton's interpreter)")
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return torch.device("cuda" if cuda else "cpu")


# --------------------------------------------------------------------- policies


def policies(grid: Grid) -> dict[str, object]:
    from vllm_utio.kernels import decoder as d

    r1, r2 = grid.recent
    return {
        "dense": d.Dense(),
        f"throttle_{grid.sink}_{r1}": d.Throttle(grid.sink, r1),
        f"throttle_{grid.sink}_{r2}": d.Throttle(grid.sink, r2),
        "vslash": d.Vslash(grid.sink, r1, grid.slash_offsets, grid.vertical_blocks),
        "query_aware": d.QueryAware(grid.sink, r1, grid.budget),
    }


def reference_blocks(policy, lens: list[int], grid: Grid, ranked: list[list[int]], bounds):
    """Per (row, KV head) sorted logical blocks (the torch definitions)."""
    from vllm_utio.kernels import decoder as d
    from vllm_utio.kernels import reference as ref

    bs, heads = grid.block_size, grid.kv_heads
    sink = getattr(policy, "sink_tokens", 0) // bs
    if isinstance(policy, d.Dense):
        return [[ref.range_blocks(n, bs, 0, None)] * heads for n in lens]
    if isinstance(policy, d.Throttle):
        return [[ref.range_blocks(n, bs, sink, policy.recent_tokens)] * heads for n in lens]
    if isinstance(policy, d.Vslash):
        args = (policy.recent_tokens, policy.slash_offsets)
        return [
            [ref.vslash_block_set(n, bs, sink, *args, ranked[b], policy.vertical_blocks)] * heads
            for b, n in enumerate(lens)
        ]
    return ref.select_per_kv_head(
        bounds, lens, bs, sink, policy.recent_tokens, policy.budget_tokens
    )


# --------------------------------------------------------------------- one point


@dataclass
class Point:
    """Inputs at one (batch, lengths): paged cache, summaries, rankings, SDPA's K/V."""

    case: object  # PagedCase
    summaries: torch.Tensor
    ranked: torch.Tensor
    dense_k: torch.Tensor | None = None
    dense_v: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def build_point(lens: list[int], grid: Grid, device: torch.device, contiguous: bool) -> Point:
    from vllm_utio.kernels.block_summaries import fold_block_summaries
    from vllm_utio.kernels.paged_cases import make_paged_case

    case = make_paged_case(
        lens,
        num_q_heads=grid.q_heads,
        num_kv_heads=grid.kv_heads,
        head_dim=grid.head_dim,
        block_size=grid.block_size,
        dtype=torch.bfloat16,
        device=device,
        seed=len(lens),
        spare_columns=0,  # a table exactly max_blocks wide, as vLLM's
    )
    bs = grid.block_size
    summaries = torch.full(
        (grid.kv_heads, case.kv_cache.shape[0], 2 * grid.head_dim),
        float("-inf"),
        dtype=torch.bfloat16,
        device=device,
    )
    # every cached key through the device fold (what the K/V write would do)
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=device)
        slots = case.block_table[b].long()[pos // bs] * bs + pos % bs
        keys = case.key_cache[case.block_table[b].long()[pos // bs], pos % bs]
        fold_block_summaries(summaries, keys, slots, bs)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ranked = torch.stack(
        [torch.randperm(max(-(-n // bs), grid.ranked), generator=gen)[: grid.ranked] for n in lens]
    ).to(torch.int32)
    point = Point(case, summaries, ranked.to(device))
    if contiguous:  # SDPA's contiguous K/V (random: only timed)
        shape = (len(lens), grid.kv_heads, max(lens), grid.head_dim)
        point.dense_k = torch.randn(shape, dtype=torch.bfloat16, device=device)
        point.dense_v = torch.randn(shape, dtype=torch.bfloat16, device=device)
    return point


class PolicyRun:
    """One policy's call at a point, every buffer preallocated (graph-capturable)."""

    def __init__(self, decoder, point: Point, scale: float) -> None:
        self.decoder, self.point, self.scale = decoder, point, scale
        self.out = torch.empty_like(point.case.q)

    def __call__(self) -> torch.Tensor:
        c, p = self.point.case, self.point
        return self.decoder(
            c.q,
            c.key_cache,
            c.value_cache,
            c.block_table,
            c.seq_lens,
            self.scale,
            out=self.out,
            summaries=p.summaries,
            ranked=p.ranked,
        )


def make_methods(
    point: Point, grid: Grid, device: torch.device, config=None
) -> dict[str, PolicyRun]:
    from vllm_utio.kernels import decoder as d
    from vllm_utio.kernels.decode_attention import KernelConfig

    case = point.case
    shape = d.DecodeShape(
        len(case.lens),
        grid.q_heads,
        grid.kv_heads,
        grid.head_dim,
        grid.block_size,
        case.block_table.shape[1],
    )
    config = config or KernelConfig()
    return {
        name: PolicyRun(
            d.SparseDecoder(policy, shape, device, config=config),
            point,
            1 / math.sqrt(grid.head_dim),
        )
        for name, policy in policies(grid).items()
    }


def baselines(point: Point, grid: Grid) -> dict[str, Callable]:
    """SDPA dense on contiguous K/V, and FlashAttention / FlashInfer when importable."""
    import torch.nn.functional as F

    case = point.case
    q4 = case.q[:, :, None, :]
    out: dict[str, Callable] = {
        "sdpa_dense": lambda: F.scaled_dot_product_attention(
            q4, point.dense_k, point.dense_v, enable_gqa=True
        )
    }
    try:
        from flash_attn import flash_attn_with_kvcache

        k = point.dense_k.transpose(1, 2).contiguous()
        v = point.dense_v.transpose(1, 2).contiguous()
        q = case.q[:, None]
        out["flash_attn_dense"] = lambda: flash_attn_with_kvcache(
            q, k, v, cache_seqlens=case.seq_lens
        )
    except Exception as exc:  # not installed, or another API: recorded, not fatal
        point.extra["flash_attn"] = repr(exc)[:200]
    try:
        out["flashinfer_dense"] = _flashinfer(point, grid)
    except Exception as exc:
        point.extra["flashinfer"] = repr(exc)[:200]
    return out


def _flashinfer(point: Point, grid: Grid) -> Callable:
    import flashinfer

    case = point.case
    bs, n = grid.block_size, len(case.lens)
    pages = torch.tensor([-(-L // bs) for L in case.lens], dtype=torch.int32)
    indptr = torch.zeros(n + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0)
    cols = torch.arange(case.block_table.shape[1])[None, :] < pages[:, None]
    indices = case.block_table.cpu()[cols]
    last = torch.tensor(
        [L - bs * (p - 1) for L, p in zip(case.lens, pages.tolist(), strict=True)],
        dtype=torch.int32,
    )
    dev = case.q.device
    k = case.key_cache.contiguous()  # [pages, bs, kv_heads, D] (NHD)
    v = case.value_cache.contiguous()
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device=dev), "NHD"
    )
    wrapper.plan(
        indptr.to(dev),
        indices.to(dev),
        last.to(dev),
        grid.q_heads,
        grid.kv_heads,
        grid.head_dim,
        bs,
        data_type=torch.bfloat16,
    )
    return lambda: wrapper.run(case.q, (k, v))


# --------------------------------------------------------------------- timing


def time_call(fn: Callable, reps: int, device: torch.device, graph: bool) -> float | None:
    """Median milliseconds of ``fn`` (CUDA-graph replays when ``graph``), L2 flushed."""
    if device.type != "cuda":
        if graph:
            return None
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    for _ in range(3):
        fn()
    call = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        call = g.replay
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times)


# --------------------------------------------------------------------- bytes


def bytes_read(run: PolicyRun, grid: Grid) -> int:
    """HBM bytes a policy must read at a point: its selected K/V positions (+ summaries
    and scores for query-aware), counted from the selection the call actually made."""
    from vllm_utio.kernels import reference as ref
    from vllm_utio.kernels.decoder import QueryAware
    from vllm_utio.kernels.selection import BlockLists

    case, bs = run.point.case, grid.block_size
    selection = run.decoder.select(
        case.q,
        case.block_table,
        case.seq_lens,
        summaries=run.point.summaries,
        ranked=run.point.ranked,
    )
    if isinstance(selection, BlockLists):
        blocks, counts = selection.blocks.long(), selection.counts.long()
        entries = torch.arange(blocks.shape[2], device=blocks.device) < counts[..., None]
        tokens = (case.seq_lens.long()[:, None, None] - blocks * bs).clamp(0, bs)
        per_head = (tokens * entries).sum(dim=2)  # [rows, list heads]
        positions = int(per_head.expand(-1, grid.kv_heads).sum())
    else:
        positions = grid.kv_heads * sum(
            sum(
                min(bs, n - j * bs)
                for j in ref.range_blocks(n, bs, selection.sink_blocks, selection.recent_tokens)
            )
            for n in case.lens
        )
    total = positions * 2 * grid.head_dim * 2  # K and V, bf16
    if isinstance(run.decoder.policy, QueryAware):
        blocks = sum(-(-n // bs) for n in case.lens) * grid.kv_heads
        total += blocks * (2 * grid.head_dim * 2 + 2 * 4)  # summaries read, scores written+read
    return total


# --------------------------------------------------------------------- checks


def bounds_of(point: Point) -> torch.Tensor:
    from vllm_utio.kernels import reference as ref

    case = point.case
    kmin, kmax = ref.gather_summaries(
        point.summaries.cpu(), case.block_table.cpu(), case.block_table.shape[1]
    )
    return ref.kv_head_bounds(case.q.cpu(), kmin, kmax)


def check_correctness(grid: Grid, device: torch.device) -> list[dict]:
    """Every policy vs the reference on the device; CUDA-graph replay vs the eager call."""
    from vllm_utio.kernels import reference as ref

    lens = list(grid.check_lens)
    point = build_point(lens, grid, device, contiguous=False)
    case = point.case
    ranked = point.ranked.cpu().tolist()
    bounds = bounds_of(point)
    results = []
    for name, run in make_methods(point, grid, device).items():
        got = run().clone()
        sets = reference_blocks(run.decoder.policy, lens, grid, ranked, bounds)
        mask = ref.blocks_mask(sets, lens, grid.block_size)
        want = ref.sparse_decode_attention_ref(
            case.q,
            case.key_cache,
            case.value_cache,
            case.block_table,
            case.seq_lens,
            run.scale,
            mask,
        ).float()
        err = float((got.float() - want).abs().max())
        entry = {
            "policy": name,
            "max_abs_err": err,
            "ok": err <= 2e-2 * (1 + float(want.abs().max())),
        }
        if device.type == "cuda":
            entry["graph_equal"] = _graph_replay_equal(run, got)
            entry["ok"] = entry["ok"] and entry["graph_equal"]
        results.append(entry)
        print(f"check {name:22s} max|err| {err:.2e} {'ok' if entry['ok'] else 'FAIL'}", flush=True)
    return results


def _graph_replay_equal(run: PolicyRun, eager: torch.Tensor) -> bool:
    """Capture the call in a CUDA graph, clear its output, replay: the eager result again."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    run.out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(run.out, eager))


# --------------------------------------------------------------------- the grid


def measure(grid: Grid, device: torch.device, save: Callable[[list[dict]], None]) -> list[dict]:
    """Every method at every point; ``save`` gets the rows so far after each point (a run
    cut short by a timeout still leaves its measurements)."""
    rows = []
    for batch in grid.batches:
        for ctx in grid.contexts:
            lens = [ctx] * batch
            point = build_point(lens, grid, device, contiguous=True)
            methods = {**make_methods(point, grid, device), **baselines(point, grid)}
            dense_bytes = batch * ctx * grid.kv_heads * 2 * grid.head_dim * 2
            row = {
                "batch": batch,
                "context": ctx,
                "hbm_limit_dense_ms": dense_bytes / HBM_BYTES_PER_S * 1e3,
                "methods": {},
                "notes": point.extra,
            }
            for name, fn in methods.items():
                entry = timed(fn, grid, device)
                if isinstance(fn, PolicyRun):
                    entry["bytes"] = bytes_read(fn, grid)
                    entry["hbm_limit_ms"] = entry["bytes"] / HBM_BYTES_PER_S * 1e3
                    entry["num_splits"] = fn.decoder.num_splits(batch)
                row["methods"][name] = entry
            rows.append(row)
            save(rows)
            print(
                f"b={batch:3d} ctx={ctx:6d} "
                + " ".join(f"{k}={_ms(v)}" for k, v in row["methods"].items()),
                flush=True,
            )
            del point, methods
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def timed(fn: Callable, grid: Grid, device: torch.device) -> dict:
    """Graph and eager times; a baseline that fails is recorded, not fatal."""
    try:
        return {
            "graph_ms": time_call(fn, grid.reps, device, graph=True),
            "eager_ms": time_call(fn, grid.reps, device, graph=False),
        }
    except Exception as exc:
        return {"graph_ms": None, "eager_ms": None, "error": repr(exc)[:300]}


def sweep(grid: Grid, device: torch.device, configs) -> list[dict]:
    """Tiling alternatives (block_n, num_warps, tl.dot vs elementwise) at a few points."""
    from vllm_utio.kernels.decode_attention import KernelConfig

    out = []
    for policy, batch, ctx in grid.sweep_points:
        point = build_point([ctx] * batch, grid, device, contiguous=False)
        base = make_methods(point, grid, device)[policy]().clone()  # the default tiling
        for block_n, warps, dot in configs:
            config = KernelConfig(block_n=block_n, num_warps=warps, use_dot=dot)
            fn = make_methods(point, grid, device, config)[policy]
            try:
                ms = time_call(fn, grid.reps, device, graph=device.type == "cuda")
                diff = float((fn().float() - base.float()).abs().max())
            except Exception as exc:  # a config that does not compile is a result too
                ms, diff = None, None
                print(f"sweep {policy} b={batch} ctx={ctx} {config}: {exc!r}"[:300], flush=True)
            out.append(
                {
                    "policy": policy,
                    "batch": batch,
                    "context": ctx,
                    "block_n": block_n,
                    "num_warps": warps,
                    "use_dot": dot,
                    "ms": ms,
                    "max_abs_diff_vs_default": diff,
                }
            )
        del point
    return out


# --------------------------------------------------------------------- targets


def targets(rows: list[dict], grid: Grid) -> list[dict]:
    """The issue's targets, judged on CUDA-graph times (eager ones where there are none:
    the CPU run, which only exercises this code)."""
    r1, r2 = grid.recent
    throttles = [f"throttle_{grid.sink}_{r1}", f"throttle_{grid.sink}_{r2}"]
    sparse = [*throttles, "vslash", "query_aware"]
    checks = []

    def add(name: str, row: dict, ok: bool | None, detail: str) -> None:
        checks.append(
            {
                "target": name,
                "batch": row["batch"],
                "context": row["context"],
                "ok": ok,
                "detail": detail,
            }
        )

    for row in rows:
        m = {name: _time(entry) for name, entry in row["methods"].items()}
        limit = {name: e.get("hbm_limit_ms") for name, e in row["methods"].items()}
        sdpa, dense = m.get("sdpa_dense"), m["dense"]
        if sdpa and dense:
            add("dense <= 1.15x SDPA", row, dense <= 1.15 * sdpa, f"{dense / sdpa:.2f}x")
        for name in sparse:
            t = m[name]
            bound = max(1.3 * limit[name], SPARSE_FLOOR_S * 1e3)
            if t is not None:
                add(
                    f"{name} <= max(1.3 x bytes/4.8TB/s, 15us)",
                    row,
                    t <= bound,
                    f"{t:.4f} vs {bound:.4f} ms",
                )
        for name in [*throttles, "query_aware"]:
            t = m[name]
            if sdpa and t and row["context"] >= 4096:
                add(f"{name} < SDPA dense", row, t < sdpa, f"{sdpa / t:.2f}x faster")
        need = {16384: 4.0, 32768: 6.0}.get(row["context"])
        t = m["query_aware"]
        if need and row["batch"] >= 8 and sdpa and t:
            add(f"query_aware >= {need:.0f}x SDPA", row, sdpa / t >= need, f"{sdpa / t:.2f}x")
    return checks


# --------------------------------------------------------------------- report


def _time(entry: dict) -> float | None:
    graph = entry.get("graph_ms")
    return graph if graph is not None else entry.get("eager_ms")


def _ms(entry: dict | None) -> str:
    t = _time(entry) if entry else None
    return "-" if t is None else f"{t:.3f}"


def markdown(result: dict) -> str:
    rows = result["points"]
    names = list(rows[0]["methods"]) if rows else []
    head = ["batch", "ctx", "HBM limit dense", *names]
    lines = [
        f"# GPU decode attention, {result['meta']['date']} ({result['meta']['device']})",
        "",
        f"{result['meta']['note']}",
        "",
        "Milliseconds, median, CUDA-graph replay (eager where no graph); L2 flushed per call.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [str(row["batch"]), str(row["context"]), f"{row['hbm_limit_dense_ms']:.3f}"]
        cells += [_ms(row["methods"].get(n)) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Correctness (device vs torch reference)", ""]
    lines += [
        f"- {c['policy']}: max|err| {c['max_abs_err']:.2e}, {'ok' if c['ok'] else 'FAIL'}"
        + (f", graph replay equal: {c['graph_equal']}" if "graph_equal" in c else "")
        for c in result["correctness"]
    ]
    checks = result["targets"]
    passed = sum(1 for c in checks if c["ok"])
    lines += ["", f"## Targets: {passed}/{len(checks)} met", ""]
    lines += [
        f"- {'met' if c['ok'] else 'MISSED'}: {c['target']} at b={c['batch']} "
        f"ctx={c['context']} ({c['detail']})"
        for c in checks
    ]
    if result["sweep"]:
        lines += [
            "",
            "## Tiling sweep",
            "",
            "| policy | batch | ctx | block_n | warps | tl.dot | ms | max diff vs default |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in result["sweep"]:
            ms = "-" if s["ms"] is None else f"{s['ms']:.3f}"
            diff = s.get("max_abs_diff_vs_default")
            diff = "-" if diff is None else f"{diff:.1e}"
            lines.append(
                f"| {s['policy']} | {s['batch']} | {s['context']} | {s['block_n']} | "
                f"{s['num_warps']} | {s['use_dot']} | {ms} | {diff} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = setup(args)
    import triton

    grid = TINY if args.tiny else FULL
    if args.batches:
        grid = _replace(grid, batches=tuple(args.batches))
    if args.contexts:
        grid = _replace(grid, contexts=tuple(args.contexts))
    t0 = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "grid": grid.__dict__,
        "note": "tiny CPU run: a check that the script works, not a measurement"
        if device.type != "cuda"
        else "Llama-3-8B attention shape, bf16, 16-token pages",
    }
    result = {"meta": meta, "correctness": [], "points": [], "sweep": [], "targets": []}

    def save(rows: list[dict] | None = None) -> None:
        if rows is not None:
            result["points"] = rows
            result["targets"] = targets(rows, grid)
        meta["seconds"] = round(time.time() - t0, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        (args.out / "results.md").write_text(markdown(result))

    result["correctness"] = check_correctness(grid, device)
    save()
    ok = all(c["ok"] for c in result["correctness"])
    if ok:
        measure(grid, device, save)
        if not args.no_sweep:
            result["sweep"] = sweep(grid, device, SWEEP_TINY if args.tiny else SWEEP_FULL)
    save()
    print(f"wrote {args.out}/results.json and results.md in {meta['seconds']} s", flush=True)
    return 0 if ok else 1


def _replace(grid: Grid, **kw) -> Grid:
    from dataclasses import replace

    return replace(grid, **kw)


if __name__ == "__main__":
    sys.exit(main())
