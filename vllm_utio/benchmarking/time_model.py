"""A time model of a decode step, fitted from the measurements, to explain speedups.

Per decode step with ``B`` rows, where ``n_l`` rows run layer ``l`` and ``m_l`` rows skip
it (and so get the K/V fill):

    step_ms = c0 + c1 * B + sum_l [n_l > 0] * (a0 + a1 * n_l + a2 * n_l * T)
              + sum_l [m_l > 0] * (f0 + f1 * m_l)

``c`` is the fixed per-step cost, ``a`` a layer's cost (per sub-batch, per row, and per
row and cached token: attention reads a row's ``T`` tokens of context, the prompt plus
half the output on average), ``f`` the cost of writing a skipped layer's K/V. It is
fitted by least squares on every UTIO sample (full-depth samples run vLLM's compiled
model, shallow ones the layer loop with its compiled body; vanilla only serves as the
speedup reference). The model then predicts each configuration's step time from its
level sizes; a measured speedup below the predicted one points at overhead the model
does not see (the loop's own, beyond the layers it runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURES = ("fixed", "per_row", "layer", "layer_row", "layer_row_token", "fill", "fill_row")


def decode_level_rows(sample: dict[str, Any]) -> list[float] | None:
    """Mean rows per level in one decode step (prefill rows removed)."""
    utio = sample.get("utio")
    steps = sample.get("decode_steps") or 0
    if not utio or steps <= 0 or "rows_per_level" not in utio:
        return None
    rows = list(utio["rows_per_level"])
    rows[0] -= sample["batch"]  # the prefill step ran every row at full depth
    return [max(0.0, r) / steps for r in rows]


def features(
    level_rows: list[float], levels: list[dict], num_layers: int, context: float = 0.0
) -> np.ndarray:
    """The model's features of one decode step; ``context``: a row's mean cached tokens."""
    batch = sum(level_rows)
    x = np.zeros(len(FEATURES))
    x[0], x[1] = 1.0, batch
    for layer in range(num_layers):
        running = sum(
            n
            for n, lv in zip(level_rows, levels, strict=True)
            if layer < lv["keep_first"] or layer >= num_layers - lv["keep_last"]
        )
        skipped = batch - running
        if running > 0:
            x[2] += 1.0
            x[3] += running
            x[4] += running * context / 1000.0  # per thousand cached tokens
        if skipped > 0:
            x[5] += 1.0
            x[6] += skipped
    return x


def fit(results: dict[str, Any]) -> dict[str, Any] | None:
    """Coefficients and per-(config, batch, prompt) predicted vs measured step times."""
    configs = {c["name"]: c for c in results["configs"]}
    rows, targets, keys = [], [], []
    for s in results["samples"]:
        cfg = configs.get(s["config"])
        level_rows = decode_level_rows(s)
        if cfg is None or not cfg.get("levels") or level_rows is None or not s["step_ms"]:
            continue
        context = s["prompt_len"] + results["settings"].get("output_len", 0) / 2
        rows.append(features(level_rows, cfg["levels"], cfg["num_layers"], context))
        targets.append(s["step_ms"])
        keys.append((s["config"], s["batch"], s["prompt_len"]))
    if len(rows) < len(FEATURES):
        return None
    x, y = np.array(rows), np.array(targets)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    per_key: dict[tuple, list[tuple[float, float]]] = {}
    for k, p, m in zip(keys, pred, y, strict=True):
        per_key.setdefault(k, []).append((float(p), float(m)))
    table = [
        {
            "config": k[0],
            "batch": k[1],
            "prompt_len": k[2],
            "predicted_step_ms": float(np.median([p for p, _ in v])),
            "measured_step_ms": float(np.median([m for _, m in v])),
        }
        for k, v in per_key.items()
    ]
    resid = y - pred
    return {
        "coefficients_ms": dict(zip(FEATURES, map(float, coef), strict=True)),
        "r2": float(1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum()) if len(y) > 1 else None,
        "table": table,
    }
