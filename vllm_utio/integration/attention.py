"""Attention metadata for sub-batches, built with the backend's own builders.

vLLM builds one ``CommonAttentionMetadata`` (CM) per step and turns it into backend
metadata with each attention group's builder. We record that CM (by wrapping the
groups' ``build_metadata``), then for any subset of requests derive a smaller CM
(query offsets, sequence lengths, block-table rows, slot mapping, positions) and run
the same builders on it. Contiguous leading subsets use views; arbitrary subsets
(the gather/scatter path) use index copies.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

_RECORDER_MARK = "_utio_recorder"


class StepMetadataRecorder:
    """Keeps the last CM each attention group was built from in this step."""

    def __init__(self) -> None:
        self.common: Any | None = None
        self.recording = True  # off while we build sub-batch metadata ourselves

    def reset(self) -> None:
        self.common = None

    @contextlib.contextmanager
    def paused(self):
        """Not recording: for metadata UTIO builds itself from a derived CM."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def install(self, attn_groups: list[list[Any]]) -> None:
        for groups in attn_groups:
            for group in groups:
                if getattr(group, _RECORDER_MARK, None) is self:
                    continue
                group.build_metadata = self._wrap(group.build_metadata)
                setattr(group, _RECORDER_MARK, self)

    def _wrap(self, build):
        @functools.wraps(build)
        def build_metadata(common_attn_metadata, *args, **kwargs):
            if self.recording:
                self.common = common_attn_metadata
            return build(common_attn_metadata, *args, **kwargs)

        return build_metadata


@dataclass
class SubBatch:
    """A set of rows (requests) of the step and the tokens they own."""

    rows: np.ndarray  # request rows of the persistent batch, ascending
    tokens: slice | torch.Tensor  # token selector into the step's flat token axis
    num_tokens: int
    attn_metadata: dict[str, Any]
    slot_mapping: dict[str, torch.Tensor]
    common: Any = None  # the CommonAttentionMetadata its attn_metadata was built from

    @property
    def contiguous(self) -> bool:
        return isinstance(self.tokens, slice)


def token_selector(rows: np.ndarray, query_start_loc_cpu: np.ndarray) -> slice | np.ndarray:
    """Flat token positions owned by ``rows``: a slice when rows are 0..n-1."""
    if len(rows) and rows[0] == 0 and rows[-1] == len(rows) - 1:
        return slice(0, int(query_start_loc_cpu[len(rows)]))
    starts = query_start_loc_cpu[rows]
    stops = query_start_loc_cpu[rows + 1]
    return (
        np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
        if len(rows)
        else (np.zeros(0, dtype=np.int64))
    )


def subset_common_metadata(cm: Any, rows: np.ndarray, tokens: slice | torch.Tensor) -> Any:
    """A CM for only ``rows`` (ascending) of the step's CM ``cm``."""
    qsl_cpu = cm.query_start_loc_cpu
    lens_cpu = (qsl_cpu[1:] - qsl_cpu[:-1])[: cm.num_reqs]
    if isinstance(tokens, slice):
        n = len(rows)
        sel_rows: slice | torch.Tensor = slice(0, n)
        new_qsl_cpu = qsl_cpu[: n + 1]
        new_qsl = cm.query_start_loc[: n + 1]
    else:
        sel_rows = torch.as_tensor(rows, dtype=torch.long)
        new_qsl_cpu = torch.zeros(len(rows) + 1, dtype=qsl_cpu.dtype)
        torch.cumsum(lens_cpu[sel_rows], 0, out=new_qsl_cpu[1:])
        new_qsl = new_qsl_cpu.to(cm.query_start_loc.device, non_blocking=True)
    seq_lens_ub = cm.seq_lens_cpu_upper_bound
    sub_lens_ub = seq_lens_ub[sel_rows] if seq_lens_ub is not None else None
    tok = tokens if isinstance(tokens, slice) else tokens.to(cm.slot_mapping.device)
    num_tokens = int(new_qsl_cpu[-1])
    q_lens = new_qsl_cpu[1:] - new_qsl_cpu[:-1]
    return replace(
        cm,
        query_start_loc=new_qsl,
        query_start_loc_cpu=new_qsl_cpu,
        seq_lens=cm.seq_lens[sel_rows],
        seq_lens_cpu_upper_bound=sub_lens_ub,
        num_reqs=len(rows),
        num_actual_tokens=num_tokens,
        max_query_len=int(q_lens.max()) if len(rows) else 0,
        max_seq_len=int(sub_lens_ub.max()) if sub_lens_ub is not None else cm.max_seq_len,
        block_table_tensor=cm.block_table_tensor[sel_rows],
        slot_mapping=cm.slot_mapping[tok],
        positions=cm.positions[tok] if cm.positions is not None else None,
        is_prefilling=cm.is_prefilling[sel_rows] if cm.is_prefilling is not None else None,
        req_idx=cm.req_idx[rows] if cm.req_idx is not None else None,
        logits_indices_padded=None,
        num_logits_indices=None,
        max_logits_per_req=None,
    )


def build_sub_batch(
    cm: Any,
    rows: np.ndarray,
    attn_groups: list[list[Any]],
    step_slot_mapping: dict[str, torch.Tensor],
) -> SubBatch:
    """Backend metadata and per-layer slot mappings for ``rows`` of this step."""
    qsl_cpu = cm.query_start_loc_cpu.numpy()
    sel = token_selector(rows, qsl_cpu)
    tokens = sel if isinstance(sel, slice) else torch.as_tensor(sel, dtype=torch.long)
    sub_cm = subset_common_metadata(cm, rows, tokens)
    attn_metadata = build_metadata(sub_cm, attn_groups)
    slot_mapping = {name: sm[tokens] for name, sm in step_slot_mapping.items()}
    return SubBatch(rows, tokens, sub_cm.num_actual_tokens, attn_metadata, slot_mapping, sub_cm)


def build_metadata(cm: Any, attn_groups: list[list[Any]]) -> dict[str, Any]:
    """Layer name -> backend metadata of ``cm``, from each attention group's builder."""
    attn_metadata: dict[str, Any] = {}
    for groups in attn_groups:
        for group in groups:
            md = group.build_metadata(cm)
            for name in group.layer_names:
                attn_metadata[name] = md
    return attn_metadata


# Backend metadata classes that use the block table only as their ``block_table`` field:
# the CPU backend plans its work (``scheduler_metadata``) from query and sequence lengths
# alone, so metadata for the same lengths and another table is a field swap, not a build.
_TABLE_ONLY_METADATA = frozenset({"CPUAttentionMetadata"})


def with_block_table(metadata: Any, block_table: torch.Tensor) -> Any | None:
    """``metadata`` reading ``block_table`` instead (same lengths), or None where the
    backend's metadata may depend on the table in other ways (build it then)."""
    if type(metadata).__name__ not in _TABLE_ONLY_METADATA:
        return None
    return replace(metadata, block_table=block_table)
