"""C++ ports of hand-written layers' training steps, built on first use by torch.utils.cpp_extension.

At batch 2 a layer written as a few dozen small torch calls spends most of its time in the Python around them,
not in their arithmetic: MABN's training step was 0.52x BN's images/s on ResNet-20 at batch 2 and 0.72x with its
step as C++ making the same ATen calls (one thread, process time, paired with BN, measured while another job
ran). A port here makes exactly the calls of its Python definition, in the same order, so its values are the
same bit for bit (each port's tests check that against the Python path): the Python stays the definition, and
the path everywhere the port does not serve (another dtype or device, the model-wide modes).

``extension(name)`` builds ``normbench/norms/<name>.cpp`` once per machine (about 40 s on this project's 2-core
CPU; torch's extension cache, ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, keeps it for later
processes, and ``make setup`` builds it first) and returns the module, or None where it cannot be built (no C++
compiler or ninja; one warning, then the Python path) or where ``NORMBENCH_NATIVE=0``.
``main()`` (``make setup`` calls it) builds every port and says whether each one built.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

PORTS = ("mabn_step",)  # the .cpp files next to this module
ENABLED = os.environ.get("NORMBENCH_NATIVE") != "0"


@functools.cache
def extension(name: str) -> ModuleType | None:
    """The built module of port ``name`` (one of PORTS), or None (the reason warned once)."""
    if not ENABLED:
        return None
    # Its import warns "No CUDA runtime is found" on every CPU-only machine: noise here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name=f"normbench_{name}", sources=[str(Path(__file__).with_name(f"{name}.cpp"))],
                                  extra_cflags=["-O2"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the Python path computes the same
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"normbench: cannot build the C++ port {name} ({first_line[:200]}); its layer runs its Python "
                      f"path (the same values, slower at small batches)", RuntimeWarning, stacklevel=2)
        return None


def main() -> None:
    for name in PORTS:
        print(f"normbench C++ port {name}: {'built' if extension(name) is not None else 'not built (Python path)'}")
