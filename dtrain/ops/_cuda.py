"""Which CUDA kernels run: the extension's (built by nvcc at install time) or the same
source compiled at run time through NVRTC (dtrain.ops._nvrtc, needs CuPy).

DTRAIN_CUDA_KERNELS=nvrtc picks the run-time path even when the extension has CUDA
kernels (to test it); =builtin refuses the run-time path.
"""

from __future__ import annotations

import os
from typing import Optional

from dtrain.errors import ConfigError


def backend(what: str, required: bool = True) -> Optional[object]:
    """An object with the *_cuda kernel functions, or None (required=False) when neither
    path is there. Raises ConfigError naming the fix when required."""
    from dtrain import _C
    choice = os.environ.get("DTRAIN_CUDA_KERNELS", "").lower()
    if choice not in ("", "builtin", "nvrtc"):
        raise ConfigError(f"DTRAIN_CUDA_KERNELS={choice!r}: use 'builtin' or 'nvrtc' (or leave it unset)")
    if _C.kernels.cuda_built and choice != "nvrtc":
        return _C.kernels
    from dtrain.ops import _nvrtc
    if choice != "builtin" and _nvrtc.available():
        return _nvrtc
    if not required:
        return None
    raise ConfigError(f"{what}: the tensors are on CUDA, but this dtrain was built without CUDA kernels and "
                      "CuPy (which compiles them at run time) is not installed: pip install cupy-cuda12x "
                      "(or cupy-cuda13x), or reinstall dtrain where nvcc is found (CUDA_HOME)")
