"""`python -m p2p` and the `p2p` command: the CLI, with a Ctrl-C while its modules import one line too."""
import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:   # main() says it for everything after this import
        argv = sys.argv[1:]
        print(f"p2p {argv[0]}: interrupted" if argv and not argv[0].startswith("-") else "p2p: interrupted",
              file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
