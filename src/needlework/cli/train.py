"""``needlework fit|validate|test|predict --config FILE.yaml`` on LightningCLI.

``--config`` also takes the name of a packaged config (``needle_mnist/dense``; ``needlework list configs``).

Every option of the task, the data module and the trainer can be set in the YAML or overridden on the
command line (``--model.lr 3e-4``, ``--trainer.max_epochs 5``, ``--data.batch_size 8``). Each run writes
a folder ``<runs_dir>/<run_name>/<version>/`` holding the resolved ``config.yaml``, ``versions.json``,
``metrics.json``, CSV and TensorBoard logs and ``checkpoints/`` (best by ``--checkpoint.monitor`` and
last). After ``fit`` the test split is evaluated at the best checkpoint (``--test_after_fit false`` to
skip).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from needlework.configs import resolve_config
from needlework.training.datamodule import DatasetDataModule
from needlework.training.run_info import RunInfo
from needlework.training.task import ClassificationTask

# Under DDP Lightning re-runs this command once per extra process, seconds later: they must agree on the
# run folder, so the first process hands its version to the ones it launches through the environment.
_VERSION_ENV = "NEEDLEWORK_RUN_VERSION"


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


class NeedleworkCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", default="run", help="run folder: <runs_dir>/<run_name>/<version>")
        parser.add_argument("--runs_dir", default="runs", help="parent folder of all runs")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="evaluate the test split at the best checkpoint after fit")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-{epoch:03d}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(RunInfo, "run_info")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.logger in (None, True):
            root = Path(cfg.runs_dir) / cfg.run_name
            args = Namespace(save_dir=cfg.runs_dir, name=cfg.run_name, version=_run_version(root))
            cfg.trainer.logger = [
                Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=args.clone()),
                Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=args.clone()),
            ]

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and ckpt.best_model_path else None
        if ckpt_path is None:
            # e.g. max_epochs below check_val_every_n_epoch: say which weights the test numbers are of
            t = self.trainer
            if t.is_global_zero:
                print(f"needlework fit: no best checkpoint (no validation in {t.current_epoch} epochs with "
                      f"check_val_every_n_epoch={t.check_val_every_n_epoch}); testing the final weights",
                      file=sys.stderr)
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


def main(argv: list[str]) -> int:
    # From the console script argv *is* sys.argv[1:]; LightningCLI then reads sys.argv itself (handing it
    # the same list again only makes it warn about receiving both). From Python, argv is passed through.
    from_console = argv == sys.argv[1:]
    argv = resolve_config_args(argv)
    if from_console:
        sys.argv[1:] = argv
    args = None if from_console else argv
    NeedleworkCLI(
        ClassificationTask,
        DatasetDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
    return 0
