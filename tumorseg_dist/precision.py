"""How the numbers run: AMP dtype, GradScaler, memory format, torch.compile, the loaders' dtype.

Decided once, here, from `--amp`, `--channels-last`, `--compile` and the device
(`resolve_precision`), and handed as one frozen `Precision` to the engines, the loaders and the
benchmarks; they read its fields and never re-derive them. train.run writes `amp` back into the
config, so RUN/config.toml records what ran (`auto` becomes bf16, fp16 or off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    amp: str                              # "bf16", "fp16" or "off" (never "auto")
    compute_dtype: torch.dtype | None     # autocast dtype; None = fp32, no autocast
    grad_scaler: bool                     # fp16 needs loss scaling; bf16 and fp32 do not
    memory_format: torch.memory_format    # of the model's parameters and of every batch
    compile: bool                         # torch.compile the model
    image_dtype: torch.dtype              # what the loaders deliver: the compute dtype, else fp32

    def describe(self) -> str:
        layout = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        return (f"amp {self.amp}{' + GradScaler' if self.grad_scaler else ''}, {layout}, "
                f"images {str(self.image_dtype).removeprefix('torch.')}, "
                f"torch.compile {'on' if self.compile else 'off'}")


def resolve_amp(choice: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs that have it, fp16 on older GPUs, off on CPU."""
    if choice == "auto":
        if device.type != "cuda":
            return "off"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (the GradScaler is CUDA-only here); "
                         "use --amp bf16 or --amp off on CPU")
    return choice


def resolve_precision(train: TrainConfig, device: torch.device) -> Precision:
    """The run's Precision from --amp (auto resolved for `device`), --channels-last, --compile."""
    amp = resolve_amp(train.amp, device)
    dtype = AMP_DTYPES.get(amp)
    return Precision(amp=amp, compute_dtype=dtype, grad_scaler=amp == "fp16",
                     memory_format=torch.channels_last if train.channels_last else torch.contiguous_format,
                     compile=train.compile, image_dtype=dtype or torch.float32)
