"""Worker methods callable through ``LLM.collective_rpc`` (offline stats, introspection)."""

from __future__ import annotations

from typing import Any


class UtioWorkerRpcMixin:
    def utio_stats(self, reset: bool = False) -> dict[str, Any]:
        """This worker's UTIO totals (see :class:`vllm_utio.stats.UtioStats`)."""
        out = self.model_runner.utio_stats_dict(reset=reset)
        out["worker_class"] = type(self).__name__
        return out

    def utio_classes(self) -> dict[str, str]:
        return {
            "worker": type(self).__name__,
            "model_runner": type(self.model_runner).__name__,
        }
