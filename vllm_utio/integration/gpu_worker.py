"""The UTIO worker and model runner for vLLM's GPU platform.

UNTESTED: this project has no GPU. It is written against vLLM 0.32's ``Worker`` /
``GPUModelRunner`` (V1 runner) and shares all UTIO logic with the CPU runner; GPU
attention backends that reorder decodes first make UTIO use gather/scatter
sub-batches (``execution="auto"``).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_utio.integration.runner import UtioRunnerMixin
from vllm_utio.integration.version import check_vllm_version
from vllm_utio.integration.worker_rpc import UtioWorkerRpcMixin


class UtioGPUModelRunner(UtioRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config: Any, device: Any) -> None:
        super().__init__(vllm_config, device)
        self._utio_init()


class UtioGPUWorker(UtioWorkerRpcMixin, Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError("UTIO needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        return UtioGPUModelRunner(self.vllm_config, self.device)
