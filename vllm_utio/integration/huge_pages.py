"""vLLM's CPU KV cache on 2 MiB pages (Linux transparent huge pages).

Why: a decode step reads each row's KV blocks from wherever the block pool put them, so on
4 KiB pages nearly every block (for select's sparq op, every block and KV head) costs a
TLB miss and a page walk before its first byte arrives; those reads are latency-bound. On
the usual THP setting ('madvise') a buffer gets huge pages only when asked, and vLLM's
``allocate_kv_cache`` zero-fills its one backing buffer on small pages. So, right after
that allocation, the buffer's 2 MiB-aligned interior is marked for huge pages and
collapsed onto them in place (MADV_COLLAPSE, Linux 6.1+: the contents are kept; 0.3-1.5 s
per GiB, once at start: 4.7 s for 3.3 GiB while another engine was starting). Nothing
here changes a value. Where the kernel refuses, the cache stays on small pages (or
khugepaged collapses it later, in the background).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from vllm_utio.log import get_logger

logger = get_logger(__name__)
HUGE = 2 << 20  # bytes in one x86-64 / arm64 transparent huge page
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP setting ('always', 'madvise', 'never'), None where unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_pages_possible() -> bool:
    """Whether a buffer here can be asked onto huge pages (THP 'madvise' or 'always')."""
    return thp_mode() in ("madvise", "always")


def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _aligned(start: int, nbytes: int) -> tuple[int, int]:
    """The 2 MiB-aligned interior of [start, start + nbytes): (address, length)."""
    first = -(-start // HUGE) * HUGE
    last = (start + nbytes) // HUGE * HUGE
    return first, max(0, last - first)


def huge_page_bytes(start: int, nbytes: int) -> int:
    """Bytes of [start, start + nbytes) this process has on huge pages (from smaps)."""
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: lo-hi perms ...
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < start + nbytes and hi > start
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return min(total, nbytes)


def back_with_huge_pages(buffers: Iterable[torch.Tensor]) -> int:
    """Put each distinct CPU storage behind ``buffers`` on huge pages; bytes now on them."""
    storages = {}
    for t in buffers:
        if t.device.type == "cpu":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s
    if not storages:
        return 0
    if not huge_pages_possible():
        logger.info("UTIO: transparent huge pages are %s here; KV cache on 4 KiB pages", thp_mode())
        return 0
    madvise = _madvise()
    t0, done = time.perf_counter(), 0
    for addr, storage in storages.items():
        first, length = _aligned(addr, storage.nbytes())
        if length == 0:
            continue
        if madvise(first, length, MADV_HUGEPAGE) != 0:
            logger.warning("UTIO: madvise(MADV_HUGEPAGE) failed (errno %d)", ctypes.get_errno())
            continue
        if madvise(first, length, MADV_COLLAPSE) != 0:
            logger.warning("UTIO: madvise(MADV_COLLAPSE) failed (errno %d)", ctypes.get_errno())
        done += huge_page_bytes(addr, storage.nbytes())
    total = sum(s.nbytes() for s in storages.values())
    logger.info(
        "UTIO: %.2f of %.2f GiB of KV cache on 2 MiB pages (%.1f s)",
        done / 2**30, total / 2**30, time.perf_counter() - t0,
    )  # fmt: skip
    return done
