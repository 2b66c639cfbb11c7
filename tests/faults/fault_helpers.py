"""Shared pieces of the fault tests: job settings, the CLI line, a killable child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from needlework.slides.embed_job import EmbedJobConfig
from needlework.slides.jobs import TileJobConfig
from needlework.slides.tiling import TilingConfig
from needlework.slides.tissue import TissueParams

N_SLIDES = 3
TILING = TilingConfig(target_magnification=20, patch_size=128, overlap=0, min_tissue_fraction=0.25)
SRC = str(Path(__file__).resolve().parents[2] / "src")


def tile_config(job_dir, **kw) -> TileJobConfig:
    return TileJobConfig(str(job_dir), TILING, TissueParams(), progress=False, qc_max_side=256, **kw)


def embed_config(job_dir, **kw) -> EmbedJobConfig:
    kw.setdefault("encoder", "color_stats")
    kw.setdefault("num_workers", 0)
    return EmbedJobConfig(str(job_dir), TILING.dir_name(), batch_size=16, device="cpu", progress=False, **kw)


def tile_args(slides, job_dir) -> list[str]:
    return [
        "slides", "tile", "--slides", str(slides), "--job_dir", str(job_dir),
        "--tiling.target_magnification", "20", "--tiling.patch_size", "128",
        "--progress", "false", "--qc_max_side", "256",
    ]  # fmt: skip


def embed_args(slides, job_dir) -> list[str]:
    return [
        "slides", "embed", "--slides", str(slides), "--job_dir", str(job_dir), "--encoder", "color_stats",
        "--num_workers", "0", "--batch_size", "16", "--device", "cpu", "--progress", "false",
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``needlework <args>`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "needlework", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
    )


# A child that runs the CLI with one function replaced: for the chosen slide it starts the write (a
# half-written temporary file), signals the parent through a marker file and hangs until killed.
HANG = """
import pathlib, sys, time, importlib
module, name, slide_id, marker = sys.argv[1:5]
mod = importlib.import_module(module)
real = getattr(mod, name)
def hang(path, *args, **kwargs):
    if slide_id in str(path):
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(path.name + ".tmp424242").write_bytes(b"half written")
        pathlib.Path(marker).write_text("in the middle")
        time.sleep(600)
    return real(path, *args, **kwargs)
setattr(mod, name, hang)
from needlework.cli import main
sys.exit(main(sys.argv[5:]))
"""


def kill9_in_the_middle(module: str, name: str, slide_id: str, args: list[str], marker: Path) -> float:
    """Run the CLI with ``module.name`` hanging on ``slide_id``; ``kill -9`` it there. Returns the seconds
    the child ran."""
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", HANG, module, name, slide_id, str(marker), *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"child ended before the fault point: {proc.communicate()}")
            if time.time() > deadline:
                raise AssertionError("child never reached the fault point")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return time.time() - t0


def artefacts(tiling_dir) -> dict[str, bytes]:
    """Every output file of a job except status/summary/config files and stray temporary files."""
    return {
        str(p.relative_to(tiling_dir)): p.read_bytes()
        for p in sorted(Path(tiling_dir).rglob("*"))
        if p.is_file()
        and "wsi_states" not in p.parts
        and not p.name.startswith("config_")
        and ".tmp" not in p.name
    }


def assert_same_outputs(ours, reference) -> int:
    """The job folders hold the same artefacts, byte for byte; returns how many files were compared."""
    a, b = artefacts(ours), artefacts(reference)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in b:
        assert a[name] == b[name], f"{name} differs from the uninterrupted run"
    return len(b)
