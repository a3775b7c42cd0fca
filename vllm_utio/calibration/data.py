"""Calibration text: a deterministic document split and fixed-length token windows.

Documents are assigned to the calibration or the held-out side by a hash of their
title, so the split does not depend on file order and never mixes: every window of a
document lands on the same side. Windows are consecutive, non-overlapping runs of
``window`` tokens from the start of a document (no BOS: this tokenizer adds none).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HELD_OUT_SHARE = 3  # one document in three is held out


@dataclass(frozen=True)
class Document:
    title: str
    text: str


@dataclass(frozen=True)
class Window:
    """``ids`` [T]: one teacher-forced sequence; ``doc`` indexes its document."""

    doc: int
    ids: torch.Tensor
    title: str = ""


TUNE_SHARE = 4  # one calibration document in four tunes thresholds (not fitted on)


def _title_hash(title: str) -> int:
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "little")


def is_held_out(title: str) -> bool:
    """A document's side of the split, from its title alone."""
    return _title_hash(title) % HELD_OUT_SHARE == 0


def is_tune(title: str) -> bool:
    """Within calibration: documents reserved for choosing thresholds."""
    return (_title_hash(title) // HELD_OUT_SHARE) % TUNE_SHARE == 0


def split_documents(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """(calibration, held-out), each in input order."""
    calib = [d for d in docs if not is_held_out(d.title)]
    held = [d for d in docs if is_held_out(d.title)]
    return calib, held


def split_calibration(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """Calibration documents -> (fit, tune)."""
    return [d for d in docs if not is_tune(d.title)], [d for d in docs if is_tune(d.title)]


def load_documents(source: str) -> list[Document]:
    """``"wiki"``: the prepared Wikipedia excerpt; otherwise a file: ``.jsonl`` records
    with ``text`` (and optionally ``title``), or plain text with documents separated
    by blank lines."""
    if source == "wiki":
        from vllm_utio.assets.data import load_wiki_documents

        return [Document(d["title"], d["text"]) for d in load_wiki_documents()]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--data: {source!r} is neither 'wiki' nor an existing file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        return [Document(str(r.get("title", f"doc{i}")), r["text"]) for i, r in enumerate(records)]
    blocks = [b.strip() for b in raw.split("\n\n") if b.strip()]
    # Titles only drive the split: use the text's head so reordering keeps sides.
    return [Document(b[:200], b) for b in blocks]


def data_fingerprint(docs: Iterable[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.title.encode("utf-8") + b"\0" + d.text.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def load_tokenizer(model_dir: str | Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _encode_head(tokenizer: Any, text: str, needed: int) -> list[int]:
    # Whole articles are slow to tokenize; a head that yields enough tokens suffices.
    cut = 6 * needed
    while True:
        ids = tokenizer.encode(text[:cut], add_special_tokens=False).ids
        if cut >= len(text) or len(ids) > needed + 16:
            return list(ids[:needed])
        cut *= 2


def make_windows(
    tokenizer: Any,
    docs: Sequence[Document],
    window: int,
    per_doc: int,
    max_windows: int | None = None,
) -> list[Window]:
    """Up to ``per_doc`` full windows from each document's start, documents in order."""
    out: list[Window] = []
    for i, doc in enumerate(docs):
        ids = _encode_head(tokenizer, doc.text, window * per_doc)
        for start in range(0, len(ids) - window + 1, window):
            out.append(Window(i, torch.tensor(ids[start : start + window]), doc.title))
            if max_windows is not None and len(out) >= max_windows:
                return out
    return out


def interleave_by_doc(windows: Sequence[Window]) -> list[Window]:
    """Round-robin over documents: any prefix of the result covers many documents."""
    by_doc: dict[int, list[Window]] = {}
    for w in windows:
        by_doc.setdefault(w.doc, []).append(w)
    out: list[Window] = []
    rank = 0
    while len(out) < len(windows):
        out.extend(ws[rank] for ws in by_doc.values() if rank < len(ws))
        rank += 1
    return out
