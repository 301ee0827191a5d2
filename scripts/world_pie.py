"""Write a PIE-Bench-format set from the world of captioned shapes (p2p/eval/world.py): colour,
shape, size and background edits in turn, with the exact masks the generator knows.

    python scripts/world_pie.py --out DIR --count 40 --seed 0 [--size 512]
    p2p bench pie --data DIR ...      # then runs on it as on PIE-Bench itself
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import InputError  # noqa: E402
from p2p.eval import world  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="world_pie", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    parser.add_argument("--count", type=int, required=True, help="how many edits")
    parser.add_argument("--seed", type=int, required=True, help="the world's seed: item i of a seed is one scene")
    parser.add_argument("--size", type=int, default=512, help="pixels of the images (masks stay on the 512 grid)")
    args = parser.parse_args(argv)
    try:
        written = world.write_pie(args.out, args.count, args.seed, args.size)
    except InputError as e:
        print(f"world_pie: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(written) - 1} images in annotation_images/ and mapping_file.json "
          f"({args.count} edits: {', '.join(world.KINDS)} in turn, seed {args.seed}, {args.size} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
