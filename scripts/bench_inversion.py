"""Time the inversions of a photo on one model: negative-prompt (= ddim = direct) fully, null-text per outer step.

    python scripts/bench_inversion.py --weights CKPT [--size 512] [--steps 50] [--inner-steps 10] [--outer 2]

Negative-prompt inversion (VAE encode + DDIM inversion, no optimisation) is run and timed in
full; direct inversion is the same (it keeps the DDIM trajectory, nothing more).
Null-text inversion is the slow part: only --outer of its outer steps are run, each
with the full --inner-steps Adam steps (a random model never reaches the early-stop loss, so
none stops early; the progress line shows the count), and the total for --steps is
extrapolated as DDIM inversion + steps x (seconds per outer step), and labelled so. The
weights do not change the cost, so a random full-size checkpoint from
`scripts/make_tiny.py OUT --full` measures what a real SD v1.5 would. Runs in float32.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load  # noqa: E402
from p2p import inversion  # noqa: E402

PROMPT = "a cat sitting next to a mirror"   # the official null-text notebook's example


def timed(f, *args, **kwargs):
    start = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the inversion timed (default 50)")
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--outer", type=int, default=2, help="null-text outer steps actually run (default 2)")
    args = ap.parse_args(argv)

    sd = load(args.weights)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond, null = sd.text.encode([PROMPT]), sd.text.encode([""])
    print(f"{sd.name}, {args.size} px, float32, {torch.get_num_threads()} threads, {args.steps} steps")

    z0, t_encode = timed(inversion.encode, sd, image)
    _, t_ddim = timed(inversion.ddim_inversion, sd, z0, cond, args.steps)
    print(f"negative-prompt (and ddim, direct) inversion: {t_encode + t_ddim:.1f} s measured "
          f"(VAE encode {t_encode:.1f} s + DDIM inversion {t_ddim:.1f} s, {t_ddim / args.steps:.2f} s/step)")

    # the first --outer outer steps of an --outer-step inversion cost what the first of a 50-step one do
    short = inversion.ddim_inversion(sd, z0, cond, args.outer, progress=False)
    _, t_null = timed(inversion.null_text_inversion, sd, short, cond, null, 7.5, args.inner_steps)
    per_outer = t_null / args.outer
    total = t_encode + t_ddim + args.steps * per_outer
    print(f"null-text inversion: {per_outer:.1f} s per outer step ({args.inner_steps} Adam steps, measured over "
          f"{args.outer}); {total / 60:.1f} min for {args.steps} steps (extrapolated: encode + DDIM inversion "
          f"+ {args.steps} x per outer step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
