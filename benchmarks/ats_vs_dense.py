"""ATS vs the dense CNN on Megapixel MNIST: training-step time and peak memory per sample, side by side,
plus patch-extraction throughput (ours vs a naive per-patch loop vs a plain copy of the same bytes).

    PYTHONPATH=src python benchmarks/ats_vs_dense.py            # writes benchmarks/results/ats_vs_dense.json
    PYTHONPATH=src python benchmarks/ats_vs_dense.py --quick    # tiny sizes, to check the script
    PYTHONPATH=src python benchmarks/ats_vs_dense.py --device cuda   # → ats_vs_dense_cuda.json

Method.
* Step = forward + loss (``compute_loss``) + backward + Adam step of the registered models
  ``ats.megapixel_mnist`` (10 patches of 50², without replacement, x_low rendered at 0.12) and
  ``dense.megapixel_mnist`` (same feature net over the whole x_high) on real generated items.
  Time = median over ``reps`` steps after one warm-up step, divided by the batch size.
* Peak memory: each (method, size) case runs in a fresh subprocess. Just before the first step the
  script reads the resident set size (``VmRSS``); after the steps it reads the process's high-water
  mark ``ru_maxrss``. Their difference is the step's working memory beyond the model, optimiser
  shell and input batch (activations, gradients, Adam state, temporaries), divided by the batch size.
  ``ru_maxrss`` is a true peak (it catches transient buffers), and separate processes keep the cases
  from sharing allocator caches. On CUDA the peak is ``torch.cuda.max_memory_allocated`` during the
  steps minus the memory allocated just before them (the same quantity, read from the caching allocator),
  and step times are taken after ``torch.cuda.synchronize``.
* Patch extraction: ``extract_patches`` vs a per-patch Python loop over a zero-padded copy of each image
  (the reference PyTorch port's approach) vs ``Tensor.copy_`` of a contiguous tensor with the output's
  size (the memory-bandwidth floor). Median of a few calls; GB/s counts output bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "ats_vs_dense.json"


def megapixel_batch(size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` Megapixel MNIST images of ``size``² (noise digits scaled with the area as in the paper's
    1500² setting): ``x_high`` ``(B, 1, size, size)``, ``x_low``, ``label`` ``(B,)``."""
    from needlework.data import MegapixelMNIST

    ds = MegapixelMNIST("train", size=batch, canvas=size, n_noise=max(1, round(50 * (size / 1500) ** 2)))
    items = [ds[i] for i in range(batch)]
    x_high = torch.stack([it["x_high"] for it in items])
    x_low = torch.stack([it["x_low"] for it in items])
    return x_high, x_low, torch.tensor([it["label"] for it in items])


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_case(method: str, size: int, batch: int, reps: int, threads: int, device: str = "cpu") -> dict:
    """One (method, size) case in this process; returns times and memory."""
    import needlework

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x_high, x_low, label = (t.to(device) for t in megapixel_batch(size, batch))
    name = {"ats": "ats.megapixel_mnist", "dense": "dense.megapixel_mnist"}[method]
    model = needlework.create_model(name, num_classes=10).to(device)
    cuda = device.startswith("cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        out = model(x_low, x_high) if method == "ats" else model(x_high)
        loss, _ = model.compute_loss(out, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first step is a warm-up (allocations, Adam state)
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    step_s = statistics.median(times)
    return {
        "method": method,
        "device": device,
        "size": size,
        "batch": batch,
        "reps": reps,
        "threads": threads,
        "step_s": step_s,
        "step_s_all": times,
        "time_per_sample_s": step_s / batch,
        "peak_step_bytes": peak - base,
        "peak_bytes_per_sample": (peak - base) / batch,
        "input_bytes_per_sample": x_high[0].numel() * 4 + x_low[0].numel() * 4,
    }


def naive_patches(images: torch.Tensor, offsets: torch.Tensor, P: int) -> torch.Tensor:
    """Reference-port style: pad each whole image, then slice patch by patch in a double Python loop."""
    out = []
    for b in range(images.shape[0]):
        padded = F.pad(images[b], (P, P, P, P))
        row = []
        for x, y in offsets[b].tolist():
            row.append(padded[:, y + P : y + 2 * P, x + P : x + 2 * P])
        out.append(torch.stack(row))
    return torch.stack(out)


def extraction_benchmark(size: int, batch: int, n: int, P: int, reps: int, threads: int, device: str) -> dict:
    from needlework.ats import extract_patches

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=gen)
    offsets = torch.randint(-P // 2, size - P // 2, (batch, n, 2), generator=gen)  # some cross the border
    source = torch.rand(batch, n, 1, P, P, generator=gen)
    images, offsets, source = images.to(device), offsets.to(device), source.to(device)
    target = torch.empty_like(source)
    ours = extract_patches(images, offsets, P)
    assert torch.equal(ours, naive_patches(images, offsets, P)), "extract_patches disagrees with the loop"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    nbytes = source.numel() * 4
    result = {"size": size, "batch": batch, "n_patches": n, "patch": P, "output_bytes": nbytes}
    for name, fn in [
        ("extract_patches", lambda: extract_patches(images, offsets, P)),
        ("naive_loop", lambda: naive_patches(images, offsets, P)),
        ("memory_copy", lambda: target.copy_(source)),
    ]:
        t = timed(fn)
        result[name] = {"s": t, "GB_per_s": nbytes / t / 1e9}
    result["border_patches"] = int(((offsets < 0) | (offsets > size - P)).any(-1).sum())
    return result


def _subprocess_case(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, __file__, "--case", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs=6, metavar=("METHOD", "SIZE", "BATCH", "REPS", "THREADS", "DEVICE"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (script check only)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help="default: results/ats_vs_dense[_cuda].json")
    args = parser.parse_args()
    if args.case:
        m, s, b, r, t, d = args.case
        print(json.dumps(run_case(m, int(s), int(b), int(r), int(t), d)))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.out is None:
        args.out = (
            RESULT
            if args.device == "cpu"
            else RESULT.with_name(f"ats_vs_dense_{args.device.split(':')[0]}.json")
        )
    # (method, size, batch, reps): ATS batches amortise per-step overheads; dense runs one image per step
    plan = [("ats", 1500, 16, 5), ("dense", 1500, 1, 2), ("ats", 750, 16, 5), ("dense", 750, 1, 3)]
    if args.quick:
        plan = [("ats", 200, 4, 2), ("dense", 200, 1, 2)]
    cases = []
    for method, size, batch, reps in plan:
        c = _subprocess_case([method, str(size), str(batch), str(reps), str(args.threads), args.device])
        print(
            f"  {method:>5} {size:>5}²  batch {batch:>2}: {c['time_per_sample_s'] * 1e3:9.1f} ms/sample, "
            f"{c['peak_bytes_per_sample'] / 2**20:8.1f} MiB/sample",
            flush=True,
        )
        cases.append(c)
    sizes = sorted({c["size"] for c in cases}, reverse=True)
    ratios = {}
    for s in sizes:
        a = next(c for c in cases if c["method"] == "ats" and c["size"] == s)
        d = next(c for c in cases if c["method"] == "dense" and c["size"] == s)
        ratios[str(s)] = {
            "time_dense_over_ats": d["time_per_sample_s"] / a["time_per_sample_s"],
            "memory_dense_over_ats": d["peak_bytes_per_sample"] / a["peak_bytes_per_sample"],
        }
    ext_size = 200 if args.quick else 1500
    extraction = [
        extraction_benchmark(ext_size, 16, 10, 50, 5, args.threads, args.device),
        extraction_benchmark(ext_size, 16, 64, 50, 5, args.threads, args.device),
    ]
    result = {
        "benchmark": "ats_vs_dense",
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "memory_method": (
            "per case subprocess: ru_maxrss after the steps minus VmRSS just before the first step (step "
            "working memory beyond model, optimiser shell and input batch), divided by the batch"
            if args.device == "cpu"
            else "per case subprocess: torch.cuda.max_memory_allocated during the steps minus "
            "memory_allocated "
            "just before them, divided by the batch"
        ),
        "time_method": "median step time over reps after one warm-up step, divided by the batch",
        "cases": cases,
        "ratios": ratios,
        "extraction": extraction,
    }
    print("\n| method | size | batch | ms / sample | peak MiB / sample |")
    print("|---|---|---|---|---|")
    for c in cases:
        print(
            f"| {c['method']} | {c['size']}² | {c['batch']} | {c['time_per_sample_s'] * 1e3:.1f} | "
            f"{c['peak_bytes_per_sample'] / 2**20:.1f} |"
        )
    for s, r in ratios.items():
        print(
            f"\n{s}²: dense / ATS = {r['time_dense_over_ats']:.0f}× time, "
            f"{r['memory_dense_over_ats']:.0f}× memory"
        )
    print("\n| patches | extract_patches | naive loop | memory copy |")
    print("|---|---|---|---|")
    for e in extraction:
        cells = [
            f"{e[k]['s'] * 1e3:.2f} ms ({e[k]['GB_per_s']:.2f} GB/s)"
            for k in ("extract_patches", "naive_loop", "memory_copy")
        ]
        print(
            f"| {e['batch']}×{e['n_patches']} of {e['patch']}² from {e['size']}² | "
            + " | ".join(cells)
            + " |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
