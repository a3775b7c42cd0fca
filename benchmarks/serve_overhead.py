"""UTIO's serving overhead, measured with vLLM's own client (`vllm bench serve`).

    python benchmarks/serve_overhead.py [-o docs/results/<date>/serve-overhead] \
        [--utio NAME=JSON ...] [--pin NAME=SERVER:BUCKET ...] [--concurrency 1 16] \
        [--repeats 2]

Starts real `vllm serve` processes on 127.0.0.1: one with UTIO off (`vanilla`) and one
`--enable-utio --utio-config JSON` per `--utio` (default: `utio={}`, full depth), keeps
them alive, and runs `vllm bench serve` (random dataset, 256 in / 128 out,
`--ignore-eos`) against each in turn: concurrency levels and repeats interleaved, so
drift hits all alike. A `--pin` adds a configuration that sends every request to a UTIO
server with `vllm_xargs: {"utio_bucket": BUCKET}` (its forced plan) through
`--extra-body`. Writes each run's JSON from `vllm bench serve`, a summary JSON and a
markdown table (medians over repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from vllm_utio.paths import default_model_dir
from vllm_utio.serving import ServerProcess

INPUT_LEN, OUTPUT_LEN = 256, 128
PROMPTS_PER_SLOT = 8  # requests per concurrency slot, at least 16 per run


def bench_once(
    server: ServerProcess, model: str, concurrency: int, out: Path, bucket: str | None
) -> dict:
    """One `vllm bench serve` run (every request pinned to ``bucket`` unless None);
    returns its saved result JSON."""
    cmd = [
        str(Path(sys.executable).with_name("vllm")),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        server.base_url,
        "--model",
        model,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(INPUT_LEN),
        "--random-output-len",
        str(OUTPUT_LEN),
        "--ignore-eos",
        "--num-prompts",
        str(max(16, PROMPTS_PER_SLOT * concurrency)),
        "--max-concurrency",
        str(concurrency),
        "--seed",
        "0",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    if bucket is not None:
        cmd += ["--extra-body", json.dumps({"vllm_xargs": {"utio_bucket": bucket}})]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _named(text: str, flag: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or name == "vanilla":
        raise SystemExit(
            f"{flag}: expected NAME=VALUE with a NAME other than 'vanilla', got {text!r}"
        )
    return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("serve-overhead"))
    parser.add_argument(
        "--utio",
        action="append",
        default=None,
        metavar="NAME=JSON",
        help="a UTIO server and its --utio-config (repeatable; default: utio={})",
    )
    parser.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="NAME=SERVER:BUCKET",
        help="a configuration: every request to UTIO server SERVER pinned to BUCKET",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = str(default_model_dir())
    utio = dict(_named(u, "--utio") for u in (args.utio or ["utio={}"]))
    # configuration name -> (server name, pinned bucket or None)
    configs: dict[str, tuple[str, str | None]] = {"vanilla": ("vanilla", None)}
    configs.update({name: (name, None) for name in utio})
    for text in args.pin:
        name, target = _named(text, "--pin")
        server, sep, bucket = target.partition(":")
        if not sep or server not in utio or not bucket:
            raise SystemExit(
                f"--pin {text!r}: expected NAME=SERVER:BUCKET with SERVER one of {sorted(utio)}"
            )
        configs[name] = (server, bucket)
    args.out.mkdir(parents=True, exist_ok=True)
    # servers share the machine: a fixed KV cache each, not vLLM's share of memory
    common = ["--dtype", "bfloat16", "--max-model-len", "2048", "--kv-cache-memory-bytes", "2G"]
    server_args = {"vanilla": common}
    for name, config in utio.items():
        server_args[name] = [*common, "--enable-utio", "--utio-config", config]
    runs: dict[str, dict[int, list[dict]]] = {c: {n: [] for n in args.concurrency} for c in configs}
    servers: dict[str, ServerProcess] = {}
    try:
        for name, extra in server_args.items():
            servers[name] = ServerProcess(model, extra).start()
        for rep in range(args.repeats):
            for n in args.concurrency:
                for name, (server, bucket) in configs.items():
                    path = args.out / f"{name}-c{n}-r{rep}.json"
                    result = bench_once(servers[server], model, n, path, bucket)
                    runs[name][n].append(result)
                    print(f"{name} c={n} rep {rep}: {result['output_throughput']:.1f} tok/s")
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for n in args.concurrency:
        base = statistics.median(r["output_throughput"] for r in runs["vanilla"][n])
        for name in configs:
            rs = runs[name][n]
            tput = statistics.median(r["output_throughput"] for r in rs)
            rows.append(
                {
                    "config": name,
                    "concurrency": n,
                    "output_tok_s": tput,
                    "vs_vanilla": tput / base,
                    "median_tpot_ms": statistics.median(r["median_tpot_ms"] for r in rs),
                    "median_ttft_ms": statistics.median(r["median_ttft_ms"] for r in rs),
                    "failed": sum(r["num_prompts"] - r["completed"] for r in rs),
                    "runs": len(rs),
                }
            )
    summary = {
        "utio_configs": utio,
        "pins": {name: bucket for name, (_, bucket) in configs.items() if bucket},
        "input_len": INPUT_LEN,
        "output_len": OUTPUT_LEN,
        "rows": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"`vllm bench serve`, random {INPUT_LEN} in / {OUTPUT_LEN} out, ignore_eos; "
        f"medians of {args.repeats} interleaved repeats.",
        "",
        *(f"- `{name}`: `--enable-utio --utio-config '{config}'`" for name, config in utio.items()),
        *(
            f"- `{name}`: `{server}`, every request pinned to `{bucket}`"
            for name, (server, bucket) in configs.items()
            if bucket
        ),
        "",
        "| config | concurrency | output tok/s | vs vanilla | median TPOT ms | median TTFT ms "
        "| failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['concurrency']} | {r['output_tok_s']:.1f} | "
            f"{r['vs_vanilla']:.2f}x | {r['median_tpot_ms']:.1f} | {r['median_ttft_ms']:.1f} "
            f"| {r['failed']} |"
        )
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
