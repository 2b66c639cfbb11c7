"""``needlework slides tile --ray_address ADDRESS`` against a real Ray cluster started as its own process
(``ray start --head``), as on a cluster whose head node runs elsewhere; outputs equal the local run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slide_helpers import TILING, artefacts

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster in its own session (stopped by signalling that session only, so other
    Ray instances on the machine survive, unlike a global ``ray stop``). Yields ``host:port``."""
    ray_bin = Path(sys.executable).with_name("ray")
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'needlework[ray]')")
    if not ray_bin.exists():
        pytest.skip("the ray command is not installed next to this Python")
    port = free_port()
    # a short temporary folder: Ray's socket paths must stay under the 107-character limit
    temp = Path(f"/tmp/nw-ray-{os.getpid()}-{port}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2",
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)]  # fmt: skip
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # --block: ray stops the processes it started
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # anything of that session still alive
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_slides_tile_on_a_separate_ray_cluster(cohort, tmp_path, ray_cluster):
    from needlework.cli import main

    address, env = ray_cluster
    args = ["slides", "tile", "--slides", str(cohort["slides_dir"]), "--mpp_csv", str(cohort["mpp_csv"]),
            "--tiling.target_magnification", str(TILING.target_magnification),
            "--tiling.patch_size", str(TILING.patch_size), "--tiling.overlap", str(TILING.overlap),
            "--tiling.min_tissue_fraction", str(TILING.min_tissue_fraction),
            "--qc_max_side", "256", "--progress", "false"]  # fmt: skip
    ray_args = [*args, "--job_dir", str(tmp_path / "ray"), "--ray_address", address]
    cmd = [sys.executable, "-m", "needlework", *ray_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the driver joined the cluster (Ray names it by the node's IP) rather than starting its own
    assert "Connecting to existing Ray cluster" in proc.stderr and f":{address.split(':')[1]}" in proc.stderr
    assert main([*args, "--job_dir", str(tmp_path / "local")]) == 0  # the same command on this process
    ours = artefacts(tmp_path / "ray" / TILING.dir_name())
    reference = artefacts(tmp_path / "local" / TILING.dir_name())
    assert ours.keys() == reference.keys() and any(k.startswith("patches/") for k in ours)
    for name, data in reference.items():
        assert ours[name] == data, name  # the cluster's workers wrote what the local run wrote
