"""``needlework list``: print the registered models, datasets and encoders."""

from __future__ import annotations

import argparse

from needlework.registry import list_datasets, list_encoders, list_models


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="needlework list", description=__doc__)
    parser.add_argument("kind", nargs="?", choices=["models", "datasets", "encoders"], default=None)
    parser.add_argument("--pattern", default="*", help="glob over names, e.g. 'abmil*'")
    args = parser.parse_args(argv)
    listers = {"models": list_models, "datasets": list_datasets, "encoders": list_encoders}
    for kind, lister in listers.items():
        if args.kind in (None, kind):
            print(f"{kind}:")
            for name in lister(args.pattern):
                print(f"  {name}")
    return 0
