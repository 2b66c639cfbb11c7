"""``needlework fit|validate|test|predict --config FILE.yaml`` on LightningCLI.

``--config`` also takes the name of a packaged config (``needle_mnist/dense``; ``needlework list configs``).

Every option of the task, the data module and the trainer can be set in the YAML or overridden on the
command line (``--model.lr 3e-4``, ``--trainer.max_epochs 5``, ``--data.batch_size 8``). Each run writes
a folder ``<runs_dir>/<run_name>/<version>/`` holding the resolved ``config.yaml``, ``versions.json``,
``metrics.json``, CSV and TensorBoard logs and ``checkpoints/`` (best by ``--checkpoint.monitor`` and
last). After ``fit`` the test split is evaluated at the best checkpoint (``--test_after_fit false`` to
skip).

A run folder is written by one command only. ``validate``, ``test`` and ``predict`` write to a folder of
their own, ``<runs_dir>/<run_name>-<verb>/<version>/`` (``predict`` adds ``predictions.csv``), even when
given a fit run's saved ``config.yaml``, so evaluating a run never touches its curves, config or scores.
A ``fit`` whose configured folder already holds a run (a saved config re-run, or a resume with
``--ckpt_path <run>/checkpoints/last.ckpt``) starts a new version beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from needlework.cli.model_args import (
    PREFIXES,
    check_model_kwargs,
    merge_overrides,
    model_arguments,
    split_overrides,
)
from needlework.configs import resolve_config
from needlework.training.checkpointing import BestCheckpoint
from needlework.training.datamodule import DatasetDataModule
from needlework.training.predictions import PredictionCSVWriter
from needlework.training.run_info import RunInfo
from needlework.training.task import ClassificationTask

# Under DDP Lightning re-runs this command once per extra process, seconds later: they must agree on the
# run folder, so the first process hands its version to the ones it launches through the environment.
_VERSION_ENV = "NEEDLEWORK_RUN_VERSION"

EVAL_VERBS = ("validate", "test", "predict")
MODEL_ARGS_HELP = """

Model arguments: --model.init_args.model_kwargs.NAME VALUE sets one argument of the model and keeps the
others, at any depth (--model.init_args.model_kwargs.mil_kwargs.heads 2); an argument the model does not
take is an error before anything is built. --print_config lists every argument of the chosen model with
its default (needlework list models: the models)."""


def _run_version(root: Path) -> str:
    if _launched_rank() > 0 and os.environ.get(_VERSION_ENV):
        return os.environ[_VERSION_ENV]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    version, n = stamp, 1
    while (root / version).exists():
        n += 1
        version = f"{stamp}-{n}"
    os.environ[_VERSION_ENV] = version  # inherited by the processes Lightning launches
    return version


def _launched_rank() -> int:
    """This process's rank as set by a launcher (Lightning's, torchrun, SLURM); 0 when none set one.

    Read from the environment because the process group does not exist yet when the run folder is named.
    Processes started by torchrun or SLURM each name their own folder; rank zero's wins, because the
    checkpoint folder and ``trainer.log_dir`` are broadcast from it and only rank zero writes run files.
    """
    for key in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _fresh_loggers(cfg: Namespace, subcommand: str) -> None:
    """Point the run's loggers at a folder no earlier command wrote (see the module docstring).

    The default (``logger: null``/``true``) gets CSV and TensorBoard loggers. Loggers configured with
    ``save_dir``/``name``/``version`` (what a saved ``config.yaml`` holds) keep their class but get a new
    folder when their folder already holds files (``<run_name>-<verb>`` when the command evaluates):
    Lightning's CSV logger would otherwise delete the ``metrics.csv`` there and the config and
    ``metrics.json`` be replaced. A logger pointing at a folder of its own is left alone.
    """
    evaluating = subcommand in EVAL_VERBS
    name = f"{cfg.run_name}-{subcommand}" if evaluating else cfg.run_name
    if cfg.trainer.logger in (None, True):
        args = Namespace(save_dir=cfg.runs_dir, name=name, version=_run_version(Path(cfg.runs_dir) / name))
        cfg.trainer.logger = [
            Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=args.clone()),
            Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=args.clone()),
        ]
        return
    loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
    new_versions: dict[tuple[str, str], str] = {}
    for logger in loggers:
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None or not {"save_dir", "name", "version"} <= set(vars(init)):
            continue
        folder = Path(str(init.save_dir)) / str(init.name or "") / str(init.version or "")
        if not (init.version is not None and _holds_files(folder)):
            continue  # a logger of its own (e.g. --trainer.logger on the command line): left alone
        save_dir, old_name = (cfg.runs_dir, name) if evaluating else (init.save_dir, init.name)
        key = (str(save_dir), str(old_name))
        if key not in new_versions:  # loggers that shared a folder keep sharing the new one
            new_versions[key] = _run_version(Path(key[0]) / key[1])
        init.save_dir, init.name, init.version = save_dir, old_name, new_versions[key]


class NeedleworkCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.description = (parser.description or "") + MODEL_ARGS_HELP
        parser.add_argument("--run_name", default="run", help="run folder: <runs_dir>/<run_name>/<version>")
        parser.add_argument("--runs_dir", default="runs", help="parent folder of all runs")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="evaluate the test split at the best checkpoint after fit",
        )
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(RunInfo, "run_info")

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's parsing, with nested ``model_kwargs`` flags merged and every model argument
        checked against the model before anything is built (:mod:`needlework.cli.model_args`)."""
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rest, overrides = split_overrides(argv)
        except ValueError as err:
            parser.error(str(err))
        if any(a in ("-h", "--help") for a in rest):
            self.config = parser.parse_args(rest)  # prints the help and exits
            return None
        printing = [a for a in rest if a == "--print_config" or a.startswith("--print_config=")]
        plain = [a for a in rest if a not in printing]
        self.config = parser.parse_args(plain)
        sub = self.config.get("subcommand")
        init = (self.config[sub] if sub else self.config).model.get("init_args")
        if init is None or not isinstance(init.get("model"), str) or "model_kwargs" not in init:
            if overrides:
                parser.error(f"{PREFIXES[0]}...: this model class takes no model_kwargs")
            if printing:
                parser.parse_args(plain + printing)
            return None
        kwargs = merge_overrides(init.model_kwargs, overrides)
        try:
            check_model_kwargs(init.model, kwargs, "--model.init_args.model_kwargs")
        except (KeyError, ValueError) as err:
            parser.error(str(err.args[0] if isinstance(err, KeyError) else err))
        init.model_kwargs = kwargs
        if printing:  # the model's arguments with their defaults, then jsonargparse prints and exits
            shown = json.dumps(model_arguments(init.model, kwargs))
            parser.parse_args([*plain, "--model.init_args.model_kwargs", shown, *printing])
        return None

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.logger is not False:
            _fresh_loggers(cfg, self.subcommand or "fit")
        if cfg.trainer.get("default_root_dir") is None:
            # without a logger (fast_dev_run, --trainer.logger false) Lightning puts checkpoints/ into the
            # working directory; keep them under the runs folder instead
            cfg.trainer.default_root_dir = str(Path(cfg.runs_dir) / cfg.run_name)

    def before_predict(self) -> None:
        self.trainer.callbacks.append(PredictionCSVWriter())

    def after_predict(self) -> None:
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionCSVWriter)), None)
        if writer is not None and writer.path is not None:
            print(f"predictions of {len(writer.rows)} items in {writer.path}")

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
        if ckpt_path is None:
            # e.g. max_epochs below check_val_every_n_epoch: say which weights the test numbers are of
            t = self.trainer
            if t.is_global_zero:
                print(
                    f"needlework fit: no best checkpoint (no validation in {t.current_epoch} epochs with "
                    f"check_val_every_n_epoch={t.check_val_every_n_epoch}); testing the final weights",
                    file=sys.stderr,
                )
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config NAME`` (or ``--config=NAME``) that is not a file by the packaged config."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, _config_path(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _config_path(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def _config_path(name: str) -> str:
    if name.lstrip().startswith(("{", "[")) or ":" in name.split("/")[0]:
        return name  # inline YAML/JSON, or a URL-like spec: jsonargparse handles it
    try:
        return str(resolve_config(name))
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


def build_cli(argv: list[str] | None, **kwargs: Any) -> NeedleworkCLI:
    """The CLI of ``needlework fit|validate|test|predict`` on ``argv`` (``None``: ``sys.argv[1:]``);
    ``kwargs`` go to LightningCLI (``run=False``: parse and build without running, for tests)."""
    return NeedleworkCLI(
        ClassificationTask,
        DatasetDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=argv,
        auto_configure_optimizers=False,
        **kwargs,
    )


def main(argv: list[str]) -> int:
    # From the console script argv *is* sys.argv[1:]; LightningCLI then reads sys.argv itself (handing it
    # the same list again only makes it warn about receiving both). From Python, argv is passed through.
    from_console = argv == sys.argv[1:]
    argv = resolve_config_args(argv)
    if from_console:
        sys.argv[1:] = argv
    build_cli(None if from_console else argv)
    return 0
