"""``needlework list``: the registered models, datasets, encoders and collates; the packaged configs."""

from __future__ import annotations

import argparse

from needlework.api import list_datasets, list_encoders, list_models
from needlework.configs import list_configs
from needlework.registry import COLLATES


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="needlework list", description=__doc__)
    kinds = ["models", "datasets", "encoders", "collates", "configs"]
    parser.add_argument("kind", nargs="?", choices=kinds, default=None)
    parser.add_argument("--pattern", default="*", help="glob over names, e.g. 'abmil*'")
    args = parser.parse_args(argv)
    listers = {
        "models": list_models, "datasets": list_datasets, "encoders": list_encoders,
        "collates": COLLATES.names, "configs": list_configs,
    }  # fmt: skip
    for kind, lister in listers.items():
        if args.kind in (None, kind):
            print(f"{kind}:")
            for name in lister(args.pattern):
                print(f"  {name}")
    return 0
