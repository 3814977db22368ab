"""The one switch for lowbit's compiled kernels (no lowbit imports).

lowbit JIT-builds three C++ extensions on first use (fused fake-quant, XNOR-popcount, integer
executor) and falls back to pure-torch code when a build fails. ``LOWBIT_NO_EXT=1`` turns all of
them off (``LOWBIT_NO_EXTENSION=1``, the XNOR kernel's old name for it, is still read).
"""

from __future__ import annotations

import os

ENV_VARS = ("LOWBIT_NO_EXT", "LOWBIT_NO_EXTENSION")


def extensions_disabled() -> bool:
    """Whether the environment asks for the pure-torch paths only."""
    return any(os.environ.get(v, "").strip() not in ("", "0") for v in ENV_VARS)
