"""``python -m trainables.criteria --list``: the registered criteria, one per line."""

import argparse

from trainables.criteria import CRITERIA, list_criteria


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainables.criteria", description=__doc__)
    parser.add_argument("--list", action="store_true", help="print the registered names, one per line")
    parser.add_argument("--describe", action="store_true", help="print each name with what it measures")
    args = parser.parse_args(argv)
    for name in list_criteria():
        print(f"{name:16s} {CRITERIA.get(name).doc}" if args.describe else name)


if __name__ == "__main__":
    main()
