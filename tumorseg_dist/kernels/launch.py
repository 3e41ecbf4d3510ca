"""How the Triton kernels run: compiled for a CUDA device, or under Triton's interpreter for CPU
tensors (TRITON_INTERPRET=1: the tests). One place for both kernels (dice_bce, dice_ce)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set to a true value right now (Triton's own parsing)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class KernelPair:
    """A forward and a backward kernel, wrapped for the interpreter or the compiler on first
    use: the environment may change between calls (tests), the wrapping is made once per flavour."""

    def __init__(self, fwd, bwd):
        self._fns = (fwd, bwd)
        self._made: dict[bool, tuple] = {}

    def __call__(self, interpret: bool) -> tuple:
        if interpret not in self._made:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction as make
            else:
                from triton.runtime.jit import JITFunction as make
            self._made[interpret] = tuple(make(f) for f in self._fns)
        return self._made[interpret]


INTERPRET_PROGRAMS_PER_IMAGE = 2   # small grid under the interpreter (each program is Python)


def programs_per_image(tiles: int, images: int, interpret: bool, device: torch.device) -> int:
    """Forward programs per image: enough to fill the GPU (4 per SM over the batch), never
    more than the image has tiles; a small grid under the interpreter."""
    if interpret:
        per_image = INTERPRET_PROGRAMS_PER_IMAGE
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        per_image = -(-4 * sms // images)
    return max(1, min(tiles, per_image))


def check_runnable(logits: torch.Tensor, what: str) -> bool:
    """Which flavour runs these logits (True = interpreter); a clear error if none can."""
    if interpreting():
        return True
    if logits.is_cuda:
        return False
    raise RuntimeError(
        f"{what} ('--fused-loss on') needs CUDA tensors, or the Triton interpreter for "
        f"{logits.device.type} tensors: set TRITON_INTERPRET=1 in the environment (slow, meant "
        "for tests), or use --fused-loss auto|off to run the PyTorch reference here.")
