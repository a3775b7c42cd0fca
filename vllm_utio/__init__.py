"""vllm-utio: adaptive-depth (UTIO) inference as a vLLM general plugin.

vLLM calls :func:`register` in every process it starts (API server, engine core,
workers), possibly several times, so it is cheap and idempotent: it only wraps a few
``EngineArgs`` methods to add the ``--enable-utio`` / ``--utio-config`` flags and to
select the UTIO worker when the feature is on. Worker and runner code is imported
by vLLM itself, by class path, only when UTIO is enabled.
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from vllm_utio.integration.engine_args import install_engine_arg_hooks

    install_engine_arg_hooks()
