"""One soak run end to end: start ``vllm serve``, warm up, load, measure, judge, stop.

Phases, in order (each bounded):

1. start the server (127.0.0.1, :mod:`vllm_utio.serving`), read its memory and
   ``/metrics``, send the probe request alone;
2. warm-up: a separate draw of the same mix, then wait until the engine is idle and
   read memory again (the baseline of the growth check);
3. the load: the mix at a fixed concurrency, capped by request count and wall time,
   with memory and ``/metrics`` sampled in the background;
4. wait until idle, send one tiny request (vLLM tells the worker about finished requests
   on the next step), then read UTIO's per-request state gauge, memory and counters;
5. the reference requests again, one at a time with a fresh cache salt (alone), and the
   probe again: the engine still answers with the same tokens;
6. optionally, malformed requests (:mod:`.bad_inputs`) then the probe again, and killing
   the engine core (:mod:`.faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_utio.serving import ServerProcess
from vllm_utio.soak import bad_inputs as bad
from vllm_utio.soak import checks, observe
from vllm_utio.soak.client import Outcome, drive, new_http_client, send
from vllm_utio.soak.faults import kill_engine_core
from vllm_utio.soak.identity import DEFAULT_TOLERANCE, Verdict, compare
from vllm_utio.soak.workload import (
    MixSettings,
    RequestSpec,
    build_mix,
    load_prompt_sources,
    probe_request,
    tiny_request,
)


@dataclass
class SoakSettings:
    """One run: the server's configuration, the load, and the limits of the checks."""

    name: str = "utio"
    utio: dict[str, Any] | None = None  # the --utio-config JSON; None: UTIO off
    requests: int = 600
    concurrency: int = 32
    max_wall_s: float = 1800.0  # no request starts after this (the load phase)
    warmup_requests: int = 64
    seed: int = 0
    mix: MixSettings = field(default_factory=MixSettings)
    model: str | None = None  # default: the embedded model
    served_name: str = "soak"
    dtype: str = "bfloat16"
    block_size: int = 32  # vLLM on CPU: a multiple of 32
    max_model_len: int = 5120
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_n: int = 16  # VLLM_MAX_N_SEQUENCES: vLLM's default (16384) lets one request hog it
    server_env: dict[str, str] = field(default_factory=dict)  # e.g. glibc malloc tunables
    eager: bool = False
    request_timeout_s: float = 600.0
    rss_growth_limit: float = 0.05
    tie_tolerance: float = DEFAULT_TOLERANCE
    expect_preemption: bool = False
    bad_inputs: bool = False
    kill_engine: bool = False
    sample_every_s: float = 2.0
    startup_timeout_s: float = 900.0
    progress: bool = True
    log_dir: str | None = None


def quick_settings(**overrides: Any) -> SoakSettings:
    """The ``--quick`` run (tests): a few dozen short requests on an eager server."""
    mix = MixSettings(
        long_fraction=0.15,
        long_tokens=(600, 1000),
        n2_fraction=0.3,
        cut_fraction=0.3,
        reference_fraction=0.25,
        max_tokens=(8, 16),
        reference_max_tokens=12,
    )
    base = SoakSettings(
        requests=24,
        concurrency=8,
        max_wall_s=240.0,
        warmup_requests=8,
        mix=mix,
        max_model_len=2048,
        kv_cache_bytes=256 << 20,
        eager=True,
        request_timeout_s=180.0,
        sample_every_s=0.5,
        startup_timeout_s=600.0,
        # A short run meets many step sizes for the first time, and vLLM's CPU GEMM keeps
        # ~88 KiB per new row count and linear layer (benchmarks/cpu_gemm_memory.py):
        # ~10 MiB per new step size here. 15% still catches a leak of any size that
        # matters (a KV cache's worth, state per request); the full soak uses 5%.
        rss_growth_limit=0.15,
    )
    return replace(base, **overrides)


def preemption_settings(base: SoakSettings) -> SoakSettings:
    """A KV cache too small for the long prompts in flight (256 MiB: ~11k tokens of the
    default model, three or four long prompts): vLLM must preempt and recompute. Fewer
    requests, as most are long."""
    return replace(
        base,
        name=f"{base.name}-preemption",
        mix=replace(base.mix, long_fraction=0.6),
        requests=min(base.requests, 160),
        warmup_requests=min(base.warmup_requests, 16),
        kv_cache_bytes=256 << 20,
        expect_preemption=True,
    )


def server_args(s: SoakSettings) -> list[str]:
    args = [
        "--served-model-name",
        s.served_name,
        "--dtype",
        s.dtype,
        "--max-model-len",
        str(s.max_model_len),
        "--block-size",
        str(s.block_size),
        "--kv-cache-memory-bytes",
        str(s.kv_cache_bytes),
        "--max-num-seqs",
        str(s.max_num_seqs),
    ]
    if s.eager:
        args.append("--enforce-eager")
    if s.utio is not None:
        args += ["--enable-utio", "--utio-config", json.dumps(s.utio)]
    return args


def server_env(s: SoakSettings) -> dict[str, str]:
    # The same plugins load with UTIO off, so the side-by-side differs only by the flag.
    env = {**os.environ, "VLLM_PLUGINS": "utio", "VLLM_MAX_N_SEQUENCES": str(s.max_n)}
    return {**env, **s.server_env}


def engine_bucket_names(utio: dict[str, Any] | None, model_dir: str) -> list[str]:
    """The bucket names a ``utio_bucket`` control may name on this engine."""
    if utio is None:
        return []
    from vllm_utio.artifact import resolve_artifact
    from vllm_utio.config import parse_utio_config

    raw = {"enabled": True, **utio}
    if raw.get("artifact") is not None:
        raw = resolve_artifact(raw, model_dir)
    return [b.name for b in parse_utio_config(raw).buckets]


def run_soak(settings: SoakSettings) -> dict[str, Any]:
    """Run one soak; returns the report (see :mod:`.report` to write it)."""
    return asyncio.run(_run(settings))


async def _run(s: SoakSettings) -> dict[str, Any]:
    from vllm_utio.paths import default_model_dir

    model_dir = str(s.model or default_model_dir())
    buckets = engine_bucket_names(s.utio, model_dir)
    n_long = max(1, round((s.requests + s.warmup_requests) * s.mix.long_fraction))
    sources = load_prompt_sources(model_dir, s.mix, s.requests + s.warmup_requests, n_long, s.seed)
    warm = build_mix(s.warmup_requests, s.mix, sources, buckets, s.seed + 1, start_index=100_000)
    main = build_mix(s.requests, s.mix, sources, buckets, s.seed)
    log_dir = Path(s.log_dir or tempfile.mkdtemp(prefix="vllm-utio-soak-"))
    server = ServerProcess(
        model_dir,
        server_args(s),
        log_path=log_dir / f"{s.name}.server.log",
        startup_timeout=s.startup_timeout_s,
        env=server_env(s),
    )
    report: dict[str, Any] = {
        "name": s.name,
        "utio": s.utio,
        "settings": asdict(s),
        "buckets": buckets,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t_start = time.monotonic()
    server.start()
    report["server"] = {
        "command": server.command,
        "log": str(server.log_path),
        "startup_s": server.startup_seconds,
    }
    try:
        await _phases(server, s, warm, main, report)
    except Exception as err:  # the server died or stopped answering: still report it
        report.setdefault("checks", []).append(
            checks.Check("the run completed", False, f"{type(err).__name__}: {err}"[:500]).to_dict()
        )
        report["error"] = traceback.format_exc()
    finally:
        server.stop()
        report["server"].update(exit_code=server.returncode, stopped_cleanly=server.stopped_cleanly)
        report["machine"]["loadavg_end"] = list(os.getloadavg())
        report["wall_s"] = time.monotonic() - t_start
    verdicts = [c["passed"] for c in report.get("checks", [])]
    report["passed"] = bool(verdicts) and all(v is not False for v in verdicts)
    return report


async def _phases(
    server: ServerProcess,
    s: SoakSettings,
    warm: list[RequestSpec],
    main: list[RequestSpec],
    report: dict[str, Any],
) -> None:
    url, model = server.base_url, s.served_name
    pid = server.pid
    assert pid is not None
    t0 = time.monotonic()
    specs = {spec.index: spec for spec in [*warm, *main]}
    async with new_http_client(4, s.request_timeout_s) as client:
        mem = {"start": observe.tree_memory(pid, t0)}
        metrics = {"start": await observe.scrape(client, url)}
        probe = probe_request(-1)
        probe_before = await send(client, url, model, probe, cache_salt="soak-probe-0")
        # -- warm-up
        warm_out, warm_wall = await drive(
            url, model, warm, s.concurrency, s.max_wall_s, s.request_timeout_s
        )
        metrics["after_warmup"] = await _idle(client, url, s)
        mem["after_warmup"] = observe.tree_memory(pid, t0)
        # -- the load, sampled
        sampler = _Sampler(client, url, pid, t0, s.sample_every_s)
        sampling = asyncio.create_task(sampler.run())
        bar = tqdm(total=len(main), desc=f"soak {s.name}", unit="req", disable=not s.progress)
        errors = 0

        def done(outcome: Outcome) -> None:
            nonlocal errors
            errors += not outcome.ok
            bar.update()
            bar.set_postfix(errors=errors, cut=outcome.cut)

        try:
            load_out, load_wall = await drive(
                url, model, main, s.concurrency, s.max_wall_s, s.request_timeout_s, done
            )
        finally:
            bar.close()
            sampler.stop = True
            await sampling
        # -- after: idle, one tiny step, then state, memory and counters
        metrics["idle"] = await _idle(client, url, s)
        tiny = await send(client, url, model, tiny_request(-2))
        metrics["end"] = await observe.fresh_scrape(client, url)
        mem["end"] = observe.tree_memory(pid, t0)
        # -- alone: the reference requests one at a time, fresh prefill
        loaded = {o.index: o for o in load_out}
        verdicts, alone_out = await _alone_pass(client, url, model, main, loaded, s)
        probe_after = await send(client, url, model, probe, cache_salt="soak-probe-1")
        report["warmup"] = checks.summarize(specs, warm_out, warm_wall)
        report["load"] = checks.summarize(specs, load_out, load_wall)
        report["memory"] = _memory_report(mem, sampler)
        report["state_entries"] = {
            "peak_during_load": sampler.peak_state,
            "after": metrics["end"].get(observe.STATE_ENTRIES),
        }
        report["metrics"] = {k: _selected(v) for k, v in metrics.items()}
        report["identity"] = {
            "tolerance": s.tie_tolerance,
            "verdicts": {str(i): v.to_dict() for i, v in verdicts.items()},
        }
        every = [probe_before, *warm_out, *load_out, tiny, *alone_out, probe_after]
        found = [
            checks.no_5xx(every),
            checks.complete_answers(specs, load_out),
            checks.identity(verdicts, s.tie_tolerance),
            checks.engine_answers(
                probe_before,
                probe_after,
                _probe_verdict(probe_before, probe_after, s),
                "after the run",
            ),
            checks.memory_growth(
                mem["after_warmup"].total_rss, mem["end"].total_rss, s.rss_growth_limit
            ),
            checks.state_entries(metrics["end"], sampler.peak_state),
            checks.counters_consistent(metrics["after_warmup"], metrics["end"]),
            checks.engine_idle(metrics["end"]),
            checks.tokens_accounted(load_out, metrics["after_warmup"], metrics["idle"]),
            checks.preemptions(metrics["after_warmup"], metrics["end"], s.expect_preemption),
        ]
        report["requests"] = [_request_record(specs[o.index], o) for o in load_out]
        if s.bad_inputs:
            found += await _bad_input_phase(client, server, s, probe, probe_before, report)
    if s.kill_engine:
        fault = await kill_engine_core(server, model, max_tokens=s.max_model_len // 2)
        report["fault"] = fault.to_dict()
        found.append(
            checks.Check(
                "engine-core death: the API server exits or reports unhealthy in bounded time",
                fault.bounded,
                _fault_detail(fault.to_dict()),
            )
        )
    report["checks"] = [c.to_dict() for c in found]


async def _idle(client: Any, url: str, s: SoakSettings) -> dict[str, float]:
    """``/metrics`` once the engine is idle; if it never drains, the last page (the
    idle check then fails on it instead of the run stopping here)."""
    with contextlib.suppress(TimeoutError):  # the idle check then fails on the page below
        await observe.wait_idle(client, url, timeout_s=s.request_timeout_s)
    return await observe.fresh_scrape(client, url)


class _Sampler:
    """Memory and ``/metrics`` every few seconds while the load runs."""

    def __init__(self, client: Any, url: str, pid: int, t0: float, every_s: float) -> None:
        self.client, self.url, self.pid, self.t0, self.every_s = client, url, pid, t0, every_s
        self.stop = False
        self.samples: list[dict[str, Any]] = []
        self.peak_state: float | None = None
        self.peak_rss = 0

    async def run(self) -> None:
        while not self.stop:
            mem = observe.tree_memory(self.pid, self.t0)
            try:
                m = await observe.scrape(self.client, self.url)
            except Exception as err:  # a missed sample is recorded, not fatal
                self.samples.append({"at_s": round(mem.at_s, 1), "error": repr(err)[:200]})
                await asyncio.sleep(self.every_s)
                continue
            state = m.get(observe.STATE_ENTRIES)
            if state is not None:
                self.peak_state = max(self.peak_state or 0.0, state)
            self.peak_rss = max(self.peak_rss, mem.total_rss)
            self.samples.append(
                {
                    "at_s": round(mem.at_s, 1),
                    "rss": mem.total_rss,
                    "state_entries": state,
                    "running": m.get(observe.RUNNING),
                    "waiting": m.get(observe.WAITING),
                    "kv_usage": m.get(observe.KV_USAGE),
                    "preemptions": m.get(observe.PREEMPTIONS),
                }
            )
            await asyncio.sleep(self.every_s)


async def _alone_pass(
    client: Any,
    url: str,
    model: str,
    main: list[RequestSpec],
    loaded: dict[int, Outcome],
    s: SoakSettings,
) -> tuple[dict[int, Verdict], list[Outcome]]:
    refs = [
        spec for spec in main if spec.reference and spec.index in loaded and loaded[spec.index].ok
    ]
    verdicts: dict[int, Verdict] = {}
    outs = []
    for spec in tqdm(refs, desc="alone", unit="req", disable=not s.progress):
        out = await send(client, url, model, spec.alone(), cache_salt=f"soak-alone-{spec.index}")
        outs.append(out)
        if out.ok and out.choices and loaded[spec.index].choices:
            verdicts[spec.index] = compare(
                loaded[spec.index].choices[0], out.choices[0], s.tie_tolerance
            )
        else:
            verdicts[spec.index] = Verdict("differs")  # the alone request itself failed
    return verdicts, outs


def _probe_verdict(before: Outcome, after: Outcome, s: SoakSettings) -> Verdict | None:
    if not (before.ok and after.ok and before.choices and after.choices):
        return None
    return compare(after.choices[0], before.choices[0], s.tie_tolerance)


async def _bad_input_phase(
    client: Any,
    server: ServerProcess,
    s: SoakSettings,
    probe: RequestSpec,
    probe_before: Outcome,
    report: dict[str, Any],
) -> list[checks.Check]:
    url, model = server.base_url, s.served_name
    buckets = report["buckets"]
    cases = bad.bad_inputs(model, buckets, s.max_model_len, s.max_n)
    results = [await bad.send_bad(client, url, c) for c in cases]
    lenient = [
        await bad.send_bad(client, url, c) for c in bad.lenient_inputs(model, s.max_model_len)
    ]
    await _idle(client, url, s)
    after = await send(client, url, model, probe, cache_salt="soak-probe-2")
    report["bad_inputs"] = {
        "results": [r.to_dict() for r in results],
        "lenient": [r.to_dict() for r in lenient],
    }
    not_refused = [r for r in results if not r.refused]
    utio = [r for r in results if r.owner == "utio"]
    unclear = [r for r in utio if not (r.names_field and r.names_allowed)]
    vllm_unclear = [
        r
        for r in results
        if r.owner == "vllm" and (r.names_field is False or r.names_allowed is False)
    ]
    return [
        checks.Check(
            f"every malformed request gets a 4xx ({len(results)} sent)",
            not not_refused,
            f"{len(results) - len(not_refused)} of {len(results)} refused with 4xx",
            [f"{r.name}: {r.status} {r.message[:120]}" for r in not_refused],
        ),
        checks.Check(
            "UTIO's refusals name the field and the allowed values",
            (not unclear) if utio else None,
            f"{len(utio) - len(unclear)} of {len(utio)} UTIO refusals name both "
            f"(vLLM's own: {len(vllm_unclear)} of {len(results) - len(utio)} miss the field "
            "or the rule; listed in the report)",
            [f"{r.name}: {r.message[:160]}" for r in unclear],
        ),
        checks.engine_answers(
            probe_before, after, _probe_verdict(probe_before, after, s), "after the bad input"
        ),
    ]


def _memory_report(mem: dict[str, observe.MemorySample], sampler: _Sampler) -> dict[str, Any]:
    out: dict[str, Any] = {k: v.to_dict() for k, v in mem.items()}
    out["peak_during_load"] = sampler.peak_rss
    out["samples"] = sampler.samples
    return out


_SELECTED = (
    observe.PREEMPTIONS,
    observe.RUNNING,
    observe.WAITING,
    observe.KV_USAGE,
    observe.GENERATION_TOKENS,
    observe.PROMPT_TOKENS,
)


def _selected(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in _SELECTED or k.startswith("utio_")}


def _request_record(spec: RequestSpec, out: Outcome) -> dict[str, Any]:
    return {
        "index": spec.index,
        "tags": spec.tags,
        "max_tokens": spec.max_tokens,
        "xargs": spec.xargs,
        "cut_after": spec.cut_after,
        **out.to_dict(),
    }


def _fault_detail(fault: dict[str, Any]) -> str:
    if fault.get("error"):
        return fault["error"]
    unhealthy = fault["seconds_to_unhealthy"]
    exited = fault["seconds_to_exit"]
    parts = [
        f"unhealthy after {unhealthy:.1f} s" if unhealthy is not None else "never unhealthy",
        f"exited after {exited:.1f} s with code {fault['exit_code']}"
        if exited is not None
        else f"still running after {fault['deadline_s']:.0f} s",
        f"the open request got {fault['in_flight'].get('status')} "
        f"({fault['in_flight'].get('error_class') or 'ok'})",
    ]
    if fault["left_running"]:
        parts.append(f"left running: {', '.join(fault['left_running'])}")
    return "; ".join(parts)
