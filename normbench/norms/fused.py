"""Fused CPU kernels for the hand-written layers (FRN+TLU, EvoNorm-S0 and -B0, LRN, SwitchNorm, Online Norm).

Under bf16 autocast these layers compute in float32 and round once (``layers``). Eagerly, every
elementwise operation of their formula is one more pass over the feature map, and on this project's
2-core CPU that made FRN, EvoNorm-S0 and LRN 0.4-0.6x as fast as BN, whose kernel is one fused loop
(results/bench/cpu2.md). ``cpu_fused`` compiles a formula with torch.compile (Inductor's C++ backend),
which fuses its forward and its backward into a few loops each, and calls the compiled function for a
low-precision input on a CPU; any other input (a GPU, a model compiled as a whole) runs the same function
eagerly. A float32 CPU input runs eagerly too, bit for bit the eager formula (every committed float32 result
of FRN, EvoNorm-S0 and LRN was trained so), except for the functions declared ``cpu_fused(float32=True)``:
the issue-28 remedies (SwitchNorm, EvoNorm-B0, Online Norm), which no committed result trained eagerly and
whose dozens of small operations per layer made them far slower than BN at batch 2 in float32 (eager:
results/bench/remedies_avx2.md; fused: results/bench/remedies_fused.md). Those compute the same formula up
to the order of float32 roundings (tests/test_fused.py checks the compiled path against the eager one).

Compilation costs a few seconds per layer shape at a run's first steps (Inductor's on-disk cache makes
later processes faster) and needs a C++ compiler; where it fails, the function runs eagerly from then
on, after a one-line warning. Shapes are static (measured: dynamic shapes made EvoNorm-S0 2.5x
slower), so every layer shape, batch size and constant is its own graph: the recompile limit is raised
to ``RECOMPILE_LIMIT``. The test suite sets ``NORMBENCH_EAGER_FLOAT32=1`` (``FUSE_FLOAT32`` false): compiling
each of its hundreds of float32 layer shapes would take most of its time.

``compile_disabled`` is this project's ``torch.compiler.disable`` (the host-side parts of layers that
torch.compile must leave out of its graphs), applied when something can compile.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Callable

import torch

# Graphs one fused function may compile into: layer shapes x batch sizes (training, evaluation, the last
# partial batch) x variants (with and without the activation), static shapes each.
RECOMPILE_LIMIT = 256
# Whether ``cpu_fused(float32=True)`` functions compile a float32 CPU input (the module docstring).
FUSE_FLOAT32 = os.environ.get("NORMBENCH_EAGER_FLOAT32") != "1"


def is_low_precision(t: torch.Tensor) -> bool:
    """A float dtype below float32 (bf16, fp16): what autocast feeds a norm."""
    return t.dtype in (torch.bfloat16, torch.float16)


def _low_precision_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and is_low_precision(x)


def _float32_on_cpu(x: torch.Tensor) -> bool:
    return FUSE_FLOAT32 and x.device.type == "cpu" and x.dtype == torch.float32


def cpu_fused(fn: Callable[..., torch.Tensor] | None = None, *, float32: bool = False):
    """``fn(x, *args)`` compiled for a low-precision CPU input ``x`` (with ``float32``, a float32 one too), eager
    for any other. As a decorator: ``@cpu_fused`` or ``@cpu_fused(float32=True)``."""
    if fn is None:
        return functools.partial(cpu_fused, float32=float32)
    compiled: Callable[..., torch.Tensor] | None = None
    works: bool | None = None  # None until the first compiled call returns or fails

    @functools.wraps(fn)
    def call(x: torch.Tensor, *args):
        nonlocal compiled, works
        if (works is False or not (_low_precision_on_cpu(x) or (float32 and _float32_on_cpu(x)))
                or torch.compiler.is_compiling()):
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

    call.fuses_float32 = float32  # the declaration, for tests/test_fused.py
    return call


# Every compile_disabled function not yet disabled: what before_compile disables.
_NOT_YET_DISABLED: list[Callable[[], Callable]] = []


def compile_disabled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, applied once torch._dynamo is loaded: that decorator imports torch._dynamo,
    which nothing needs before something compiles (measured: without it a bad option is refused in 2.4 s, not 4.2).
    Until then ``fn`` runs as it is (nothing can be tracing it); ``before_compile`` disables every such function
    before a trace starts (``torch.compile`` of something else first: the first call inside a trace disables it
    there, at one extra graph break)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.disable(fn)
    disabled: Callable | None = None

    def disable() -> Callable:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if disabled is None and "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        return disable()(*args, **kwargs)

    _NOT_YET_DISABLED.append(disable)
    return call


def before_compile() -> None:
    """Disable every ``compile_disabled`` function now, outside any trace (called before torch.compile)."""
    while _NOT_YET_DISABLED:
        _NOT_YET_DISABLED.pop()()
