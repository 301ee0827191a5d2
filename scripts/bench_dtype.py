"""Speed and drift of bfloat16 (and float16) against float32 on a CPU, for one Prompt-to-Prompt edit.

    python scripts/bench_dtype.py --weights CKPT [--size 512] [--steps 50] [--seed 0] [--float16] [--repeats 1]
    python scripts/bench_dtype.py --tiny --size 64            # the random tiny model of make_tiny.py

Loads the checkpoint once per dtype in one process and runs the same edit in each (source
"a cat riding a bicycle", target "a dog riding a bicycle", replace, cross 0.8, self 0.4).
The dtypes take turns, --repeats rounds; s/step is the median UNet call (one guided step)
of the best round, so other processes on the machine hit every dtype alike (on a shared
CPU they still move it by 2x: rerun when the machine is quiet). The DDIM state
stays float32 in every run (the sampler casts only the UNet's input), so the drift is what
the networks' arithmetic does to the trajectory: max |dz| and RMS(dz) / RMS(z_float32) of the
final latents per prompt, and the PSNR of the decoded images (each dtype decodes its own
latents with its own VAE, as `p2p edit --dtype` would) against float32's. On random weights
this measures how far the arithmetic moves a trajectory, not image quality.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load  # noqa: E402
from p2p import edits, sampler  # noqa: E402
from p2p.eval import metrics  # noqa: E402

PROMPTS = ["a cat riding a bicycle", "a dog riding a bicycle"]


def edit_run(sd, args):
    """Final latents [2, 4, h, w] and the seconds of every UNet call of one edited sampling run."""
    calls = []
    pre = sd.unet.register_forward_pre_hook(lambda *_: calls.append(-time.perf_counter()))
    post = sd.unet.register_forward_hook(lambda *_: calls.append(calls.pop() + time.perf_counter()))
    tok = sd.text.tokenizer
    edit = edits.PromptToPrompt(tok, PROMPTS, args.steps, cross=edits.Replace(tok, PROMPTS),
                                cross_steps=0.8, self_steps=0.4)
    try:
        latents = sampler.generate(sd, PROMPTS, seed=args.seed, steps=args.steps, height=args.size,
                                   width=args.size, edit=edit, progress=False)
    finally:
        pre.remove()
        post.remove()
    return latents, calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="SD v1 checkpoint (file or diffusers folder)")
    ap.add_argument("--tiny", action="store_true", help="the random tiny model of scripts/make_tiny.py")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all dtypes, taking turns")
    ap.add_argument("--float16", action="store_true", help="also float16 (no faster than float32 on a CPU)")
    args = ap.parse_args(argv)
    if args.tiny == (args.weights is not None):
        ap.error("give --weights or --tiny")
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if args.float16 else [])
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            import make_tiny  # scripts/make_tiny.py
            make_tiny.main([tmp])
            args.weights = Path(tmp) / "tiny.safetensors"
        models = {dt: load(args.weights, "cpu", dt) for dt in dtypes}
    for sd in models.values():   # warm-up: first-call allocations and kernel selection
        sampler.generate(sd, PROMPTS[:1], steps=1, height=args.size, width=args.size, progress=False)
    seconds, latents = {dt: [] for dt in dtypes}, {}
    for _ in range(args.repeats):
        for dt, sd in models.items():
            start = time.perf_counter()
            latents[dt], calls = edit_run(sd, args)
            total = time.perf_counter() - start
            seconds[dt].append((statistics.median(calls), total / args.steps))
            print(f"{str(dt)[6:]}: {total:.1f} s sampling, median UNet call {seconds[dt][-1][0]:.3f} s",
                  file=sys.stderr, flush=True)
    images = {dt: sampler.decode(models[dt], z) for dt, z in latents.items()}
    base_z, base_img = latents[torch.float32], images[torch.float32]
    print(f"{models[torch.float32].name}, {args.size}x{args.size}, {args.steps} steps, seed {args.seed}, "
          f"cpu, {torch.get_num_threads()} threads, best of {args.repeats}; "
          f"RMS(z_float32) = {base_z.pow(2).mean().sqrt().item():.4f}")
    print("| dtype | s/step (median UNet call) | s/step (whole run) | / float32 | prompt "
          "| max abs dz | RMS dz / RMS z | PSNR vs float32 (dB) |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    base_s = min(seconds[torch.float32])[0]
    for dt in dtypes:
        call, whole = min(seconds[dt])
        for row, name in enumerate(["source", "target"]):
            dz = latents[dt][row] - base_z[row]
            rel = dz.pow(2).mean().sqrt().item() / base_z[row].pow(2).mean().sqrt().item()
            timing = f"{call:.3f} | {whole:.3f} | {call / base_s:.2f}" if row == 0 else " |  | "
            print(f"| {str(dt)[6:] if row == 0 else ''} | {timing} | {name} | {dz.abs().max().item():.2e} "
                  f"| {rel:.2e} | {metrics.psnr((images[dt][row] + 1) / 2, (base_img[row] + 1) / 2):.1f} |")


if __name__ == "__main__":
    main()
