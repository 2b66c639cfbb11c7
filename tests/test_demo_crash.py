"""The demo crash of issue #11: oneDNN's strided 1×1 backward kernel corrupts memory on AVX-512 CPUs.

Everything that could kill the interpreter runs in a subprocess, so a crash fails the test with its signal
instead of taking pytest down. See ``needlework.models.layers`` for the cause and the reproducer.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from needlework.models.layers import Conv1x1
from needlework.registry import create_model


def run_python(code: str, timeout: float = 300, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-c", textwrap.dedent(code)] if code else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"subprocess killed by {name}:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [7, 8, 124, 125])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv1x1_equals_strided_conv(size, stride, dtype):
    conv = Conv1x1(8, 16, stride=stride, bias=True).to(dtype)
    x = torch.randn(2, 8, size, size, dtype=dtype)
    ref = F.conv2d(x, conv.weight, conv.bias, stride=stride)
    out = conv(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(conv(x.contiguous(memory_format=torch.channels_last)), ref)


def test_conv1x1_gradcheck_and_checkpoint_compatibility():
    conv = Conv1x1(3, 4, stride=2, bias=True).double()
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    reference = lambda x, w, b: F.conv2d(x, w, b, stride=2)  # noqa: E731
    assert torch.autograd.gradcheck(reference, (x, conv.weight, conv.bias))
    assert torch.autograd.gradcheck(conv, (x,))
    # the same parameter names and shapes as nn.Conv2d(in, out, 1, stride): old checkpoints load unchanged
    plain = nn.Conv2d(3, 4, 1, stride=2).double()
    conv.load_state_dict(plain.state_dict())
    torch.testing.assert_close(conv(x), plain(x))
    assert conv.stride == (2, 2) and conv.kernel_size == (1, 1)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("bagnet", {"kernel3": [1, 1, 1, 1], "stem_stride": 1, "width": 0.125, "blocks": [1, 1, 1, 1]}),
        ("bagnet", {"receptive_field": 177, "width": 0.25}),
    ],
)
def test_no_plain_strided_1x1_conv_in_cnn_families(name, kwargs):
    """Every strided 1×1 convolution in the CNN families goes through Conv1x1 (never the crashing kernel)."""
    from needlework.models.encoders import ResNet  # noqa: F401  (registers the encoders)
    from needlework.models.patch_cnn import PatchCNN
    from needlework.registry import create_encoder, list_encoders

    modules = [create_model(name, **kwargs), PatchCNN()]
    modules += [create_encoder(n) for n in list_encoders() if "resnet" in n]
    checked = 0
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d) and sub.kernel_size == (1, 1) and sub.stride != (1, 1):
                assert isinstance(sub, Conv1x1), f"{type(module).__name__}: plain strided 1×1 conv {sub}"
                checked += 1
    assert checked > 0


def test_reproducer_shapes_run_through_conv1x1_in_channels_last():
    """The smallest reproducer of the oneDNN crash, with Conv1x1 in place of nn.Conv2d."""
    assert_ok(run_python("""
        import torch
        from needlework.models.layers import Conv1x1
        conv = Conv1x1(8, 32, stride=2).to(memory_format=torch.channels_last)
        for size in (124, 128, 96):
            x = torch.randn(2, 8, size, size, requires_grad=True)
            x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(10):
                conv(x).sum().backward()
        print("ok")
    """))


def test_demo_model_survives_the_curriculum_canvas_switch():
    """The demo's model, memory format and optimiser through its 64 → 128 px switch (the crash of #11)."""
    assert_ok(run_python("""
        import torch
        from needlework.cli.demo import build_task
        torch.manual_seed(0)
        task = build_task(3e-3)
        model = task.model
        assert model.encoder.stem[1].weight.is_contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for size in (64, 64, 64, 128, 128, 128, 64, 128):
            x = torch.rand(32, 1, size, size)
            y = torch.randint(0, 2, (32,))
            loss = torch.nn.functional.cross_entropy(model(image=x)["logits"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
        print("ok")
    """))


def test_demo_end_to_end_through_both_curriculum_stages(tmp_path):
    """A shortened ``needlework demo``: one epoch at 64 px, one at 128 px, in a subprocess."""
    import json

    out = tmp_path / "demo"
    proc = run_python("", args=(
        "-m", "needlework", "demo", "--out", str(out), "--canvas", "128", "--warmup-canvas", "64",
        "--warmup-epochs", "1", "--epochs", "2", "--epoch-size", "96", "--val-size", "32",
        "--test-size", "48", "--quiet",
    ))  # fmt: skip
    assert_ok(proc)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["args"]["canvas"] == 128
    assert 0.0 <= metrics["test/acc"] <= 1.0 and 0.0 <= metrics["localisation_ap"] <= 1.0
    assert metrics["n_test"] == 48
    assert "| test accuracy |" in (out / "report.md").read_text()
    assert (out / "saliency.png").stat().st_size > 10_000
    assert "test accuracy" in proc.stdout


def test_ats_networks_train_in_channels_last_at_two_sizes_without_crashing():
    """The ATS Megapixel-MNIST networks keep their weights channels-last (a 2× CPU speed-up, see
    ``models/ats_networks.py``): train them through two input sizes in a subprocess, as the demo's BagNet
    crashed at a size change, and check they match an NCHW copy."""
    proc = run_python(
        """
        import copy, torch
        import needlework
        from needlework.data import MegapixelMNIST
        torch.manual_seed(0)
        model = needlework.create_model("ats.megapixel_mnist", num_classes=10)
        nets = (model.sampler.attention_net, model.sampler.feature_net)
        convs = [m for net in nets for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        convs = [m.weight for m in convs if m.in_channels > 1]
        cl = torch.channels_last
        assert convs and all(w.is_contiguous(memory_format=cl) and not w.is_contiguous() for w in convs)
        nchw = copy.deepcopy(model.sampler.feature_net).to(memory_format=torch.contiguous_format)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for canvas in (200, 256, 200):
            ds = MegapixelMNIST("train", size=2, canvas=canvas, n_noise=2)
            items = [ds[i] for i in range(2)]
            x_low = torch.stack([it["x_low"] for it in items])
            x_high = torch.stack([it["x_high"] for it in items])
            label = torch.tensor([it["label"] for it in items])
            for _ in range(3):
                loss, _ = model.compute_loss(model(x_low, x_high), label)
                opt.zero_grad()
                loss.backward()
                opt.step()
            assert torch.isfinite(loss)
        nchw.load_state_dict(model.sampler.feature_net.state_dict())
        patches = torch.randn(6, 1, 50, 50)
        torch.testing.assert_close(model.sampler.feature_net(patches), nchw(patches), atol=1e-5, rtol=1e-4)
        print("ok")
        """
    )
    assert_ok(proc)
    assert proc.stdout.strip().endswith("ok")
