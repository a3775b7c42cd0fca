"""Ad hoc: where a speculating engine's plain decode step spends its time vs the kernel engine's."""

from __future__ import annotations

import time
from typing import Any

EXT = "step_probe.ProbeExtension"
RUNNER = [
    "execute_model",
    "sample_tokens",
    "propose_draft_token_ids",
    "_prepare_inputs",
    "_model_forward",
    "_sample",
    "_bookkeeping_sync",
    "_update_states",
    "_build_attention_metadata",
    "_calc_spec_decode_metadata",
    "compute_logits",
]
WORKER = ["execute_model", "sample_tokens", "take_draft_token_ids"]


def _wrap(obj: Any, name: str, totals: dict, prefix: str) -> None:
    fn = getattr(obj, name, None)
    if fn is None:
        return
    key = prefix + name

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
            totals[key + "#"] = totals.get(key + "#", 0) + 1

    setattr(obj, name, timed)


class ProbeExtension:
    def probe(self, reset: bool = False) -> dict:
        t = getattr(self, "_probe", None)
        if t is None:
            t = self._probe = {}
            for n in RUNNER:
                _wrap(self.model_runner, n, t, "r.")
            for n in WORKER:
                _wrap(self, n, t, "w.")
        out = dict(t)
        if reset:
            t.clear()
        return out
