"""Retrieval cases of ``eval-long`` (no engine): case generation, prompt lengths, where the
facts sit, scoring, Wilson intervals and the judgement against dense."""

from __future__ import annotations

import math
import re

import pytest
from conftest import model_path

from vllm_utio.evaluation import retrieval as rt


class _Chars:
    """A tokenizer stand-in: one token per character, a two-part chat template."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return f"<user>{messages[0]['content']}</user><bot>"


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize(
    ("passed", "total", "lo", "hi"),
    [  # Newcombe (1998), Stat. Med. 17:857, table I, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(passed, total, lo, hi):
    got = rt.wilson_interval(passed, total)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_edges():
    assert rt.wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + 1.96**2))  # n / (n + z²)
    assert rt.wilson_interval(10, 10)[1] == 1.0 and rt.wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(x) for x in rt.wilson_interval(0, 0))
    narrow, wide = rt.wilson_interval(24, 48), rt.wilson_interval(24, 48, z=2.576)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_matches_normalize_per_value_type():
    m = rt.matches
    assert m("first_number", ["4471"], " 4471.\n") and not m("first_number", ["4471"], " 447")
    # multikey: a distractor's value first is a miss, even with the right one after it
    assert not m("first_number", ["4471"], " 9082, or maybe 4471")
    assert m("all_numbers", ["12", "345", "6789"], " 6789, 12 and 345.")
    assert not m("all_numbers", ["12", "345", "6789"], " 6789 and 345.")
    assert not m("all_numbers", ["12", "345"], " 123 and 3456")  # whole numbers only
    assert m("words", ["Priya Raman"], ' "priya   RAMAN".') and m("words", ["ember"], " Ember!")
    assert not m("words", ["ember"], " embers") and not m("words", ["Priya Raman"], " Priya")
    assert m("exact", ["KX-4471-QZ-9082"], " KX-4471-QZ-9082.")
    assert not m("exact", ["KX-4471-QZ-9082"], " kx-4471-qz-9082")
    assert not m("exact", ["123456789012"], " 1234567890123")  # no longer number around it
    with pytest.raises(ValueError, match="unknown match"):
        m("fuzzy", ["a"], "a")


def _scored(kinds_passed: dict[str, list[bool]]) -> dict:
    cases, answers = [], []
    for kind, flags in kinds_passed.items():
        for ok in flags:
            cases.append(rt.RetrievalCase(kind, (), (0.5,), "", "", ("7",), "first_number"))
            answers.append(" 7" if ok else " 8")
    return rt.scores(cases, answers)


def test_scores_per_kind_and_judgement_against_dense():
    dense = _scored({"single": [True] * 10, "copy": [True] * 5 + [False] * 5})
    assert dense["overall"] == {
        "passed": 15,
        "total": 20,
        "rate": 0.75,
        "ci": list(rt.wilson_interval(15, 20)),
    }
    assert set(dense["by_kind"]) == {"single", "copy"} and dense["by_kind"]["copy"]["rate"] == 0.5
    assert rt.judge(dense, dense) == "within"
    # copy 3/10 is inside dense's interval for copy (0.24..0.76), overall 13/20 = 0.65 < 0.72
    assert rt.judge(dense, _scored({"single": [True] * 10, "copy": [True] * 3 + [False] * 7})) == (
        "below"
    )
    # overall within 3 points but copy falls under dense's interval
    other = _scored({"single": [True] * 10, "copy": [False] * 10})
    assert rt.judge(_scored({"single": [False] * 10, "copy": [True] * 10}), other) == "below"
    # better than dense is within
    assert rt.judge(dense, _scored({"single": [True] * 10, "copy": [True] * 10})) == "within"


# --------------------------------------------------------------------------- cases


def test_depths_spread_evenly_and_every_kind_covers_them():
    for n in (48, 10):
        depths = rt.spread_depths(n, seed=3)
        assert sorted(depths) == [(i + 0.5) / n for i in range(n)]
        assert depths == rt.spread_depths(n, seed=3) != rt.spread_depths(n, seed=4)
        for j in range(len(rt.KINDS)):  # one depth in every run of four slots
            mine = sorted(depths[j :: len(rt.KINDS)])
            assert [int(d * n) // 4 for d in mine] == list(range(len(mine)))


def test_specs_rotate_kinds_and_value_types():
    specs = rt.case_specs(48, seed=0)
    assert [s.kind for s in specs[:8]] == [*rt.KINDS, *rt.KINDS]
    assert specs == rt.case_specs(48, seed=0)
    single = [s for s in specs if s.kind == "single"]
    assert [s.match for s in single[:3]] == ["first_number", "words", "words"]
    assert {s.expected[0] for s in single[1::3]} <= set(rt.NAMES)
    assert {s.expected[0] for s in single[2::3]} <= set(rt.WORDS)
    assert all(4 <= len(s.expected[0]) <= 6 for s in single[::3])
    for s in specs:
        assert all(any(v in f for f in s.facts) for v in s.expected)
        assert s.facts[0].endswith(f"{s.expected[0]}.")
        assert all(0.0 <= d < 1.0 for d in s.depths) and s.depth == s.depths[0]
    for s in (s for s in specs if s.kind == "multikey"):
        keys = [re.match(r"The secret code of the (.+) is", f).group(1) for f in s.facts]
        target = keys[0].split()
        assert len(keys) in (3, 4) and len(set(keys)) == len(keys)
        assert keys[0] in s.question and keys[0] in s.opening
        assert all(set(k.split()) & set(target) for k in keys[1:3])  # similar: a shared word
        values = [f.rsplit(" ", 1)[1].rstrip(".") for f in s.facts]
        assert len(set(values)) == len(values) and s.expected == (values[0],)
    for s in (s for s in specs if s.kind == "multivalue"):
        assert len(s.facts) == 3 and len(set(s.expected)) == 3 and s.match == "all_numbers"
        assert sorted((d - s.depth) % 1 for d in s.depths) == pytest.approx([0, 1 / 3, 2 / 3])
    copies = [s.expected[0] for s in specs if s.kind == "copy"]
    assert all(10 <= len(v) <= 12 and v.isdigit() for v in copies[::2])
    assert all(re.fullmatch(r"[A-Z]{2}-\d{4}-[A-Z]{2}-\d{4}", v) for v in copies[1::2])


def _check_prompts(tok, cases, context: int) -> None:
    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    head, tail = rt.chat_parts(tok)
    for rc in cases:
        text = tok.decode(rc.tokens)
        assert len(rc.tokens) + rc.answer_tokens == context
        assert rc.answer_tokens >= 8 and rc.answer_tokens % 4 == 0
        assert list(rc.tokens[: len(head)]) == head
        assert text.endswith(tok.decode(tail) + rc.opening)
        assert f"Question: {rc.question}" in text
        facts = [enc(" " + f) for f in rc.facts]
        fixed = len(head) + sum(map(len, facts)) + len(enc("\n\nQuestion: " + rc.question))
        body = len(rc.tokens) - fixed - len(tail) - len(enc(rc.opening))
        for fact, ids, pos, depth in zip(rc.facts, facts, rc.positions, rc.depths, strict=True):
            assert list(rc.tokens[pos : pos + len(ids)]) == ids
            assert fact in text
            before = sum(len(f) for f, p in zip(facts, rc.positions, strict=True) if p < pos)
            hay_before = pos - len(head) - before  # haystack tokens ahead of this fact
            assert abs(hay_before - int(depth * body)) < 64
            assert tok.decode(rc.tokens[pos - 1 : pos]).endswith(".")  # after a sentence
            assert re.match(r" [A-Z]", tok.decode(rc.tokens[pos + len(ids) : pos + len(ids) + 2]))


def test_cases_fill_the_context_and_hold_the_facts_at_their_depths():
    tok = _Chars()
    hay = tok.encode("".join(f"Rain fell on day {i}. " for i in range(2000)))
    cases = rt.make_cases(tok, hay, 3000, count=12, seed=1)
    assert [c.kind for c in cases] == [*rt.KINDS] * 3
    _check_prompts(tok, cases, 3000)
    # copy and multivalue answers are longer than 8 tokens, so are their budgets
    budgets = {c.kind: c.answer_tokens for c in cases}
    assert budgets["copy"] > 8 and budgets["multivalue"] > budgets["single"]
    # each case its own stretch of the haystack, from a sentence start: no shared opening
    openings = {tok.decode(c.tokens[6:40]) for c in cases}
    assert len(openings) == len(cases) and all(o.startswith(" Rain fell") for o in openings)
    with pytest.raises(ValueError, match="too short"):
        rt.make_cases(tok, hay, 120, count=4)
    with pytest.raises(ValueError, match="haystack"):
        rt.make_cases(tok, hay[:500], 3000, count=4)


def test_cases_with_the_real_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    hay_text = (
        "The town grew around a small harbour on the northern coast. Fishing and trade "
        "shaped its early history, and by the eighteenth century it had a market hall, "
        "two churches and a school. "
    ) * 300
    hay = tok.encode(hay_text, add_special_tokens=False)
    cases = rt.make_cases(tok, hay, 2048, count=8, seed=0)
    _check_prompts(tok, cases, 2048)
    assert all(c.passed(" " + ", ".join(c.expected) + ".") for c in cases)
