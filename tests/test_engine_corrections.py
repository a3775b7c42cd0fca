"""Exit corrections and prefill routing through the engine: a correction loaded from the
documented file format is applied exactly where the skipped stream rejoins, and with
``route_prefill`` a request's (chunked) prefill follows its plan with the same KV rule;
both checked via every layer's K/V against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import BUCKETS, make_llm, model_path, shutdown
from kv_check import kv_relative_errors, run_until
from test_engine_kv import TOLERANCE, _params

from vllm_utio.corrections import Correction, save_correction

pytestmark = pytest.mark.engine
HIDDEN = 576
SHALLOW = (BUCKETS[0]["keep_first"], BUCKETS[0]["keep_last"])


@pytest.fixture(scope="module")
def corrected_llm(tmp_path_factory):
    # a clearly visible low-rank correction (not trained: this checks the plumbing)
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(8, HIDDEN, generator=gen) / HIDDEN**0.5
    up = torch.randn(HIDDEN, 8, generator=gen) * 0.5
    path = tmp_path_factory.mktemp("corr") / "shallow.safetensors"
    save_correction(path, Correction(down, up, torch.zeros(HIDDEN)))
    buckets = [{**BUCKETS[0], "correction": str(path)}, BUCKETS[1]]
    llm = make_llm({"enabled": True, "router": "forced", "buckets": buckets, "route_prefill": True})
    yield llm, str(path)
    shutdown(llm)


def test_correction_and_prefill_routing(corrected_llm):
    llm, path = corrected_llm
    engine = llm.llm_engine
    # > 256 tokens: prefilled in two chunks (token budget 256), both routed shallow
    prompt = "The history of the river valley is long. " * 30
    engine.add_request("corr-a", prompt, _params("shallow", 48))
    cached = run_until(engine, "corr-a", 24)
    prompt_len = len(llm.get_tokenizer().encode(prompt))
    assert prompt_len > 256
    every = [(0, cached, *SHALLOW)]  # prompt and decode positions all ran shallow
    args = ("corr-a", model_path(), every, cached)
    with_corr = llm.collective_rpc(kv_relative_errors, args=(*args, {SHALLOW: path}))[0]
    without = llm.collective_rpc(kv_relative_errors, args=args)[0]
    # wrong expectation: the prompt ran full depth (what happens without route_prefill)
    prompt_full = [(0, prompt_len, 30, 0), (prompt_len, cached, *SHALLOW)]
    prefill_wrong = llm.collective_rpc(
        kv_relative_errors, args=("corr-a", model_path(), prompt_full, cached, {SHALLOW: path})
    )[0]
    engine.abort_request(["corr-a"])
    while engine.has_unfinished_requests():
        engine.step()
    assert max(with_corr["range1"]) < TOLERANCE, with_corr["range1"]
    rejoin = 30 - SHALLOW[1]  # first layer the corrected stream feeds
    # before the rejoin the correction changes nothing; from it on, ignoring it is wrong
    assert max(without["range1"][:rejoin]) < TOLERANCE
    assert min(without["range1"][rejoin:]) > 2 * TOLERANCE, without["range1"]
    skipped = range(SHALLOW[0] + 1, 30 - SHALLOW[1])
    assert min(prefill_wrong["range1"][layer] for layer in skipped) > 2 * TOLERANCE


def test_correction_file_errors(tmp_path):
    from vllm_utio.corrections import load_correction

    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"down": torch.zeros(2, 4), "up": torch.zeros(4, 2)}, str(bad))
    with pytest.raises(ValueError, match="not a UTIO correction file"):
        load_correction(bad, 4, torch.float32)
    good = tmp_path / "good.safetensors"
    save_correction(good, Correction(torch.zeros(2, 4), torch.zeros(4, 2), None))
    with pytest.raises(ValueError, match="hidden size 4, the model has 8"):
        load_correction(good, 8, torch.float32)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_correction(tmp_path / "missing.safetensors", 4, torch.float32)
    corr = load_correction(good, 4, torch.float32)
    x = torch.randn(3, 4)
    assert torch.equal(corr.delta(x), torch.zeros(3, 4))
