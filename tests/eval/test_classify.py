"""Batched prediction, top-k accuracy and the tensor-level evaluate_model."""
import pytest
import torch
from torch import nn

from softmoe.eval.classify import predict, topk_accuracy
from softmoe.eval.fewshot import fewshot_evaluate, select_fewshot
from softmoe.eval.run import evaluate_model


class StandIn(nn.Module):
    """The zoo's model surface on flat features: tokens = x as 4 tokens, GAP, linear head."""

    def __init__(self, dim=8, num_classes=6):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):  # (B, 4*dim) -> (B, 4, dim)
        return self.proj(x.reshape(x.shape[0], 4, -1))

    def forward_head(self, x, pre_logits=False):
        x = x.mean(1)
        return x if pre_logits else self.head(x)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 5, 1, 2, 3, 4]])
    labels = torch.tensor([0, 0, 4])
    acc = topk_accuracy(logits, labels)
    assert acc["top1"] == pytest.approx(1 / 3)  # only row 0
    assert acc["top5"] == pytest.approx(2 / 3)  # row 1's label 0 is ranked last (6th)
    assert set(topk_accuracy(logits[:, :4], labels.clamp_max(3))) == {"top1"}  # 4 classes: no top-5


def test_predict_matches_unbatched_and_restores_mode():
    torch.manual_seed(0)
    model = StandIn().train()
    x = torch.randn(11, 32)
    out = predict(model, x, batch_size=4)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert torch.allclose(out["logits"], model.forward_head(tokens), atol=1e-6)
        assert torch.allclose(out["pre_logits"], model.forward_head(tokens, pre_logits=True), atol=1e-6)
    assert model.training  # mode restored
    prepared = predict(model, x, batch_size=5, prepare=lambda b: b * 2, pre_logits=False)
    assert set(prepared) == {"logits"}
    with torch.no_grad():
        assert torch.allclose(prepared["logits"], model.forward_head(model.forward_features(x * 2)), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, x, batch_size=0)


def test_evaluate_model_end_to_end_on_tensors():
    torch.manual_seed(1)
    model = StandIn(num_classes=6)
    train_y = torch.arange(6).repeat(8)
    train_x = torch.randn(48, 32)
    test_y = torch.arange(6).repeat(3)
    test_x = torch.randn(18, 32)
    res = evaluate_model(model, test_x, test_y, 6, train_x, train_y, shots=[1, 5], seed=3, batch_size=7)
    logits = predict(model, test_x)["logits"]
    assert res["top1"] == topk_accuracy(logits, test_y)["top1"]
    assert res["top5"] == topk_accuracy(logits, test_y)["top5"]
    # Few-shot equals the probe on the features of the seeded selection.
    sel = select_fewshot(train_y, 5, 6, seed=3)
    feats = predict(model, train_x[sel.reshape(-1)])["pre_logits"].view(6, 5, -1)
    ref = fewshot_evaluate(feats, predict(model, test_x)["pre_logits"], test_y, [1, 5])
    for s in (1, 5):
        assert res["fewshot"][s]["accuracies"] == ref[s]["accuracies"]
    # Deterministic for a seed.
    again = evaluate_model(model, test_x, test_y, 6, train_x, train_y, shots=[1, 5], seed=3)
    assert again["fewshot"][5]["accuracies"] == res["fewshot"][5]["accuracies"]


def test_evaluate_model_errors_and_notes():
    model = StandIn(num_classes=6)
    train_y = torch.tensor([0] * 5 + [1] * 2 + [2] * 5 + [3] * 5 + [4] * 5 + [5] * 5)
    train_x = torch.randn(len(train_y), 32)
    test_y, test_x = torch.arange(6), torch.randn(6, 32)
    with pytest.raises(ValueError, match=r"shots=5.*class 1 \('b'\) has 2"):
        evaluate_model(model, test_x, test_y, 6, train_x, train_y, shots=[1, 5], classes=list("abcdef"))
    # A 4-class dataset on a 6-output head: no top-k, a note says why; few-shot still runs.
    res = evaluate_model(model, test_x[:4], test_y[:4], 4, train_x[:8], torch.arange(4).repeat(2), shots=[2])
    assert "top1" not in res and "6 outputs" in res["note"] and 2 in res["fewshot"]
    small = StandIn(num_classes=3)
    res = evaluate_model(small, test_x[:3], test_y[:3], 3)
    assert "top1" in res and "top5" not in res and "3 < 5 classes" in res["note"]


def test_resolve_device():
    from softmoe.eval.classify import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_flag_is_a_no_op_on_cpu():
    model = StandIn()
    x = torch.randn(5, 32)
    assert torch.equal(predict(model, x, device="cpu", bf16=True)["logits"], predict(model, x, device="cpu")["logits"])
