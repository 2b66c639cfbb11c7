"""The machinery shared by the slide jobs (tiling in :mod:`~needlework.slides.jobs`, embedding in
:mod:`~needlework.slides.embed_job`): the slide tasks of a folder, one status record per slide and stage,
and :func:`run_stage`, which runs a stage over the slides locally or on Ray, retries slides another run
holds, writes the run summary and stops at the first failure unless ``skip_errors``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from needlework.errors import ConfigError, InputNotFoundError
from needlework.slides.locks import SlideLock, describe_owner
from needlework.slides.mpp import load_mpp_overrides, override_for, unknown_overrides
from needlework.slides.reader import slide_id_of
from needlework.slides.scan import scan_slides
from needlework.slides.status import summarise, summary_markdown, write_json_atomic, write_text_atomic


class SlideJobError(RuntimeError):
    """A slide failed and ``skip_errors`` was off."""


@dataclass
class SlideTask:
    """One slide to process (picklable; sent to Ray workers)."""

    slide_path: str
    slide_id: str
    mpp_override: float | None = None


def features_dir_name(encoder: str) -> str:
    """``features_<encoder>`` with characters unsafe in file names replaced by ``-``."""
    return "features_" + re.sub(r"[^A-Za-z0-9._-]+", "-", encoder).strip("-")


def patches_path(tiling_dir: Path, slide_id: str) -> Path:
    return tiling_dir / "patches" / f"{slide_id}_patches.h5"


def make_tasks(
    slides: str | Path | Sequence[str | Path], mpp_csv: str | Path | None = None
) -> tuple[list[SlideTask], list[str]]:
    """Tasks for a slide folder (or list of files) and the MPP-override entries that match no slide."""
    skipped: list[dict[str, str]] = []
    if isinstance(slides, (str, Path)):
        paths, skipped = scan_slides(slides)
    else:
        paths = [Path(p) for p in slides]
    for f in skipped:
        warnings.warn(f"not read: {f['path']}: {f['reason']}", stacklevel=2)
    if not paths:
        listed = "".join(f"\n  {f['path']}: {f['reason']}" for f in skipped)
        raise InputNotFoundError(f"no slides found in {slides}{listed}")
    ids = [slide_id_of(p) for p in paths]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(
            f"several slides share the id(s) {dup}; slide ids (file names without extension) must be unique"
        )
    overrides = load_mpp_overrides(mpp_csv) if mpp_csv else {}
    unknown = unknown_overrides(overrides, [p.name for p in paths], ids)
    if unknown:
        warnings.warn(f"MPP override CSV lists slides that are not in the folder: {unknown}", stacklevel=2)
    tasks = [SlideTask(str(p), i, override_for(overrides, p.name, i)) for p, i in zip(paths, ids)]
    return tasks, unknown


def status_record(task: SlideTask, stage: str, status: str, **kw: Any) -> dict[str, Any]:
    return {"slide_id": task.slide_id, "slide_path": task.slide_path, "stage": stage, "status": status, **kw}


def busy_record(task: SlideTask, stage: str, lock: SlideLock) -> dict[str, Any]:
    error = f"locked by {lock.owner()} ({lock.path})"
    return status_record(task, stage, "busy", error=error, lock=str(lock.path))


def take_over_note(lock: SlideLock) -> list[str]:
    """A status warning when the slide's lock was left by a dead run (its partial work is redone)."""
    if lock.taken_over is None:
        return []
    return [f"took over the lock left by {describe_owner(lock.taken_over)}, which is no longer running"]


def failed_record(task: SlideTask, stage: str, exc: BaseException, t0: float) -> dict[str, Any]:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
    return status_record(
        task,
        stage,
        "failed",
        error=f"{type(exc).__name__}: {exc}",
        traceback=tail[-2000:],
        seconds=round(time.time() - t0, 3),
    )


@contextlib.contextmanager
def recorded_warnings(sink: list[str]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        sink.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def run_stage(
    stage: str,
    tasks: list[SlideTask],
    fn: Callable[[SlideTask, Any], dict[str, Any]],
    cfg: Any,
    state_dir: Path,
    skip_errors: bool = False,
    ray_address: str | None = None,
    extra: dict[str, Any] | None = None,
    wait_busy_s: float = 0.0,
) -> dict[str, Any]:
    """Run ``fn`` over ``tasks`` locally or on Ray; write and return the run summary.

    Without ``skip_errors`` the first failing slide stops the run with :class:`SlideJobError`
    (on Ray: after the slides in flight finish); finished slides are skipped on the next run.
    Slides locked by another live worker ("busy") are tried again at the end of the pass, for up to
    ``wait_busy_s`` seconds; those still busy are listed in the summary (the CLI then exits non-zero).
    """
    statuses: list[dict[str, Any]] = []
    failure: dict[str, Any] | None = None
    if ray_address:
        from needlework.slides.ray_runner import run_on_ray

        want_gpu = stage == "embed" and getattr(cfg, "device", "cpu") != "cpu"
        statuses = run_on_ray(tasks, fn, cfg, ray_address, want_gpu, skip_errors, cfg.progress)
        failure = next((s for s in statuses if s["status"] == "failed"), None)
    else:
        from tqdm.auto import tqdm

        with tqdm(total=len(tasks), desc=stage, unit="slide", disable=None if cfg.progress else True) as bar:
            for task in tasks:
                status = fn(task, cfg)
                statuses.append(status)
                bar.update(1)
                bar.set_postfix_str(f"{task.slide_id}: {status['status']}")
                if status["status"] == "failed" and not skip_errors:
                    failure = status
                    break
        if failure is None:
            statuses = _retry_busy(tasks, statuses, fn, cfg, wait_busy_s)
            failure = next((s for s in statuses if s["status"] == "failed" and not skip_errors), None)
    summary = summarise(statuses, stage, {"config": jsonable(cfg), **(extra or {})})
    write_json_atomic(state_dir / "summary.json", summary)
    write_text_atomic(state_dir / "summary.md", summary_markdown(summary))
    if failure is not None and not skip_errors:
        raise SlideJobError(
            f"{stage} failed on slide {failure['slide_id']} ({failure['slide_path']}): {failure['error']}\n"
            "Fix or remove that slide, or rerun with --skip_errors true to continue past failing slides "
            "(finished slides are skipped on the next run)."
        )
    return summary


def skipped_files(slides: str | Path | Sequence[str | Path]) -> list[dict[str, str]]:
    """Files of a slide folder that are not read, with the reason (listed in the summary)."""
    return scan_slides(slides)[1] if isinstance(slides, (str, Path)) else []


def _retry_busy(
    tasks: list[SlideTask],
    statuses: list[dict[str, Any]],
    fn: Callable[[SlideTask, Any], dict[str, Any]],
    cfg: Any,
    wait_s: float,
) -> list[dict[str, Any]]:
    """Try busy slides again (their owner may have finished, or died) until none is busy or ``wait_s``
    seconds have passed; at least once."""
    by_id = {t.slide_id: t for t in tasks}
    deadline = time.time() + max(0.0, wait_s)
    while True:
        busy = [i for i, s in enumerate(statuses) if s["status"] == "busy"]
        if not busy:
            return statuses
        for i in busy:
            statuses[i] = fn(by_id[statuses[i]["slide_id"]], cfg)
        if time.time() >= deadline or not any(s["status"] == "busy" for s in statuses):
            return statuses
        time.sleep(min(1.0, max(0.0, deadline - time.time())))


def jsonable(cfg: Any) -> Any:
    return json.loads(json.dumps(asdict(cfg), default=str))


def find_tiling_dir(job_dir: str | Path) -> str:
    """The single tiling folder of ``job_dir`` (error listing them when there are several or none)."""
    found = sorted(p.name for p in Path(job_dir).glob("*x_*px_*px_overlap") if (p / "patches").is_dir())
    if len(found) != 1:
        raise InputNotFoundError(
            f"{job_dir}: expected one tiling folder (like 20x_256px_0px_overlap/patches), "
            f"found {found or 'none'}; "
            "run `needlework slides tile` first or pass --tiling_dir_name NAME"
        )
    return found[0]


__all__ = [
    "SlideJobError",
    "SlideTask",
    "busy_record",
    "failed_record",
    "features_dir_name",
    "find_tiling_dir",
    "jsonable",
    "make_tasks",
    "patches_path",
    "recorded_warnings",
    "run_stage",
    "skipped_files",
    "status_record",
    "take_over_note",
]
