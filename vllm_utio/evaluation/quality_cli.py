"""``vllm-utio eval``: perplexity, top-1 and greedy agreement of a UTIO config vs the full model.

Runs the full model (UTIO off) and then the UTIO engine, one after the other so only one
engine is alive at a time, both teacher-forced over the same windows (see
:mod:`vllm_utio.evaluation.quality`), and prints a small table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# vllm and torch are imported only inside run(): `vllm-utio --help` builds this parser.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory (default: built-in)")
    parser.add_argument(
        "--utio-config", required=True, help="UTIO config: inline JSON or a JSON file"
    )
    parser.add_argument(
        "--utio-bucket",
        default=None,
        help="forced router: send every UTIO request to this bucket; a comma-separated "
        "list measures each bucket on the same engines, one report each",
    )
    parser.add_argument(
        "--data",
        default="wiki",
        help="'wiki' (prepared Wikipedia text), 'wiki-held' (its documents held out from "
        "calibration), a UTF-8 text file (documents separated by "
        "blank lines) or a .jsonl file of {'text': ...} or {'prompt': ...}",
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="scored-token budget")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--prompt-tokens", type=int, default=1, help="prompt tokens per window")
    parser.add_argument(
        "--windows-per-doc",
        type=int,
        default=1,
        help="at most this many windows from one document (0 = no limit); more documents "
        "give a tighter document-level bootstrap",
    )
    parser.add_argument("--greedy-prompts", type=int, default=16)
    parser.add_argument("--greedy-prompt-len", type=int, default=32)
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap only")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per engine call")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="write the full report here")


# --------------------------------------------------------------------------- inputs


def load_texts(spec: str) -> list[str]:
    """Documents of ``--data``."""
    if spec in ("wiki", "wiki-held"):
        from vllm_utio.assets.data import load_wiki_documents
        from vllm_utio.calibration.data import is_held_out

        docs = load_wiki_documents()
        if spec == "wiki-held":  # the documents calibration never sees
            docs = [d for d in docs if is_held_out(d["title"])]
        return [d["text"] for d in docs]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SystemExit(f"--data: {spec!r} is not 'wiki', 'wiki-held' or an existing file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [_jsonl_text(line, i + 1) for i, line in enumerate(text.splitlines()) if line]
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def _jsonl_text(line: str, lineno: int) -> str:
    record = json.loads(line)
    for key in ("text", "prompt"):
        if isinstance(record, dict) and isinstance(record.get(key), str):
            return record[key]
    raise SystemExit(f"--data: line {lineno} has neither a 'text' nor a 'prompt' string")


def utio_config(args: argparse.Namespace) -> dict[str, Any]:
    """The validated config, enabled (eval measures it whatever its 'enabled' says)."""
    from vllm_utio.config import UtioConfigError, load_utio_config_arg, parse_utio_config

    try:
        raw = {**load_utio_config_arg(args.utio_config), "enabled": True}
        cfg = parse_utio_config(raw)
    except UtioConfigError as err:
        raise SystemExit(str(err)) from None
    names = [b.name for b in cfg.buckets]
    for bucket in _buckets(args):
        if bucket is not None and (cfg.router != "forced" or bucket not in names):
            raise SystemExit(
                f"--utio-bucket {bucket!r} needs router 'forced' and one of the config's "
                f"buckets {names}"
            )
    return raw


def _buckets(args: argparse.Namespace) -> list[str | None]:
    """The forced buckets to measure ([None]: let the config's router decide)."""
    if not args.utio_bucket:
        return [None]
    return [b.strip() for b in args.utio_bucket.split(",") if b.strip()]


# --------------------------------------------------------------------------- engines


def _engine(args: argparse.Namespace, model: str, max_len: int, utio: dict | None) -> Any:
    from vllm import LLM

    from vllm_utio.evaluation.quality import ENGINE_DEFAULTS

    kw: dict[str, Any] = {
        **ENGINE_DEFAULTS,
        "kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30)),
        "max_model_len": max_len,
        "max_num_seqs": args.batch_size,
    }
    if utio is not None:
        kw["additional_config"] = {"utio": utio}
    return LLM(model, **kw)


def _shutdown(llm: Any) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def _measure(
    args: argparse.Namespace,
    model: str,
    max_len: int,
    utio: dict | None,
    windows: list[Any],
    prompts: list[list[int]],
    cases: list[dict | None],
    label: str,
) -> list[Any]:
    """One :class:`~vllm_utio.evaluation.quality.EngineRun` per case (request extra_args)
    on one engine, shut down afterwards so the next engine has the machine to itself."""
    from tqdm import tqdm

    from vllm_utio.evaluation.quality import run_engine

    llm = _engine(args, model, max_len, utio)
    total = len(cases) * sum(len(w.tokens) - w.prompt_len for w in windows)
    try:
        with tqdm(total=total, desc=f"{label} teacher-forced", unit="tok") as bar:
            return [
                run_engine(
                    llm, windows, prompts, args.greedy_tokens, extra, args.batch_size, bar.update
                )
                for extra in cases
            ]
    finally:
        _shutdown(llm)


# --------------------------------------------------------------------------- output


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def format_table(report: Any) -> str:
    r = report
    lo, hi = r.ppl_delta_ci
    alo, ahi = r.top1_agreement_ci
    g = r.greedy
    routing = r.routing.get("teacher_forced") or {}
    greedy_routing = r.routing.get("greedy") or {}
    rows = [
        ("", "full", "utio", ""),
        ("perplexity", f"{r.ppl_full:.3f}", f"{r.ppl_utio:.3f}", f"{_pct(r.ppl_delta)}"),
        ("  95% CI (documents)", "", "", f"{_pct(lo)} .. {_pct(hi)}"),
        ("top-1 agreement", "", f"{100 * r.top1_agreement:.1f}%", ""),
        ("  95% CI (documents)", "", "", f"{100 * alo:.1f}% .. {100 * ahi:.1f}%"),
        ("mean |dlogp| (nats)", "", f"{r.mean_abs_logprob_diff:.3f}", ""),
        (
            "greedy agreement",
            "",
            f"{100 * g['token_agreement']:.1f}%",
            f"first divergence at {g['mean_first_divergence']:.1f} of "
            f"{g['tokens_per_prompt']} ({g['prompts']} prompts)",
        ),
        (
            "layer-tokens saved",
            "",
            f"{100 * routing.get('saved_fraction', 0.0):.1f}%",
            f"greedy phase {100 * greedy_routing.get('saved_fraction', 0.0):.1f}%",
        ),
        (
            "seconds",
            f"{r.seconds['full_teacher_forced'] + r.seconds['full_greedy']:.1f}",
            f"{r.seconds['utio_teacher_forced'] + r.seconds['utio_greedy']:.1f}",
            "",
        ),
    ]
    head = (
        f"{r.documents} documents, {r.windows} windows, {r.scored_tokens} scored tokens "
        f"(window {r.window}, prompt {r.prompt_len}); UTIO requests: {r.extra_args or '-'}"
    )
    lines = [head] + [f"{a:<22}{b:>10}{c:>10}   {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from vllm_utio.evaluation.quality import compare, greedy_prompts, prepare_windows
    from vllm_utio.paths import default_model_dir

    utio = utio_config(args)
    # Both engines on vLLM's V1 runner: UTIO and the forcing processor need it, and the
    # full model must share its numerics (V2 is the default where Triton exists).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    model = str(args.model or default_model_dir())
    cases = [{"utio_bucket": b} if b else None for b in _buckets(args)]
    # The engines' tokenizer, loaded without an engine: windows are cut before either starts.
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = prepare_windows(
        tokenizer,
        load_texts(args.data),
        args.window,
        args.prompt_tokens,
        args.max_tokens,
        args.windows_per_doc or None,
    )
    if not windows:
        raise SystemExit("--data: no document is long enough for one window")
    prompts = greedy_prompts(windows, args.greedy_prompts, args.greedy_prompt_len)
    prefix = windows[0].prefix_len
    max_len = max(args.window, args.greedy_prompt_len + args.greedy_tokens) + prefix
    (full,) = _measure(args, model, max_len, None, windows, prompts, [None], "full")
    routed = _measure(args, model, max_len, utio, windows, prompts, cases, "utio")
    reports = [
        compare(windows, full, run, args.bootstrap, args.seed, extra)
        for run, extra in zip(routed, cases, strict=True)
    ]
    print("\n\n".join(format_table(r) for r in reports))
    if args.json:
        out = {
            "model": model,
            "data": args.data,
            "utio_config": utio,
            "reports": [r.to_dict() for r in reports],
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"report: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-utio eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # spawned engine processes re-import this module
    sys.exit(main())
