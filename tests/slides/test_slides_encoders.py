"""Tile encoders and their loading paths (local state dicts; timm / torchvision when importable)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from needlework.models import encoder_loading
from needlework.models.encoder_loading import (
    EncoderUnavailableError,
    build_tile_encoder,
    load_state_dict_file,
    load_weights_into,
)
from needlework.models.encoders import ResNet
from needlework.registry import create_encoder, list_encoders


@pytest.mark.parametrize(
    ("name", "dim"), [("resnet8", 128), ("resnet18", 512), ("resnet50_trunc", 1024), ("color_stats", 39)]
)
def test_builtin_encoders_shapes(name, dim):
    assert name in list_encoders()
    enc = create_encoder(name)
    with torch.no_grad():
        y = enc(torch.rand(2, 3, 32, 32))
    assert enc.embed_dim == dim and y.shape == (2, dim) and y.dtype == torch.float32
    with pytest.raises(ValueError, match="tiles"):
        enc(torch.rand(2, 4, 32, 32))


def test_random_init_is_seeded():
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b, c = (
            create_encoder("resnet8")(x),
            create_encoder("resnet8")(x),
            create_encoder("resnet8", seed=1)(x),
        )
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_resnet_parameter_names_follow_torchvision():
    names = set(create_encoder("resnet18").backbone.state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
        "layer4.1.bn2.bias",
    ):
        assert key in names, key
    # torchvision's ResNet-18 has 11,689,512 parameters, of which 513,000 in fc
    assert sum(p.numel() for p in create_encoder("resnet18").parameters()) == 11_689_512 - 513_000


def _full_resnet50_checkpoint(path, wrap=True):
    """A random-init ResNet-50 saved like a torchvision/timm checkpoint: trunk + layer4 + fc."""
    torch.manual_seed(123)
    net = ResNet("bottleneck", (3, 4, 6, 3))
    for m in net.modules():  # non-trivial BN statistics so that a bad load would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = dict(net.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state
    torch.save(payload, path)
    return net.eval()


def test_truncated_resnet_loads_a_full_checkpoint(tmp_path):
    src = _full_resnet50_checkpoint(tmp_path / "r50.pth")
    enc = build_tile_encoder("resnet50_trunc", weights=str(tmp_path / "r50.pth"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        # Reference: the source network's stem + layer1..3, average-pooled, on the normalised input.
        z = (x - enc.mean) / enc.std
        z = src.maxpool(src.relu(src.bn1(src.conv1(z))))
        ref = src.layer3(src.layer2(src.layer1(z))).mean(dim=(2, 3))
        torch.testing.assert_close(enc(x), ref)
    assert enc.version.startswith("weights:")


def test_full_resnet_loads_and_ignores_the_classifier(tmp_path):
    src = create_encoder("resnet18", seed=3).backbone
    state = {**src.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    torch.save({"model": state}, tmp_path / "r18.pth")
    enc = build_tile_encoder("resnet18", weights=str(tmp_path / "r18.pth"))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), src((x - enc.mean) / enc.std))


def test_wrong_checkpoint_is_refused_with_the_keys(tmp_path):
    torch.save(create_encoder("resnet18").backbone.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(KeyError, match="missing keys"):
        build_tile_encoder("resnet50_trunc", weights=str(tmp_path / "r18.pt"))
    state = create_encoder("resnet18", seed=1).backbone.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        load_weights_into(create_encoder("resnet18").backbone, state)
    torch.save({"a": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_state_dict_file(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="encoder weights not found"):
        build_tile_encoder("resnet18", weights=str(tmp_path / "missing.pt"))


def test_local_checkpoint_registry(tmp_path, monkeypatch):
    _full_resnet50_checkpoint(tmp_path / "r50.pth", wrap=False)
    (tmp_path / "ckpts.json").write_text(json.dumps({"resnet50_trunc": "r50.pth"}))
    monkeypatch.setenv(encoder_loading.LOCAL_CKPTS_ENV, str(tmp_path / "ckpts.json"))
    enc = build_tile_encoder("resnet50_trunc")
    assert enc.version == f"weights:{tmp_path / 'r50.pth'}"


def test_fake_timm_exercises_the_timm_loading_path(tmp_path, monkeypatch):
    """A stand-in ``timm`` module (the real one cannot be imported here, ENVIRONMENT.md §2) checks that
    our code asks for a headless model, loads local weights with head keys dropped and takes timm's
    normalisation."""
    calls = {}

    def create_model(name, pretrained=False, num_classes=None):
        calls.update(name=name, pretrained=pretrained, num_classes=num_classes)
        net = ResNet("basic", (1, 1), widths=(8, 16), stem="small")
        net.num_features = 16
        return net

    fake = types.ModuleType("timm")
    fake.__version__ = "0.0-fake"
    fake.create_model = create_model
    fake.data = types.SimpleNamespace(
        resolve_data_config=lambda args, model: {
            "input_size": (3, 96, 96),
            "mean": (0.5,) * 3,
            "std": (0.25,) * 3,
        }
    )
    monkeypatch.setitem(sys.modules, "timm", fake)
    torch.manual_seed(5)
    ref = ResNet("basic", (1, 1), widths=(8, 16), stem="small")
    state = {**ref.state_dict(), "head.fc.weight": torch.zeros(3, 16)}
    torch.save(state, tmp_path / "w.pt")
    enc = build_tile_encoder("timm:hf_hub:org/tiny", weights=str(tmp_path / "w.pt"))
    assert calls == {"name": "hf_hub:org/tiny", "pretrained": False, "num_classes": 0}
    assert enc.embed_dim == 16 and enc.input_size == 96 and enc.name == "timm:hf_hub:org/tiny"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref.eval()((x - 0.5) / 0.25))


def test_real_timm_encoder_round_trip(tmp_path):
    timm = pytest.importorskip(
        "timm", reason="timm is not importable with this CPU torch (ENVIRONMENT.md §2)"
    )
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    enc = build_tile_encoder("timm:resnet18", weights=str(tmp_path / "r18.pth"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert enc(x).shape == (1, 512)


def test_real_torchvision_encoder_round_trip(tmp_path):
    pytest.importorskip(
        "torchvision", reason="torchvision does not import beside the CPU torch (ENVIRONMENT.md §2)"
    )
    torch.save(create_encoder("resnet18").backbone.state_dict(), tmp_path / "r18.pth")
    enc = build_tile_encoder("torchvision:resnet18", weights=str(tmp_path / "r18.pth"))
    ref = create_encoder("resnet18")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x))


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import fails
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EncoderUnavailableError, match=r"needlework\[timm\]"):
        build_tile_encoder("timm:vit_small_patch16_224")
    with pytest.raises(EncoderUnavailableError, match="transformers"):
        build_tile_encoder("hf:some/repo")
    with pytest.raises(KeyError, match="Unknown encoder"):
        build_tile_encoder("no_such_encoder")
