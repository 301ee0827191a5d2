"""How far an edit kept what it should, and how far it went: background preservation, edit
locality, CLIP score and direction, DINO structure distance.

Images are float tensors [3, H, W] in [0, 1] (`viz.as_tensor` takes PIL images too); a region is a
boolean mask [H, W], True inside the edit region. The background is everything outside it.
With no region, the whole image is the background; a region that leaves no background gives
nan for the background metrics.

    MSE(a, b; B)  = mean over pixels p in B and channels c of (a[c, p] - b[c, p])^2
    PSNR(a, b; B) = 10 log10(1 / MSE)                       (data range 1; inf when equal)
    SSIM(a, b; B) = mean over p in B and c of ssim_map[c, p], Wang et al. (2004):
        mu, sigma^2, sigma_ab from a Gaussian window (11 x 11, sigma 1.5, normalised), so
        ssim = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)),
        C1 = (0.01)^2, C2 = (0.03)^2; the window is used only where it fits the image
        ("valid"), so the map is (H - 10) x (W - 10) and the region is cropped to match.
    locality(a, b; R) = sum over R of |a - b| / sum over the image of |a - b|   (1: all change inside)
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from models import InputError
from models.text import TOKENIZER_DIR, load_tokenizer

from .. import align, viz
from ..viz import as_tensor
from .lpips import Lpips

WINDOW, SIGMA = 11, 1.5          # Wang et al. (2004)
K1, K2 = 0.01, 0.03


def as_pil(image) -> Image.Image:
    """A PIL image as it is; else as_tensor's image rounded to 8 bits."""
    if isinstance(image, Image.Image):
        return image
    return viz.to_pil(as_tensor(image)[None] * 2 - 1, truncate=False)[0]


def background(region: torch.Tensor | None, shape) -> torch.Tensor:
    """The pixels outside the region, [H, W] boolean (all of them without a region)."""
    if region is None:
        return torch.ones(shape[-2:], dtype=torch.bool)
    if tuple(region.shape) != tuple(shape[-2:]):
        raise InputError(f"an edit region of {tuple(region.shape)} does not fit images of {tuple(shape[-2:])}")
    return ~region.bool()


def mse(a, b, region=None) -> float:
    a, b = as_tensor(a), as_tensor(b)
    keep = background(region, a.shape)
    if not keep.any():
        return math.nan                                    # the region is the whole image: no background
    return (a - b).square()[:, keep].mean().item()


def psnr(a, b, region=None) -> float:
    error = mse(a, b, region)
    return math.inf if error == 0 else math.nan if math.isnan(error) else 10 * math.log10(1 / error)


def gaussian_window() -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float64) - WINDOW // 2
    g = torch.exp(-x ** 2 / (2 * SIGMA ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]          # [1, 1, 11, 11]


def ssim_map(a, b) -> torch.Tensor:
    """SSIM per channel and pixel, [3, H - 10, W - 10] (the window's valid positions)."""
    a, b = as_tensor(a)[:, None], as_tensor(b)[:, None]   # channels as a batch: [3, 1, H, W]
    if min(a.shape[-2:]) < WINDOW:
        raise InputError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels")
    blur = lambda x: F.conv2d(x, gaussian_window())
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = K1 ** 2, K2 ** 2
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))[:, 0]


def ssim(a, b, region=None) -> float:
    s = ssim_map(a, b)
    keep = background(region, as_tensor(a).shape)[WINDOW // 2:-(WINDOW // 2), WINDOW // 2:-(WINDOW // 2)]
    if not keep.any():
        return math.nan                                    # no background pixel where the window fits
    return s[:, keep].mean().item()


def locality(a, b, region) -> float:
    """The share of the change (L1) that falls inside the region; nan when nothing changed."""
    change = (as_tensor(a) - as_tensor(b)).abs().sum(0)
    region = ~background(region, change.shape)
    total = change.sum().item()
    return math.nan if total == 0 else change[region].sum().item() / total


def attention_region(maps: torch.Tensor, size, threshold: float = 0.3) -> torch.Tensor:
    """An edit region from attention: maps [h, w] (the edited words' summed attention), divided
    by their max, resized (nearest) to `size` (H, W), above the threshold."""
    m = maps.double() / maps.max().clamp(min=1e-12)
    return F.interpolate(m[None, None], size=tuple(size))[0, 0] > threshold


def edited_words(r, target: str) -> list[str]:
    """The words an edit (a p2p.record.Experiment) changes in a target: swapped (replace), added
    (refine), re-weighted."""
    source, words = r.source.split(" "), target.split(" ")
    changed = [t for s, t in zip(source, words) if s != t] if r.mode == "replace" else \
        [t for t in words if t not in source] if r.mode == "refine" else []
    return list(dict.fromkeys(changed + [w for w in r.reweight if w in words]))


def attention_masks(result, threshold: float) -> list[torch.Tensor | None]:
    """Per target of a p2p.run.Result (its edit with a store), the edited words' (edited_words)
    cross-attention as a region at image size: the blend_res maps of the down and up blocks,
    averaged over steps, layers and heads, divided by their max, above `threshold`."""
    r, store, tokenizer = result.record, result.edit.store, load_tokenizer()
    try:
        maps = store.maps(r.blend_res)                              # [b, h, w, 77]
    except InputError:   # no down/up cross-attention at blend_res at this size: no region to read
        return [None] * len(r.targets)
    size = result.images[0].size[::-1]
    masks = []
    for k, target in enumerate(r.targets, start=1):
        words = edited_words(r, target)
        if not words:
            masks.append(None)
            continue
        columns = [i for w in words for i in align.token_indices(tokenizer, target, w)]
        masks.append(attention_region(maps[k][..., columns].sum(-1), size, threshold))
    return masks


def pixel_metrics(source, edited, region=None) -> dict[str, float]:
    """Background preservation of `edited` against `source`, and locality when there is a region."""
    out = {"mse": mse(source, edited, region), "psnr": psnr(source, edited, region),
           "ssim": ssim(source, edited, region)}
    if region is not None:
        out["locality"] = locality(source, edited, region)
    return out


# ---- metrics with networks of their own: CLIP and DINO (transformers, local safetensors) ----------

CLIP_FOLDER, DINO_FOLDER = "openai--clip-vit-large-patch14", "facebook--dino-vitb8"   # as `p2p download` names them
# transformers 5's CLIPImageProcessor resizes with torchvision when it is installed (other pixels); the
# PIL one, transformers 4's CLIPImageProcessor, is CLIP's own preprocessing whatever else is installed.
IMAGE_PROCESSOR = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def local_model(kind, folder, what: str):
    """A transformers model from a local folder of safetensors, or None with one note when absent."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        repo = folder.name.replace("--", "/")
        print(f"note: {what} skipped: no safetensors model in {folder} (get it with: p2p download --repo {repo})",
              file=sys.stderr)
        return None
    return kind.from_pretrained(str(folder), use_safetensors=True).eval()


class Clip:
    """CLIP score and CLIP directional similarity (CLIPModel, e.g. ViT-L/14):

    score(image, text)  = 100 * max(cos(E_I(image), E_T(text)), 0)
    direction(source image, edited image, source text, target text)
                        = cos(E_I(edited) - E_I(source), E_T(target) - E_T(source))   (nan if either is 0)
    with E_I the image embedding of CLIP's preprocessing (CLIPImageProcessor: the short side to 224
    bicubic, the long side truncated as torchvision's Resize, the centre 224 square, CLIP's mean and std)."""

    def __init__(self, model, tokenizer, preprocess):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess

    @classmethod
    def load(cls, folder):
        model = local_model(transformers.CLIPModel, folder, "CLIP score")
        if model is None:
            return None
        folder, size = Path(folder), model.config.vision_config.image_size     # 224 for ViT-L/14
        preprocess = IMAGE_PROCESSOR.from_pretrained(str(folder)) if (folder / "preprocessor_config.json").is_file() \
            else IMAGE_PROCESSOR(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls(model, load_tokenizer(folder if (folder / "vocab.json").is_file() else TOKENIZER_DIR), preprocess)

    @torch.no_grad()
    def image(self, image) -> torch.Tensor:
        pixels = self.preprocess(images=as_pil(image), return_tensors="pt").pixel_values
        # the towers and projections themselves: get_*_features changed its return type in transformers 5
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output).float()[0]

    @torch.no_grad()
    def text(self, text: str) -> torch.Tensor:
        ids = self.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.model.text_projection(self.model.text_model(input_ids=ids.input_ids).pooler_output).float()[0]

    @staticmethod
    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.nan if a.norm() == 0 or b.norm() == 0 else F.cosine_similarity(a, b, dim=0).item()

    def score(self, image, text: str) -> float:
        return 100 * max(self.cos(self.image(image), self.text(text)), 0.0)

    def measure(self, source, edited, source_text: str, target_text: str) -> dict[str, float]:
        """clip_score and clip_direction of one edit, each of the four embeddings computed once."""
        edited_i, target_t = self.image(edited), self.text(target_text)
        return {"clip_score": 100 * max(self.cos(edited_i, target_t), 0.0),
                "clip_direction": self.cos(edited_i - self.image(source), target_t - self.text(source_text))}


class Dino:
    """Structure distance as PIE-Bench defines it (Tumanyan et al.'s Splice): the MSE between the
    self-similarity matrices of the last layer's keys of DINO ViT-B/8 (ViTModel), for the image
    resized to 224 px on its short side and ImageNet-normalised:

    S(image)[i, j] = cos(key_i, key_j) over all tokens (class token included), keys of all heads
    concatenated;  distance(a, b) = mean over i, j of (S(a) - S(b))^2."""

    def __init__(self, model):
        self.model = model
        size = model.config.image_size
        # not CLIP's crop, only its bicubic short-side resize (long side truncated), then ImageNet's mean and std
        self.resize = IMAGE_PROCESSOR(size={"shortest_edge": size}, do_center_crop=False,
                                      image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)

    @classmethod
    def load(cls, folder):
        model = local_model(transformers.ViTModel, folder, "structure distance")
        return None if model is None else cls(model)

    def pixels(self, image, pie: bool = False) -> torch.Tensor:
        """The network's input [1, 3, h, w]: the short side resized to 224 (bicubic, the long side
        truncated) and ImageNet-normalised.
        pie=True follows PIE-Bench's evaluation code instead, for comparable numbers: torchvision's
        bilinear resize without antialiasing (its torchvision 0.13), the long side truncated and capped
        at 480, applied to pixel values 0..255 (not 0..1) before the same normalisation."""
        size = self.model.config.image_size
        if not pie:
            return self.resize(images=as_pil(image), return_tensors="pt").pixel_values
        x = as_tensor(image).float()[None] * 255
        h, w = x.shape[-2:]
        short, long = sorted((h, w))
        new_short, new_long = size, int(size * long / short)
        if new_long > 480:
            new_short, new_long = int(480 * new_short / new_long), 480
        x = F.interpolate(x, size=(new_short, new_long) if h <= w else (new_long, new_short), mode="bilinear",
                          align_corners=False)
        return (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]

    @torch.no_grad()
    def self_similarity(self, image, pie: bool = False) -> torch.Tensor:
        hidden = self.model(pixel_values=self.pixels(image, pie), output_hidden_states=True,
                            interpolate_pos_encoding=True).hidden_states
        # transformers 5 renamed ViT's modules: layers[i].attention.k_proj, once encoder.layer[i].attention.attention.key
        last = (self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer)[-1]
        key = last.attention.k_proj if hasattr(last.attention, "k_proj") else last.attention.attention.key
        keys = key(last.layernorm_before(hidden[-2]))[0]                              # [tokens, heads * d]
        keys = F.normalize(keys.float(), dim=-1)
        return keys @ keys.T

    def distance(self, a, b, pie: bool = False) -> float:
        """The structure distance; pie=True preprocesses as PIE-Bench does (see pixels)."""
        return (self.self_similarity(a, pie) - self.self_similarity(b, pie)).square().mean().item()


# ---- the networks, for the grids of cells ---------------------------------------------------

@dataclass(frozen=True)
class Nets:
    """The networks of the metrics that need one; None where not asked for or absent."""
    clip: Clip | None = None
    dino: Dino | None = None
    lpips: Lpips | None = None

    @classmethod
    def load(cls, clip: Path | None = None, dino: Path | None = None, lpips: Path | None = None) -> "Nets":
        """Each network from its path, skipped with a note where its weights are absent."""
        return cls(clip and Clip.load(clip), dino and Dino.load(dino), lpips and Lpips.load(lpips))


def load_png(path: Path) -> torch.Tensor:
    """A saved image as the metrics take it: [3, H, W] in [0, 1]."""
    with Image.open(path) as image:
        return as_tensor(image)
