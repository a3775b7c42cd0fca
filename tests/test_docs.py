"""Generated docs stay in step with the code."""

from pathlib import Path

from vllm_utio.config_doc import render


def test_config_doc_is_current():
    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text() == render(), "run: python -m vllm_utio.config_doc > docs/config.md"
