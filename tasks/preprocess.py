"""The model's preprocessing (FORMAT.md): shorter side -> resize, centre crop, [0, 1], normalize.

`preprocessing` is the dict recorded in the manifest, so any client can reproduce an activation."""
from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images -> RGB (alpha composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    return img.convert("RGB")


def crop_input(img: Image.Image, pre: dict) -> Image.Image:
    """The geometric part: RGB, resize shorter side, centre crop. Returns a crop x crop PIL image."""
    img = to_rgb(img)
    interp = InterpolationMode(pre.get("interpolation", "bilinear"))
    img = TF.resize(img, pre["resize"], interpolation=interp)
    return TF.center_crop(img, pre["crop"])


def normalize(x: torch.Tensor, pre: dict) -> torch.Tensor:
    """[0, 1] tensor (..., 3, H, W) -> model input."""
    mean = torch.tensor(pre["mean"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(pre["std"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor, pre: dict) -> torch.Tensor:
    """Model input -> [0, 1] (not clamped)."""
    mean = torch.tensor(pre["mean"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(pre["std"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def preprocess(img: Image.Image, pre: dict) -> torch.Tensor:
    """PIL image -> normalized float tensor 3 x crop x crop."""
    return normalize(TF.to_tensor(crop_input(img, pre)), pre)


def to_pil(x01: torch.Tensor) -> Image.Image:
    """[0, 1] tensor 3 x H x W -> 8-bit RGB image."""
    arr = (x01.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")
