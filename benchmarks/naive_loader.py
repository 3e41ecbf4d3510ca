"""The seeds' way of loading data, as the baseline for `throughput.py --stage data --loader naive`.

What our users start from: PIL opens the original image/mask files from two folders, albumentations
resizes and augments, a torch `DataLoader` with N workers batches, and the batch is copied to
the device. Same augmentation kinds and probabilities as our presets (albumentations' own
parameterisation), same output as our loaders: normalised float NCHW image, {0,1} mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tumorseg_dist.data.augment import AugmentParams


def albumentations_transform(size: int, p: AugmentParams, mean, std):
    import albumentations as A
    from albumentations.pytorch import ToTensorV2
    ops = [A.Resize(size, size)]
    if p.flip_p:
        ops += [A.HorizontalFlip(p=p.flip_p), A.VerticalFlip(p=p.flip_p)]
    if p.affine_p and (p.rotate_deg or p.scale or p.translate):
        ops.append(A.Affine(rotate=(-p.rotate_deg, p.rotate_deg), scale=(1 - p.scale, 1 + p.scale),
                            translate_percent=(-p.translate, p.translate), p=p.affine_p))
    if (p.brightness and p.brightness_p) or (p.contrast and p.contrast_p):
        ops.append(A.RandomBrightnessContrast(brightness_limit=p.brightness, contrast_limit=p.contrast,
                                              p=max(p.brightness_p, p.contrast_p)))
    if p.gamma and p.gamma_p:
        ops.append(A.RandomGamma(gamma_limit=(100 * (1 - p.gamma), 100 * (1 + p.gamma)), p=p.gamma_p))
    if p.noise and p.noise_p:
        ops.append(A.GaussNoise(std_range=(0.0, p.noise), p=p.noise_p))
    ops += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


class FolderDataset(torch.utils.data.Dataset):
    """`ROOT/image/NAME.png` + `ROOT/mask/NAME.png`, decoded with PIL on every access."""

    def __init__(self, root: Path, transform, channels: int):
        self.images = sorted((Path(root) / "image").glob("*.png"))
        self.masks = [Path(root) / "mask" / p.name for p in self.images]
        if not self.images:
            raise FileNotFoundError(f"{root}/image/*.png: no images")
        self.transform, self.mode = transform, "RGB" if channels == 3 else "L"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = np.asarray(Image.open(self.images[i]).convert(self.mode))
        mask = (np.asarray(Image.open(self.masks[i]).convert("L")) > 0).astype(np.uint8)
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"][None].float()


def naive_loader(root: Path, size: int, channels: int, batch_size: int, workers: int,
                 augment: AugmentParams, mean, std, pin: bool) -> torch.utils.data.DataLoader:
    ds = FolderDataset(root, albumentations_transform(size, augment, mean, std), channels)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=pin, drop_last=True,
                                       persistent_workers=False)


def write_folder(root: Path, samples) -> Path:
    """Write (name, image uint8, mask bool) samples as the seeds' folders of PNG files."""
    (Path(root) / "image").mkdir(parents=True, exist_ok=True)
    (Path(root) / "mask").mkdir(parents=True, exist_ok=True)
    for name, image, mask in samples:
        Image.fromarray(image).save(Path(root) / "image" / f"{name}.png")
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(Path(root) / "mask" / f"{name}.png")
    return Path(root)
