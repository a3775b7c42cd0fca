"""The decode hot path is CUDA-graph safe: no host synchronisation, fixed buffers.

- On CPU (checkable anywhere): every policy's call through SparseDecoder, and the
  summaries fold, run with the ways a tensor reaches the host (``item``, ``tolist``,
  ``cpu``, ``numpy``, ``bool``/``int``/``float``/``index`` of a tensor, a CUDA sync)
  patched to raise, given preallocated outputs; a second call writes the same buffers.
- On a GPU only: each policy captured in a CUDA graph, the inputs changed in place,
  replayed: equal to an eager call on the new inputs.
- The GPU benchmark's ``--tiny`` run (CPU interpreter here; CUDA on a GPU machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_kernels_env import (
    DEVICE,
    ON_GPU,
    block_summaries,
    decoder,
    light_cpu,  # noqa: F401 (a fixture)
    needs_gpu,
    needs_kernels,
)

from vllm_utio.kernels.paged_cases import make_paged_case

pytestmark = [needs_kernels, pytest.mark.usefixtures("light_cpu")]
ROOT = Path(__file__).resolve().parents[1]

_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Every way a tensor's value reaches Python raises while the block runs."""
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync on the hot path: Tensor.{name}")

        return method

    sync = torch.cuda.synchronize
    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        torch.cuda.synchronize = refuse("torch.cuda.synchronize")
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.cuda.synchronize = sync


def policies() -> dict[str, object]:
    return {
        "dense": decoder.Dense(),
        "throttle": decoder.Throttle(8, 12),
        "vslash": decoder.Vslash(8, 12, (0, 30, 200), 2),
        "query_aware": decoder.QueryAware(8, 12, 40),
        "query_aware_shared": decoder.QueryAware(8, 12, 40, per_kv_head=False),
    }


def setup_case(seed: int = 0):
    case = make_paged_case([5, 61, 90], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                           dtype=torch.float16, device=DEVICE, seed=seed)  # fmt: skip
    packed = torch.full(
        (2, case.kv_cache.shape[0], 64), float("-inf"), dtype=torch.float16, device=DEVICE
    )
    for b, n in enumerate(case.lens):
        pos = torch.arange(n, device=DEVICE)
        blocks = case.block_table[b].long()[pos // 8]
        block_summaries.fold_block_summaries(
            packed, case.key_cache[blocks, pos % 8], blocks * 8 + pos % 8, 8
        )
    ranked = torch.tensor([[3, 1, 4, 1, 5]] * 3, dtype=torch.int32, device=DEVICE)
    return case, packed, ranked


def test_hot_path_never_syncs():
    case, packed, ranked = setup_case()
    shape = decoder.DecodeShape(4, 4, 2, 32, 8, case.block_table.shape[1])
    keys = torch.randn(3, 2, 32, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([8, 9, -1], device=DEVICE)
    for name, policy in policies().items():
        dec = decoder.SparseDecoder(policy, shape, DEVICE, num_splits=3)
        out = torch.empty_like(case.q)
        args = (case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 0.2)
        eager = dec(*args, out=torch.empty_like(case.q), summaries=packed, ranked=ranked)
        with no_host_sync():
            got = dec(*args, out=out, summaries=packed, ranked=ranked)
            block_summaries.fold_block_summaries(packed.clone(), keys, slots, 8)
        assert got is out, name
        assert torch.equal(out, eager), name


def test_no_host_sync_guard_catches_a_sync():
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        int(torch.ones(()).sum())


@needs_gpu
@pytest.mark.parametrize(
    "name", ["dense", "throttle", "vslash", "query_aware", "query_aware_shared"]
)
def test_cuda_graph_capture_replay(name: str):
    """Captured once; new query values and shorter sequences written in place; replay ==
    an eager call on the new inputs."""
    case, packed, ranked = setup_case()
    shape = decoder.DecodeShape(3, 4, 2, 32, 8, case.block_table.shape[1])
    dec = decoder.SparseDecoder(policies()[name], shape, DEVICE)  # the device's SM count
    out = torch.empty_like(case.q)
    args = (case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 0.2)

    def call() -> torch.Tensor:
        return dec(*args, out=out, summaries=packed, ranked=ranked)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    case.q.copy_(torch.randn_like(case.q))
    case.seq_lens.copy_(torch.tensor([3, 50, 90], dtype=torch.int32, device=DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    eager = dec(*args, out=torch.empty_like(out), summaries=packed, ranked=ranked)
    assert torch.equal(replayed, eager)


def test_gpu_benchmark_tiny_run(tmp_path: Path):
    """benchmarks/gpu_decode_attention.py --tiny: correctness checks pass, every policy
    and SDPA timed at every point, targets judged, JSON and markdown written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not ON_GPU:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the interpreter path even where a GPU exists
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_decode_attention.py"),
        "--tiny",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert [c["ok"] for c in result["correctness"]] == [True] * 5
    assert len(result["points"]) == 2  # batch 1 and 2 at 48 tokens
    for point in result["points"]:
        assert {"dense", "vslash", "query_aware", "sdpa_dense"} <= set(point["methods"])
        assert all(m.get("eager_ms") is not None for m in point["methods"].values())
    assert result["targets"] and result["sweep"]
    assert "| batch | ctx |" in (tmp_path / "results.md").read_text()


def test_kernels_package_is_standalone():
    """Importing the package (or its pure-torch modules) imports no Triton (which would fix
    interpreted-or-compiled before the kernels are defined), and all of it, Triton modules
    included, imports nothing from vLLM (the GPU benchmark runs without vLLM)."""
    code = (
        "import sys\n"
        "import vllm_utio.kernels, vllm_utio.kernels.reference, vllm_utio.kernels.selection\n"
        "import vllm_utio.kernels.paged_cases, vllm_utio.kernels.common\n"
        "assert 'triton' not in sys.modules, 'triton imported by the package'\n"
        "import vllm_utio.kernels.decoder, vllm_utio.kernels.sparse_decode\n"
        "assert vllm_utio.kernels.SparseDecoder\n"
        "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
