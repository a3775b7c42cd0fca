"""Long held-out documents for long-context quality (retrieval cases:
:mod:`vllm_utio.evaluation.retrieval`).

Held-out Wikipedia articles (the calibration split's held-out side) concatenated and cut
into consecutive, non-overlapping runs of ``length`` tokens; each run is one document
(the bootstrap unit). The first ``length - T`` tokens are the prompt (prefilled dense)
and the last ``T`` are teacher-forced, so every scored token comes out of a decode step
attending over thousands of cached positions: where a sparse policy cuts (see
:mod:`vllm_utio.evaluation.quality` for the forcing). The same concatenated text is the
retrieval cases' haystack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vllm_utio.evaluation.quality import Window


def held_out_texts(records: Iterable[dict[str, str]]) -> list[str]:
    """Texts of the documents the calibration split holds out (never fitted on)."""
    from vllm_utio.calibration.data import is_held_out

    return [r["text"] for r in records if is_held_out(r["title"])]


def concatenated_ids(tokenizer: Any, texts: Iterable[str], needed: int | None = None) -> list[int]:
    """``texts`` joined by blank lines, tokenized one by one until ``needed`` ids exist."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False))
        if needed is not None and len(ids) >= needed:
            break
    return ids


def long_windows(
    ids: Sequence[int], length: int, forced: int, count: int, prefix: Sequence[int] = ()
) -> list[Window]:
    """Up to ``count`` consecutive ``length``-token documents of ``ids``, the last
    ``forced`` tokens of each teacher-forced (``prefix``: a BOS the model expects)."""
    if not 3 <= forced < length:
        raise ValueError(f"forced tokens ({forced}) must be in [3, {length})")
    prefix = tuple(prefix)
    body = length - len(prefix)
    out = []
    for doc in range(min(count, len(ids) // body)):
        chunk = tuple(ids[doc * body : (doc + 1) * body])
        out.append(Window(doc, prefix + chunk, length - forced, len(prefix)))
    return out
