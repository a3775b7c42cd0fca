"""The workaround for vLLM 0.32's CPU ``expand_kernel`` stand-in (vllm-project/vllm#55005):
the replacement spreads per-request values in the caller's dtype; vLLM's own stand-in
loses them, and after :func:`fix_expand_kernel` the rejection sampler's temperature is the
request's. (The engine-level check: test_engine_speculate's sampling test.)"""

from __future__ import annotations

import subprocess
import sys

import torch

from vllm_utio.integration.cpu_sampling_fix import expand_in_dtype


def test_expand_in_dtype_spreads_each_request_over_its_tokens():
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # the middle request has no drafts
    temp = torch.tensor([0.7, 1.3, 0.0], dtype=torch.float32)
    out = torch.full((5,), -9.0)
    expand_in_dtype(out, temp, cu, 0, 1)  # greedy rows (0.0) read as temperature 1
    assert out.tolist() == [0.699999988079071, 0.699999988079071, 1.0, 1.0, 1.0]
    top_k = torch.tensor([5, 0], dtype=torch.int32)
    out_k = torch.zeros(4, dtype=torch.int32)
    expand_in_dtype(out_k, top_k, torch.tensor([1, 4]), 0, 0)
    assert out_k.dtype == torch.int32 and out_k.tolist() == [5, 0, 0, 0]


_PROBE = """
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
current_platform.register_triton_kernel_overrides()  # what vLLM's CPU worker does
from vllm_utio.integration.cpu_sampling_fix import expand_is_broken, fix_expand_kernel
from vllm.v1.sample.rejection_sampler import apply_sampling_constraints

class Meta:  # the fields apply_sampling_constraints reads
    all_greedy, top_k, top_p = False, None, None
    temperature = torch.tensor([0.5, 2.0])

broken = expand_is_broken()
fixed = fix_expand_kernel()
logits = torch.ones(3, 4)
got = apply_sampling_constraints(logits.clone(), torch.tensor([1, 3], dtype=torch.int32), Meta)
print(broken, fixed, got[:, 0].tolist())
"""


def test_fix_repairs_vllms_cpu_stand_in():
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    broken, fixed, temps = done.stdout.strip().splitlines()[-1].split(" ", 2)
    # vLLM 0.32's stand-in loses its output, so the fix applies (if a later vLLM fixes
    # it, fixed is False and the workaround can go)
    assert (broken, fixed) == ("True", "True")
    assert temps == "[2.0, 0.5, 0.5]"  # logits 1 divided by each row's own temperature
