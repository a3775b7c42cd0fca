"""Retrieval cases for long-context quality: facts hidden in held-out text, asked for at
the end of the prompt, and their scores.

Four kinds, in rotation (after RULER's needle tasks):

- ``single``: one fact; its value a 4-6 digit number, a person's full name or a word
  (value types in rotation);
- ``multikey``: 3-4 facts of one template with similar keys ("the blue door", "the blue
  gate", "the red door"); the question names one, and the first number of the answer must
  be that key's value;
- ``multivalue``: one key with three values at different depths; the question asks for
  all of them, and every value must appear in the answer;
- ``copy``: a long value (a 10-12 digit number or a code like ``KX-4471-QZ-9082``), which
  must appear exactly in the answer.

Depths: with ``N`` cases, case ``k`` takes one of the slots ``(j + 0.5) / N``; each run of
four consecutive slots goes to one case of each kind, in a seeded random order, so every
kind covers every part of the text. The other facts of a multikey or multivalue case sit
evenly around the text from there (``d + j / n`` modulo 1). A fact goes in between two
sentences, at the boundary nearest its depth (within 64 tokens, fewer at short contexts;
exactly at its depth if there is none).

Each case has its own stretch of haystack, the question at the end of the user message
in the model's chat template and the answer's opening words given; the prompt is exactly
``context - answer_tokens`` tokens, the answer budget coming from the expected answer's
token count plus a margin. Scores: pass counts per kind and overall with Wilson score
intervals, and a judgement of each policy against the dense reference.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

KINDS = ("single", "multikey", "multivalue", "copy")

COLORS = ("blue", "red", "green", "silver", "yellow", "black", "white", "orange", "purple")
THINGS = ("door", "gate", "box", "key", "lamp", "chest", "tower", "boat", "bell", "bridge")
NAMES = (
    "Margaret Ellison",
    "Tomas Okafor",
    "Priya Raman",
    "Henrik Dahl",
    "Lucia Moreno",
    "Daniel Whitcombe",
    "Amara Nwosu",
    "Felix Brandt",
    "Ingrid Solberg",
    "Mateo Alvarez",
    "Nadia Karimova",
    "Oliver Pembroke",
)
WORDS = ("lantern", "harbor", "violet", "compass", "meadow", "falcon", "ember", "quartz")

# value type -> (fact, question, answer opening); {key}: "blue door", {value}: the value
TEMPLATES = {
    "number": (
        "The secret code of the {key} is {value}.",
        "What is the secret code of the {key}? Answer with the number only.",
        "The secret code of the {key} is",
    ),
    "name": (
        "The keeper of the {key} is {value}.",
        "Who is the keeper of the {key}? Answer with the full name only.",
        "The keeper of the {key} is",
    ),
    "word": (
        "The password for the {key} is {value}.",
        "What is the password for the {key}? Answer with the word only.",
        "The password for the {key} is",
    ),
    "multivalue": (
        "One of the special magic numbers for the {key} is {value}.",
        "What are the special magic numbers for the {key}? List all three numbers.",
        "The special magic numbers for the {key} are",
    ),
    "copy": (
        "The serial number of the {key} is {value}.",
        "What is the serial number of the {key}? Copy it exactly.",
        "The serial number of the {key} is",
    ),
}
SINGLE_TYPES = ("number", "name", "word")
ANSWER_MARGIN = 4  # answer tokens per expected value beyond the answer's own (list marks)
MIN_ANSWER_TOKENS = 8


@dataclass(frozen=True)
class RetrievalCase:
    kind: str  # one of KINDS
    facts: tuple[str, ...]  # the sentences placed in the text; the asked-for one first
    depths: tuple[float, ...]  # where each fact sits, share of the haystack
    question: str
    opening: str  # the answer's first words, given
    expected: tuple[str, ...]  # the value(s) the answer must hold
    match: str  # "first_number" | "all_numbers" | "words" | "exact"
    tokens: tuple[int, ...] = ()  # the whole prompt (once built)
    positions: tuple[int, ...] = ()  # token index where each fact starts
    answer_tokens: int = 0  # greedy tokens for the answer

    @property
    def depth(self) -> float:
        return self.depths[0]

    def passed(self, answer: str) -> bool:
        return matches(self.match, self.expected, answer)


# --------------------------------------------------------------------------- scoring


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def matches(match: str, expected: Sequence[str], answer: str) -> bool:
    """Whether ``answer`` holds the ``expected`` value(s): ``first_number``: the first
    number in it is the value; ``all_numbers``: every value is one of its numbers;
    ``words``: the value's words in a row, ignoring case, spacing and punctuation;
    ``exact``: the value verbatim, not inside a longer word or number."""
    if match == "first_number":
        m = re.search(r"\d+", answer)
        return m is not None and m.group() == expected[0]
    if match == "all_numbers":
        return set(expected) <= set(re.findall(r"\d+", answer))
    if match == "words":
        return f" {_words(expected[0])} " in f" {_words(answer)} "
    if match == "exact":
        pattern = rf"(?<![A-Za-z0-9]){re.escape(expected[0])}(?![A-Za-z0-9])"
        return re.search(pattern, answer) is not None
    raise ValueError(f"unknown match {match!r}")


def wilson_interval(passed: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a pass rate (95% at z = 1.96); (nan, nan) for no trials."""
    if total == 0:
        return (math.nan, math.nan)
    p, zz = passed / total, z * z / total
    centre = (p + zz / 2) / (1 + zz)
    half = z * math.sqrt(p * (1 - p) / total + zz / (4 * total)) / (1 + zz)
    return (max(0.0, centre - half), min(1.0, centre + half))


def tally(passed: Sequence[bool]) -> dict[str, Any]:
    n, k = len(passed), sum(map(bool, passed))
    return {
        "passed": k,
        "total": n,
        "rate": k / n if n else math.nan,
        "ci": list(wilson_interval(k, n)),
    }


def scores(cases: Sequence[RetrievalCase], answers: Sequence[str]) -> dict[str, Any]:
    """Per-case pass flags, overall and per-kind tallies of ``answers`` to ``cases``."""
    passed = [c.passed(a) for c, a in zip(cases, answers, strict=True)]
    by_kind = {
        kind: tally([p for p, c in zip(passed, cases, strict=True) if c.kind == kind])
        for kind in KINDS
        if any(c.kind == kind for c in cases)
    }
    return {"passed": passed, "overall": tally(passed), "by_kind": by_kind}


def judge(reference: dict[str, Any], other: dict[str, Any], margin: float = 0.03) -> str:
    """``"within"`` if no kind's pass rate in ``other`` falls below the reference's Wilson
    interval for that kind and the overall rate is at least the reference's minus
    ``margin``; else ``"below"`` (``scores`` results; a rate above the interval is fine)."""
    eps = 1e-12
    kinds_ok = all(
        other["by_kind"][kind]["rate"] >= ref["ci"][0] - eps
        for kind, ref in reference["by_kind"].items()
    )
    overall_ok = other["overall"]["rate"] >= reference["overall"]["rate"] - margin - eps
    return "within" if kinds_ok and overall_ok else "below"


# --------------------------------------------------------------------------- cases


def spread_depths(count: int, seed: int = 0) -> list[float]:
    """Depth of case ``k`` of ``count`` (kind ``KINDS[k % 4]``): slots (j + 0.5) / count,
    each run of len(KINDS) slots dealt to one case of each kind in a seeded order."""
    rng = random.Random(seed)
    slots: list[int] = []
    for start in range(0, count, len(KINDS)):
        run = list(range(start, min(count, start + len(KINDS))))
        rng.shuffle(run)
        slots += run
    return [(s + 0.5) / count for s in slots]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _numbers(rng: random.Random, count: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = _number(rng, rng.randint(4, 6))
        if value not in out:
            out.append(value)
    return out


def _code(rng: random.Random) -> str:
    def letters() -> str:
        return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2))

    return f"{letters()}-{_number(rng, 4)}-{letters()}-{_number(rng, 4)}"


def _around(depth: float, n: int) -> tuple[float, ...]:
    return tuple((depth + j / n) % 1.0 for j in range(n))


def _case(
    kind: str,
    template: str,
    keys: Sequence[str],
    values: Sequence[str],
    depths: Sequence[float],
    match: str,
) -> RetrievalCase:
    fact, question, opening = TEMPLATES[template]
    return RetrievalCase(
        kind=kind,
        facts=tuple(fact.format(key=k, value=v) for k, v in zip(keys, values, strict=True)),
        depths=tuple(depths),
        question=question.format(key=keys[0]),
        opening=opening.format(key=keys[0]),
        expected=tuple(values) if kind == "multivalue" else (values[0],),
        match=match,
    )


def case_specs(count: int, seed: int = 0) -> list[RetrievalCase]:
    """``count`` cases (facts, question, expected values; no tokens yet), kinds in
    rotation, depths from :func:`spread_depths`; the same for every context length."""
    rng = random.Random(seed)
    out = []
    for k, depth in enumerate(spread_depths(count, seed)):
        kind, turn = KINDS[k % len(KINDS)], k // len(KINDS)
        color, thing = rng.choice(COLORS), rng.choice(THINGS)
        key = f"{color} {thing}"
        if kind == "single":
            vtype = SINGLE_TYPES[turn % len(SINGLE_TYPES)]
            if vtype == "number":
                value, match = _numbers(rng, 1)[0], "first_number"
            else:
                value, match = rng.choice(NAMES if vtype == "name" else WORDS), "words"
            out.append(_case(kind, vtype, [key], [value], [depth], match))
        elif kind == "multikey":
            other_color = rng.choice([c for c in COLORS if c != color])
            other_thing = rng.choice([t for t in THINGS if t != thing])
            similar = [f"{color} {other_thing}", f"{other_color} {thing}"]
            keys = [key, *similar, f"{other_color} {other_thing}"][: 3 + turn % 2]
            values, depths = _numbers(rng, len(keys)), _around(depth, len(keys))
            out.append(_case(kind, "number", keys, values, depths, "first_number"))
        elif kind == "multivalue":
            values = _numbers(rng, 3)
            out.append(_case(kind, kind, [key] * 3, values, _around(depth, 3), "all_numbers"))
        else:
            value = _number(rng, rng.randint(10, 12)) if turn % 2 == 0 else _code(rng)
            out.append(_case(kind, kind, [key], [value], [depth], "exact"))
    return out


def chat_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
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


def answer_budget(tokenizer: Any, expected: Sequence[str]) -> int:
    """Greedy tokens for an answer: the expected answer's tokens plus a margin per value
    (room for a list's marks), rounded up to a multiple of 4 (few distinct budgets, so few
    engine calls), at least 8."""
    n = len(tokenizer.encode(" " + ", ".join(expected) + ".", add_special_tokens=False))
    n += ANSWER_MARGIN * len(expected)
    return max(MIN_ANSWER_TOKENS, 4 * math.ceil(n / 4))


def _sentence_start(tokenizer: Any, text: Sequence[int], at: int, window: int) -> int:
    """The index nearest ``at`` (less than ``window`` away) between the end of a sentence
    and the next one (". Next", not "c. 347" or a paragraph break); ``at`` if none."""
    for j in sorted(range(at - window + 1, at + window), key=lambda j: (abs(j - at), j)):
        if 0 < j < len(text) and tokenizer.decode(text[j - 1 : j]).endswith((".", "!", "?")):
            after = tokenizer.decode(text[j : j + 2])
            if after[:1] == " " and after[1:2].isupper():
                return j
    return at


def build_case(
    tokenizer: Any,
    spec: RetrievalCase,
    hay: Sequence[int],
    context: int,
    chat: tuple[list[int], list[int]] | None = None,
) -> RetrievalCase:
    """``spec`` with its prompt: text of ``hay`` (from its first sentence start, if one is
    near) with the facts placed at their depths, then the question, in the chat template,
    and the answer's opening; exactly ``context - answer_tokens`` tokens."""

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    head, tail = chat or chat_parts(tokenizer)
    facts = [enc(" " + f) for f in spec.facts]
    question, opening = enc("\n\nQuestion: " + spec.question), enc(spec.opening)
    budget = answer_budget(tokenizer, spec.expected)
    length = context - budget
    fixed = len(head) + sum(map(len, facts)) + len(question) + len(tail) + len(opening)
    body = length - fixed
    if body < 16 * len(facts):
        raise ValueError(f"context {context} is too short for a {spec.kind} retrieval prompt")
    if len(hay) < body:
        raise ValueError(f"haystack has {len(hay)} tokens; the prompt needs {body}")
    start = _sentence_start(tokenizer, hay, 0, min(32, len(hay) - body + 1))
    text = list(hay[start : start + body])
    window = max(1, min(64, body // (8 * len(facts))))
    cuts = [_sentence_start(tokenizer, text, int(d * body), window) for d in spec.depths]
    tokens, positions, prev = list(head), [0] * len(facts), 0
    for i in sorted(range(len(facts)), key=lambda i: cuts[i]):
        tokens += text[prev : cuts[i]]
        positions[i] = len(tokens)
        tokens += facts[i]
        prev = cuts[i]
    tokens += text[prev:] + question + tail + opening
    assert len(tokens) == length
    return replace(spec, tokens=tuple(tokens), positions=tuple(positions), answer_tokens=budget)


def make_cases(
    tokenizer: Any, hay: Sequence[int], context: int, count: int, seed: int = 0
) -> list[RetrievalCase]:
    """:func:`case_specs` built at ``context`` tokens (prompt + answer), each case on its
    own stretch of ``hay`` (consecutive, non-overlapping if ``hay`` is long enough)."""
    if len(hay) < context:
        raise ValueError(f"haystack has {len(hay)} tokens; a {context}-token case needs more")
    chat = chat_parts(tokenizer)
    stride = min(context, (len(hay) - context) // max(1, count - 1))
    return [
        build_case(tokenizer, spec, hay[k * stride : k * stride + context], context, chat)
        for k, spec in enumerate(case_specs(count, seed))
    ]
