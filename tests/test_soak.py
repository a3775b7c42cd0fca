"""``vllm-utio soak``: a real ``vllm serve --enable-utio`` under a mixed load, bad input
and a killed engine core (one shared server, the ``--quick`` run), plus the pure logic
of its checks, verdicts and reports.

The server test runs the quick soak once (module fixture): 8 warm-up and 24 mixed
requests (chat and completions, streamed and not, ``n`` = 2, sampling, stop strings,
logprobs, cut streams, UTIO controls, ~1k-token prompts), the reference requests again
alone, 69 malformed requests, and finally SIGKILL of the engine core. Each test then
reads one part of the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllm_utio.config import parse_utio_config
from vllm_utio.request_controls import RequestControlError, validate_request_controls
from vllm_utio.soak import checks, identity, observe
from vllm_utio.soak.bad_inputs import BadInput, bad_inputs, judge
from vllm_utio.soak.cli import QUICK_UTIO, parse_config, settings_for
from vllm_utio.soak.client import HTTP_5XX, OK, Choice, Outcome, _add_logprobs
from vllm_utio.soak.report import render_run, render_table, write_report
from vllm_utio.soak.runner import server_args, server_env
from vllm_utio.soak.workload import (
    CHAT,
    COMPLETION,
    REFERENCE_TOP_LOGPROBS,
    REFERENCE_XARGS,
    MixSettings,
    PromptSources,
    RequestSpec,
    build_mix,
    long_prompts,
)

BUCKETS = ["skip_13_19", "skip_15_19", "skip_17_19"]

# ============================================================================ real server


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from vllm_utio.paths import default_artifact_dir, default_model_dir
    from vllm_utio.soak import quick_settings, run_soak

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("default model not built: run `make setup`")
    if not (default_artifact_dir() / "artifact.json").is_file():
        pytest.skip("default artifact not built: run `make setup`")
    out = tmp_path_factory.mktemp("soak")
    settings = quick_settings(
        name="quick",
        utio=QUICK_UTIO,
        bad_inputs=True,
        kill_engine=True,
        progress=False,
        log_dir=str(out),
    )
    report = run_soak(settings)
    write_report(report, out)
    for c in report["checks"]:
        print(f"{checks._status(c['passed']):4} {c['name']}: {c['detail']}")
        for p in c["problems"]:
            print(f"       {p}")
    report["_out"] = str(out)
    return report


@pytest.mark.server
def test_quick_soak_passes_every_check(quick_report: dict[str, Any]) -> None:
    failed = [c for c in quick_report["checks"] if c["passed"] is False]
    assert not failed, json.dumps(failed, indent=1)
    assert quick_report["passed"]
    names = {c["name"] for c in quick_report["checks"]}
    assert len(names) >= 14, names


@pytest.mark.server
def test_quick_soak_exercised_the_mix_and_the_state(quick_report: dict[str, Any]) -> None:
    load = quick_report["load"]
    assert load["requests"] == 24 and load["errors_by_class"] == {}
    mix = load["mix"]
    for tag in ("chat", "completion", "stream", "whole", "long", "n=2", "greedy", "sampled"):
        assert mix.get(tag, 0) > 0, (tag, mix)
    for tag in ("stop", "logprobs", "controls", "reference", "cut"):
        assert mix.get(tag, 0) > 0, (tag, mix)
    assert load["cut"] > 0  # streams really closed by the client mid-answer
    # UTIO kept per-request state (held blocks) while requests ran, and released it
    state = quick_report["state_entries"]
    assert state["peak_during_load"] and state["peak_during_load"] > 0, state
    assert state["after"] == 0
    verdicts = quick_report["identity"]["verdicts"]
    assert len(verdicts) >= 2, verdicts
    assert all(v["kind"] != identity.DIFFERS for v in verdicts.values()), verdicts
    # the long prompts were long
    long_lens = [
        r["prompt_tokens"]
        for r in quick_report["requests"]
        if "long" in r["tags"] and r["prompt_tokens"]
    ]
    assert long_lens and min(long_lens) >= 600, long_lens


@pytest.mark.server
def test_bad_inputs_get_4xx_naming_field_and_rule(quick_report: dict[str, Any]) -> None:
    results = quick_report["bad_inputs"]["results"]
    assert len(results) >= 40
    not_4xx = [r for r in results if not r["refused"]]
    assert not not_4xx, not_4xx
    utio = [r for r in results if r["owner"] == "utio"]
    assert len(utio) >= 20
    for r in utio:
        assert r["names_field"] and r["names_allowed"], r
        assert r["param"] == r["field"], r  # the OpenAI error's param is the key
    # per-request values are names, never paths: a path is just an unknown name
    paths = [r for r in utio if "path" in r["name"] or "file" in r["name"]]
    assert paths and all("allowed" in r["message"] for r in paths)
    streamed = [r for r in utio if r["in_stream"]]
    assert len(streamed) == 2 and all(r["status"] == 400 for r in streamed)
    checks_by_name = {c["name"]: c for c in quick_report["checks"]}
    assert checks_by_name["the engine answers after the bad input"]["passed"]


@pytest.mark.server
def test_engine_core_death_is_reported_in_bounded_time(quick_report: dict[str, Any]) -> None:
    fault = quick_report["fault"]
    print(json.dumps(fault, indent=1))
    assert fault["bounded"], fault
    assert fault["engine_core_pid"] is not None
    assert fault["in_flight"]["tokens_before"] > 0  # it was streaming when the core died
    assert fault["in_flight"]["error_class"] != OK  # and it was failed, not left hanging
    reported = [t for t in (fault["seconds_to_unhealthy"], fault["seconds_to_exit"]) if t]
    assert reported and min(reported) < 30


@pytest.mark.server
def test_report_files_are_written(quick_report: dict[str, Any]) -> None:
    out = Path(quick_report["_out"])
    data = json.loads((out / "quick.json").read_text())
    assert data["passed"] is quick_report["passed"]
    md = (out / "quick.md").read_text()
    assert "## Checks" in md and "## Bad inputs" in md and "## Engine-core kill" in md
    assert md.count("| utio_") >= 5


# ============================================================================ pure logic


def _choice(tokens: list[int], tops: list[dict[int, float]] | None = None, **kw: Any) -> Choice:
    return Choice(token_ids=list(tokens), top=tops or [], logprob_positions=len(tops or []), **kw)


def test_identity_exact_tie_and_differs() -> None:
    same = identity.compare(_choice([1, 2, 3]), _choice([1, 2, 3]))
    assert same.kind == identity.EXACT
    tops_a = [{1: -0.1}, {2: -0.7, 5: -0.8}]
    tops_b = [{1: -0.1}, {5: -0.7, 2: -0.75}]
    tie = identity.compare(_choice([1, 2, 9], tops_a), _choice([1, 5, 4], tops_b))
    assert (tie.kind, tie.position, tie.loaded_token, tie.alone_token) == ("tie", 1, 2, 5)
    assert tie.margin == pytest.approx(0.05)
    wide = [{1: -0.1}, {2: -0.1, 5: -3.0}]
    far = identity.compare(_choice([1, 2], wide), _choice([1, 5], wide))
    assert far.kind == identity.DIFFERS and far.margin == pytest.approx(2.9)
    unseen = identity.compare(_choice([1, 7], wide), _choice([1, 5], wide))
    assert unseen.kind == identity.DIFFERS and unseen.margin is None  # 7 not in the top
    prefix = identity.compare(_choice([1, 2]), _choice([1, 2, 3]))
    assert prefix.kind == identity.DIFFERS and prefix.position == 2
    assert identity.tally([same, tie, far]) == {"exact": 1, "tie": 1, "differs": 1}


def _spec(**kw: Any) -> RequestSpec:
    base = dict(
        index=0, kind=COMPLETION, prompt="x", long=False, stream=False, n=1,
        temperature=0.0, max_tokens=4,
    )  # fmt: skip
    return RequestSpec(**{**base, **kw})


def _outcome(choices: dict[int, Choice], usage: int | None, **kw: Any) -> Outcome:
    return Outcome(0, status=200, choices=choices, usage_completion_tokens=usage, **kw)


def test_answer_problems_find_lost_truncated_and_inconsistent_answers() -> None:
    ok = _outcome({0: _choice([1, 2, 3, 4], finish_reason="length")}, 4)
    assert checks.answer_problems(_spec(), ok) == []
    eos = _outcome({0: _choice([1, 2], finish_reason="stop")}, 2)
    assert checks.answer_problems(_spec(), eos) == []
    short = _outcome({0: _choice([1, 2], finish_reason="length")}, 2)
    assert "'length' after 2 tokens" in checks.answer_problems(_spec(), short)[0]
    unfinished = _outcome({0: _choice([1, 2], finish_reason=None)}, 2)
    assert "finish_reason None" in checks.answer_problems(_spec(), unfinished)[0]
    usage = _outcome({0: _choice([1, 2, 3, 4], finish_reason="length")}, 5)
    assert "usage says 5" in checks.answer_problems(_spec(), usage)[0]
    n2 = _outcome({0: _choice([1, 2, 3, 4], finish_reason="length")}, 4)
    assert "expected 2" in checks.answer_problems(_spec(n=2), n2)[0]
    stop = _outcome({0: _choice([1], finish_reason="stop", stop_reason=".", text="a.b")}, 1)
    assert "left in the text" in checks.answer_problems(_spec(stop=["."]), stop)[0]
    lp = _outcome({0: _choice([1, 2, 3, 4], [{1: 0.0}], finish_reason="length")}, 4)
    assert "1 logprob positions" in checks.answer_problems(_spec(top_logprobs=1), lp)[0]
    failed = Outcome(0, status=500, error_class=HTTP_5XX, error="boom")
    assert checks.answer_problems(_spec(), failed)[0].startswith("http_5xx")
    # the check over a run ignores cut streams and counts each request once
    cut = Outcome(1, status=200, cut=True)
    check = checks.complete_answers({0: _spec(), 1: _spec(index=1)}, [short, cut])
    assert check.passed is False and "0 of 1 complete (1 cut" in check.detail


def test_server_side_checks() -> None:
    assert checks.no_5xx([Outcome(0, status=200)]).passed
    assert not checks.no_5xx([Outcome(0, status=502, error_class=HTTP_5XX)]).passed
    assert not checks.no_5xx([Outcome(0, status=500, error_class="stream_error")]).passed
    assert checks.memory_growth(1000, 1049, 0.05).passed
    assert not checks.memory_growth(1000, 1050, 0.05).passed
    assert checks.state_entries({}, None).passed is None  # UTIO off: not applicable
    assert checks.state_entries({observe.STATE_ENTRIES: 0.0}, 5.0).passed
    assert not checks.state_entries({observe.STATE_ENTRIES: 2.0}, 5.0).passed
    before = {
        "utio_steps_total": 10.0,
        "utio_layer_tokens_full_total": 300.0,
        "utio_layer_tokens_run_total": 280.0,
        "utio_layer_tokens_saved_total": 20.0,
        "utio_bucket_tokens_total[full]": 9.0,
    }
    after = {**before, "utio_steps_total": 12.0, "utio_layer_tokens_full_total": 330.0,
             "utio_layer_tokens_run_total": 310.0}  # fmt: skip
    assert checks.counters_consistent(before, after).passed
    assert checks.counters_consistent({}, {}).passed is None  # UTIO off
    down = {**after, "utio_bucket_tokens_total[full]": 8.0}
    assert "went down" in checks.counters_consistent(before, down).problems[0]
    stalled = checks.counters_consistent(before, {**before})
    assert any("did not increase" in p for p in stalled.problems)
    lying = {**after, "utio_layer_tokens_saved_total": 400.0}
    assert any("saved 400 > full" in p for p in checks.counters_consistent(before, lying).problems)
    assert checks.engine_idle({observe.RUNNING: 0, observe.WAITING: 0, observe.KV_USAGE: 0}).passed
    assert not checks.engine_idle({observe.RUNNING: 1}).passed
    got = [_outcome({0: _choice([1, 2, 3])}, 3)]
    gen = observe.GENERATION_TOKENS
    assert checks.tokens_accounted(got, {gen: 10}, {gen: 13}).passed
    assert not checks.tokens_accounted(got, {gen: 10}, {gen: 12}).passed
    pre = observe.PREEMPTIONS
    assert checks.preemptions({pre: 1}, {pre: 4}, expected=True).passed
    assert not checks.preemptions({pre: 1}, {pre: 1}, expected=True).passed
    assert checks.preemptions({pre: 1}, {pre: 1}, expected=False).passed is None


def test_parse_metrics_sums_labels_and_keeps_buckets() -> None:
    text = "\n".join(
        [
            "# TYPE vllm:num_preemptions counter",
            'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
            'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0',
            "# TYPE utio_bucket_tokens counter",
            'utio_bucket_tokens_total{bucket="full",model_name="m"} 7.0',
            'utio_bucket_tokens_total{bucket="shallow",model_name="m"} 5.0',
        ]
    )
    m = observe.parse_metrics(text)
    assert m["vllm:num_preemptions_total"] == 5.0
    assert m["utio_bucket_tokens_total"] == 12.0
    assert m["utio_bucket_tokens_total[shallow]"] == 5.0


def test_bad_input_judgement() -> None:
    case = BadInput("n zero", "/v1/completions", {}, field="n", allowed=r"at least 1")
    body = json.dumps(
        {"error": {"message": "n must be at least 1, got 0.", "param": None, "code": 400}}
    )
    r = judge(case, 400, body, in_stream=False)
    assert r.refused and r.names_field and r.names_allowed
    # "n" must be named as a word, not found inside "token" or "min_tokens"
    other = json.dumps({"error": {"message": "token count is invalid", "param": "min_tokens"}})
    assert judge(case, 400, other, False).names_field is False
    # the OpenAI error's param counts as naming the field
    param = json.dumps({"error": {"message": "bad value", "param": "body.n"}})
    assert judge(case, 400, param, False).names_field is True
    # an error event inside a 200 stream carries its own code
    event = json.dumps({"error": {"message": "n must be at least 1", "code": 400}})
    streamed = judge(case, 200, event, in_stream=True)
    assert streamed.status == 400 and streamed.refused
    accepted = judge(case, 200, json.dumps({"choices": [{"text": "Paris"}]}), False)
    assert not accepted.refused and "Paris" in accepted.message
    starlette = judge(
        BadInput("GET", "/", allowed="Not Allowed"), 405, '{"detail":"Method Not Allowed"}', False
    )
    assert starlette.refused and starlette.names_allowed and starlette.names_field is None


def test_bad_input_table() -> None:
    cases = bad_inputs("m", BUCKETS, 2048, 16)
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    utio = [c for c in cases if c.owner == "utio"]
    cfg = parse_utio_config(
        {"enabled": True, "buckets": [
            {"name": n, "max_score": 0.1 * (i + 1), "keep_first": 13 + 2 * i, "keep_last": 11}
            for i, n in enumerate(BUCKETS)
        ]}
    )  # fmt: skip
    for c in utio:  # every UTIO row is really refused by UTIO's own validation
        xargs = c.body["vllm_xargs"]
        if any(isinstance(v, bool) for v in xargs.values()):
            continue  # vLLM's request model turns true into 1 before UTIO sees it
        with pytest.raises(RequestControlError) as info:
            validate_request_controls(xargs, cfg)
        assert info.value.field == c.field
    streamed = [c for c in cases if c.stream]
    assert len(streamed) >= 3


def test_mix_is_seeded_and_follows_the_rules() -> None:
    sources = PromptSources([f"short {i}" for i in range(50)], [f"long {i}" for i in range(5)])
    mix = MixSettings(long_fraction=0.3, n2_fraction=0.3, cut_fraction=0.5)
    a = build_mix(300, mix, sources, BUCKETS, seed=3)
    b = build_mix(300, mix, sources, BUCKETS, seed=3)
    assert [s.summary() for s in a] == [s.summary() for s in b]
    assert [s.summary() for s in a] != [
        s.summary() for s in build_mix(300, mix, sources, BUCKETS, 4)
    ]
    cfg = parse_utio_config(
        {"enabled": True, "buckets": [
            {"name": n, "max_score": 0.1 * (i + 1), "keep_first": 13 + 2 * i, "keep_last": 11}
            for i, n in enumerate(BUCKETS)
        ]}
    )  # fmt: skip
    for s in a:
        validate_request_controls(s.xargs, cfg)  # every control the mix sends is allowed
        assert s.n == 1 or s.temperature > 0  # vLLM refuses n > 1 with greedy sampling
        if s.cut_after is not None:
            assert s.stream and 1 <= s.cut_after < s.max_tokens
        if s.reference:
            assert (s.n, s.temperature, s.cut_after) == (1, 0.0, None)
            assert s.xargs == REFERENCE_XARGS and s.top_logprobs == REFERENCE_TOP_LOGPROBS
            assert s.alone().top_logprobs == 20 and not s.alone().stream
        assert ("long " in s.prompt) == s.long  # the prompt came from its pool
    kinds = {t for s in a for t in s.tags}
    assert {"chat", "completion", "cut", "reference", "controls", "n=2", "long"} <= kinds


def test_request_bodies() -> None:
    chat = _spec(kind=CHAT, stream=True, top_logprobs=2, stop=["."], xargs={"utio_bucket": "full"})
    body = chat.body("m", cache_salt="s")
    assert body["messages"] == [{"role": "user", "content": "x"}]
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["stream_options"] == {"include_usage": True} and body["cache_salt"] == "s"
    assert body["return_token_ids"] and body["return_tokens_as_token_ids"]
    comp = _spec(top_logprobs=5).body("m")
    assert comp["prompt"] == "x" and comp["logprobs"] == 5 and "stream_options" not in comp
    assert chat.alone().stream is False and chat.alone().cut_after is None


def test_logprobs_are_keyed_by_token_id() -> None:
    chat = Choice()
    _add_logprobs(
        chat,
        {"content": [{"token": "token_id:5", "logprob": -0.5, "top_logprobs": [
            {"token": "token_id:5", "logprob": -0.5}, {"token": "token_id:9", "logprob": -1.0}]}]},
        CHAT,
    )  # fmt: skip
    assert chat.top == [{5: -0.5, 9: -1.0}] and chat.logprob_positions == 1
    comp = Choice()
    _add_logprobs(
        comp,
        {"tokens": ["token_id:3", "token_id:4"], "token_logprobs": [-0.1, -0.2],
         "top_logprobs": [{"token_id:3": -0.1, "token_id:8": -2.0}, {"token_id:4": -0.2}]},
        COMPLETION,
    )  # fmt: skip
    assert comp.top == [{3: -0.1, 8: -2.0}, {4: -0.2}] and comp.logprob_positions == 2
    with pytest.raises(ValueError, match="not 'token_id:N'"):
        _add_logprobs(Choice(), {"tokens": ["Paris"], "token_logprobs": [-0.1]}, COMPLETION)


def test_long_prompts_have_the_asked_lengths() -> None:
    ids = list(range(10_000))
    got = long_prompts(ids, lambda xs: xs, (2000, 4000), 20, seed=1)
    assert all(2000 <= len(x) <= 4000 for x in got)
    assert len({x[0] for x in got}) > 15  # random offsets: prefixes differ
    with pytest.raises(ValueError, match="need 4000"):
        long_prompts(list(range(100)), lambda xs: xs, (2000, 4000), 1, seed=1)


def _fake_report(name: str, utio: dict | None, passed: bool) -> dict[str, Any]:
    return {
        "name": name,
        "utio": utio,
        "settings": {"dtype": "bfloat16", "block_size": 32, "max_model_len": 5120,
                     "kv_cache_bytes": 1 << 30, "max_num_seqs": 64, "eager": False, "max_n": 16,
                     "requests": 10, "concurrency": 2, "max_wall_s": 60.0,
                     "warmup_requests": 2, "seed": 0},
        "machine": {"cpus": 2, "loadavg_start": [1.0], "loadavg_end": [2.0]},
        "load": {"requests": 10, "completed": 8, "cut": 2, "errors_by_class": {},
                 "latency_s_p50": 0.5, "latency_s_p99": 1.5, "ttft_s_p50": 0.1,
                 "ttft_s_p99": 0.2, "output_tok_s": 12.0, "mix": {"chat": 5}},
        "memory": {"start": {"total_rss": 100 << 20}, "after_warmup": {"total_rss": 200 << 20},
                   "end": {"total_rss": 204 << 20},
                   "samples": [{"rss": r << 20} for r in (200, 200, 200, 200, 201, 202)]},
        "state_entries": {"peak_during_load": 3.0 if utio else None, "after": 0.0 if utio else None},
        "metrics": {"after_warmup": {observe.PREEMPTIONS: 1.0}, "end": {observe.PREEMPTIONS: 4.0}},
        "identity": {"verdicts": {"1": {"kind": "exact"}, "2": {"kind": "tie"}}},
        "checks": [{"name": "no 5xx", "passed": passed, "detail": "d", "problems": ["p"]}],
        "passed": passed,
    }  # fmt: skip


def test_report_rendering(tmp_path: Path) -> None:
    off = _fake_report("off", None, True)
    on = _fake_report("on", {"artifact": "default"}, False)
    table = render_table([off, on])
    assert "| | off | on |" in table
    assert "| RSS start / after warm-up / end | 100 MiB / 200 MiB / 204 MiB |" in table
    assert "| RSS growth | +2.0% | +2.0% |" in table
    assert "| RSS growth, last quarter of the load | +1.0% | +1.0% |" in table  # 200 -> 202
    assert "| live UTIO entries (peak / after) | n/a (UTIO off) | 3 / 0 |" in table
    assert "| latency p50 / p99 | 500 ms / 1500 ms |" in table
    assert "| preemptions | 3 | 3 |" in table
    assert "| identity (exact / tie / differs) | 1 / 1 / 0 |" in table
    md = render_run(on)
    assert "result: **FAIL**" in md and "| no 5xx | **FAIL** | d |" in md
    json_path, md_path = write_report(on, tmp_path)
    assert json.loads(json_path.read_text())["name"] == "on" and md_path.read_text() == md


def test_cli_settings(tmp_path: Path) -> None:
    import argparse

    from vllm_utio.soak.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "c.json"
    config.write_text('{"artifact": "default"}')
    args = parser.parse_args(
        ["--utio-config", "off", "--utio-config", str(config), "--requests", "7",
         "--preemption", "--bad-inputs", "--server-env", "MALLOC_ARENA_MAX=2", "-o", str(tmp_path)]
    )  # fmt: skip
    runs = settings_for(args)
    assert [r.name for r in runs] == ["off-preemption", "utio1-preemption"]
    assert runs[0].utio is None and runs[1].utio == {"artifact": "default"}
    assert all(r.requests == 7 and r.expect_preemption and r.bad_inputs for r in runs)
    assert runs[0].kv_cache_bytes < (1 << 30)
    assert runs[1].server_env == {"MALLOC_ARENA_MAX": "2"}
    assert server_env(runs[1])["MALLOC_ARENA_MAX"] == "2"
    assert server_env(runs[1])["VLLM_PLUGINS"] == "utio"  # the same plugins, UTIO off or on
    assert "--enable-utio" not in server_args(runs[0]) and "--enable-utio" in server_args(runs[1])
    assert parse_config('{"a": 1}') == {"a": 1}
    with pytest.raises(SystemExit):
        parse_config("[1]")


def _sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def _send_streamed(spec: RequestSpec, body: bytes) -> Outcome:
    """The client's stream reader against a canned SSE answer (an HTTP transport of
    httpx, not vLLM: what is tested is how the client reads and cuts)."""
    import asyncio

    import httpx

    from vllm_utio.soak.client import send

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def go() -> Outcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await send(client, "http://test", "m", spec)

    return asyncio.run(go())


def _chunk(i: int, tok: int, finish: str | None = None) -> dict:
    return {"choices": [{"index": i, "text": "t", "token_ids": [tok], "finish_reason": finish}]}


def test_stream_reader_cuts_only_unfinished_answers() -> None:
    usage = {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 2}}
    stream = _sse(_chunk(0, 5), _chunk(0, 6), _chunk(0, 7, "length"), usage)
    whole = _send_streamed(_spec(stream=True, max_tokens=3), stream)
    assert whole.ok and not whole.cut and whole.usage_completion_tokens == 3
    assert (
        whole.choices[0].token_ids == [5, 6, 7]
        and checks.answer_problems(_spec(max_tokens=3), whole) == []
    )
    cut = _send_streamed(_spec(stream=True, max_tokens=3, cut_after=2), stream)
    assert cut.cut and cut.choices[0].token_ids == [5, 6] and cut.usage_completion_tokens is None
    # both answers of n=2 ended exactly at the cut point: read to the end, nothing cut
    ended = _sse(
        _chunk(0, 5, "stop"), _chunk(1, 6, "stop"), {**usage, "usage": {"completion_tokens": 2}}
    )
    spec = _spec(stream=True, n=2, temperature=0.8, max_tokens=8, cut_after=2)
    done = _send_streamed(spec, ended)
    assert not done.cut and done.usage_completion_tokens == 2
    assert checks.answer_problems(spec, done) == []
    error = _sse({"error": {"message": "bad", "code": 400, "param": "n"}})
    refused = _send_streamed(_spec(stream=True), error)
    assert refused.error_class == "stream_error" and refused.status == 400
