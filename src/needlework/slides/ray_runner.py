"""Shard per-slide jobs over a Ray cluster: one task per slide, one GPU per task when GPUs exist.

Each task runs the same function as the single-process run (``tile_one`` / ``embed_one``) and writes
its artefacts directly into the job folder, which must therefore be on storage shared by all nodes.
Outputs are identical to the local run. Ray is an optional extra: ``pip install 'needlework[ray]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # src/ (or site-packages/)


def local_runtime_env() -> dict[str, Any]:
    """Make ``needlework`` importable in local workers even when it is used from a source checkout."""
    path = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def init_ray(address: str | None = None, num_cpus: int | None = None, ship_code: bool = False) -> None:
    """Connect to ``address`` (``"local"`` or None = start a local Ray) unless Ray is already running.

    ``ship_code=True`` uploads this needlework package to the cluster (``runtime_env.py_modules``) for
    clusters where it is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--ray needs Ray: pip install 'needlework[ray]'") from exc
    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, runtime_env=local_runtime_env(), log_to_driver=False
        )
    else:
        env = {"py_modules": [str(Path(__file__).resolve().parents[1])]} if ship_code else None
        ray.init(address=address, runtime_env=env, log_to_driver=False)


def _call(fn: Callable[[Any, Any], dict[str, Any]], task: Any, cfg: Any) -> dict[str, Any]:
    return fn(task, cfg)


def run_on_ray(
    tasks: list[Any],
    fn: Callable[[Any, Any], dict[str, Any]],
    cfg: Any,
    address: str,
    want_gpu: bool = False,
    skip_errors: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``fn(task, cfg)`` for every task as a Ray task and return the statuses in task order.

    Without ``skip_errors``, the first failure cancels the tasks not yet started.
    """
    import dataclasses

    import ray
    from tqdm.auto import tqdm

    started = not ray.is_initialized()
    init_ray(address)
    try:
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
        if want_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
            options["num_gpus"] = 1
        remote = ray.remote(_call).options(**options)
        # Progress bars inside workers would garble the driver's output.
        worker_cfg = dataclasses.replace(cfg, progress=False) if dataclasses.is_dataclass(cfg) else cfg
        refs = [remote.remote(fn, task, worker_cfg) for task in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        pending = list(refs)
        with tqdm(
            total=len(tasks), desc="slides (ray)", unit="slide", disable=None if progress else True
        ) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                status = ray.get(done[0])
                results[index[done[0]]] = status
                bar.update(1)
                if status["status"] == "failed" and not skip_errors:
                    for ref in pending:
                        ray.cancel(ref)
                    break
        return [r for r in results if r is not None]
    finally:
        if started:
            ray.shutdown()
