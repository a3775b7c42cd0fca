"""The draft-count rule, the acceptance estimate, and the speculate config's checks."""

from __future__ import annotations

import pytest
import torch

from vllm_utio.config import UtioConfigError, parse_utio_config
from vllm_utio.integration.self_draft import draft_read, speculative_config
from vllm_utio.request_controls import RequestControlError, validate_request_controls
from vllm_utio.speculation import (
    PRIOR_ACCEPTANCE,
    Acceptance,
    SpeculationStats,
    best_draft_count,
    draft_cost,
    expected_tokens,
)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 3) == pytest.approx(4.0, rel=0.01)  # capped just below 1


def test_long_context_with_good_acceptance_drafts_many():
    # 4k cached positions, a throttled draft reads 672, row cost 450, cheap verification
    k = best_draft_count(0.9, 4096, draft_cost(672, 450, 1.0), 450, 4, 1.05, 0.05)
    assert k >= 3


def test_costly_verification_drafts_none():
    # the CPU's measured verification cost: even 93% acceptance does not pay at 4k
    assert best_draft_count(0.93, 4096, draft_cost(1200, 450, 1.0), 450, 4, 1.05, 0.75) == 0


def test_short_context_or_poor_acceptance_drafts_none():
    # a throttled draft at 600 positions reads everything: it costs a full step
    assert best_draft_count(0.9, 600, draft_cost(600, 450, 1.0), 450, 4, 1.05, 0.05) == 0
    # 4k, but drafts are nearly always rejected
    assert best_draft_count(0.05, 4096, draft_cost(672, 450, 1.0), 450, 4, 1.05, 0.05) == 0


def test_gain_threshold_is_respected():
    args = (0.7, 4096, draft_cost(672, 450, 1.0), 450, 4)
    assert best_draft_count(*args, 1.0, 0.05) > 0
    assert best_draft_count(*args, 10.0, 0.05) == 0


def test_depth_draft_costs_its_share_of_layers_plus_fill():
    assert draft_cost(1000, 400, 1.0) == pytest.approx(1400)
    assert draft_cost(1000, 400, 0.5) == pytest.approx(0.5 * 1400 + 0.5 * 200)


def test_acceptance_estimate_moves_with_verifications():
    acc = Acceptance()
    acc.proposed = 4
    acc.observe(4)  # all accepted: rate rises
    high = acc.rate
    assert high > PRIOR_ACCEPTANCE
    acc.proposed = 4
    acc.observe(0)  # the first draft rejected: rate falls
    assert acc.rate < high
    low = Acceptance(rate=0.1)
    low.proposed = 0
    low.observe(0)  # not drafting: drifts back towards the prior, so it retries
    assert 0.1 < low.rate < PRIOR_ACCEPTANCE


def test_stats_rates():
    s = SpeculationStats(verified_tokens=10, accepted_tokens=7, verifications=4)
    d = s.as_dict()
    assert d["spec_acceptance_rate"] == pytest.approx(0.7)
    assert d["spec_tokens_per_verification"] == pytest.approx(1 + 7 / 4)
    assert SpeculationStats().as_dict()["spec_acceptance_rate"] == 0.0


def test_draft_read_per_policy():
    cfg = parse_utio_config({"speculate": {}})
    throttle = cfg.speculate.draft.attention
    assert throttle.policy == "throttle"
    assert draft_read(throttle, 4096, 32, 30) == 128 + 512 + 32
    assert draft_read(throttle, 300, 32, 30) == 300
    select = parse_utio_config(
        {"attention_all": {"policy": "select", "budget_tokens": 1024, "dense_layers": 3}}
    ).attention_all
    assert draft_read(select, 4096, 32, 30) == (3 * 4096 + 27 * 1024) // 30


def test_speculative_config_uses_vllms_custom_proposer():
    spec = parse_utio_config({"speculate": {"tokens": 3}}).speculate
    got = speculative_config(spec)
    assert got["method"] == "custom_class" and got["num_speculative_tokens"] == 3
    module, name = got["model"].rsplit(".", 1)
    assert hasattr(__import__(module, fromlist=[name]), name)


def test_drafts_ride_on_the_reply_only_for_the_executor_that_reads_them():
    from types import SimpleNamespace

    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import ModelRunnerOutput

    from vllm_utio.integration.draft_handoff import (
        DRAFTS_ATTR,
        SelfDraftExecutor,
        attach_drafts,
        reads_drafts_from_reply,
        use_draft_handoff,
    )

    def config(backend):
        return SimpleNamespace(
            parallel_config=SimpleNamespace(distributed_executor_backend=backend)
        )

    # vLLM's multiprocess executor is swapped for the one that reads the reply ...
    mp = config("mp")
    assert use_draft_handoff(mp) and reads_drafts_from_reply(mp)
    assert mp.parallel_config.distributed_executor_backend is SelfDraftExecutor
    assert use_draft_handoff(config(MultiprocExecutor))
    # ... an in-process one is kept, and then the runner attaches nothing
    uni = config("uni")
    assert not use_draft_handoff(uni) and not reads_drafts_from_reply(uni)
    reply = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    attach_drafts(reply, "drafts")
    assert getattr(reply, DRAFTS_ATTR) == "drafts"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"speculate": {"tokens": 0}}, "speculate.tokens"),
        ({"speculate": {"tokens": 17}}, "speculate.tokens"),
        ({"speculate": {"draft": {"bucket": "nope"}}}, "speculate.draft.bucket"),
        ({"speculate": {"depth": 3}}, "speculate"),
        ({"speculate": {}, "attention_all": {"policy": "throttle"}}, "attention_all"),
        ({"speculate": {"draft": {"attention": {"policy": "weird"}}}}, "policy"),
    ],
)
def test_bad_speculate_config_names_the_field(raw, needle):
    with pytest.raises(UtioConfigError) as err:
        parse_utio_config(raw)
    assert needle in str(err.value)


def test_speculate_control_values():
    cfg = parse_utio_config({"speculate": {}})
    validate_request_controls({"utio_speculate": "off"}, cfg)
    validate_request_controls({"utio_speculate": "default"}, cfg)
    with pytest.raises(RequestControlError, match="allowed values"):
        validate_request_controls({"utio_speculate": "maybe"}, cfg)
    with pytest.raises(RequestControlError, match="must be a string"):
        validate_request_controls({"utio_speculate": False}, cfg)


def test_identity_counts_one_bf16_step_as_a_near_tie():
    from vllm_utio.benchmarking.speculative import identity, reclassify

    ref = {"tokens": [[1, 2, 3], [1, 2, 3], [1, 2, 3]], "top2_gap": [[0.0, 0.125, 0.0]] * 2}
    ref["top2_gap"].append([0.0, 0.25, 0.0])
    got = identity([[1, 2, 3], [1, 9, 3], [1, 9, 3]], ref)
    assert got["identical"] == 1
    assert [e["prompt"] for e in got["near_ties"]] == [1]  # 0.125: one bf16 step
    assert [e["prompt"] for e in got["mismatches"]] == [2]  # 0.25: two steps
    # an earlier run split at 0.1 is re-split under the current rule
    old = {**got, "near_ties": [], "mismatches": got["near_ties"] + got["mismatches"]}
    assert reclassify(old) == got


def test_near_tie_line_widens_with_the_top_logits_bf16_step():
    """With vanilla's top logit known, a gap of one bf16 step of it is a near tie: 0.25
    at a logit of 38.5 (adjacent bf16 values 38.25 and 38.5), not at 20 (step 0.125)."""
    from vllm_utio.benchmarking.speculative import bf16_step, identity, tie_line

    assert bf16_step(38.5) == 0.25 and bf16_step(20.0) == 0.125 and bf16_step(-13.5) == 0.0625
    assert tie_line(None) == tie_line(5.0) == 0.125 and tie_line(70.0) == 0.5
    ref = {"tokens": [[1, 2, 3]] * 3, "top2_gap": [[0.0, 0.25, 0.0]] * 3}
    ref["top1_logit"] = [[40.0, 38.5, 30.0], [40.0, 20.0, 30.0], [40.0, 38.5, 30.0]]
    got = identity([[1, 9, 3], [1, 9, 3], [1, 2, 3]], ref)
    assert got["identical"] == 1
    assert got["near_ties"] == [{"prompt": 0, "step": 1, "top2_gap": 0.25, "top1_logit": 38.5}]
    assert [(e["prompt"], e["top1_logit"]) for e in got["mismatches"]] == [(1, 20.0)]


@pytest.mark.parametrize("block_size", [32, 128])
def test_bench_spec_engines_are_valid_configs(block_size):
    from vllm_utio.benchmarking.speculative import engines

    table = engines(4, block_size)
    assert table["vanilla"] == {"utio": None, "spec": None}
    # vLLM's own methods run without UTIO, capped at the same draft count
    for name in ("ngram", "suffix"):
        assert table[name]["utio"] is None
        assert table[name]["spec"]["method"] == name
        assert table[name]["spec"]["num_speculative_tokens"] == 4
    # suffix from each prompt alone: no tree of earlier repeats' answers to the same prompt
    assert table["suffix"]["spec"]["suffix_decoding_max_cached_requests"] == 0
    assert table["utio-kernel-twin"] == table["utio-kernel"]  # a second instance, same config
    drafts = {}
    for name, engine in table.items():
        if engine["utio"] is not None:
            cfg = parse_utio_config(engine["utio"])  # raises on a config UTIO rejects
            if cfg.speculate is not None:
                drafts[name] = (cfg.speculate.draft.attention.policy, cfg.decode_kernel)
    assert drafts["spec-vslash-utio-kernel"] == ("vslash", "utio")
    vocab16k = parse_utio_config(table["spec-throttle-vocab16k-utio-kernel"]["utio"])
    assert vocab16k.speculate.draft.vocab == 16384
    assert drafts["spec-skip-utio-kernel"] == ("dense", "utio")
    fixed_skip = parse_utio_config(table["spec-skip-fixed-utio-kernel"]["utio"]).speculate
    assert fixed_skip.draft.bucket == "draft" and not fixed_skip.adaptive
    # select finds facts only with fine blocks: no select drafts at 128-token blocks
    assert ("spec-sparq768-utio-kernel" in drafts) == (block_size <= 64)


def test_interleaved_order_rotates_per_repeat():
    """Over as many repeats as engines, every engine runs once in every place; over twice
    as many, right after every other engine."""
    from vllm_utio.benchmarking.speculative import rotated

    names = ["vanilla", "utio-kernel", "spec-throttle-utio-kernel"]
    assert rotated(names, 0) == names and rotated(names, 6) == names
    orders = [rotated(names, r) for r in range(6)]
    for name in names:
        assert sorted(order.index(name) for order in orders[:3]) == [0, 1, 2]
        before = {order[order.index(name) - 1] for order in orders if order[0] != name}
        assert before == set(names) - {name}
    assert rotated([], 2) == []


def _bench_spec_args(*argv: str):
    import argparse

    from vllm_utio.benchmarking.speculative import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_spec_short_cells_get_whole_prompts_at_any_batch_size():
    """--short adds batch-8 cells whatever --batch-sizes says: the text is cut for them
    too, so no prompt comes out empty or short (vLLM refused such a run part way)."""
    from vllm_utio.benchmarking.speculative import workloads

    class Chars:  # one token per character: no model files needed
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    args = _bench_spec_args("--context-lens", "512", "--batch-sizes", "1", "--short")
    cells = workloads(args, Chars())
    wiki = [c for c in cells if c["workload"] == "wikipedia"]
    assert len(wiki) == 4  # the 512-token, batch-1 cell once, not once per flag
    assert sorted({(c["context"], c["batch"]) for c in wiki}) == [
        (64, 1),
        (64, 8),
        (512, 1),
        (512, 8),
    ]
    for cell in wiki:
        assert len(cell["prompts"]) == cell["batch"]
        assert all(len(p["prompt_token_ids"]) == cell["context"] for p in cell["prompts"])
        starts = [tuple(p["prompt_token_ids"][:32]) for p in cell["prompts"]]
        assert len(set(starts)) == len(starts)  # every prompt its own text


def test_bench_spec_sampled_refuses_vllms_own_speculation():
    """vLLM 0.32's CPU rejection sampler samples its own speculation engines under
    uninitialised temperatures (vllm-project/vllm#55005): a sampled run refuses them,
    naming the issue, before any engine starts; a negative temperature is refused too."""
    from vllm_utio.benchmarking.speculative import run

    args = _bench_spec_args("--temperature", "0.8", "--engines", "ngram", "spec-throttle")
    with pytest.raises(SystemExit, match=r"\['ngram'\].*55005"):
        run(args)
    with pytest.raises(SystemExit, match="--temperature must be >= 0"):
        run(_bench_spec_args("--temperature", "-1", "--engines", "spec-throttle"))


def test_bench_spec_sampled_table_compares_no_outputs():
    from vllm_utio.benchmarking.speculative import markdown

    row = {
        "engine": "spec-throttle",
        "workload": "wikipedia",
        "context": 4096,
        "batch": 8,
        "decode_tok_s": 50.0,
        "tok_s_min": 49.0,
        "tok_s_max": 51.0,
        "speedup": 1.1,
        "acceptance": 0.6,
        "tokens_per_verification": 2.5,
        "draft_tokens_per_output": 0.8,
        "draft_share": 0.2,
        "identity": None,
    }
    settings = {"model": "m", "dtype": "bfloat16", "block_size": 32, "output_len": 64}
    settings |= {"repeats": 2, "tokens": 4, "temperature": 0.8}
    text = markdown({"created": "2026-12-06", "settings": settings, "summary": [row], "notes": []})
    assert "(temperature 0.8, ignore_eos)" in text
    (line,) = [x for x in text.splitlines() if x.startswith("| wikipedia")]
    assert line.endswith("| 20% | - | - | - |")


def test_bench_spec_results_of_a_run_stopped_part_way(tmp_path):
    """bench-spec saves after every sample: a stopped run's file says what it measured,
    how much of the run that was, and its table has the rows measured so far."""
    import json

    from vllm_utio.benchmarking.results import machine_info, version_info
    from vllm_utio.benchmarking.speculative import _results, _save

    settings = {"model": "m", "dtype": "bfloat16", "block_size": 32, "output_len": 3}
    settings |= {"repeats": 2, "tokens": 4, "temperature": 0.0, "interleaved": False}
    cells = [{"workload": "wikipedia", "context": 8116, "batch": 2, "prompts": ["a", "b"]}]
    sample = {"wall_s": 2.0, "decode_tok_s": 10.0, "drafts": 0, "draft_tokens": 0}
    sample |= {"accepted": 0, "draft_s": None, "payoff": None, "engine": "vanilla"}
    sample |= {"cell": 0, "repeat": 0, "identity": None, "tokens": [[1, 2, 3], [4, 5, 6]]}
    facts = {"machine": machine_info(), "versions": version_info()}
    _save(tmp_path / "spec.json", _results(settings, facts, cells, [sample], total=6))
    saved = json.loads((tmp_path / "spec.json").read_text())
    assert saved["complete"] is False and "tokens" not in saved["samples"][0]
    assert "stopped part way: 1 of 6 runs measured" in saved["notes"]
    assert [r["engine"] for r in saved["summary"]] == ["vanilla"]
    assert "| wikipedia | 8116 | 2 | vanilla | 10.0" in (tmp_path / "spec.md").read_text()
    assert _results(settings, facts, cells, [sample], total=1)["complete"] is True


def _spec_run(path, tok_s: dict[str, float], identical: int = 2, repeats: int = 1):
    """A finished bench-spec results file: one 4k cell, batch 2, each engine's repeats
    alike (``identical`` outputs per repeat, the other a near tie)."""
    from vllm_utio.benchmarking.results import machine_info, version_info
    from vllm_utio.benchmarking.speculative import _results, _save

    settings = {"model": "m", "dtype": "bfloat16", "block_size": 32, "output_len": 3}
    settings |= {"repeats": repeats, "tokens": 4, "temperature": 0.0, "interleaved": True}
    settings["engines"] = {name: {} for name in tok_s}
    cells = [{"workload": "wikipedia", "context": 4096, "batch": 2, "prompts": ["a", "b"]}]
    ident = {"identical": identical, "outputs": 2, "mismatches": []}
    ident["near_ties"] = [{"prompt": 1, "step": 1, "top2_gap": 0.0}] * (2 - identical)
    samples = [
        {"wall_s": 1.0, "decode_tok_s": v, **_counts(name.startswith("spec"))}
        | {"draft_s": None, "payoff": None, "engine": name, "cell": 0, "repeat": repeat}
        | {"identity": ident, "tokens": [[1, 2, 3], [4, 5, 6]]}
        for repeat in range(repeats)
        for name, v in tok_s.items()
    ]
    facts = {"machine": machine_info(), "versions": version_info()}
    _save(path, _results(settings, facts, cells, samples, total=len(samples)))
    return path


def _counts(drafting: bool) -> dict[str, int]:
    return (
        {"drafts": 2, "draft_tokens": 4, "accepted": 3}
        if drafting
        else dict.fromkeys(("drafts", "draft_tokens", "accepted"), 0)
    )


def test_bench_spec_combine_reads_each_run_against_its_own_vanilla(tmp_path):
    """Runs of the same cell at different speeds: each engine's ratio is taken within its
    run, the table shows every run's and their median, a run on another machine makes its
    own cell, the plot is written."""
    import json

    from vllm_utio.benchmarking.results import cpu_label, machine_info
    from vllm_utio.benchmarking.spec_summary import combine, machine_tag

    one = _spec_run(tmp_path / "day1" / "a" / "spec.json", {"vanilla": 10.0, "utio-kernel": 20.0})
    fast = {"vanilla": 40.0, "utio-kernel": 60.0, "spec-throttle-utio-kernel": 66.0}
    two = _spec_run(tmp_path / "day2" / "a" / "spec.json", fast, identical=1)
    other = _spec_run(tmp_path / "day3" / "a" / "spec.json", {"vanilla": 5.0, "utio-kernel": 6.0})
    moved = json.loads(other.read_text())  # the third run on another machine
    moved["machine"] |= {"cpu": "Other CPU", "isa": "AVX2"}
    moved["machine"]["cpu_id"] = "vendor_id GenuineIntel cpu family 6 model 85"
    other.write_text(json.dumps(moved))
    assert machine_tag(moved["machine"]) == "Intel family 6 model 85"
    out = tmp_path / "sum" / "summary.json"
    assert combine([one, two, other], out) == 0
    rows = json.loads(out.read_text())["rows"]
    kernel = [r for r in rows if r["engine"] == "utio-kernel"]
    assert [r["speedup"] for r in kernel] == [2.0, 1.5, 1.2] and kernel[0]["run"] == "day1/a"
    (spec,) = [r for r in rows if r["engine"] == "spec-throttle-utio-kernel"]
    assert spec["vs_kernel"] == pytest.approx(1.1) and spec["acceptance"] == 0.75
    text = out.with_suffix(".md").read_text()
    here = f"wikipedia 4096 tok, b2 [{machine_tag(machine_info())}]"
    assert f"| {here} | 25.0 | 1.75x | 1.65x |" in text  # medians of this machine's runs
    assert f"| {here} | utio-kernel | 2 | **1.75** (2.00 / 1.50) | - | - | 0.00 |" in text
    assert f"| {here} | spec-throttle-utio-kernel | 1 | 1.65 | 1.10 | 0.75 |" in text
    assert "| 3/4 · 1 · 0 |" in text  # identity summed over both runs
    there = "wikipedia 4096 tok, b2 [Intel family 6 model 85]"
    assert f"| {there} | 5.0 | 1.20x | - |" in text  # never in this machine's median
    runs = [line for line in text.splitlines() if line.startswith("- `day")]
    assert cpu_label(machine_info()) in runs[0]  # each run names its machine
    assert "Other CPU (AVX2) [vendor_id GenuineIntel cpu family 6 model 85]" in runs[2]
    assert out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no such results file"):
        combine([tmp_path / "missing.json"], out)
    (tmp_path / "other.json").write_text(json.dumps({"kind": "long-context"}))
    with pytest.raises(SystemExit, match="not bench-spec results"):
        combine([one, tmp_path / "other.json"], out)
    before = one.read_text()  # -o left at a run's own results file: refused, not overwritten
    with pytest.raises(SystemExit, match="holds other results"):
        combine([one, two], one)
    assert one.read_text() == before
    assert combine([one, two], out) == 0  # an earlier summary is rewritten


def test_bench_spec_reads_every_engine_against_the_kernel_alone_per_repeat(tmp_path):
    """Each row but the kernel alone's carries its decode tok/s over the kernel alone's in
    the same repeat (drift that slows both cancels); a file saved before the column gets
    it, and its note, when re-rendered."""
    import json

    from vllm_utio.benchmarking.speculative import KERNEL_ALONE, kernel_note, render

    speeds = {"vanilla": 10.0, KERNEL_ALONE: 20.0, "spec-throttle-utio-kernel": 19.0}
    path = _spec_run(tmp_path / "d" / "a" / "spec.json", speeds, repeats=2)
    results = json.loads(path.read_text())
    ratios = {r["engine"]: r["vs_kernel"] for r in results["summary"]}
    assert ratios == {
        "vanilla": [0.5, 0.5],
        KERNEL_ALONE: None,
        "spec-throttle-utio-kernel": pytest.approx([0.95, 0.95]),
    }
    for s in results["samples"]:  # the second repeat: UTIO's engines both half as fast
        if s["repeat"] == 1 and s["engine"] != "vanilla":
            s["decode_tok_s"] /= 2
    for r in results["summary"]:  # as saved before the column
        del r["vs_kernel"]
    results["notes"].remove(kernel_note())
    path.write_text(json.dumps(results))
    assert render(path) == 0
    saved = json.loads(path.read_text())
    (spec,) = [r for r in saved["summary"] if r["engine"] == "spec-throttle-utio-kernel"]
    assert spec["vs_kernel"] == pytest.approx([0.95, 0.95])
    assert saved["notes"][-2] == kernel_note()
    table = path.with_suffix(".md").read_text()
    assert "| vanilla | 10.0 (10.0-10.0) | 1.00x | 0.50, 1.00 |" in table
    assert f"| {KERNEL_ALONE} | 20.0 (20.0-20.0) | 2.00x | - |" in table  # the row as saved
    assert "x | 0.95, 0.95 |" in table and f"- {kernel_note()}" in table


def test_render_finds_each_rows_cell_where_cells_repeat(tmp_path):
    """Runs saved before the per-repeat column could hold one cell twice (--short beside
    --context-lens 512): re-rendered, each row reads its own cell's samples."""
    import json

    from vllm_utio.benchmarking.results import machine_info, version_info
    from vllm_utio.benchmarking.speculative import KERNEL_ALONE, _results, _save, render

    settings = {"model": "m", "dtype": "bfloat16", "block_size": 32, "output_len": 3}
    settings |= {"repeats": 1, "tokens": 4, "temperature": 0.0, "interleaved": True}
    cell = {"workload": "wikipedia", "context": 512, "batch": 1, "prompts": ["a"]}
    cells = [cell, {**cell, "context": 64}, cell]
    speeds = [(10.0, 20.0), (10.0, 10.0), (10.0, 40.0)]  # vanilla, kernel alone per cell
    samples = [
        {"wall_s": 1.0, "decode_tok_s": v, "drafts": 0, "draft_tokens": 0, "accepted": 0}
        | {"draft_s": None, "payoff": None, "engine": name, "cell": c, "repeat": 0}
        | {"identity": None, "tokens": [[1, 2, 3]]}
        for c, pair in enumerate(speeds)
        for name, v in zip(("vanilla", KERNEL_ALONE), pair, strict=True)
    ]
    path = tmp_path / "spec.json"
    facts = {"machine": machine_info(), "versions": version_info()}
    _save(path, _results(settings, facts, cells, samples, total=len(samples)))
    results = json.loads(path.read_text())
    for row in results["summary"]:
        del row["vs_kernel"]
    path.write_text(json.dumps(results))
    assert render(path) == 0
    vanilla = [r for r in json.loads(path.read_text())["summary"] if r["engine"] == "vanilla"]
    assert [r["vs_kernel"] for r in vanilla] == [[0.5], [1.0], [0.25]]


def test_identity_is_counted_over_every_repeat(tmp_path):
    """A difference in a later repeat shows in the run's table, its render and the
    summary, also for a file whose table counted the first repeat only (before the
    fourteenth session)."""
    import json

    from vllm_utio.benchmarking.spec_summary import combine
    from vllm_utio.benchmarking.speculative import render

    path = _spec_run(tmp_path / "d" / "a" / "spec.json", {"vanilla": 10.0, "spec-x": 20.0}, 2, 2)
    results = json.loads(path.read_text())
    later = [s for s in results["samples"] if s["engine"] == "spec-x" and s["repeat"] == 1]
    far = {"prompt": 0, "step": 2, "top2_gap": 0.5, "top1_logit": 25.0}
    later[0]["identity"] = {"identical": 1, "outputs": 2, "near_ties": [], "mismatches": [far]}
    (row,) = [r for r in results["summary"] if r["engine"] == "spec-x"]
    assert row["identity"]["identical"] == 4  # the table as written, before that repeat changed
    path.write_text(json.dumps(results))
    assert render(path) == 0
    (row,) = [r for r in json.loads(path.read_text())["summary"] if r["engine"] == "spec-x"]
    assert (row["identity"]["identical"], row["identity"]["outputs"]) == (3, 4)
    assert row["identity"]["mismatches"] == [{**far, "repeat": 1}]
    table = path.with_suffix(".md").read_text()
    assert "| 3/4 | 0 | 1 |" in table
    assert (
        "- wikipedia 4096, b2, spec-x: prompt 0 (repeat 1) step 2: gap 0.5, top logit 25 "
        "(bf16 step 0.125) **not a near tie**"
    ) in table
    out = tmp_path / "summary.json"
    assert combine([path], out) == 0
    text = out.with_suffix(".md").read_text()
    assert "| 3/4 · 0 · 1 |" in text and "## Other mismatches (not near ties)" in text


class _Head(torch.nn.Module):
    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden))
        self.bias = None


class _Proc:
    scale, soft_cap, logits_as_input, org_vocab_size = 1.0, None, False, 1000


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lm_head = _Head(1024, 16)  # padded: 1000 real token ids
        self.body = torch.nn.Linear(16, 16, bias=False)
        self.logits_processor = _Proc()


def test_draft_head_is_the_argmax_over_its_first_rows():
    from vllm_utio.integration.self_draft import DraftHead

    model = _Model()
    head = DraftHead(model, 300)
    hidden = torch.randn(64, 16)
    full = hidden @ model.lm_head.weight.T
    assert torch.equal(head(hidden), full[:, :300].argmax(-1))
    # a view of the model's weight, not a copy
    assert head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    # the share of all weights a draft step no longer reads: rows 300..1023 of the head
    assert head.saved_share == pytest.approx(724 * 16 / (1024 * 16 + 16 * 16))


def test_draft_head_refuses_what_it_cannot_prune():
    from vllm_utio.integration.self_draft import DraftHead

    model = _Model()
    with pytest.raises(ValueError, match=r"draft.vocab is 1001, more than the model's 1000"):
        DraftHead(model, 1001)
    model.logits_processor.scale = -1.0
    with pytest.raises(ValueError, match="non-positive"):
        DraftHead(model, 300)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(1024))
    with pytest.raises(ValueError, match="has a bias"):
        DraftHead(model, 300)
    with pytest.raises(ValueError, match="vocab"):
        parse_utio_config({"speculate": {"draft": {"vocab": 100}}})  # fewer than 256


def test_draft_payoff_keeps_drafting_only_while_it_yields_tokens_faster():
    """The measured payoff of drafting (per proposal-to-proposal cycle, seconds per token
    yielded): a draft cycle that costs 1.6 plain steps pays at 2 tokens, not at 1.5."""
    from vllm_utio.path_payoff import PathPayoff

    def drive(tokens_when_drafting: float) -> list[bool]:
        payoff = PathPayoff("measured", base="plain", alt="draft")
        chosen = []
        for _ in range(40):
            draft = payoff.choose(8)
            seconds, tokens = (1.6, tokens_when_drafting * 8) if draft else (1.0, 8)
            payoff.observe(8, draft, seconds, tokens)
            chosen.append(draft)
        return chosen

    assert drive(2.0)[-8:] == [True] * 8
    losing = drive(1.5)
    assert losing[:2] == [True, False] and sum(losing) <= 5  # then re-checked now and then
    always = PathPayoff("always", base="plain", alt="draft")
    assert always.choose(8) and always.as_dict()["size_classes"] == {}


def test_drafter_times_each_cycle_on_the_rows_it_proposed_for():
    """A cycle (one proposal to the next) counts the tokens its rows yielded; a cycle whose
    rows are all gone (the engine was idle in between) is not a step and is dropped."""
    from vllm_utio.integration.self_draft import SelfDrafter
    from vllm_utio.path_payoff import PathPayoff

    drafter = SelfDrafter.__new__(SelfDrafter)  # no runner: only the cycle bookkeeping
    drafter.payoff = PathPayoff("measured", base="plain", alt="draft")
    drafter._cycle = (10.0, True, {"a", "b"})
    drafter._time_cycle(10.5, ["a", "b", "c"], [[1, 2, 3], [4], [5]], True)  # c: new
    times = drafter.payoff.classes[2]  # 2 rows
    assert times.alt_s == pytest.approx(0.5 / 4) and times.base_s is None
    drafter._cycle = (20.0, False, {"a", "b"})
    drafter._time_cycle(99.0, ["x"], [[7]], True)
    assert times.base_s is None and drafter._cycle is None
    drafter._cycle = (30.0, False, {"a", "b"})  # its step also prefilled: dropped
    drafter._time_cycle(32.0, ["a", "b"], [[1], [2]], False)
    assert times.base_s is None and drafter._cycle is None


def test_a_step_that_prefills_is_not_a_decode_step():
    """What the drafter's timing keeps: steps of last tokens plus drafts, nothing else."""
    from types import SimpleNamespace

    from vllm_utio.integration.self_draft import _decode_only

    def step(scheduled: dict[str, int], spec: dict[str, list[int]]) -> bool:
        return _decode_only(
            SimpleNamespace(num_scheduled_tokens=scheduled, scheduled_spec_decode_tokens=spec)
        )

    assert step({"a": 1, "b": 5}, {"b": [7, 8, 9, 10]})
    assert step({"a": 1}, {})
    assert not step({"a": 1, "b": 512}, {})  # b: a prefill chunk
    assert not step({"a": 3}, {"a": [7]})  # more than its last token and its drafts


def test_drafting_must_win_by_its_margin():
    """With margin 1.05, drafting 3% faster per token is not enough; 10% faster is."""
    from vllm_utio.path_payoff import PathPayoff

    def drafted(draft_s: float) -> int:
        payoff = PathPayoff("measured", base="plain", alt="draft", margin=1.05)
        count = 0
        for _ in range(64):
            draft = payoff.choose(8)
            payoff.observe(8, draft, draft_s if draft else 1.0, 1)
            count += draft
        return count

    assert drafted(0.97) <= 8  # the first measurement, then re-checks only
    assert drafted(0.90) >= 56
    assert PathPayoff("measured", "plain", "draft", margin=1.05).as_dict()["margin"] == 1.05


def test_a_new_size_starts_on_its_nearest_measured_sizes_path():
    """Drafting loses at 32 rows; a batch's ragged last steps (3 rows here, 4x slower per
    token drafting) then run plain for 8 steps and measure drafting once, where without
    seeding a new size drafts first. Where drafting wins at the nearest size, a new size
    drafts from its first step."""
    from vllm_utio.path_payoff import PathPayoff

    def tail(seed: bool, draft_at_32: float) -> list[bool]:
        payoff = PathPayoff("measured", "plain", "draft", 1.05, 32, seed_nearest=seed)
        for _ in range(10):
            draft = payoff.choose(32)
            payoff.observe(32, draft, draft_at_32 if draft else 1.0, 1)
        chosen = []
        for _ in range(10):
            draft = payoff.choose(3)
            payoff.observe(3, draft, 4.0 if draft else 1.0, 1)
            chosen.append(draft)
        return chosen

    assert tail(False, 1.03)[:2] == [True, False]  # unseeded: drafting measured first
    assert tail(True, 1.03) == [False] * 8 + [True, False]
    assert tail(True, 0.8)[:8] == [True] * 8  # drafting won at 32: drafts, then measures
    solo = PathPayoff("measured", "plain", "draft", 1.05, 32, seed_nearest=True)
    assert solo.choose(1) is True  # nothing measured yet: as without seeding


def test_one_slow_step_does_not_decide_a_measurement():
    """With measure_steps 3 a path's (re-)measurement is the median of 3 steps: one slow
    plain step (a page fault, a neighbour waking) no longer makes a losing draft look
    faster for the next 8 steps; with one step per measurement it does."""
    from vllm_utio.path_payoff import PathPayoff

    def drafted(measure_steps: int) -> list[bool]:
        payoff = PathPayoff("measured", "plain", "draft", margin=1.05, measure_steps=measure_steps)
        plain_steps, chosen = 0, []
        for _ in range(24):
            draft = payoff.choose(1)
            if not draft:
                plain_steps += 1
            slow = not draft and plain_steps == 1  # the first plain step ever: 40% slow
            payoff.observe(1, draft, 1.1 if draft else (1.4 if slow else 1.0), 1)
            chosen.append(draft)
        return chosen

    one = drafted(1)  # draft, plain (slow), then drafting wins until the re-check at 8
    assert one[:2] == [True, False] and all(one[2:9])
    three = drafted(3)  # drafted 3 (measuring), plain 3 (median 1.0), then plain
    assert three[:6] == [True] * 3 + [False] * 3 and not any(three[6:13])
    # the re-check of drafting: 3 steps in a row, then plain again
    assert three[13:16] == [True] * 3 and not any(three[16:])


def test_a_measurement_of_long_steps_ends_at_its_time():
    """The drafter's measurement: up to MEASURE_CYCLES short (batch-1) cycles, but one
    long (large-batch) cycle once it lasts MEASURE_S: measuring a losing path longer there
    only costs more (4k, batch 32: ~4% of the kernel alone's speed)."""
    from vllm_utio.integration.self_draft import MEASURE_CYCLES, MEASURE_S
    from vllm_utio.path_payoff import PathPayoff

    def first_choices(step_s: float) -> list[bool]:
        payoff = PathPayoff("measured", "plain", "draft", 1.05, 32, MEASURE_CYCLES, MEASURE_S)
        chosen = []
        for _ in range(2 * MEASURE_CYCLES):
            draft = payoff.choose(1)
            payoff.observe(1, draft, step_s * (1.2 if draft else 1.0), 1)
            chosen.append(draft)
        return chosen

    assert MEASURE_CYCLES == 3 and MEASURE_S == 0.1
    assert first_choices(0.035) == [True] * 3 + [False] * 3  # 3 x 35-42 ms: 3 steps each
    assert first_choices(0.25) == [True, False, False, False, False, False]  # one each
    # a plain cycle the payoff was not asked about (the cost model proposed no drafts)
    # while drafting is being measured counts for plain, not in drafting's measurement
    payoff = PathPayoff("measured", "plain", "draft", 1.05, 32, MEASURE_CYCLES, MEASURE_S)
    for draft, seconds in ((True, 0.05), (False, 0.01), (True, 0.04), (True, 0.06)):
        payoff.observe(1, draft, seconds, 1)
    times = payoff.classes[1]
    assert times.alt_s == pytest.approx(0.05) and times.base_s is None


def test_payoff_times_small_sizes_apart():
    """Up to exact_upto every size is its own class (a step's time per token falls with
    its rows: 5 rows must not stand in for 8); above it, powers of two."""
    from vllm_utio.path_payoff import PathPayoff, size_class

    assert [size_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    assert [size_class(n, 8) for n in (3, 5, 8, 9, 16, 17)] == [3, 5, 8, 16, 16, 32]
    payoff = PathPayoff("measured", base="plain", alt="draft", exact_upto=8)
    for rows, draft_s, plain_s in ((8, 0.9, 1.0), (5, 1.6, 1.4)):  # per step, 1 token a row
        for _ in range(2):  # draft first, then plain
            draft = payoff.choose(rows)
            payoff.observe(rows, draft, (draft_s if draft else plain_s), rows)
    assert payoff.choose(8) is True and payoff.choose(5) is False
    assert sorted(payoff.as_dict()["size_classes"]) == ["5", "8"]
