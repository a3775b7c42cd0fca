"""A calibration artifact that is missing, truncated or corrupted, or whose manifest lies
about shapes, is refused before any engine starts, naming the file and what is wrong
(:mod:`vllm_utio.artifact_check`); UTIO's weight files are read through safetensors only.

The unit tests copy the default artifact (built by set-up) and break one thing each; no
engine runs. The two ``server`` tests start a real ``vllm serve``: a corrupted artifact
stops it before the engine core starts, and a corrupted correction file that only a
worker loads names the file in the error.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_utio.artifact import MANIFEST, ArtifactError, resolve_artifact
from vllm_utio.corrections import load_correction
from vllm_utio.paths import default_artifact_dir, default_model_dir
from vllm_utio.serving import ServerError, ServerProcess
from vllm_utio.tagged_files import load_tagged

MODEL = default_model_dir()
SOURCE = default_artifact_dir()
CORRECTION = "skip_13_19.safetensors"
ROUTER = "router.safetensors"


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    if not (SOURCE / MANIFEST).is_file() or not (MODEL / "config.json").is_file():
        pytest.skip("default model or artifact not built: run `make setup`")
    out = tmp_path / "art"
    shutil.copytree(SOURCE, out)
    return out


def _resolve(directory: Path) -> dict:
    return resolve_artifact({"enabled": True, "artifact": str(directory)}, MODEL)


def _edit_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def test_intact_copy_loads(artifact: Path) -> None:
    out = _resolve(artifact)
    assert [b["name"] for b in out["buckets"]] == ["skip_13_19", "skip_15_19", "skip_17_19"]
    assert out["probe_path"] == str((artifact / ROUTER).resolve())


def _set_bucket(i: int, key: str, value: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["buckets"][i][key] = value

    return edit


def _del_bucket_key(i: int, key: str) -> Callable[[dict], None]:
    return lambda m: m["buckets"][i].pop(key)


def _set(path: tuple[str, ...], value: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


# (case, how to break the copy, regex the ArtifactError must match)
BROKEN: list[tuple[str, Callable[[Path], None], str]] = [
    ("no directory", lambda d: shutil.rmtree(d), r"art: no such directory"),
    ("no manifest", lambda d: (d / MANIFEST).unlink(), r"no artifact\.json; not a calibration"),
    (
        "truncated manifest",
        lambda d: _truncate(d / MANIFEST),
        r"artifact\.json: not valid JSON .*truncated or corrupted",
    ),
    (
        "manifest is a list",
        lambda d: (d / MANIFEST).write_text("[1, 2]"),
        r"artifact\.json: must hold a JSON object, got list",
    ),
    (
        "manifest has no buckets",
        lambda d: _edit_manifest(d, lambda m: m.pop("buckets")),
        r"field 'buckets' must be a non-empty list",
    ),
    (
        "bucket without keep_last",
        lambda d: _edit_manifest(d, _del_bucket_key(1, "keep_last")),
        r"buckets\[1\]\.keep_last must be int, got None",
    ),
    (
        "bucket keep_first a string",
        lambda d: _edit_manifest(d, _set_bucket(0, "keep_first", "13")),
        r"buckets\[0\]\.keep_first must be int, got '13'",
    ),
    (
        "correction missing",
        lambda d: (d / CORRECTION).unlink(),
        r"UTIO correction file not found: .*skip_13_19\.safetensors",
    ),
    (
        "correction truncated",
        lambda d: _truncate(d / CORRECTION),
        r"skip_13_19\.safetensors: not a readable UTIO correction file .*truncated or corrupted",
    ),
    (
        "correction is garbage",
        lambda d: (d / CORRECTION).write_bytes(b"\x00" * 64),
        r"skip_13_19\.safetensors: not a readable UTIO correction file",
    ),
    (
        "correction is a pickle",
        lambda d: torch.save({"down": torch.zeros(2, 576)}, d / CORRECTION),
        r"skip_13_19\.safetensors: not a readable UTIO correction file",
    ),
    (
        "correction holds NaN",
        lambda d: _edit_tensors(d / CORRECTION, lambda t: t["up"].__setitem__((0, 0), torch.nan)),
        r"skip_13_19\.safetensors: tensor 'up' holds NaN or Inf",
    ),
    (
        "correction lacks a tensor",
        lambda d: _edit_tensors(d / CORRECTION, lambda t: t.pop("down")),
        r"skip_13_19\.safetensors: correction file lacks tensor\(s\) \['down'\]",
    ),
    (
        "correction of another hidden size",
        lambda d: _edit_tensors(
            d / CORRECTION,
            lambda t: t.update(down=t["down"][:, :64], up=t["up"][:64], bias=t["bias"][:64]),
        ),
        r"skip_13_19\.safetensors: correction is for hidden size 64, the model has 576",
    ),
    (
        "correction shapes do not fit",
        lambda d: _edit_tensors(d / CORRECTION, lambda t: t.update(down=t["down"][:, :100])),
        r"skip_13_19\.safetensors: correction must map the hidden size onto itself",
    ),
    (
        "correction is the router file",
        lambda d: shutil.copy(d / ROUTER, d / CORRECTION),
        r"skip_13_19\.safetensors: not a UTIO correction file \(metadata format='utio-router'",
    ),
    (
        "correction path leaves the directory",
        lambda d: _edit_manifest(d, _set_bucket(0, "correction", "../skip_13_19.safetensors")),
        r"buckets\[0\]\.correction must be a plain file name inside the artifact directory",
    ),
    (
        "correction path is absolute",
        lambda d: _edit_manifest(d, _set_bucket(0, "correction", "/etc/passwd")),
        r"buckets\[0\]\.correction must be a plain file name",
    ),
    (
        "router path leaves the directory",
        lambda d: _edit_manifest(d, _set(("router", "weights"), "../../router.safetensors")),
        r"router\.weights must be a plain file name",
    ),
    (
        "router truncated",
        lambda d: _truncate(d / ROUTER, 0.9),
        r"router\.safetensors: not a readable UTIO router file",
    ),
    (
        "router missing",
        lambda d: (d / ROUTER).unlink(),
        r"UTIO router file not found: .*router\.safetensors",
    ),
    (
        "router layers do not chain",
        lambda d: _edit_tensors(d / ROUTER, lambda t: t.update(w0=t["w0"][:, :100])),
        r"router\.safetensors: router layer shapes do not chain",
    ),
    (
        "router lacks a tensor",
        lambda d: _edit_tensors(d / ROUTER, lambda t: t.pop("scale")),
        r"router\.safetensors: router file lacks 'scale'",
    ),
    (
        "manifest lies about the hidden size",
        lambda d: _edit_manifest(d, _set(("model", "hidden_size"), 1024)),
        r"model\.hidden_size is 1024, but the model at .* has 576",
    ),
    (
        "manifest lies about the layer count",
        lambda d: _edit_manifest(d, _set(("model", "num_layers"), 32)),
        r"model\.num_layers is 32, but the model at .* has 30",
    ),
    (
        "manifest lies about the router's plans",
        lambda d: _edit_manifest(d, _set(("router", "saved_layers"), [6, 4, 3])),
        r"router\.saved_layers is \[6, 4, 3\], but router\.safetensors was calibrated for \[6, 4, 2\]",
    ),
    (
        "manifest lies about a bucket's depth",
        lambda d: _edit_manifest(d, _set_bucket(0, "keep_first", 12)),
        r"the buckets skip \[7, 4, 2\] layers, but router\.safetensors was calibrated for "
        r"buckets skipping \[6, 4, 2\]",
    ),
    (
        "manifest lies about the routing layer",
        lambda d: _edit_manifest(d, _set(("router", "routing_layer"), 5)),
        r"router\.routing_layer is 5, but router\.safetensors reads layer 12",
    ),
    (
        "bucket keeps every layer",
        lambda d: _edit_manifest(d, _set_bucket(2, "keep_first", 19)),
        r"buckets\[2\] keeps 19 \+ 11 layers; the model has 30",
    ),
    (
        "manifest max_score out of range",
        lambda d: _edit_manifest(d, _set_bucket(0, "max_score", 2.0)),
        r"artifact\.json: its settings are no valid UTIO config: .*buckets\[0\]\.max_score",
    ),
]


@pytest.mark.parametrize(("case", "breaker", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_artifact_is_refused_naming_file_and_field(
    artifact: Path, case: str, breaker: Callable[[Path], None], message: str
) -> None:
    breaker(artifact)
    with pytest.raises(ArtifactError, match=message) as info:
        _resolve(artifact)
    text = str(info.value)
    print(f"{case}: {text}")
    assert text.startswith("UTIO config field 'artifact': ")


def test_worker_loaders_name_the_file(tmp_path: Path) -> None:
    """The loaders a worker calls (corrections, routers) name a corrupted file."""
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"broken\.safetensors: not a readable UTIO correction"):
        load_correction(bad, 576, torch.float32)
    with pytest.raises(ValueError, match=r"broken\.safetensors: not a readable UTIO router"):
        load_tagged(bad, "utio-router", "1", "router")
    torch.save({"weight": torch.zeros(3)}, bad)  # a pickle is never unpickled
    with pytest.raises(ValueError, match=r"broken\.safetensors: not a readable UTIO probe"):
        load_tagged(bad, "utio-probe", "1", "probe")


SERVE_ARGS = [
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "1024",
    "--kv-cache-memory-bytes",
    str(128 << 20),
    "--enforce-eager",
]


@pytest.mark.server
def test_serve_refuses_corrupted_artifact_before_engine_starts(
    artifact: Path, tmp_path: Path
) -> None:
    _truncate(artifact / CORRECTION)
    log = tmp_path / "server.log"
    config = json.dumps({"artifact": str(artifact)})
    server = ServerProcess(
        MODEL,
        ["--enable-utio", "--utio-config", config, *SERVE_ARGS],
        log_path=log,
        startup_timeout=180.0,
        stop_timeout=30.0,
    )
    with pytest.raises(ServerError, match="exited with code"):
        server.start()
    text = log.read_text(errors="replace")
    assert "UTIO config field 'artifact'" in text
    assert f"{artifact / CORRECTION}: not a readable UTIO correction file" in text
    # refused in the API server process: no engine core was ever started
    assert "EngineCore" not in text


@pytest.mark.server
def test_worker_names_corrupted_correction_file(tmp_path: Path) -> None:
    """A correction given directly (not in an artifact) is loaded by the worker; if that
    load fails, the engine fails to start and the error names the file."""
    if not (MODEL / "config.json").is_file():
        pytest.skip("default model not built: run `make setup`")
    bad = tmp_path / "shallow.safetensors"
    bad.write_bytes(b"\x00" * 64)
    log = tmp_path / "server.log"
    config = {
        "buckets": [
            {
                "name": "shallow",
                "max_score": 0.3,
                "keep_first": 13,
                "keep_last": 11,
                "correction": str(bad),
            }
        ]
    }
    server = ServerProcess(
        MODEL,
        ["--enable-utio", "--utio-config", json.dumps(config), *SERVE_ARGS],
        log_path=log,
        startup_timeout=600.0,  # fails after the model loads; slow on a busy machine
        stop_timeout=30.0,
    )
    with pytest.raises(ServerError, match="exited with code"):
        server.start()
    text = log.read_text(errors="replace")
    assert "EngineCore" in text  # it got as far as the worker
    assert f"{bad}: not a readable UTIO correction file" in text
