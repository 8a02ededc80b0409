"""Fused CPU kernels for the hand-written layers' low-precision path (FRN+TLU, EvoNorm-S0 and -B0, LRN).

Under bf16 autocast these layers compute in float32 and round once (``layers``). Eagerly, every
elementwise operation of their formula is one more pass over the feature map, and on this project's
2-core CPU that made FRN, EvoNorm-S0 and LRN 0.4-0.6x as fast as BN, whose kernel is one fused loop
(results/bench/cpu2.md). ``cpu_fused`` compiles a formula with torch.compile (Inductor's C++ backend),
which fuses its forward and its backward into a few loops each, and calls the compiled function for a
low-precision input on a CPU; any other input (float32, a GPU, a model compiled as a whole) runs the
same function eagerly. A float32 run therefore computes exactly the eager formula, bit for bit: only
bf16 runs, which round to bf16 at every layer anyway, see the compiled float32 arithmetic (the same
formula, up to the order of float32 roundings).

Compilation costs a few seconds per layer shape at a run's first steps (Inductor's on-disk cache makes
later processes faster) and needs a C++ compiler; where it fails, the function runs eagerly from then
on, after a one-line warning. Shapes are static (measured: dynamic shapes made EvoNorm-S0 2.5x
slower), so every layer shape, batch size and constant is its own graph: the recompile limit is raised
to ``RECOMPILE_LIMIT``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Callable

import torch

# Graphs one fused function may compile into: layer shapes x batch sizes (training, evaluation, the last
# partial batch) x variants (with and without the activation), static shapes each.
RECOMPILE_LIMIT = 256


def is_low_precision(t: torch.Tensor) -> bool:
    """A float dtype below float32 (bf16, fp16): what autocast feeds a norm."""
    return t.dtype in (torch.bfloat16, torch.float16)


def _low_precision_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and is_low_precision(x)


def cpu_fused(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn(x, *args)`` compiled for a low-precision CPU input ``x``, eager for any other."""
    compiled: Callable[..., torch.Tensor] | None = None
    works: bool | None = None  # None until the first compiled call returns or fails

    @functools.wraps(fn)
    def call(x: torch.Tensor, *args):
        nonlocal compiled, works
        if works is False or not _low_precision_on_cpu(x) or torch.compiler.is_compiling():
            return fn(x, *args)
        if compiled is None:
            # Inductor's C++ toolchain probe warns "No CUDA runtime is found" on every CPU-only machine: noise here.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
            compiled = torch.compile(fn, dynamic=False)
        if works:
            return compiled(x, *args)
        try:
            out = compiled(x, *args)
        except Exception as e:  # no C++ compiler, an Inductor limitation: the eager formula computes the same
            works = False
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"normbench: torch.compile cannot fuse {fn.__name__} here ({first_line[:200]}); "
                          f"running it eagerly (slower)", RuntimeWarning, stacklevel=2)
            return fn(x, *args)
        works = True
        return out

    return call
