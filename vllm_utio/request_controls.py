"""Per-request UTIO controls, carried in ``SamplingParams.extra_args``.

vLLM's OpenAI server fills ``extra_args`` from a request's ``vllm_xargs``, so a client
sends e.g. ``{"vllm_xargs": {"utio_attention": "dense"}}``. The keys:

- ``utio_bucket``: pin the request's depth to a bucket by name (``"full"``: every
  layer). Honoured by the pre-step routers (forced and surrogate); the probe router
  decides mid-forward and honours it too.
- ``utio_attention``: ``"dense"`` opts the request out of every sparse attention policy
  (its decode tokens read the whole cache); ``"default"`` keeps the configured policy.
- ``utio_speculate``: ``"off"`` opts the request out of self-speculation (plain decode
  steps; the output is the same, speculation is lossless); ``"default"`` keeps it.

Values are names, never paths. Every other ``utio_*`` key, a value of the wrong type or
an unknown name is refused with a message naming the field and the allowed values (the
server turns it into a 400). ``utio_force_tokens`` is the evaluation's teacher-forcing key
(:mod:`vllm_utio.evaluation.quality`): not a control, let through untouched (its logits
processor checks it). Pure logic: no vLLM import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_utio.config import UtioConfig

BUCKET_KEY = "utio_bucket"
ATTENTION_KEY = "utio_attention"
ATTENTION_VALUES = ("default", "dense")
SPECULATE_KEY = "utio_speculate"
SPECULATE_VALUES = ("default", "off")
FULL_DEPTH = "full"
KEYS = (BUCKET_KEY, ATTENTION_KEY, SPECULATE_KEY)
# ``utio_*`` keys owned by other parts of the plugin, not judged here.
FORCE_TOKENS_KEY = "utio_force_tokens"
PASSTHROUGH_KEYS = (FORCE_TOKENS_KEY,)


class RequestControlError(ValueError):
    """A request's UTIO control is invalid; the message names the field and what is allowed."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the offending extra_args key (the server's error ``param``)


def bucket_names(cfg: UtioConfig) -> list[str]:
    return [FULL_DEPTH, *(b.name for b in cfg.buckets)]


def validate_request_controls(extra_args: Mapping[str, Any] | None, cfg: UtioConfig) -> None:
    """Raise :class:`RequestControlError` unless every ``utio_*`` key of ``extra_args`` is
    known and has an allowed value for the engine's config ``cfg``."""
    if not extra_args:
        return
    for key, value in extra_args.items():
        if not str(key).startswith("utio_") or key in PASSTHROUGH_KEYS:
            continue  # other plugins' and vLLM's own keys are not ours to judge
        if key == BUCKET_KEY:
            _check_name(key, value, bucket_names(cfg))
        elif key == ATTENTION_KEY:
            _check_name(key, value, list(ATTENTION_VALUES))
        elif key == SPECULATE_KEY:
            _check_name(key, value, list(SPECULATE_VALUES))
        else:
            raise RequestControlError(
                f"{key!r} is not a UTIO request control; allowed keys: {list(KEYS)}",
                str(key),
            )


def _check_name(key: str, value: Any, allowed: list[str]) -> None:
    if not isinstance(value, str):
        raise RequestControlError(
            f"UTIO request control {key!r} must be a string, got {type(value).__name__} "
            f"{value!r}; allowed values: {allowed}",
            key,
        )
    if value not in allowed:
        raise RequestControlError(
            f"UTIO request control {key!r}: unknown value {value!r}; allowed values: {allowed}",
            key,
        )


def pinned_bucket(extra_args: Mapping[str, Any] | None) -> str | None:
    """The bucket name a request pins (None: the router decides)."""
    value = (extra_args or {}).get(BUCKET_KEY)
    return value if isinstance(value, str) else None


def wants_dense(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether the request opted out of sparse attention."""
    return (extra_args or {}).get(ATTENTION_KEY) == "dense"


def wants_no_speculation(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether the request opted out of self-speculation."""
    return (extra_args or {}).get(SPECULATE_KEY) == "off"
