"""Hooks on ``vllm.engine.arg_utils.EngineArgs``: CLI flags and worker selection.

- ``add_cli_args``: adds the "UTIO" argument group (``--enable-utio``, ``--utio-config``)
  to ``vllm serve`` and every other command built on EngineArgs.
- ``from_cli_args``: folds those flags into ``additional_config["utio"]``, the one
  place UTIO settings live (``LLM(additional_config=...)`` uses it directly).
- ``create_engine_config``: validates the UTIO config (clear errors before any
  process is spawned), selects the UTIO worker class, expands a calibration
  ``artifact`` (checked against the model), and checks model-dependent values once the
  model's depth is known, sets vLLM's ``speculative_config`` for ``speculate``
  (:mod:`.self_draft`) with the executor that takes each step's drafts from its reply
  (:mod:`.draft_handoff`), and installs the admission check of per-request ``utio_*``
  controls (:mod:`.request_validation`). With UTIO off it changes nothing.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from vllm_utio.config import (
    UTIO_KEY,
    UtioConfigError,
    load_utio_config_arg,
    utio_config_from_additional,
)
from vllm_utio.integration.version import (
    SUPPORTED_VLLM,
    check_vllm_version,
    installed_vllm_version,
    is_supported,
)
from vllm_utio.log import get_logger

logger = get_logger(__name__)

_MARK = "_vllm_utio_hooked"
CPU_WORKER = "vllm_utio.integration.cpu_worker.UtioCPUWorker"
GPU_WORKER = "vllm_utio.integration.gpu_worker.UtioGPUWorker"


def install_engine_arg_hooks() -> None:
    """Wrap EngineArgs once per process (vLLM may load plugins more than once)."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _MARK, False):
        return
    version = installed_vllm_version()
    if not is_supported(version):
        # UTIO off keeps working (the flags are all we add); --enable-utio will refuse.
        logger.warning(
            "vllm-utio is written for vLLM %s.x but vLLM %s is installed; UTIO cannot be "
            "enabled on this version",
            ".".join(map(str, SUPPORTED_VLLM)),
            version,
        )
    _wrap_add_cli_args(EngineArgs)
    _wrap_from_cli_args(EngineArgs)
    _wrap_create_engine_config(EngineArgs)
    setattr(EngineArgs, _MARK, True)


def add_utio_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "UTIO", "Adaptive-depth inference (vllm-utio plugin): fewer layers for easy tokens."
    )
    group.add_argument(
        "--enable-utio",
        action="store_true",
        default=False,
        help="Turn on UTIO adaptive depth (sets additional_config['utio']['enabled']).",
    )
    group.add_argument(
        "--utio-config",
        type=str,
        default=None,
        metavar="JSON_OR_PATH",
        help="UTIO settings as inline JSON or a path to a JSON file; merged into "
        "additional_config['utio']. See docs/config.md for every field.",
    )


def merge_cli_into_additional(
    additional: dict[str, Any] | None, enable: bool, config_arg: str | None
) -> dict[str, Any]:
    """additional_config with the UTIO flags folded in (flags win over existing keys)."""
    merged = dict(additional or {})
    utio = dict(merged.get(UTIO_KEY) or {})
    if config_arg is not None:
        utio.update(load_utio_config_arg(config_arg))
    if enable:
        utio["enabled"] = True
    if utio:
        merged[UTIO_KEY] = utio
    return merged


def _wrap_add_cli_args(cls: type) -> None:
    original = cls.add_cli_args

    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        add_utio_arguments(parser)
        return parser

    cls.add_cli_args = staticmethod(add_cli_args)


def _wrap_from_cli_args(cls: type) -> None:
    original = cls.from_cli_args.__func__

    @functools.wraps(original)
    def from_cli_args(klass, args: argparse.Namespace):
        engine_args = original(klass, args)
        enable = bool(getattr(args, "enable_utio", False))
        config_arg = getattr(args, "utio_config", None)
        if enable or config_arg is not None:
            engine_args.additional_config = merge_cli_into_additional(
                engine_args.additional_config, enable, config_arg
            )
        return engine_args

    cls.from_cli_args = classmethod(from_cli_args)


def _wrap_create_engine_config(cls: type) -> None:
    original = cls.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        cfg = utio_config_from_additional(self.additional_config)
        if cfg.enabled:
            check_vllm_version()
            _select_worker(self)
            if cfg.artifact is not None:
                cfg = _expand_artifact(self)
            if cfg.speculate is not None:
                _enable_self_speculation(self, cfg)
        vllm_config = original(self, *args, **kwargs)
        if cfg.enabled:
            model_config = vllm_config.model_config
            cfg.check_against_model(
                model_config.get_num_layers(vllm_config.parallel_config),
                vllm_config.cache_config.block_size,
            )
            if cfg.router == "probe":  # fail here, not inside a worker process
                from vllm_utio.routing.probe import load_checked_probe

                load_checked_probe(
                    cfg,
                    model_config.get_hidden_size(),
                    model_config.get_num_layers(vllm_config.parallel_config),
                )
            if cfg.speculate is not None:  # drafts ride on each step's reply
                from vllm_utio.integration.draft_handoff import use_draft_handoff

                use_draft_handoff(vllm_config)
            # Requests enter through this process (LLM / API server): check their
            # utio_* controls at admission, so a bad value is a ValueError / HTTP 400.
            from vllm_utio.integration.request_validation import install_request_validation

            install_request_validation()
        return vllm_config

    cls.create_engine_config = create_engine_config


def _expand_artifact(engine_args: Any) -> Any:
    """Replace ``artifact`` by the settings it holds (checked against the model), so the
    workers get a plain config and never re-read the artifact."""
    from vllm_utio.artifact import resolve_artifact

    raw = dict(engine_args.additional_config[UTIO_KEY])
    resolved = resolve_artifact(raw, engine_args.model)
    engine_args.additional_config = {**engine_args.additional_config, UTIO_KEY: resolved}
    cfg = utio_config_from_additional(engine_args.additional_config)
    logger.info(
        "UTIO artifact %s: buckets %s, router=%s",
        raw["artifact"],
        [b.name for b in cfg.buckets],
        cfg.router,
    )
    return cfg


def _enable_self_speculation(engine_args: Any, cfg: Any) -> None:
    """UTIO's ``speculate`` drives vLLM's own speculative decoding (custom proposer)."""
    from vllm_utio.integration.self_draft import speculative_config

    if engine_args.speculative_config:
        raise UtioConfigError(
            "UTIO config field 'speculate' sets vLLM's speculative decoding itself, but "
            f"speculative_config is also set ({engine_args.speculative_config!r}); allowed: "
            "one of them"
        )
    engine_args.speculative_config = speculative_config(cfg.speculate)


def _select_worker(engine_args: Any) -> None:
    from vllm.platforms import current_platform

    ours = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER
    if engine_args.worker_cls in ("auto", ours):
        engine_args.worker_cls = ours
        return
    raise UtioConfigError(
        f"UTIO needs its own worker class, but --worker-cls is set to "
        f"{engine_args.worker_cls!r}; allowed with UTIO enabled: 'auto' or {ours!r}"
    )
