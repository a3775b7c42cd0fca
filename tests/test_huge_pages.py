"""The KV cache's move onto huge pages: arithmetic, and that it keeps every value."""

from __future__ import annotations

import pytest
import torch

from vllm_utio.integration.huge_pages import (
    HUGE,
    _aligned,
    back_with_huge_pages,
    huge_page_bytes,
    huge_pages_possible,
)


def test_aligned_interior_of_a_buffer():
    assert _aligned(0, 3 * HUGE) == (0, 3 * HUGE)
    assert _aligned(1, 3 * HUGE) == (HUGE, 2 * HUGE)  # the partial pages at both ends stay
    assert _aligned(HUGE - 8, HUGE + 16) == (HUGE, HUGE)
    assert _aligned(5, HUGE) == (HUGE, 0)  # no whole huge page inside


@pytest.mark.skipif(not huge_pages_possible(), reason="no transparent huge pages on this kernel")
def test_buffer_moves_onto_huge_pages_with_its_values():
    gen = torch.Generator().manual_seed(0)
    buf = torch.randint(-128, 127, (48 << 20,), dtype=torch.int8, generator=gen)
    before = buf.clone()
    views = [buf[: 1 << 20].view(torch.int16), buf[8 << 20 :]]  # one storage, two views
    done = back_with_huge_pages(views)
    assert done == huge_page_bytes(buf.data_ptr(), buf.numel())
    assert done >= _aligned(buf.data_ptr(), buf.numel())[1] - 2 * HUGE  # nearly all of it
    assert torch.equal(buf, before)  # in place, nothing changed


def test_nothing_to_do_for_no_cpu_buffers():
    assert back_with_huge_pages([]) == 0
