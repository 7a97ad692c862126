"""The model's preprocessing (FORMAT.md): shorter side -> resize, centre crop, [0, 1], normalize.

`preprocessing` is the dict recorded in the manifest, so any client can reproduce an activation.
The geometric part (crop_input) needs only PIL: the dataset pass's decode processes run it without
importing torch (torch is imported by the functions that need it)."""
from __future__ import annotations

from PIL import Image


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


def _resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """torchvision's size for resize(img, int): the shorter side -> `short`, the longer scaled and
    truncated (transforms.functional._compute_resized_output_size)."""
    lo, hi = (w, h) if w <= h else (h, w)
    new_lo, new_hi = short, int(short * hi / lo)
    return (new_lo, new_hi) if w <= h else (new_hi, new_lo)


def crop_input(img: Image.Image, pre: dict) -> Image.Image:
    """The geometric part: RGB, resize shorter side, centre crop. Returns a crop x crop PIL image,
    the pixels of torchvision's TF.resize + TF.center_crop on PIL images (the same PIL calls)."""
    img = to_rgb(img)
    interp = str(pre.get("interpolation", "bilinear")).upper()
    crop, resize = int(pre["crop"]), pre["resize"]
    if not isinstance(resize, int) or crop > resize or interp not in Image.Resampling.__members__:
        return _crop_torchvision(img, pre)        # padding, (h, w) sizes, exotic modes: torchvision itself
    w, h = img.size
    size = _resized_size(w, h, resize)
    if size != (w, h):
        img = img.resize(size, Image.Resampling[interp])
    w, h = img.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def _crop_torchvision(img: Image.Image, pre: dict) -> Image.Image:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    img = TF.resize(img, pre["resize"], interpolation=InterpolationMode(pre.get("interpolation", "bilinear")))
    return TF.center_crop(img, pre["crop"])


def normalize(x, pre: dict):
    """[0, 1] tensor (..., 3, H, W) -> model input."""
    import torch
    mean = torch.tensor(pre["mean"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(pre["std"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x, pre: dict):
    """Model input -> [0, 1] (not clamped)."""
    import torch
    mean = torch.tensor(pre["mean"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(pre["std"], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def preprocess(img: Image.Image, pre: dict):
    """PIL image -> normalized float tensor 3 x crop x crop."""
    import torchvision.transforms.functional as TF
    return normalize(TF.to_tensor(crop_input(img, pre)), pre)


def to_pil(x01) -> Image.Image:
    """[0, 1] tensor 3 x H x W -> 8-bit RGB image."""
    import torch
    arr = (x01.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


# ---------------------------------------------------------------- on the model's device (--decoder nvjpeg)
# bicubic is left to the CPU: torch upsamples it with another kernel than PIL (up to 12 levels apart on
# the sample images, against 1 for bilinear)
DEVICE_INTERPOLATIONS = ("bilinear",)


def device_geometry(pre: dict) -> bool:
    """Whether crop_tensor reproduces crop_input's geometry for this preprocessing: an int resize of
    the shorter side, a crop no larger, bilinear (torch's antialiased bilinear is PIL's filter).
    Otherwise the images are cut on the CPU (crop_input)."""
    resize = pre.get("resize")
    return (isinstance(resize, int) and not isinstance(resize, bool) and int(pre["crop"]) <= resize
            and str(pre.get("interpolation", "bilinear")).lower() in DEVICE_INTERPOLATIONS)


def crop_tensor(img, pre: dict):
    """uint8 (3, H, W) RGB on any device -> uint8 (3, crop, crop): crop_input's resize of the shorter
    side and centre crop, with torch's antialiased bilinear filter (PIL's: within one level of PIL's
    pixels on the sample images, tests/tasks/test_preprocess.py). Needs device_geometry(pre)."""
    import torch
    import torch.nn.functional as F

    h, w = int(img.shape[-2]), int(img.shape[-1])
    nw, nh = _resized_size(w, h, pre["resize"])
    x = img
    if (nw, nh) != (w, h):
        mode = str(pre.get("interpolation", "bilinear")).lower()
        y = F.interpolate(img[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)[0]
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    crop = int(pre["crop"])
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return x[:, top:top + crop, left:left + crop]


def decode_jpegs(datas: list, device) -> list:
    """JPEG files' bytes -> uint8 (3, H, W) RGB tensors on `device`, all in one torchvision.io.decode_jpeg
    call (on CUDA: batched nvJPEG, the GPU's JPEG decoder). None for a file it cannot decode, which the
    caller decodes another way (a batch that fails is retried one file at a time)."""
    import warnings

    import torch
    import torchvision.io as tio

    ts = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():   # torchvision >= 0.29 says its decoders move to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(tio.decode_jpeg(ts, mode=tio.ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for t in ts:
                try:
                    out.append(tio.decode_jpeg(t, mode=tio.ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out
