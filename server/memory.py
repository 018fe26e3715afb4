"""Process memory settings that keep a long-running server's footprint near its baseline."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator(mmap_threshold_bytes: int = 1 << 20, arena_max: int = 4) -> bool:
    """Makes glibc return large freed buffers to the system.

    By default glibc raises its mmap threshold each time a large block is freed, so
    after one big request, later big buffers come from the heap and stay resident;
    and every thread that allocates can get an arena of its own. A fixed threshold
    and a few arenas keep the resident size flat. A no-op elsewhere than glibc.

    Returns:
        Whether the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, mmap_threshold_bytes),
                (_M_TRIM_THRESHOLD, 2 * mmap_threshold_bytes),
                (_M_ARENA_MAX, arena_max),
            )
        )
    except (OSError, AttributeError):
        return False
    if not ok:
        logger.debug("mallopt refused a setting; keeping the allocator's defaults")
    return ok
