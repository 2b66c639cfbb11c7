"""Peak memory and step time vs the number of candidate positions N for selection models, side by side.

Part 1 (models): one training step (forward, backward, SGD step) on a random ``(B, 1, 16g, 16g)`` image with
``N = g²`` candidate positions (16-px patches / attention cells) for
  dense — ``dense.megapixel_mnist``: the ATS feature network applied to the whole image (branch ``ats``);
  ats   — ``ats.megapixel_mnist``: attention sampling of 10 patches from a g×g attention map (branch ``ats``);
  dps   — ``dps``: g×g scorer grid, perturbed top-10 (S = 100), soft patch mixture on the support;
  ips   — ``ips``: scan of all N patches in chunks of I = 100 without gradient, M = 10 kept.
The low-resolution view (ATS, DPS) is the image area-downsampled by 16 (one pixel per candidate).
"dense" and "ats" are measured only when registered (``needlework.list_models()``); they are skipped with a
note otherwise.

Part 2 (operator): forward + backward of the perturbed top-K (B = 1, k = 10, S = 100) — ours (sampled
indices, noise regenerated in backward) vs the dense-Jacobian formulation (``(B, S, k, N)`` one-hots kept for
backward, ``(B, k, N, N)`` Jacobian built in backward); the dense one is skipped where its Jacobian alone
would exceed ``--dense-limit-gb``.

Every measurement runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_`` fixed so freed blocks go back to
the OS): peak memory = peak resident set size during the second step above the level before it (CPU) or
``torch.cuda.max_memory_allocated`` (GPU); saved = bytes autograd keeps for backward; time = median of
``--repeats`` steps after the first.

    PYTHONPATH=src python benchmarks/selection_memory.py            # N = 100, 1024, 10000 (~5-10 min CPU)
    PYTHONPATH=src python benchmarks/selection_memory.py --sizes 10 32 --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PATCH = 16
MODELS = ("dense", "ats", "dps", "ips")
REGISTRY = {"dense": "dense.megapixel_mnist", "ats": "ats.megapixel_mnist", "dps": "dps", "ips": "ips"}


def model_kwargs(key: str, g: int) -> dict[str, Any]:
    if key == "ats":
        return dict(n_patches=10, patch_size=PATCH)
    if key == "dps":
        return dict(grid=g, patch_size=PATCH, k=10, n_samples=100, sigma=0.05, dim=128, n_heads=4)
    if key == "ips":
        return dict(patch_size=PATCH, n_keep=10, chunk_size=100, dim=128)
    return {}


def run_model(key: str, g: int, batch: int, repeats: int, device: torch.device) -> dict[str, Any]:
    from needlework import create_model, list_models
    from needlework.profiling import peak_memory_bytes, saved_tensor_bytes

    name = REGISTRY[key]
    if name not in list_models():
        return {"skipped": f"model {name!r} not registered (branch ats not merged)"}
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **model_kwargs(key, g)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x_high = torch.rand(batch, 1, g * PATCH, g * PATCH, device=device)
    inputs = {"x_high": x_high, "x_low": F.avg_pool2d(x_high, PATCH)}
    target = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        out = model.forward_batch(inputs)
        loss, _ = model.compute_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: lazy initialisations and code pages are not the model's memory
    _, peak = peak_memory_bytes(step, device)
    _, saved = saved_tensor_bytes(lambda: model.forward_batch(inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "peak_mb": peak / 2**20,
        "saved_mb": saved / 2**20,
        "step_s": sorted(times)[len(times) // 2],
        "params": sum(p.numel() for p in model.parameters()),
        "image_side": g * PATCH,
    }


def run_operator(impl: str, n: int, repeats: int, device: torch.device, limit_gb: float) -> dict[str, Any]:
    from needlework.profiling import peak_memory_bytes, saved_tensor_bytes
    from needlework.topk import perturbed_topk
    from needlework.topk.reference import perturbed_topk_dense

    b, k, s = 1, 10, 100
    jac_bytes = b * k * n * n * 4
    if impl == "dense" and jac_bytes > limit_gb * 2**30:
        return {
            "skipped": f"dense Jacobian alone needs {jac_bytes / 2**30:.1f} GiB",
            "jacobian_gb": jac_bytes / 2**30,
        }
    torch.manual_seed(0)
    scores = torch.rand(b, n, device=device, requires_grad=True)
    upstream = torch.randn(b, k, n, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def forward() -> torch.Tensor:
        if impl == "dense":
            return perturbed_topk_dense(scores, k, 0.05, torch.randn(b, s, n, device=device, generator=gen))
        return perturbed_topk(scores, k, 0.05, s, gen)

    def step() -> None:
        scores.grad = None
        (forward() * upstream).sum().backward()

    step()  # warm-up
    _, peak = peak_memory_bytes(step, device)
    _, saved = saved_tensor_bytes(forward)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "peak_mb": peak / 2**20,
        "saved_mb": saved / 2**20,
        "step_s": sorted(times)[len(times) // 2],
        "jacobian_gb": jac_bytes / 2**30,
    }


def worker(spec: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind, impl, size = spec.split(":")
    if kind == "model":
        result = run_model(impl, int(size), args.batch, args.repeats, device)
    else:
        result = run_operator(impl, int(size), args.repeats, device, args.dense_limit_gb)
    print("RESULT " + json.dumps(result))


def spawn(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        spec,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--dense-limit-gb",
        str(args.dense_limit_gb),
    ]
    return run_measurement(cmd, args.threads, args.timeout, error_lines=1)


def run_measurement(cmd: list[str], threads: int, timeout: float, error_lines: int = 3) -> dict[str, Any]:
    """Run one measurement worker; its ``RESULT {json}`` line, or ``{"error": [last lines of its output]}``.

    Freed large blocks go back to the OS (``MALLOC_MMAP_THRESHOLD_``), so RSS follows what a step holds.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-error_lines:] or ["no output"]}
    return json.loads(lines[-1][len("RESULT ") :])


def fmt(r: dict[str, Any], key: str, spec: str) -> str:
    return spec.format(r[key]) if key in r else "-"


def table(rows: list[dict[str, Any]], label: str) -> str:
    head = f"{label:<16}{'N':>8}{'image':>8}{'peak MB':>10}{'saved MB':>10}{'step s':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r["result"]
        note = res.get("skipped") or (" ".join(res["error"]) if "error" in res else "")
        lines.append(
            f"{r['name']:<16}{r['n']:>8}{fmt(res, 'image_side', '{}'):>8}{fmt(res, 'peak_mb', '{:.1f}'):>10}"
            f"{fmt(res, 'saved_mb', '{:.2f}'):>10}{fmt(res, 'step_s', '{:.3f}'):>9}  {note}"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What a result was measured on (shared by the memory benchmarks)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 32, 100], help="grid sides g (N = g²)")
    p.add_argument("--op-sizes", type=int, nargs="+", default=[100, 1000, 3000, 10000], help="N for part 2")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dense-limit-gb", type=float, default=1.0)
    p.add_argument("--timeout", type=int, default=300, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selection_memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    started = time.time()
    model_rows = []
    for g in args.sizes:
        for key in args.models:
            model_rows.append({"name": key, "n": g * g, "result": spawn(f"model:{key}:{g}", args)})
            print(f"  measured {key} N={g * g} ({time.time() - started:.0f}s)", file=sys.stderr)
    op_rows = []
    for n in args.op_sizes:
        for impl in ("sampled", "dense"):
            op_rows.append({"name": f"topk_{impl}", "n": n, "result": spawn(f"op:{impl}:{n}", args)})
    print(
        f"\nSelection models, one training step, batch {args.batch}, {PATCH}-px patches, device {args.device}"
    )
    print(table(model_rows, "model"))
    print(
        "\nPerturbed top-K forward + backward (B = 1, k = 10, S = 100): sampled-index VJP vs dense Jacobian"
    )
    print(table(op_rows, "operator"))
    write_json(
        args.out,
        {
            "benchmark": "selection_memory",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"
            },
            "environment": environment(),
            "memory_measure": (
                "CPU: peak RSS during the second step above the level before it"
                if args.device == "cpu"
                else "CUDA: torch.cuda.max_memory_allocated during the second step above the level before it"
            )
            + "; saved: autograd saved-tensor bytes of one forward",
            "models": model_rows,
            "operator": op_rows,
        },
    )
    print(f"\nwrote {args.out} ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
