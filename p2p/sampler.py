"""Text-to-image sampling with classifier-free guidance; the edit rides inside `denoise`.

Letters: b batch (prompts), h w latent size (image size / 8), m = 77 tokens.
"""
import sys

import torch
from tqdm import tqdm

from models import InputError, ddim, plms
from models.checkpoint import StableDiffusion

# A sampler is a module with schedule(steps) and sample(denoise, x, schedule, after_step).
SAMPLERS = {"ddim": ddim, "plms": plms}


def calls(sampler: str, steps: int) -> int:
    """UNet calls (the edit's step indices) of `steps` steps: N for DDIM, N + 1 for PLMS."""
    return len(SAMPLERS[sampler].timesteps(steps))


def initial_noise(seed: int, height: int, width: int) -> torch.Tensor:
    """x_T [1, 4, h, w], float32 from a CPU generator: the same on every device, shared by all prompts."""
    if not 0 <= seed < 2 ** 64:   # manual_seed's range; outside it torch raises an overflow error
        raise InputError(f"seeds are 0 to 2**64-1, got {seed}")
    return torch.randn((1, 4, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(seed))


# The classifier-free-guidance batch is [unconditional rows..., conditional rows...]: these two
# are the only code that knows that order (the UNet's context, its output, the edits' maps).

def guidance_batch(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Join the halves into one CFG batch."""
    return torch.cat([uncond, cond])


def guidance_halves(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a CFG batch (or anything computed row by row from one) into (unconditional, conditional)."""
    uncond, cond = batch.chunk(2)
    return uncond, cond


@torch.no_grad()
def generate(sd: StableDiffusion, prompts: list[str], seed: int = 0, steps: int = 50, guidance: float = 7.5,
             height: int = 512, width: int = 512, negative: str = "", edit=None, x_T=None, null_embeddings=None,
             source_trajectory=None, sampler: str = "ddim", progress: bool = True) -> torch.Tensor:
    """Sample latents for each prompt from one shared x_T; returns float32 [b, 4, h, w].

    | prompts           | the batch; with an edit, [source, target, ...]                            |
    | negative          | the unconditional prompt of classifier-free guidance ("" in SD)           |
    | edit              | an attention edit (see p2p/edits.py), or None for plain sampling          |
    | x_T               | start latents [1, 4, h, w]; default `initial_noise(seed, ...)`            |
    | null_embeddings   | [steps, m, width]: per-step unconditional context (null-text inversion)   |
    | source_trajectory | [steps, 4, h, w]: row 0 after each step, set before the edit's            |
    |                   | after_step (direct inversion: the source row retraces the photo)          |
    | sampler           | "ddim", or "plms" (the official notebook's): N + 1 UNet calls, the edit's |
    |                   | step counts calls 0..N                                                    |

    The input is checked where it enters (p2p/experiment/record.py, the run's prepare):
    a sampler name, finite guidance, a size, and DDIM for an inverted photo.
    """
    b = len(prompts)
    cond = sd.text.encode(prompts)                                   # [b, m, width]
    uncond = sd.text.encode([negative]) if null_embeddings is None else None
    x = (initial_noise(seed, height, width) if x_T is None else x_T.float()).expand(b, -1, -1, -1)
    x = x.to(sd.device)

    def denoise(x, t, i):
        if edit is not None:
            edit.step = i
        null = uncond if null_embeddings is None else null_embeddings[i][None].to(sd.device, cond.dtype)
        context = guidance_batch(null.expand(b, -1, -1), cond)      # [2b, m, width]
        out = sd.unet(guidance_batch(x, x).to(sd.dtype), t, context, edit=edit)
        out_uncond, out_cond = guidance_halves(out.float())
        # guidance on the model's output (eps, or v for SD 2 at 768), as the references do; then eps
        return ddim.to_eps(out_uncond + guidance * (out_cond - out_uncond), x, t, sd.prediction)

    blend = getattr(edit, "after_step", None)

    def after(i, x):
        if source_trajectory is not None:   # direct inversion: the source row on the photo's DDIM trajectory
            x = torch.cat([source_trajectory[i][None].to(x), x[1:]])
        return x if blend is None else blend(i, x)

    method = SAMPLERS[sampler]
    # leave=None: a bar of its own stays on screen, one nested under a sweep's goes when done
    bar = tqdm(method.schedule(steps), desc="sampling", disable=not progress, leave=None, file=sys.stderr)
    return method.sample(denoise, x, bar, after)


@torch.no_grad()
def decode(sd: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1], one at a time to keep the VAE's memory flat."""
    return torch.cat([sd.vae.decode(z[None].to(sd.device, sd.dtype)).float().clamp(-1, 1) for z in latents])
