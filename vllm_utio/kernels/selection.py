"""Which logical blocks of each sequence a decode query reads: the kernels' selection input.

Block-granular, like vLLM's paged cache and :mod:`vllm_utio.attention_policy`: a
selected logical block ``j`` of a sequence contributes its positions ``[j * block_size,
(j + 1) * block_size)`` that are below the sequence length. Two forms:

* :class:`BlockRanges`: implicit, computed by the attention kernel from the sequence
  length: the first ``sink_blocks`` blocks and the blocks holding the last
  ``recent_tokens`` positions (all blocks where they overlap); ``recent_tokens=None``
  is dense. No list is built, so dense and throttle cost no extra launch.
* :class:`BlockLists`: explicit, a fixed-size int32 buffer ``blocks [num_seqs, H, W]``
  and ``counts [num_seqs, H]`` (the first ``count`` entries of a row are real, in any
  order, without repeats), ``H`` = 1 (one list for every KV head) or ``num_kv_heads``.
  Built on the device by :mod:`~vllm_utio.kernels.block_lists` (vslash) and
  :mod:`~vllm_utio.kernels.block_select` (query-aware), without host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_utio.kernels.common import recent_blocks_max

DENSE_RECENT = 1 << 30  # recent_tokens that covers any sequence: the dense selection


@dataclass(frozen=True)
class BlockRanges:
    """Sinks + recent window as whole blocks (``recent_tokens=None``: every block)."""

    sink_blocks: int = 0
    recent_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.recent_tokens is not None and self.recent_tokens < 1:
            raise ValueError(f"recent_tokens must be >= 1, got {self.recent_tokens}")

    @property
    def recent(self) -> int:
        """``recent_tokens`` as the kernels take it (a huge window when dense)."""
        return DENSE_RECENT if self.recent_tokens is None else self.recent_tokens

    def max_blocks(self, block_size: int, table_width: int) -> int:
        """The most blocks a row reads (the split heuristic's work size)."""
        if self.recent_tokens is None:
            return table_width
        return min(table_width, self.sink_blocks + recent_blocks_max(block_size, self.recent))


DENSE = BlockRanges()


@dataclass
class BlockLists:
    """Per (sequence, list head) logical block indices and how many are real."""

    blocks: torch.Tensor  # int32 [num_seqs, H, W]
    counts: torch.Tensor  # int32 [num_seqs, H]

    def __post_init__(self) -> None:
        b, c = self.blocks, self.counts
        if b.dim() != 3 or c.dim() != 2 or tuple(c.shape) != tuple(b.shape[:2]):
            raise ValueError(
                f"blocks must be [num_seqs, H, W] and counts [num_seqs, H], got "
                f"{tuple(b.shape)} and {tuple(c.shape)}"
            )
        if b.dtype != torch.int32 or c.dtype != torch.int32:
            raise TypeError(f"blocks and counts must be int32, got {b.dtype} and {c.dtype}")
        if b.stride(-1) != 1:
            raise ValueError(f"blocks must have a contiguous last dim, got {b.stride()}")

    @classmethod
    def allocate(
        cls, num_seqs: int, heads: int, width: int, device: torch.device | str
    ) -> BlockLists:
        """Buffers for lists of up to ``width`` blocks (contents undefined until built)."""
        blocks = torch.zeros((num_seqs, heads, max(width, 1)), dtype=torch.int32, device=device)
        counts = torch.zeros((num_seqs, heads), dtype=torch.int32, device=device)
        return cls(blocks, counts)

    @property
    def width(self) -> int:
        return self.blocks.shape[2]

    @property
    def heads(self) -> int:
        return self.blocks.shape[1]

    def rows(self, num_seqs: int) -> BlockLists:
        """The first ``num_seqs`` rows (views: a buffer sized for the largest batch)."""
        return BlockLists(self.blocks[:num_seqs], self.counts[:num_seqs])
