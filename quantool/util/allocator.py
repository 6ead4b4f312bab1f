"""Host memory that layer-by-layer work gives back to the system.

glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after
which blocks of that size come from the heap and stay there once freed: a loop that frees and reallocates
layer-sized tensors then grows its resident set layer after layer. Fixing the threshold keeps large
buffers mmapped (returned to the system on free), and trimming returns what the heap holds. A no-op where
the C library is not glibc.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc's malloc.h


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def keep_large_buffers_mapped(threshold: int = 1 << 20) -> None:
    """Allocate blocks of `threshold` bytes and more with mmap, always (the threshold no longer adapts)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, threshold)


def release_free_memory() -> None:
    """Return the heap's free pages to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
