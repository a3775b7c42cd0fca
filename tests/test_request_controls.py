"""Per-request UTIO controls (``vllm_xargs`` / ``SamplingParams.extra_args``): what is
accepted, and that every refusal names the field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_utio.config import parse_utio_config
from vllm_utio.request_controls import (
    ATTENTION_KEY,
    BUCKET_KEY,
    FORCE_TOKENS_KEY,
    RequestControlError,
    pinned_bucket,
    validate_request_controls,
    wants_dense,
)

CFG = parse_utio_config(
    {
        "enabled": True,
        "buckets": [
            {"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10},
            {"name": "mid", "max_score": 0.6, "keep_first": 14, "keep_last": 12},
        ],
    }
)


@pytest.mark.parametrize(
    "extra_args",
    [
        None,
        {},
        {BUCKET_KEY: "shallow"},
        {BUCKET_KEY: "mid"},
        {BUCKET_KEY: "full"},
        {ATTENTION_KEY: "dense"},
        {ATTENTION_KEY: "default"},
        {BUCKET_KEY: "shallow", ATTENTION_KEY: "dense"},
        # Not ours to judge: vLLM's own keys, other plugins', the evaluation's forcing key.
        {"kv_transfer_params": {"x": 1}, "my_plugin_knob": 7, "utio": "x", "UTIO_BUCKET": 1},
        {FORCE_TOKENS_KEY: [1, 2, 3], BUCKET_KEY: "full"},
    ],
)
def test_good_controls_pass(extra_args: dict[str, Any] | None) -> None:
    validate_request_controls(extra_args, CFG)


BAD = [
    # (extra_args, field, substrings the message must contain)
    (
        {BUCKET_KEY: "no_such_bucket"},
        BUCKET_KEY,
        ["'no_such_bucket'", "['full', 'shallow', 'mid']"],
    ),
    ({BUCKET_KEY: "Shallow"}, BUCKET_KEY, ["'Shallow'", "allowed values"]),
    ({BUCKET_KEY: ""}, BUCKET_KEY, ["''", "allowed values"]),
    ({BUCKET_KEY: 7}, BUCKET_KEY, ["must be a string", "int 7", "['full', 'shallow', 'mid']"]),
    ({BUCKET_KEY: 0.5}, BUCKET_KEY, ["must be a string", "float"]),
    ({BUCKET_KEY: None}, BUCKET_KEY, ["must be a string", "NoneType"]),
    ({BUCKET_KEY: ["shallow"]}, BUCKET_KEY, ["must be a string", "list"]),
    ({ATTENTION_KEY: "weird"}, ATTENTION_KEY, ["'weird'", "['default', 'dense']"]),
    ({ATTENTION_KEY: True}, ATTENTION_KEY, ["must be a string", "bool", "['default', 'dense']"]),
    (
        {"utio_foo": "x"},
        "utio_foo",
        ["not a UTIO request control", "['utio_bucket', 'utio_attention', 'utio_speculate']"],
    ),
    ({"utio_buckets": "shallow"}, "utio_buckets", ["allowed keys", "'utio_bucket'"]),
    # A bad control is refused even next to good and foreign keys.
    ({"other": 1, BUCKET_KEY: "mid", ATTENTION_KEY: "sparse"}, ATTENTION_KEY, ["'sparse'"]),
]


@pytest.mark.parametrize(("extra_args", "field", "needles"), BAD)
def test_bad_controls_name_field_and_allowed(
    extra_args: dict[str, Any], field: str, needles: list[str]
) -> None:
    with pytest.raises(RequestControlError) as info:
        validate_request_controls(extra_args, CFG)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert repr(field) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bucket_names_follow_the_engine_config() -> None:
    single = parse_utio_config(
        {
            "enabled": True,
            "buckets": [{"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10}],
        }
    )
    validate_request_controls({BUCKET_KEY: "mid"}, CFG)
    with pytest.raises(RequestControlError, match=r"allowed values: \['full', 'shallow'\]"):
        validate_request_controls({BUCKET_KEY: "mid"}, single)


def test_readers() -> None:
    assert pinned_bucket(None) is None
    assert pinned_bucket({BUCKET_KEY: "mid"}) == "mid"
    assert pinned_bucket({BUCKET_KEY: 3}) is None
    assert wants_dense({ATTENTION_KEY: "dense"})
    assert not wants_dense({ATTENTION_KEY: "default"})
    assert not wants_dense(None)


def test_server_maps_the_error_to_a_400_naming_the_field() -> None:
    # The integration's error is what vLLM's serving layer turns into an OpenAI error.
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    from vllm_utio.integration.request_validation import UtioRequestError

    with pytest.raises(RequestControlError) as info:
        validate_request_controls({BUCKET_KEY: "nope"}, CFG)
    err = UtioRequestError(info.value)
    assert isinstance(err, ValueError) and isinstance(err, VLLMValidationError)
    assert isinstance(err, RequestControlError) and err.field == BUCKET_KEY
    response = create_error_response(err)
    assert response.error.code == 400
    assert response.error.type == "BadRequestError"
    assert response.error.param == BUCKET_KEY
    assert "'nope'" in response.error.message
    assert "['full', 'shallow', 'mid']" in response.error.message
