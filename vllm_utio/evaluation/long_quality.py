"""Long-context inputs and scores for sparse attention: long documents and needles.

- Long documents: held-out Wikipedia articles (the calibration split's held-out side)
  concatenated and cut into consecutive, non-overlapping runs of ``length`` tokens; each
  run is one document (the bootstrap unit). The first ``length - T`` tokens are the
  prompt (prefilled dense) and the last ``T`` are teacher-forced, so every scored token
  comes out of a decode step attending over thousands of cached positions: where a
  sparse policy cuts (see :mod:`vllm_utio.evaluation.quality` for the forcing).
- Needles: a synthetic fact ("The secret code of the blue door is 7421.") placed at
  ``depth`` of a haystack of held-out text (past the attention sinks, far from the recent
  window), the question at the end in the model's chat format, the answer's opening
  words given, checked for the exact number with greedy decoding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_utio.evaluation.quality import Window

SUBJECTS = (
    ("blue", "door"),
    ("red", "box"),
    ("green", "gate"),
    ("silver", "key"),
    ("yellow", "lamp"),
    ("black", "chest"),
    ("white", "tower"),
    ("orange", "boat"),
    ("purple", "book"),
    ("golden", "bell"),
    ("brown", "bridge"),
    ("grey", "clock"),
)


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


# --------------------------------------------------------------------------- needles


@dataclass(frozen=True)
class Needle:
    subject: str  # "blue door"
    code: str  # the answer, four digits
    tokens: tuple[int, ...]  # the whole prompt, chat template and answer opening included
    position: int  # token index where the fact starts

    @property
    def fact(self) -> str:
        return fact_sentence(self.subject, self.code)


def fact_sentence(subject: str, code: str) -> str:
    return f"The secret code of the {subject} is {code}."


def _chat_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after a user message."""
    marker = "@@CONTENT@@"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    head, tail = text.split(marker)
    return (
        tokenizer.encode(head, add_special_tokens=False),
        tokenizer.encode(tail, add_special_tokens=False),
    )


def make_needles(
    tokenizer: Any,
    hay: Sequence[int],
    length: int,
    count: int,
    depth: float = 0.1,
    seed: int = 0,
) -> list[Needle]:
    """``count`` needle prompts of exactly ``length`` tokens; each takes its haystack from
    a different stretch of ``hay`` and its own subject and code."""

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    rng = np.random.default_rng(seed)
    head, tail = _chat_parts(tokenizer)
    out: list[Needle] = []
    for k in range(count):
        color, thing = SUBJECTS[k % len(SUBJECTS)]
        subject = f"{color} {thing}" if k < len(SUBJECTS) else f"{color} {thing} {k}"
        code = str(int(rng.integers(1000, 10000)))
        fact = enc(f"\n{fact_sentence(subject, code)}\n")
        question = enc(
            f"\n\nQuestion: what is the secret code of the {subject}? Answer with the number only."
        )
        answer = enc(f"The secret code of the {subject} is")
        fixed = len(head) + len(fact) + len(question) + len(tail) + len(answer)
        body = length - fixed
        if body < 16:
            raise ValueError(f"context {length} is too short for a needle prompt")
        stride = max(1, (len(hay) - body) // max(1, count))
        text = list(hay[k * stride : k * stride + body])
        if len(text) < body:
            raise ValueError(f"haystack text has {len(hay)} tokens; needles need more")
        at = int(depth * body)
        tokens = head + text[:at] + fact + text[at:] + question + tail + answer
        out.append(Needle(subject, code, tuple(tokens), len(head) + at))
    return out


def needle_answer(text: str) -> str | None:
    """The first number in a generated answer (None if there is none)."""
    m = re.search(r"\d+", text)
    return m.group() if m else None


def pass_rate(passed: Sequence[bool], resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Share passed and its percentile bootstrap interval over needles."""
    x = np.asarray(passed, dtype=float)
    if len(x) == 0:
        return {"passed": 0, "total": 0, "pass_rate": float("nan"), "ci": [np.nan, np.nan]}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5]) if len(x) > 1 else (np.nan, np.nan)
    return {
        "passed": int(x.sum()),
        "total": len(x),
        "pass_rate": float(x.mean()),
        "ci": [float(lo), float(hi)],
    }
