"""Where a run computes and how: the device, the precision (bf16 autocast) and torch.compile, each
asked for in the config (``device``, ``amp``, ``compile``, with ``auto``) and resolved here, once.

Validation calls ``check_device`` before any run (one line, exit 2); the trainer calls the
resolvers; the run's identity records what they resolve to (``identity.run_config``), so a run
is the same run on every machine that computes it the same way. Torch is imported only when a
value is resolved.
"""

from __future__ import annotations

from normbench.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
# amp and compile: auto, or forced on / off.
SWITCH_CHOICES = ("auto", True, False)
# memory_format: auto (each norm's declared preference, NormInfo.memory_format), or forced.
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_device(name) -> None:
    """A device name this machine can use: auto, cpu, mps, cuda or cuda:N (N a visible GPU)."""
    import torch

    name = str(name)
    if name in ("auto", "cpu"):
        return
    if name == "mps":
        if not _mps_available():
            raise UserError("device=mps but MPS is not available here; use device=auto or device=cpu")
        return
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but no CUDA GPU is available here; use device=auto or device=cpu")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"device={name}: no such GPU here ({torch.cuda.device_count()} visible); use device=auto or cuda:0")
        return
    raise UserError(f"device={name!r} is not a device name; use {DEVICE_CHOICES}")


def resolve_device(name: str):
    """The torch.device for ``name``: auto = cuda > mps > cpu."""
    import torch

    check_device(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    return torch.device(name)


def device_type(name: str) -> str:
    """cpu, cuda or mps: what a run asked for with ``device`` computes on here."""
    return resolve_device(str(name)).type


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles), as torch sees it:
    oneDNN runs bf16 convolutions and matmuls on them."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent means no
    return bool(probe is not None and probe())


def uses_bf16(amp, device_kind: str) -> bool:
    """Whether a run trains and evaluates under bf16 autocast: amp=auto means on CUDA, and on a CPU
    with bf16 matrix units. On this project's AMX CPU bf16 (in each norm's memory format) trained to
    fp32's test accuracy in every arm measured (results/bench/bf16_parity.md) and trained faster at
    every batch from 2 to 128 (results/bench/cpu2.md), so auto does not depend on the batch."""
    if amp != "auto":
        return amp is True
    return device_kind == "cuda" or (device_kind == "cpu" and cpu_has_bf16_matrix_units())


def resolved_memory_format(memory_format: str, norm_name: str, bf16: bool) -> str:
    """contiguous or channels_last. auto: the norm's declared preference in bf16 runs (where it was
    measured), contiguous in fp32 runs (as every run before the option)."""
    if memory_format != "auto":
        return memory_format
    from normbench.norms import NORMS

    return NORMS[norm_name].memory_format if bf16 and norm_name in NORMS else "contiguous"


def torch_memory_format(name: str):
    """The torch.memory_format of a resolved memory_format."""
    import torch

    return {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[name]


def uses_compile(compile_, device_kind: str) -> bool:
    """Whether the training step is torch.compile-d: compile=auto means on CUDA only (on a CPU its
    compile time is not won back in a run of this size)."""
    return device_kind == "cuda" if compile_ == "auto" else compile_ is True
