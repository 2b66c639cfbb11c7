import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from needlework.metrics import localisation_ap, localisation_hits
from needlework.saliency import saliency_map, saliency_peaks


class Linear(nn.Module):
    """logits = W·vec(image): its input gradient is known in closed form."""

    def __init__(self, h, w):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, h * w))

    def forward(self, image):
        return {"logits": image.flatten(1) @ self.weight.T}


def test_saliency_of_linear_model_is_abs_weight():
    model = Linear(8, 6)
    sal = saliency_map(model, torch.rand(3, 1, 8, 6), target_class=1)
    expected = model.weight[1].abs().reshape(8, 6).expand(3, 8, 6)
    assert torch.allclose(sal, expected)


def test_saliency_restores_training_mode_and_rejects_bad_class():
    model = Linear(4, 4).train()
    saliency_map(model, torch.rand(1, 1, 4, 4))
    assert model.training
    with pytest.raises(ValueError, match="target_class 5"):
        saliency_map(model, torch.rand(1, 1, 4, 4), target_class=5)


def test_saliency_peaks_xy_order():
    sal = torch.zeros(2, 5, 7)
    sal[0, 3, 6] = 2.0  # y=3, x=6
    sal[1, 0, 1] = 1.0
    points, values = saliency_peaks(sal)
    assert points.tolist() == [[6, 3], [1, 0]] and values.tolist() == [2.0, 1.0]


BOX = torch.tensor([[10.0, 10.0, 38.0, 38.0]])
EMPTY = torch.zeros(0, 4)


def test_localisation_ap_hand_case():
    # ranked: hit(pos), false alarm(neg), mis-localised(pos), hit(pos)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    points = torch.tensor([[20, 20], [5, 5], [60, 60], [11, 37]])
    boxes = [BOX, EMPTY, BOX, BOX]
    # precision at the two hits: 1/1 and 2/4; three needles in all
    assert localisation_ap(scores, points, boxes) == pytest.approx((1.0 + 0.5) / 3)


def test_localisation_ap_equals_sklearn_when_every_needle_is_found():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (50,), generator=g)
    scores = torch.rand(50, generator=g)
    boxes = [BOX if y else EMPTY for y in labels]
    points = torch.full((50, 2), 20)
    ours = localisation_ap(scores, points, boxes)
    assert ours == pytest.approx(average_precision_score(labels.numpy(), scores.numpy()))


def test_localisation_hits_and_errors():
    hits = localisation_hits(torch.tensor([[10, 10], [39, 20]]), [BOX, BOX])
    assert hits.tolist() == [True, False]
    with pytest.raises(ValueError, match="2 points but 1 box"):
        localisation_hits(torch.zeros(2, 2), [BOX])
    assert localisation_ap(torch.rand(2), torch.zeros(2, 2), [EMPTY, EMPTY]) != localisation_ap(
        torch.rand(2), torch.zeros(2, 2), [EMPTY, EMPTY]
    )  # nan: no needle at all
