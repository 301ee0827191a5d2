"""Train the baby Stable Diffusion (issue 18): SD v1's architecture and objective at small widths, on
the captioned shapes of p2p/eval/world.py, in about an hour on a 2-core CPU.

    python scripts/train_baby.py --out weights/baby            # the VAE, then the UNet + text tower, then export
    python scripts/train_baby.py --out weights/baby            # again after Ctrl-C: continues where it stopped
    python scripts/train_baby.py --out weights/baby --export-only

Phase 1 trains the VAE (L1 reconstruction + a small KL); phase 2 trains the UNet and a CLIP text tower
from scratch with the VAE frozen: epsilon prediction, t uniform in 0..999 on SD's scaled-linear
schedule (models/ddim.py), 10% of the captions replaced by "" so classifier-free guidance works.
Scenes are made on the fly from (data seed, index), so nothing is stored. Every --save-every steps,
and on Ctrl-C, DIR/train/checkpoint.safetensors is rewritten (temp name, then rename): weights, EMA,
AdamW state, the generator's state and the loss log as tensors, the rest as JSON in its metadata.
The export writes float16 weights in both layouts, DIR/baby.safetensors (LDM single file) and
DIR/baby-diffusers/, with the model card DIR/README.md, DIR/loss.png and DIR/samples.png.

Why these sizes. p2p samples latents of height // 8 (p2p/sampler.py), so the VAE keeps SD's four
levels (f8): 64 px images, 8x8 latents, one res block per level, trained on 32 px crops (see crops).
Its widths are (64, 32, 64, 128), not the (32, 32, 64, 64) a budget would pick, because of
GroupNorm: SD's 32 groups everywhere (the single-file layout has no place to say otherwise) make a
32-wide layer an instance norm, which throws away each channel's mean, and a flat colour is nothing
but a mean. With 32 channels before the decoder's last norm the VAE drew every shape in place and
the wrong colour (17-18 dB after 1,000 steps, no better at 1,250); 64 there (two channels a group)
and 128 before the encoder's last norm keep the colours (19.8 dB at 600 steps and rising), at 2.5x
the cost a step. The UNet has three levels, 8x8, 4x4, 2x2, 64 wide for the same reason, with
cross-attention at the first two (8 heads). The text tower is 64 wide (one 64-wide head), 2 layers:
its 49408-token table is 3.2M of its 3.3M parameters.

Measured on this 2-core machine, OMP_NUM_THREADS=2, a few steps after one warm-up step, data and
tokenising included: VAE 0.4 s a step (batch 16 crops), UNet 1.2 s a step (batch 64, the frozen
VAE's encoder included). The defaults, 3,000 + 2,000 steps, take about 20 + 40 minutes.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from make_tiny import write_folder, write_single_file  # noqa: E402
from models import InputError  # noqa: E402
from models.checkpoint import load  # noqa: E402
from models.ddim import TRAIN_STEPS, alphas_cumprod  # noqa: E402
from models.files import check_device  # noqa: E402
from models.text import TextEncoder, load_tokenizer, module_names, text_config  # noqa: E402
from models.unet import UNet, UNetConfig  # noqa: E402
from models.vae import VAE, VAEConfig  # noqa: E402
from p2p.eval import world  # noqa: E402

BABY_UNET = UNetConfig(channels=(64, 64, 64), attention=(True, True, False), context_dim=64)
BABY_VAE = VAEConfig(channels=(64, 32, 64, 128), layers_per_block=1)
BABY_TEXT = dict(width=64, layers=2, mlp=256)
SD_SCALE = VAEConfig.scale   # 0.18215: the scale every loader assumes for a single file (see fold_scale)
PHASES = ("vae", "unet")


@dataclass(frozen=True)
class Plan:
    """One training run; stored in its checkpoint. A resumed run may change the step counts only."""
    vae_steps: int = 3000
    unet_steps: int = 2000
    batch: int = 64                # of the UNet phase
    vae_batch: int = 16            # of the VAE phase: its full-resolution convs cost ~8x a UNet sample
    size: int = 64                 # image side, pixels; latents are size / 8
    seed: int = 0                  # data seed (scene (seed, index)), initialisation and noise
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    warmup: int = 100              # linear warmup steps of each phase, then a cosine to 0.1 (see schedule)
    kl_weight: float = 1e-5        # on the mean KL per latent element; L1 is per pixel
    caption_dropout: float = 0.1   # SD's 10% empty captions, for classifier-free guidance
    ema: float = 0.999             # EMA of the UNet and text tower; the export writes the EMA
    unet: UNetConfig = BABY_UNET
    vae: VAEConfig = BABY_VAE
    text: dict = dataclasses.field(default_factory=lambda: dict(BABY_TEXT))

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Plan":
        tuples = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}  # noqa: E731
        return Plan(**{**d, "unet": UNetConfig(**tuples(d["unet"])), "vae": VAEConfig(**tuples(d["vae"]))})


# ---- data -----------------------------------------------------------------------------------

def batch_of(plan: Plan, step: int, b: int, device) -> tuple[torch.Tensor, list[str]]:
    """Images [b, 3, size, size] in [-1, 1] and captions of scenes step*b .. step*b + b - 1."""
    scenes = [world.scene(plan.seed, step * b + i, plan.size) for i in range(b)]
    pixels = np.stack([np.asarray(world.render(s)[0]) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images.to(device), [s.caption for s in scenes]


# ---- the state of a run, and its checkpoint -----------------------------------------------

class Run:
    """The networks, the optimizer of the current phase, the EMA, the generator and the log."""

    def __init__(self, plan: Plan, device):
        self.plan, self.device = plan, torch.device(device)
        torch.manual_seed(plan.seed)
        self.vae = VAE(plan.vae).to(device)
        self.unet = UNet(plan.unet).to(device)
        self.clip = CLIPTextModel(text_config(**plan.text)).to(device)
        self.text = TextEncoder(self.clip, load_tokenizer())
        self.gen = torch.Generator(device).manual_seed(plan.seed)
        self.phase, self.step, self.scale_data, self.vae_psnr = "vae", 0, None, None
        self.losses = {p: [] for p in PHASES}
        self.wall = {p: 0.0 for p in PHASES}
        self.machines: list[str] = []
        self.start_phase("vae")

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae} if self.phase == "vae" else {"unet": self.unet, "text": self.clip}

    def start_phase(self, phase: str):
        self.phase, self.step = phase, 0
        params = [p for m in self.trained().values() for p in m.parameters()]
        lr = self.plan.vae_lr if phase == "vae" else self.plan.unet_lr
        betas = (0.5, 0.9) if phase == "vae" else (0.9, 0.999)   # LDM's autoencoder Adam; AdamW's default
        self.opt = torch.optim.AdamW(params, lr=lr, betas=betas)
        self.ema = {} if phase == "vae" else {
            f"{n}.{k}": p.detach().clone() for n, m in self.trained().items() for k, p in m.named_parameters()}
        self.vae.requires_grad_(phase == "vae").train(phase == "vae")

    def save(self, path: Path):
        tensors = {f"{n}.{k}": v for n, m in (("vae", self.vae), ("unet", self.unet), ("text", self.clip))
                   for k, v in m.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.items()}
        opt = self.opt.state_dict()
        tensors |= {f"opt.{i}.{name}": t for i, s in opt["state"].items() for name, t in s.items()}
        tensors |= {f"loss.{p}": torch.tensor(v, dtype=torch.float32) for p, v in self.losses.items()}
        tensors["rng"] = self.gen.get_state()
        meta = {"plan": self.plan.to_json(), "phase": self.phase, "step": self.step, "scale_data": self.scale_data,
                "vae_psnr": self.vae_psnr,
                "param_groups": opt["param_groups"], "wall": self.wall, "machines": self.machines}
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"state": json.dumps(meta)})
        os.replace(tmp, path)   # a checkpoint is whole or absent, never half-written

    def restore(self, tensors: dict, meta: dict):
        for n, m in (("vae", self.vae), ("unet", self.unet), ("text", self.clip)):
            m.load_state_dict({k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(n + ".")}, strict=True)
        self.start_phase(meta["phase"])
        self.step, self.scale_data, self.vae_psnr = meta["step"], meta["scale_data"], meta.get("vae_psnr")
        self.ema = {k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.losses = {p: tensors[f"loss.{p}"].tolist() for p in PHASES}
        self.gen.set_state(tensors["rng"])
        self.wall, self.machines = meta["wall"], meta["machines"]


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["state"])


def resumed(plan: Plan, stored: Plan) -> Plan:
    """The stored plan with the new step counts; anything else that differs is an error."""
    counts = {"vae_steps": plan.vae_steps, "unet_steps": plan.unet_steps}
    changed = [f.name for f in dataclasses.fields(Plan)
               if f.name not in counts and getattr(plan, f.name) != getattr(stored, f.name)]
    if changed:
        raise InputError(f"the checkpoint was trained with other {', '.join(changed)}; give the same values "
                         "or a new --out")
    return dataclasses.replace(stored, **counts)


# ---- one step of each phase -----------------------------------------------------------------

def crops(run: Run, images: torch.Tensor) -> torch.Tensor:
    """A random half-side crop of each image, on the latent grid: the autoencoder is convolutional, so
    it trains on crops (as SD's trained at 256 px for 512) at a quarter of the cost."""
    side, b = images.shape[-1] // 2, images.shape[0]
    at = (8 * torch.randint(0, side // 8 + 1, (b, 2), generator=run.gen, device=run.device)).tolist()
    return torch.stack([im[:, i:i + side, j:j + side] for im, (i, j) in zip(images, at)])


def vae_step(run: Run, images: torch.Tensor) -> torch.Tensor:
    """Squared-error reconstruction of a posterior sample, plus kl_weight times KL(q(z|x) || N(0, 1)).
    Squared, not SD's L1: on flat shapes the L1 optimum of a blurry early decoder is the median colour,
    the background, and the shapes fade; the squared error's gradient pulls every pixel to its colour."""
    images = crops(run, images)
    mean, logvar = run.vae.posterior(images)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=run.gen, device=run.device)
    rec = run.vae.decoder(run.vae.post_quant_conv(z))
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return (rec - images).pow(2).mean() + run.plan.kl_weight * kl


def unet_step(run: Run, images: torch.Tensor, captions: list[str], alphas: torch.Tensor) -> torch.Tensor:
    """SD's objective: || eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c) ||^2."""
    b, g, dev = images.shape[0], run.gen, run.device
    with torch.no_grad():   # z0 is a posterior sample, scaled, as LDM trains on
        mean, logvar = run.vae.posterior(images)
        z0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g, device=dev)) * run.vae.cfg.scale
    drop = torch.rand(b, generator=g, device=dev).tolist()
    captions = ["" if r < run.plan.caption_dropout else c for c, r in zip(captions, drop)]
    context = run.clip(input_ids=run.text.tokenize(captions).to(dev)).last_hidden_state
    t = torch.randint(0, TRAIN_STEPS, (b,), generator=g, device=dev)
    eps = torch.randn(z0.shape, generator=g, device=dev)
    a = alphas[t][:, None, None, None]
    return F.mse_loss(run.unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, context), eps)


@torch.no_grad()
def reconstruction_psnr(run: Run, n: int = 32) -> float:
    """PSNR (dB, pixels in 0..1) of the VAE's mean reconstruction of n whole scenes it never trains on
    (data seed + 1)."""
    images = batch_of(dataclasses.replace(run.plan, seed=run.plan.seed + 1), 0, n, run.device)[0]
    was = run.vae.training
    run.vae.eval()
    mean, _ = run.vae.posterior(images)
    rec = run.vae.decoder(run.vae.post_quant_conv(mean)).clamp(-1, 1)
    run.vae.train(was)
    return -10 * math.log10(((rec - images) / 2).pow(2).mean().item())


@torch.no_grad()
def fold_scale(run: Run, batches: int = 4):
    """SD chose 0.18215 as 1 / std of its latents; we measure ours (posterior samples, as LDM's
    scale_by_std) and fold 1 / std into the weights: the mean rows of quant_conv times k, the rows
    of post_quant_conv divided by k, k = (1 / std) / 0.18215. The scale stays 0.18215 and scaled
    latents have unit std, in both layouts: a single file has no place for a scaling factor."""
    zs = []
    for i in range(batches):
        mean, logvar = run.vae.posterior(batch_of(run.plan, i, run.plan.batch, run.device)[0])
        zs.append(mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=run.gen, device=run.device))
    run.scale_data = 1 / torch.cat(zs).std().item()
    k, c = run.scale_data / SD_SCALE, run.plan.vae.latent_channels
    run.vae.quant_conv.weight[:c] *= k
    run.vae.quant_conv.bias[:c] *= k
    run.vae.quant_conv.bias[c:] += 2 * math.log(k)   # log-variance of k z
    run.vae.post_quant_conv.weight /= k


# ---- the loop ------------------------------------------------------------------------------

def machine(device) -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.device(device).type == "cuda" else ""
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")


def clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


def schedule(step: int, total: int, warmup: int) -> float:
    """The learning rate's factor: linear warmup, then a cosine from 1 down to 0.1 at the last step
    (LDM keeps it constant for hundreds of thousands of steps; a budget of a few thousand ends better
    annealed)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_phase(run: Run, path: Path, save_every: int, log_every: int, stop: list):
    """Steps of the current phase from run.step to its total; saves every `save_every` and when `stop`."""
    total = run.plan.vae_steps if run.phase == "vae" else run.plan.unet_steps
    alphas = alphas_cumprod().to(run.device)
    modules = run.trained()
    params = {f"{n}.{k}": p for n, m in modules.items() for k, p in m.named_parameters()}
    lr = run.plan.vae_lr if run.phase == "vae" else run.plan.unet_lr
    for m in modules.values():
        m.train()
    start, first, since = time.time(), run.step, time.time()
    while run.step < total and not stop:
        for group in run.opt.param_groups:
            group["lr"] = lr * schedule(run.step, total, run.plan.warmup)
        images, captions = batch_of(run.plan, run.step, run.plan.vae_batch if run.phase == "vae" else run.plan.batch,
                                    run.device)
        loss = vae_step(run, images) if run.phase == "vae" else unet_step(run, images, captions, alphas)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{run.phase} step {run.step + 1}: loss is {loss.item()}")
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        decay = min(run.plan.ema, (1 + run.step) / (10 + run.step))   # LDM's LitEma warm-up
        for k, e in run.ema.items():
            e.lerp_(params[k].detach(), 1 - decay)
        run.step += 1
        run.losses[run.phase].append(loss.item())
        if run.step % log_every == 0 or run.step == total:
            rate = (run.step - first) / (time.time() - start)
            recent = run.losses[run.phase][-log_every:]
            print(f"{run.phase} {run.step}/{total} loss {sum(recent) / len(recent):.4f} {rate:.2f} steps/s "
                  f"ETA {clock((total - run.step) / rate)}", file=sys.stderr, flush=True)
        if run.step % save_every == 0 or run.step == total or stop:
            if run.phase == "vae":
                run.vae_psnr = reconstruction_psnr(run)
                print(f"vae {run.step}/{total} reconstruction PSNR {run.vae_psnr:.2f} dB (unseen scenes)",
                      file=sys.stderr, flush=True)
            run.wall[run.phase] += time.time() - since
            since = time.time()
            run.save(path)


def train(out: Path, plan: Plan, device="cpu", resume: bool = False, save_every: int = 100,
          log_every: int = 20) -> Run:
    """Train (or continue) the run in `out` up to the plan's step counts. Ctrl-C saves and exits with 130."""
    check_device(device)
    path = out / "train" / "checkpoint.safetensors"
    if path.exists():
        tensors, meta = read_checkpoint(path)
        run = Run(resumed(plan, Plan.from_json(meta["plan"])), device)
        run.restore(tensors, meta)
        print(f"resuming {run.phase} at step {run.step}", file=sys.stderr)
    elif resume:
        raise InputError(f"--resume: {path} does not exist")
    else:
        run = Run(plan, device)
    if run.phase == "unet" and run.plan.vae_steps != len(run.losses["vae"]):
        raise InputError(f"the VAE was trained {len(run.losses['vae'])} steps and is frozen now; "
                         f"--vae-steps {run.plan.vae_steps} cannot change that")
    if run.step > getattr(run.plan, f"{run.phase}_steps"):
        raise InputError(f"the checkpoint is at {run.phase} step {run.step}, past --{run.phase}-steps "
                         f"{getattr(run.plan, f'{run.phase}_steps')}")
    if machine(device) not in run.machines:
        run.machines.append(machine(device))
    stop: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))   # finish the step, save, then exit
    try:
        train_phase(run, path, save_every, log_every, stop)
        if run.phase == "vae" and run.step == run.plan.vae_steps and run.plan.unet_steps > 0 and not stop:
            fold_scale(run)
            run.start_phase("unet")
            run.save(path)
            train_phase(run, path, save_every, log_every, stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop:
        print(f"interrupted: saved {run.phase} step {run.step} to {path}; run the same command to continue",
              file=sys.stderr)
        raise SystemExit(130)
    return run


# ---- export: both layouts, the model card, the loss curves --------------------------------------

def export(out: Path) -> tuple[Path, Path]:
    """Float16 weights (the EMA of the UNet and text tower) in both layouts, README.md and loss.png."""
    path = out / "train" / "checkpoint.safetensors"
    if not path.exists():
        raise InputError(f"{path}: no checkpoint to export")
    tensors, meta = read_checkpoint(path)
    plan = Plan.from_json(meta["plan"])
    if meta["phase"] != "unet":
        raise InputError(f"{path}: the UNet phase has not started yet; nothing to export")
    part = lambda p: {k[len(p):]: v.half() for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    unet_sd, vae_sd = part("ema.unet."), part("vae.")
    # checkpoints name CLIP's tensors text_model.*, whatever the installed transformers calls them
    text_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in part("ema.text.").items()}
    single, folder = out / "baby.safetensors", out / "baby-diffusers"
    write_single_file(single, unet_sd, vae_sd, text_sd, plan.unet, plan.vae)
    write_folder(folder, unet_sd, vae_sd, text_sd, plan.unet, plan.vae, text_config(**plan.text),
                 sample_size=plan.size // 8)
    losses = {p: tensors[f"loss.{p}"].tolist() for p in PHASES}
    plot(losses).save(out / "loss.png")
    samples(folder, plan).save(out / "samples.png")
    (out / "README.md").write_text(card(plan, meta, losses, tensors, single, folder))
    return single, folder


def samples(folder: Path, plan: Plan, n: int = 8) -> Image.Image:
    """The exported model's images of the captions of n scenes it never trained on (data seed + 1),
    seed i for caption i, 50 DDIM steps at guidance 7.5, shown at twice their size."""
    from p2p import viz
    from p2p.experiment import run
    sd = load(folder, "cpu")
    captions = [world.scene(plan.seed + 1, i, plan.size).caption for i in range(n)]
    images = [run.generation(sd, [c], seed=i, steps=50, guidance=7.5, height=plan.size, width=plan.size,
                             sampler="ddim", progress=False)[1][0].resize((2 * plan.size,) * 2, Image.NEAREST)
              for i, c in enumerate(captions)]
    return viz.stack([viz.labelled_row(images[i:i + 4], captions[i:i + 4]) for i in range(0, n, 4)])


def smooth(values: list[float], n: int) -> list[float]:
    c = np.cumsum([0.0] + values)
    return [(c[i + 1] - c[max(0, i + 1 - n)]) / min(n, i + 1) for i in range(len(values))]


def plot(losses: dict[str, list[float]], w: int = 480, h: int = 240) -> Image.Image:
    """One panel per phase: the loss (log scale), raw in grey, a running mean of 1/50 of the steps in black."""
    image = Image.new("RGB", (w, h * len(losses)), "white")
    d = ImageDraw.Draw(image)
    for row, (phase, values) in enumerate(losses.items()):
        top, box = row * h, (50, row * h + 20, w - 10, row * h + h - 25)
        d.rectangle(box, outline="black")
        d.text((50, top + 5), f"{phase} loss (log scale), {len(values)} steps", fill="black")
        values = [max(v, 1e-8) for v in values]
        if len(values) < 2:
            continue
        lo, hi = math.log10(min(values)), math.log10(max(values))
        hi = hi if hi > lo else lo + 1
        xy = lambda i, v: (box[0] + (box[2] - box[0]) * i / (len(values) - 1),  # noqa: E731
                           box[3] - (box[3] - box[1]) * (math.log10(v) - lo) / (hi - lo))
        d.line([xy(i, v) for i, v in enumerate(values)], fill=(190, 190, 190))
        d.line([xy(i, v) for i, v in enumerate(smooth(values, max(1, len(values) // 50)))], fill="black", width=2)
        d.text((5, box[1]), f"{10 ** hi:.3g}", fill="black")
        d.text((5, box[3] - 10), f"{10 ** lo:.3g}", fill="black")
        d.text((box[2] - 40, box[3] + 5), str(len(values)), fill="black")
    return image


def card(plan: Plan, meta: dict, losses: dict, tensors: dict, single: Path, folder: Path) -> str:
    count = lambda p: sum(v.numel() for k, v in tensors.items() if k.startswith(p))  # noqa: E731
    final = {p: sum(v[-100:]) / max(1, len(v[-100:])) for p, v in losses.items()}
    mb = lambda p: sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*"))) / 1e6  # noqa: E731
    machines = "\n".join(f"- {m}" for m in meta["machines"])
    psnr_text = f"{meta['vae_psnr']:.2f} dB" if meta.get("vae_psnr") is not None else "(not measured)"
    return f"""# The baby Stable Diffusion

SD v1's architecture (models/), trained from scratch by scripts/train_baby.py on the captioned
shapes of p2p/eval/world.py (data seed {plan.seed}, scenes 0.. of `world.scene(seed, index, {plan.size})`),
at {plan.size} x {plan.size} px ({plan.size // 8} x {plan.size // 8} latents). Float16, two layouts of the same tensors:
`baby.safetensors` (LDM single file, {mb(single):.1f} MB) and `baby-diffusers/` ({mb(folder):.1f} MB).

    p2p generate --weights baby-diffusers --prompt "a red circle" --height {plan.size} --width {plan.size} --out x.png

| | |
| --- | --- |
| UNet | `{plan.unet}`, {count('unet.') / 1e6:.2f}M parameters; exported: its EMA (decay {plan.ema}) |
| VAE | `{plan.vae}`, {count('vae.') / 1e6:.2f}M parameters |
| text | CLIPTextModel `{plan.text}`, {count('text.') / 1e6:.2f}M parameters (the 49408-token table is most of it); EMA too |
| latent scale | measured 1 / std = {meta['scale_data']:.5g}, folded into quant_conv / post_quant_conv so the scale is SD's 0.18215 |
| VAE phase | {len(losses['vae'])} steps, batch {plan.vae_batch} (32 px crops), AdamW lr {plan.vae_lr} betas (0.5, 0.9), squared error + {plan.kl_weight} KL, final loss {final['vae']:.4f} |
| VAE reconstruction | {psnr_text} PSNR of the mean latents' decoding, 32 scenes of data seed {plan.seed + 1} (never trained on) |
| UNet phase | {len(losses['unet'])} steps, batch {plan.batch}, AdamW lr {plan.unet_lr}, eps-prediction MSE, {plan.caption_dropout:.0%} empty captions, final loss {final['unet']:.4f} |
| learning rate | {plan.warmup} warmup steps per phase, then a cosine down to a tenth |
| wall time | VAE {clock(meta['wall']['vae'])}, UNet {clock(meta['wall']['unet'])} |

Final losses are the means of the last 100 steps. Machines:
{machines}

![loss curves](loss.png)

Samples (captions of scenes it never saw, seed i for the i-th, 50 DDIM steps, guidance 7.5, shown
at twice their size):

![samples](samples.png)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder: train/ (checkpoint), the export, README.md")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=Plan.seed)
    ap.add_argument("--vae-steps", type=int, default=Plan.vae_steps)
    ap.add_argument("--unet-steps", type=int, default=Plan.unet_steps)
    ap.add_argument("--batch", type=int, default=Plan.batch, help="of the UNet phase")
    ap.add_argument("--vae-batch", type=int, default=Plan.vae_batch)
    ap.add_argument("--size", type=int, default=Plan.size, help="image side in pixels, a multiple of 32")
    ap.add_argument("--resume", action="store_true", help="insist on continuing (a checkpoint in DIR/train/ is "
                    "continued anyway)")
    ap.add_argument("--export-only", action="store_true", help="export the last checkpoint and stop")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        if args.export_only:
            for p in export(args.out):
                print(f"wrote {p}, native size {load(p, 'meta').native_size} px")
            return 0
        counts = (args.batch, args.vae_batch, args.vae_steps + 1, args.unet_steps + 1, args.save_every, args.log_every)
        if args.size % 32 or min(counts) < 1:
            raise InputError("--size a multiple of 32, batches, --save-every and --log-every at least 1, step counts at least 0")
        plan = Plan(vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch=args.batch, vae_batch=args.vae_batch,
                    size=args.size, seed=args.seed)
        run = train(args.out, plan, args.device, args.resume, args.save_every, args.log_every)
        if run.phase == "unet":
            for p in export(args.out):
                print(f"wrote {p}, native size {load(p, 'meta').native_size} px")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
