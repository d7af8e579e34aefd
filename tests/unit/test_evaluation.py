import math

import pytest
import torch

from fibecfed.evaluation import classification_metrics


def test_binary_metrics_by_hand():
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    preds = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1])
    # tp=3 fn=1 fp=1 tn=3: acc 6/8, f1 = 2*3/(2*3+1+1) = 0.75, mcc = (9-1)/sqrt(4*4*4*4) = 0.5
    m = classification_metrics(preds, labels, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["mcc"] == pytest.approx(0.5)


def test_constant_prediction_has_zero_mcc():
    labels = torch.tensor([0, 1, 1, 1])
    preds = torch.ones(4, dtype=torch.long)
    m = classification_metrics(preds, labels, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["mcc"] == 0.0


def test_multiclass_macro_f1():
    labels = torch.tensor([0, 1, 2, 2])
    preds = torch.tensor([0, 2, 2, 2])
    # class 0: f1 1; class 1: f1 0; class 2: tp 2, fp 1, fn 0 -> 4/5
    m = classification_metrics(preds, labels, 3)
    assert m["f1"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert m["accuracy"] == pytest.approx(0.75)


def test_empty():
    m = classification_metrics(torch.empty(0), torch.empty(0), 2)
    assert math.isnan(m["accuracy"])
