"""Config validation: every bad value fails with a message naming field, value and rule."""

from __future__ import annotations

import json

import pytest

from vllm_utio.config import (
    UtioConfig,
    UtioConfigError,
    load_utio_config_arg,
    parse_utio_config,
    utio_config_from_additional,
)
from vllm_utio.integration.engine_args import merge_cli_into_additional

SHALLOW = {"name": "shallow", "max_score": 0.3, "keep_first": 10, "keep_last": 8}
DEEP = {"name": "deep", "max_score": 0.6, "keep_first": 12, "keep_last": 10}

BAD_CONFIGS = [
    # (config, substrings the error must contain)
    ({"enabled": "maybe"}, ["'enabled'", "'maybe'"]),
    ({"bucket": []}, ["field 'bucket'", "unknown key", "buckets"]),
    (
        {"buckets": [{**SHALLOW, "max_score": 1.5}]},
        ["buckets[0].max_score", "1.5", "less than or equal to 1"],
    ),
    ({"buckets": [{**SHALLOW, "max_score": 0.0}]}, ["buckets[0].max_score", "greater than 0"]),
    (
        {"buckets": [{**SHALLOW, "keep_first": 0}]},
        ["buckets[0].keep_first", "greater than or equal to 1"],
    ),
    ({"buckets": [{**SHALLOW, "keep_last": -2}]}, ["buckets[0].keep_last", "-2"]),
    ({"buckets": [{**SHALLOW, "name": ""}]}, ["buckets[0].name", "at least 1 character"]),
    ({"buckets": [{**SHALLOW, "depth": 3}]}, ["buckets[0].depth", "unknown key", "keep_first"]),
    ({"buckets": [DEEP, SHALLOW]}, ["increasing max_score", "buckets[0].max_score=0.6"]),
    (
        {"buckets": [{**SHALLOW, "keep_first": 14}, DEEP]},
        ["plans must nest", "buckets[0] keeps (14 first"],
    ),
    ({"buckets": [SHALLOW, {**DEEP, "name": "shallow"}]}, ["bucket names must be unique"]),
    ({"router": "oracle"}, ["field 'router'", "'oracle'", "'surrogate', 'forced' or 'probe'"]),
    ({"schedule": "fast"}, ["field 'schedule'", "'nested' or 'per_bucket'"]),
    ({"execution": "scatter"}, ["field 'execution'", "'auto', 'prefix' or 'gather'"]),
    ({"kv_policy": "zeros"}, ["field 'kv_policy'", "'frozen_state'"]),
    ({"min_bucket_size": 0}, ["field 'min_bucket_size'", "greater than or equal to 1"]),
    ({"min_batch_size": -1}, ["field 'min_batch_size'", "-1"]),
    ({"min_saved_fraction": 1.0}, ["field 'min_saved_fraction'", "less than 1"]),
    ({"signal": {"entropy": -0.1}}, ["signal.entropy", "greater than or equal to 0"]),
    (
        {"signal": {"entropy": 0, "attention_heat": 0, "outlier": 0, "varentropy": 0}},
        ["field 'signal'", "at least one signal weight must be > 0"],
    ),
    ({"signal": {"entropi": 1.0}}, ["signal.entropi", "unknown key", "attention_heat, entropy"]),
    ({"stats_log_interval_s": -5}, ["stats_log_interval_s", "-5"]),
    ({"routing_layer": -1}, ["field 'routing_layer'", "-1"]),
    ("enabled", ["expected a JSON object", "str"]),
]


@pytest.mark.parametrize(
    ("raw", "expected"), BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))]
)
def test_bad_config_names_field_and_rule(raw, expected):
    with pytest.raises(UtioConfigError) as info:
        parse_utio_config(raw)
    message = str(info.value)
    assert message.startswith("Invalid UTIO config")
    for part in expected:
        assert part in message, f"{part!r} missing from: {message}"


MODEL_CHECKS = [
    (
        {"buckets": [{**SHALLOW, "keep_first": 20, "keep_last": 15}]},
        ["buckets[0]", "35 exceeds", "30"],
    ),
    (
        {"depth_floor": 20, "buckets": [SHALLOW]},
        ["below depth_floor=20", "keep_first + keep_last >= 20"],
    ),
    ({"routing_layer": 30}, ["routing_layer", "30", "0..29"]),
    ({"depth_floor": 31}, ["depth_floor", "1..30"]),
]


@pytest.mark.parametrize(("raw", "expected"), MODEL_CHECKS)
def test_model_dependent_checks(raw, expected):
    cfg = parse_utio_config(raw)  # valid on its own
    with pytest.raises(UtioConfigError) as info:
        cfg.check_against_model(30)
    for part in expected:
        assert part in str(info.value)


def test_defaults_are_off_and_valid():
    cfg = utio_config_from_additional(None)
    assert cfg == UtioConfig()
    assert not cfg.enabled and cfg.buckets == () and cfg.router == "surrogate"
    parse_utio_config({"enabled": True, "buckets": [SHALLOW, DEEP]}).check_against_model(30)


def test_cli_flags_fold_into_additional_config(tmp_path):
    merged = merge_cli_into_additional({"other": 1}, True, json.dumps({"buckets": [SHALLOW]}))
    assert merged == {"other": 1, "utio": {"buckets": [SHALLOW], "enabled": True}}
    path = tmp_path / "utio.json"
    path.write_text(json.dumps({"min_batch_size": 4}))
    merged = merge_cli_into_additional({"utio": {"router": "forced"}}, False, str(path))
    assert merged == {"utio": {"router": "forced", "min_batch_size": 4}}
    assert merge_cli_into_additional(None, False, None) == {}


def test_utio_config_arg_errors(tmp_path):
    with pytest.raises(UtioConfigError, match="neither inline JSON"):
        load_utio_config_arg(str(tmp_path / "missing.json"))
    with pytest.raises(UtioConfigError, match="not valid JSON"):
        load_utio_config_arg("{not json")
    with pytest.raises(UtioConfigError, match="expected a JSON object"):
        (tmp_path / "list.json").write_text("[1, 2]")
        load_utio_config_arg(str(tmp_path / "list.json"))


def test_real_vllm_parser_folds_utio_flags_into_additional_config():
    """The flags go through vLLM's own parser and EngineArgs.from_cli_args."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_utio

    vllm_utio.register()  # what vLLM's plugin loader does in every process
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(
        ["--model", "m", "--enable-utio", "--utio-config", json.dumps({"buckets": [SHALLOW]})]
    )
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config == {"utio": {"buckets": [SHALLOW], "enabled": True}}
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert "utio" not in (plain.additional_config or {})
    groups = {g.title for g in parser._action_groups}
    assert "UTIO" in groups


def test_version_check(monkeypatch):
    from vllm_utio.integration import version

    assert version.is_supported("0.32.0") and version.is_supported("0.32.7+cpu")
    assert not version.is_supported("0.33.0") and not version.is_supported("dev")
    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.33.1")
    with pytest.raises(
        version.UnsupportedVllmError, match=r"supports vLLM 0\.32\.x only.*0\.33\.1"
    ):
        version.check_vllm_version()
