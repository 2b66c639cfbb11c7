import pytest
import torch

import needlework
from needlework.models import BagNetEncoder, receptive_field


def _gradient_footprint(encoder, size):
    """Side of the input region that influences one central output unit (measured by autograd)."""
    x = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    out = encoder(x)
    h, w = out.shape[-2:]
    out[0, :, h // 2, w // 2].sum().backward()
    nz = x.grad[0, 0].abs() > 0
    rows, cols = nz.any(1).nonzero(), nz.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


@pytest.mark.parametrize(("rf", "blocks", "size"), [(9, (1, 1, 1, 1), 48), (17, (1, 1, 1, 1), 64),
                                                    (33, (2, 2, 2, 2), 80), (177, (3, 4, 6, 3), 200)])
def test_receptive_field_measured_by_gradient(rf, blocks, size):
    # norm="none": instance norm couples every position through its statistics, which is a property of
    # the normaliser, not of the convolutional receptive field being measured here.
    enc = BagNetEncoder(receptive_field=rf, width=0.25, blocks=blocks, norm="none").double().eval()
    assert receptive_field(enc) == rf
    assert _gradient_footprint(enc, size) == (rf, rf)


def test_output_shape_and_widths():
    for width, channels in [(0.25, 512), (0.5, 1024), (1.0, 2048)]:
        enc = BagNetEncoder(receptive_field=33, width=width, blocks=(1, 1, 1, 1))
        assert enc.out_channels == channels
    enc = BagNetEncoder(receptive_field=33, width=0.25, blocks=(1, 1, 1, 1))
    assert enc(torch.zeros(2, 1, 128, 128)).shape == (2, 512, 12, 12)


def test_dense_classifier_outputs():
    model = needlework.create_model("bagnet.rf9", width=0.25, blocks=(1, 1, 1, 1), pooling="attention")
    out = model(torch.rand(3, 1, 64, 64))
    assert out["logits"].shape == (3, 2)
    h, w = out["logit_map"].shape[-2:]
    assert out["logit_map"].shape[:2] == (3, 2) and out["attention"].shape == (3, h * w)
    assert torch.allclose(out["attention"].sum(1), torch.ones(3))


def test_mean_pooling_equals_pooled_local_logits():
    model = needlework.create_model("bagnet.rf9", width=0.25, blocks=(1, 1, 1, 1), pooling="mean").eval()
    out = model(torch.rand(2, 1, 64, 64))
    assert torch.allclose(out["logit_map"].mean(dim=(2, 3)), out["logits"], atol=1e-5)


@pytest.mark.parametrize("name", [n for n in needlework.list_models("bagnet*")])
def test_registry_builds_every_bagnet(name):
    model = needlework.create_model(name, width=0.25)
    assert isinstance(model, needlework.models.DenseClassifier)


def test_errors():
    with pytest.raises(ValueError, match="receptive_field must be one of"):
        BagNetEncoder(receptive_field=21)
    with pytest.raises(ValueError, match="kernel3"):
        BagNetEncoder(kernel3=(1, 1, 1))
    with pytest.raises(ValueError, match="smaller than the receptive field"):
        BagNetEncoder(receptive_field=33, width=0.25)(torch.zeros(1, 1, 20, 20))
    with pytest.raises(ValueError, match=r"image must have shape \(B, 1, H, W\)"):
        BagNetEncoder(width=0.25)(torch.zeros(1, 3, 64, 64))
    with pytest.raises(KeyError, match=r"Unknown model 'bagnet\.rf21'"):
        needlework.create_model("bagnet.rf21")
