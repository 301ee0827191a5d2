"""Speed and memory of editing against plain sampling, on one model in one process.

    python scripts/bench.py --weights CKPT [--size 512] [--steps 3] [--repeats 2] [--naive-attention]

Runs, on the same two-prompt batch and the same model:
  plain     generation of [source, target] with no edit (every attention fused);
  edit      a Prompt-to-Prompt replace with self-attention injection (16x16 and below), both
            windows covering every step measured;
  edit-all  the same with self-attention injected at every resolution (--self-max-tokens 4096
            at 512 px), which runs as SDPA(Q_src, K_src, V_tgt) around fused attention;
  edit-all-maps (with --materialised) edit-all with every edited layer materialising its
            probabilities (4096x4096 per head at 512 px): what injection cost before fusing;
  naive     (with --naive-attention) the edit, but every attention layer materialises its
            probabilities and passes them through the callback: the cost profile of the
            official implementation, which patches every attention layer.
It prints seconds per step and the peak memory of each run above the loaded model (CUDA: max
allocated; CPU: the resident set, polled), each as a ratio to plain's too. The
weights do not change the cost, so a random full-size checkpoint from
`scripts/make_tiny.py OUT --full` measures what a real SD v1.5 would.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint import load  # noqa: E402
from p2p import edits, sampler  # noqa: E402
from p2p.eval.memory import PeakMemory  # noqa: E402

PROMPTS = ["a cat riding a bicycle", "a dog riding a bicycle"]


class Materialised(edits.PromptToPrompt):
    """The same edit, materialising the probabilities of every layer it edits."""

    def fused(self, q, k, v, site):
        return None


class Naive(edits.PromptToPrompt):
    """The same edit, but wanting every site: every layer materialises its probabilities and
    passes them through the callback, which edits only where the real edit would."""

    def wants(self, site):
        return True

    def fused(self, q, k, v, site):
        return None   # every layer materialises

    def __call__(self, probs, site):
        return super().__call__(probs, site) if super().wants(site) else probs


def run(sd, args, make_edit):
    """Seconds per step and extra peak memory of one sampling run."""
    start = time.perf_counter()
    with PeakMemory(sd.device) as memory:
        sampler.generate(sd, PROMPTS, steps=args.steps, height=args.size, width=args.size,
                         edit=make_edit(args.steps), progress=False)
    return (time.perf_counter() - start) / args.steps, memory.mib


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, type=Path)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, taking turns")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--naive-attention", action="store_true", help="also run the naive (official-cost) mode")
    ap.add_argument("--materialised", action="store_true", help="also run edit-all with materialised maps")
    args = ap.parse_args()
    sd = load(args.weights, args.device, getattr(torch, args.dtype))
    tok = sd.text.tokenizer

    every = (args.size // 8) ** 2   # the keys of the largest self-attention

    def p2p(steps, kind=edits.PromptToPrompt, max_tokens=256):
        # windows over every benchmarked step (the paper's 0.8 / 0.4 would leave a few steps unedited)
        return kind(tok, PROMPTS, steps, edits.Replace(tok, PROMPTS), cross_steps=1.0, self_steps=1.0,
                    self_max_tokens=max_tokens)

    runs = [("plain", lambda s: None), ("edit", p2p), ("edit-all", lambda s: p2p(s, max_tokens=every))]
    runs += [("edit-all-maps", lambda s: p2p(s, Materialised, every))] if args.materialised else []
    runs += [("naive", lambda s: p2p(s, Naive))] if args.naive_attention else []
    sampler.generate(sd, PROMPTS, steps=1, height=args.size, width=args.size, progress=False)   # warm-up
    # the modes take turns, best of --repeats each, so drift of the machine's speed hits all alike
    trials = {name: [] for name, _ in runs}
    for _ in range(args.repeats):
        for name, make in runs:
            trials[name].append(run(sd, args, make))
    results = {name: (min(s for s, _ in t), max(mb for _, mb in t)) for name, t in trials.items()}
    print(f"{sd.name}, {args.size}x{args.size}, batch of {len(PROMPTS)} prompts, {args.steps} steps, "
          f"best of {args.repeats}, {args.device} {args.dtype}")
    plain_s, plain_mb = results["plain"]
    print("| run | s/step | / plain | peak memory (MiB) | / plain |\n| --- | --- | --- | --- | --- |")
    for name, (s, mb) in results.items():
        print(f"| {name} | {s:.2f} | {s / plain_s:.3f} | {mb:.0f} | {mb / max(plain_mb, 1e-9):.2f} |")


if __name__ == "__main__":
    main()
