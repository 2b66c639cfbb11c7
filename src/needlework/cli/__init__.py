"""The ``needlework`` command: a thin dispatcher over sub-commands.

Each sub-command lives in its own module and is imported only when used, so ``needlework --help``
stays fast (lightning alone takes seconds to import). A sub-command module exposes
``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Training verbs go to LightningCLI.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("needlework.cli.train", "train a model from a YAML config (LightningCLI)"),
    "validate": ("needlework.cli.train", "evaluate a checkpoint on the validation split"),
    "test": ("needlework.cli.train", "evaluate a checkpoint on the test split"),
    "predict": ("needlework.cli.train", "run a checkpoint on the predict split"),
    "demo": ("needlework.cli.demo", "train the dense baseline on needle-MNIST and write a report"),
    "list": ("needlework.cli.listing", "list registered models, datasets and encoders"),
    "summarize": ("needlework.cli.summarize", "mean ± std of the metrics of repeated runs"),
    "slides": ("needlework.cli.slides", "whole-slide images: synth, tile, embed, splits, heatmap, crops"),
    "doctor": ("needlework.cli.doctor", "check the installation, slide readers, slides' MPP and disk"),
}

LIGHTNING_VERBS = {"fit", "validate", "test", "predict"}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: needlework <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'needlework <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from needlework._version import __version__

        print(f"needlework {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"needlework: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from needlework.errors import UserError

    module = importlib.import_module(COMMANDS[name][0])
    try:
        # LightningCLI reads the verb itself; other commands get the arguments after their name.
        result = module.main(argv if name in LIGHTNING_VERBS else argv[1:])
    except UserError as exc:  # bad input (a wrong path in a config, a CSV without a column): no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
