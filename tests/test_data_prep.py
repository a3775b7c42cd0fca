"""Pure-logic tests for evaluation-text preparation (no network, no cache)."""

from __future__ import annotations

import io
import json

import pytest

from vllm_utio.assets import data
from vllm_utio.assets.data import (
    clean_wikitext,
    decode_truncated_utf8,
    is_disambiguation,
    iter_wiki_articles,
    opening_prompt,
    recover_json_array,
    strip_nested,
)

# ----------------------------------------------------------------------------- nesting


def test_strip_nested_removes_nested_templates() -> None:
    assert strip_nested("a {{x|{{y|{{z}}}}|w}} b {{q}}c", "{{", "}}") == "a  b c"


def test_strip_nested_unbalanced_tokens_do_not_swallow_text() -> None:
    # A never-closed opener loses only itself; its matched inner template still goes.
    assert strip_nested("keep {{open {{inner}} tail", "{{", "}}") == "keep open  tail"
    assert strip_nested("stray }} closer", "{{", "}}") == "stray  closer"


def test_strip_nested_tables() -> None:
    text = "before\n{|\n| cell\n{|\n| inner\n|}\n|}\nafter"
    assert strip_nested(text, "{|", "|}") == "before\n\nafter"


# ----------------------------------------------------------------------------- cleaner

ARTICLE = """{{Infobox thing|name={{nowrap|Foo}}|image=x.png}}
'''Foo''' is a ''kind'' of [[bar (thing)|bar]] found in [[Baz]]s of the north.\
<ref name="a">{{cite web|url=http://x.org}}</ref> It was named in 1900.\
<ref name="a"/><!-- hidden note -->
It is sold at [http://example.com the market] and [http://bare.example.com]&nbsp;today.

[[File:Foo.jpg|thumb|A caption with [[link]] and Bicyclo[1.1.0]butane text.]]
{| class="wikitable"
|-
! Header !! Other
|-
| table cell text that should vanish || more
|}
== History ==
Foo was first described (  ) by the old scholars of the time , long ago.
* a list item with enough words to keep
* short item
{{As of|2010}}, the foo population exceeded one million birds.
<math>x^2</math> Water is H<sub>2</sub>O and it is wet here.
[[Category:Things]]
[[de:Foo]]
== See also ==
* [[Qux]] is another related thing worth reading about
== References ==
{{reflist}}
"""


def test_clean_wikitext_produces_plain_prose() -> None:
    assert clean_wikitext(ARTICLE) == [
        "Foo is a kind of bar found in Bazs of the north. It was named in 1900. "
        "It is sold at the market and today.",
        "Foo was first described by the old scholars of the time, long ago.",
        "a list item with enough words to keep",
        # Adjacent lines are one paragraph; the template's leftover comma is trimmed.
        "the foo population exceeded one million birds. Water is H2O and it is wet here.",
    ]


def test_clean_wikitext_leaves_no_markup() -> None:
    out = "\n".join(clean_wikitext(ARTICLE, min_words=1))
    for junk in ("{{", "}}", "[[", "]]", "{|", "|}", "<", "'''", "&nbsp;", "http", "thumb"):
        assert junk not in out, junk
    # Everything after the first appendix heading is gone, and headings themselves.
    assert "Qux" not in out
    assert "History" not in out
    assert "short item" in out  # only the default word threshold removed it


def test_clean_wikitext_links() -> None:
    text = (
        "See [[:Category:Birds|the bird list]], [[wikt:foo]], [[Star Trek: Voyager]] and [[a|b]]."
    )
    assert clean_wikitext(text) == ["See the bird list, foo, Star Trek: Voyager and b."]


def test_disambiguation_detection() -> None:
    assert is_disambiguation("Austin (disambiguation)", "")
    assert is_disambiguation("Ada", "'''Ada''' may refer to:\n{{disambiguation|geo}}")
    assert not is_disambiguation("Anarchism", "{{Anarchism sidebar}} text")


def test_iter_wiki_articles_skips_redirects_and_other_namespaces() -> None:
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Real</title><ns>0</ns>
    <revision><text>Body &lt;ref&gt;r&lt;/ref&gt;</text></revision></page>
  <page><title>Alias</title><ns>0</ns><redirect title="Real" />
    <revision><text>#REDIRECT [[Real]]</text></revision></page>
  <page><title>Wikipedia:Help</title><ns>4</ns>
    <revision><text>Project page</text></revision></page>
</mediawiki>"""
    articles = list(iter_wiki_articles(io.BytesIO(xml.encode())))
    assert articles == [("Real", "Body <ref>r</ref>")]


# ----------------------------------------------------------------------------- truncated JSON

RECORDS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "hi [1,2]"}]},
    {"id": "b_0", "conversations": [{"from": "gpt", "value": 'x}"],'}]},
]


def test_recover_complete_array() -> None:
    text = json.dumps(RECORDS, indent=2)
    assert recover_json_array(text) == (RECORDS, 0)
    assert recover_json_array("  [ ]  ") == ([], 0)


@pytest.mark.parametrize("cut", [1, 5, 20, 40])
def test_recover_drops_cut_record(cut: int) -> None:
    full = json.dumps([*RECORDS, {"id": "c_0", "conversations": [{"from": "human", "value": "z"}]}])
    last = full.rindex('{"id": "c_0"')
    text = full[: last + cut]
    items, dropped = recover_json_array(text)
    assert items == RECORDS
    assert dropped == cut


def test_recover_cut_after_complete_record() -> None:
    full = json.dumps(RECORDS, indent=2)
    end_of_second = full.rindex("}") + 1
    assert recover_json_array(full[:end_of_second]) == (RECORDS, 0)
    assert recover_json_array(full[: end_of_second - 1])[0] == RECORDS[:1]


def test_recover_cut_number_is_not_trusted() -> None:
    # "12" may be the start of "123": without a following separator it is dropped.
    assert recover_json_array("[1, 2, 12") == ([1, 2], 2)
    assert recover_json_array("[1, 2, 12]") == ([1, 2, 12], 0)


def test_recover_rejects_malformed_middle() -> None:
    with pytest.raises(ValueError):
        recover_json_array('[{"a": 1} {"b": 2}]')
    with pytest.raises(ValueError):
        recover_json_array('{"a": 1}')


def test_decode_truncated_utf8() -> None:
    data = "ok é €".encode()
    assert decode_truncated_utf8(data[:-1]) == "ok é "  # € cut mid-sequence
    assert decode_truncated_utf8(data) == "ok é €"
    with pytest.raises(UnicodeDecodeError):
        decode_truncated_utf8(b"\xff" + b"long enough valid tail")


# ----------------------------------------------------------------------------- prompts


def test_opening_prompt() -> None:
    def rec(*roles: str) -> dict:
        return {"conversations": [{"from": r, "value": f"{r}-{i}"} for i, r in enumerate(roles)]}

    assert opening_prompt(rec("human", "gpt")) == "human-0"
    assert opening_prompt(rec("system", "human")) == "human-1"
    assert opening_prompt(rec("gpt", "human")) is None  # continuation fragment
    assert opening_prompt({"id": "x", "conversations": []}) is None


def test_load_sharegpt_prompts_filters_and_dedupes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "sharegpt.jsonl"
    values = ["first prompt", "tiny", "first prompt", "second prompt", "x" * 50, "third one"]
    lines = [json.dumps({"conversations": [{"from": "human", "value": v}]}) for v in values]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(data, "sharegpt_path", lambda: path)

    assert data.load_sharegpt_prompts(min_chars=5, max_chars=20) == [
        "first prompt",
        "second prompt",
        "third one",
    ]
    assert data.load_sharegpt_prompts(n=2, min_chars=5, max_chars=20) == [
        "first prompt",
        "second prompt",
    ]
    assert len(data.load_sharegpt_prompts(min_chars=0, max_chars=100, dedupe=False)) == 6
