"""What docs/security.md claims, checked on the source tree and the request controls:
no request field can make the server read a path or load a file, and every file UTIO
loads is read through safetensors (no pickle). No engine runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_utio.config import parse_utio_config
from vllm_utio.request_controls import (
    ATTENTION_VALUES,
    KEYS,
    SPECULATE_VALUES,
    RequestControlError,
    validate_request_controls,
)

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_utio"
SOURCES = sorted(PACKAGE.rglob("*.py"))

# (what, pattern): ways to turn bytes into arbitrary Python objects
UNSAFE = [
    ("pickle", re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b", re.M)),
    ("yaml.load", re.compile(r"\byaml\.(unsafe_)?load\(")),
    ("numpy allow_pickle", re.compile(r"allow_pickle\s*=\s*True")),
    ("eval/exec", re.compile(r"(?<![\w.])(eval|exec)\(")),
]
TORCH_LOAD = re.compile(r"torch\.load\((?P<args>[^)]*)\)")


def _code(path: Path) -> str:
    """The file without comment lines (docstrings may mention what is refused)."""
    return "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    )


def test_sources_found() -> None:
    assert len(SOURCES) > 50 and (PACKAGE / "tagged_files.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unsafe_deserialization(path: Path) -> None:
    code = _code(path)
    for what, pattern in UNSAFE:
        assert not pattern.search(code), f"{path}: {what}"
    for call in TORCH_LOAD.finditer(code):
        assert "weights_only=True" in call.group("args"), f"{path}: {call.group(0)}"


def test_weight_files_are_opened_by_safetensors_only() -> None:
    """safetensors' safe_open is the only reader of weight files: UTIO's own files
    (corrections, probes, routers) through tagged_files, the model's for the reference."""
    readers = {p.relative_to(PACKAGE).as_posix() for p in SOURCES if "safe_open(" in _code(p)}
    assert readers == {"tagged_files.py", "evaluation/reference.py"}, readers
    for name in ("corrections.py", "routing/probe.py", "routing/cost_router.py"):
        code = (PACKAGE / name).read_text()
        assert "load_tagged" in code or "read_format" in code, name


CFG = parse_utio_config(
    {
        "enabled": True,
        "buckets": [{"name": "shallow", "max_score": 0.3, "keep_first": 12, "keep_last": 10}],
    }
)
PATHS = ["/etc/passwd", "../artifacts/x.safetensors", "C:\\x", "~/.ssh/id_rsa", "file:///tmp/x"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("value", PATHS)
def test_request_controls_refuse_paths(key: str, value: str) -> None:
    with pytest.raises(RequestControlError, match="unknown value") as info:
        validate_request_controls({key: value}, CFG)
    assert info.value.field == key


def test_request_control_values_are_plain_names() -> None:
    for value in (*ATTENTION_VALUES, *SPECULATE_VALUES, "full"):
        assert re.fullmatch(r"[a-z_]+", value), value
    # any other utio_* key (one that might name a file or a config) is refused
    for key in ("utio_probe_path", "utio_artifact", "utio_config", "utio_correction"):
        with pytest.raises(RequestControlError, match="not a UTIO request control"):
            validate_request_controls({key: "/tmp/x"}, CFG)
