"""A step's drafts handed to the scheduler with the step's own reply, not by another RPC.

With speculative decoding and synchronous scheduling (vLLM's CPU platform always turns
async scheduling off), vLLM's engine core asks the worker for the step's drafts with a
third RPC after each step (``post_step`` -> ``take_draft_token_ids``), after
``execute_model`` and ``sample_tokens``. Across processes that round trip cost 0.3-0.6 ms
per step on the 2-core test machine (1-2% of a batch-1 decode step), paid also on steps
that draft nothing.

UTIO's runner proposes its drafts inside ``sample_tokens`` (after vLLM's bookkeeping), so
they are ready when that call returns. The runner attaches them to the step's
``ModelRunnerOutput`` (:func:`attach_drafts`; the reply is pickled, attributes included),
and :class:`SelfDraftExecutor`, vLLM's multiprocess executor with two methods
overridden, keeps them from the reply and hands them to ``take_draft_token_ids`` without
asking the worker. Whatever the reply does not carry (a non-blocking call, a reply without
drafts attached) falls back to vLLM's own RPC, so the scheduler always gets exactly what
the worker's ``take_draft_token_ids`` would return at that point: the worker's state does
not change between ``sample_tokens`` returning and ``post_step``.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.executor.multiproc_executor import MultiprocExecutor

# the ModelRunnerOutput attribute that carries the step's drafts (a DraftTokenIds or None)
DRAFTS_ATTR = "utio_draft_token_ids"
_NONE = object()


def attach_drafts(output: Any, drafts: Any) -> None:
    """Worker side: put the step's drafts (what ``take_draft_token_ids`` returns) on its
    ``ModelRunnerOutput`` reply; other replies (async ones) are left as they are."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    # (vLLM's shared empty reply is never marked: the mark would outlive the step)
    if isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, DRAFTS_ATTR, drafts)


def use_draft_handoff(vllm_config: Any) -> bool:
    """Engine config: run :class:`SelfDraftExecutor` where vLLM chose its multiprocess
    executor (the worker in its own process); any other executor is kept (in one process
    the draft RPC is a plain call)."""
    parallel = vllm_config.parallel_config
    if parallel.distributed_executor_backend not in ("mp", MultiprocExecutor):
        return False
    parallel.distributed_executor_backend = SelfDraftExecutor
    return True


def reads_drafts_from_reply(vllm_config: Any) -> bool:
    """Worker side: whether the engine runs :class:`SelfDraftExecutor`, which reads the
    drafts attached to a reply (any other executor asks ``take_draft_token_ids``, so
    attaching them would only build them twice)."""
    return vllm_config.parallel_config.distributed_executor_backend is SelfDraftExecutor


class SelfDraftExecutor(MultiprocExecutor):
    """vLLM's multiprocess executor; ``take_draft_token_ids`` answers from the drafts the
    last blocking ``sample_tokens`` reply carried."""

    _carried: Any = _NONE  # the drafts of the step just sampled, until taken

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
        self._carried = _NONE  # a new step: earlier drafts are stale
        return super().execute_model(scheduler_output, non_block=non_block)

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
        self._carried = _NONE
        output = super().sample_tokens(grammar_output, non_block=non_block)
        if not non_block and hasattr(output, "__dict__"):
            self._carried = vars(output).pop(DRAFTS_ATTR, _NONE)
        return output

    def take_draft_token_ids(self) -> Any:
        carried, self._carried = self._carried, _NONE
        if carried is _NONE:
            return super().take_draft_token_ids()
        return carried
