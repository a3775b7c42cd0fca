"""UTIO's own CPU ops (C++), compiled on first use with torch's extension loader.

The build lands under UTIO's cache directory, keyed by the sources, the compiler flags and
the machine's instruction set (``-march=native``: a binary built on one CPU must not run
on another), and later processes load it from there. Building needs a C++ compiler and
ninja (both installed by set-up); it takes about a minute once.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from types import ModuleType

from vllm_utio.file_lock import exclusive
from vllm_utio.log import get_logger
from vllm_utio.paths import cache_dir

logger = get_logger(__name__)
SOURCES = ("sparq_mass.cpp", "decode_attention.cpp", "bindings.cpp")
# not compiled on their own; in the build key
HEADERS = ("sparq_avx512.h", "avx512_math.h", "bf16_dot.h")
# -ffast-math: vectorized expf and float reassociation; the op ranks blocks, no result
# depends on the last bit (its test compares with the spec at a tolerance)
FLAGS = ("-O3", "-march=native", "-ffast-math")
FLOCK_NAME = "utio-build.flock"  # held while loading or building (see load)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def build_name() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((here / name).read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(_cpu_flags().encode())
    return f"utio_cpu_ops_{digest.hexdigest()[:12]}"


@functools.lru_cache(maxsize=1)
def load() -> ModuleType:
    """The compiled ops module (built here on first use, then loaded from the cache)."""
    from torch.utils.cpp_extension import load as load_extension

    name = build_name()
    build = cache_dir() / "ops" / name
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        logger.info("UTIO: compiling its CPU ops into %s (once, about a minute)", build)
    here = Path(__file__).parent
    # torch's loader guards a build with a plain 'lock' file that a killed build leaves
    # behind, and every later load then waits on it forever; an flock dies with its holder,
    # so whoever holds it knows any 'lock' file is stale
    with exclusive(build / FLOCK_NAME):
        stale = build / "lock"
        if stale.exists():
            logger.warning("UTIO: removing %s, left by an ops build that was killed", stale)
            stale.unlink(missing_ok=True)
        return load_extension(
            name=name,
            sources=[str(here / s) for s in SOURCES],
            extra_cflags=list(FLAGS),
            build_directory=str(build),
            verbose=False,
        )
