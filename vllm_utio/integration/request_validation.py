"""Per-request UTIO controls checked at admission, in the process that receives requests.

Wraps ``vllm.v1.engine.input_processor.InputProcessor._validate_params``, which vLLM 0.32
runs for every request (``LLM.generate``, ``LLMEngine``/``AsyncLLM.add_request``) before
anything is sent to the engine core. A bad ``utio_*`` value then fails the way vLLM's own
parameter errors do: a ``ValueError`` offline (added requests of the same call are
aborted), an HTTP 400 on the OpenAI server (a ``VLLMValidationError``, whose ``param``
names the field). Installed by :mod:`.engine_args` when an engine with UTIO enabled is
configured (after the version check).
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.exceptions import VLLMValidationError

from vllm_utio.config import UtioConfig, utio_config_from_additional
from vllm_utio.request_controls import RequestControlError, validate_request_controls

_MARK = "_vllm_utio_request_validation"
_CFG_ATTR = "_vllm_utio_request_cfg"


class UtioRequestError(VLLMValidationError, RequestControlError):
    """A bad UTIO request control, as vLLM's serving layer expects it: a
    ``VLLMValidationError`` (HTTP 400, ``param`` = the field) that is also a
    :class:`RequestControlError` (a ``ValueError``)."""

    def __init__(self, err: RequestControlError) -> None:
        VLLMValidationError.__init__(self, str(err.args[0]), parameter=err.field)
        self.field = err.field


def install_request_validation() -> None:
    """Wrap ``InputProcessor._validate_params`` once per process (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, _MARK, False):
        return
    original = InputProcessor._validate_params

    @functools.wraps(original)
    def _validate_params(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, params, *args, **kwargs)  # vLLM's own checks first
        extra_args = getattr(params, "extra_args", None)  # SamplingParams only
        if extra_args:
            cfg = _engine_config(self)
            if cfg.enabled:
                try:
                    validate_request_controls(extra_args, cfg)
                except RequestControlError as err:
                    raise UtioRequestError(err) from None
        return result

    InputProcessor._validate_params = _validate_params  # type: ignore[method-assign]
    setattr(InputProcessor, _MARK, True)


def _engine_config(processor: Any) -> UtioConfig:
    """The UTIO config of the engine this processor feeds, parsed once per processor.

    Read from the processor's own ``vllm_config`` (``additional_config`` already holds the
    artifact-expanded, validated settings) rather than a process-wide record: one process
    may hold several engines (UTIO on and off, different buckets)."""
    cfg = getattr(processor, _CFG_ATTR, None)
    if cfg is None:
        cfg = utio_config_from_additional(processor.vllm_config.additional_config)
        setattr(processor, _CFG_ATTR, cfg)
    return cfg
