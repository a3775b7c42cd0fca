"""The UTIO worker and model runner for vLLM's CPU platform (tested here)."""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_utio.integration.cpu_sampling_fix import fix_expand_kernel
from vllm_utio.integration.huge_pages import back_with_huge_pages
from vllm_utio.integration.runner import UtioRunnerMixin
from vllm_utio.integration.version import check_vllm_version
from vllm_utio.integration.worker_rpc import UtioWorkerRpcMixin


class UtioCPUModelRunner(UtioRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self._utio_init()

    def initialize_kv_cache_tensors(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        kv_caches = super().initialize_kv_cache_tensors(*args, **kwargs)
        if self.utio_cfg.kv_huge_pages:
            self.utio_kv_huge_page_bytes = back_with_huge_pages(kv_caches.values())
        return kv_caches


class UtioCPUWorker(UtioWorkerRpcMixin, CPUWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        # vLLM registered its CPU kernel stand-ins before building this worker
        fix_expand_kernel()

    def init_device(self) -> None:
        super().init_device()
        if self.use_v2_model_runner:
            raise RuntimeError("UTIO needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        # CPUWorker builds its runner inline; replace it with ours (construction is cheap:
        # no model or KV cache exists yet at this point).
        self.model_runner = UtioCPUModelRunner(self.vllm_config, torch.device("cpu"))
