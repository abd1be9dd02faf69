"""Evaluation metrics against values computed by hand on small cases."""

import math

import numpy as np
import pytest

from minibert.metrics import MAIN_METRIC, METRICS, compute_metrics, greater_is_better

# 10 examples: TP = 3, FN = 1, FP = 1, TN = 5 for the positive class (id 1).
BINARY_REFS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
BINARY_PREDS = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]


def test_binary_classification():
    scores = compute_metrics("classification", BINARY_PREDS, BINARY_REFS)
    assert scores["accuracy"] == pytest.approx(8 / 10)
    # F1 of class 1: P = R = 3/4. (Class 0's F1 would be 10/12.)
    assert scores["f1"] == pytest.approx(0.75)
    # MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (15 - 1) / sqrt(4 * 4 * 6 * 6)
    assert scores["mcc"] == pytest.approx(14 / 24)
    assert list(scores) == ["accuracy", "f1", "mcc"]


def test_classification_takes_logits():
    logits = np.array([[-1.0, 2.0] if p == 1 else [0.5, -0.5] for p in BINARY_PREDS])
    assert compute_metrics("classification", logits, BINARY_REFS, id2label={"0": "neg", "1": "pos"}) == compute_metrics(
        "classification", BINARY_PREDS, BINARY_REFS
    )


def test_multiclass_classification():
    refs, preds = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    scores = compute_metrics("classification", preds, refs, id2label={0: "a", 1: "b", 2: "c"})
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # Per-class F1: class 0 2/(2+1+1) = 1/2, class 1 4/(4+1) = 4/5, class 2 2/(2+1) = 2/3; macro = their mean.
    assert scores["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # Multiclass MCC = (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c = 4 correct, s = 6,
    # predicted counts p = (2, 3, 1), true counts t = (2, 2, 2).
    assert scores["mcc"] == pytest.approx((4 * 6 - (4 + 6 + 2)) / math.sqrt((36 - 14) * (36 - 12)))


def test_constant_classifier():
    scores = compute_metrics("classification", [0, 0, 0, 0], [1, 0, 1, 0])
    assert scores == {"accuracy": 0.5, "f1": 0.0, "mcc": 0.0}


def test_regression():
    scores = compute_metrics("regression", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    # Deviations from the means: x (-1, 0, 1), y (-4/3, -1/3, 5/3); r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84).
    assert scores["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert scores["spearman"] == pytest.approx(1.0)  # the same order
    assert scores["mse"] == pytest.approx(1 / 3)
    # Ranks 1..4 against 1 3 2 4: spearman = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60.
    assert compute_metrics("regression", [1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(0.8)


def test_regression_constant_predictions_report_zero_correlation():
    scores = compute_metrics("regression", [2.0, 2.0, 2.0], [1.0, 2.0, 4.0])
    assert scores == {"pearson": 0.0, "spearman": 0.0, "mse": pytest.approx((1 + 0 + 4) / 3)}
    assert compute_metrics("regression", [2.0], [1.0], metric_names=["pearson"]) == {"pearson": 0.0}


def test_multilabel():
    refs = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    probabilities = [[0.9, 0.2, 0.6], [0.1, 0.7, 0.4], [0.8, 0.3, 0.5]]  # 0.5 counts as predicted
    scores = compute_metrics("multilabel", probabilities, refs)
    # Predicted [[1,0,1], [0,1,0], [1,0,1]]: TP 4, FP 1, FN 1 -> micro F1 = 8 / 10.
    assert scores["f1_micro"] == pytest.approx(0.8)
    # Per label: 1 (2 TP), 2/3 (1 TP, 1 FN), 2/3 (1 TP, 1 FP).
    assert scores["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert scores["accuracy"] == pytest.approx(2 / 3)  # whole label sets equal in rows 0 and 1
    assert compute_metrics("multilabel", [[1, 0, 1], [0, 1, 0], [1, 0, 1]], refs) == scores
    with pytest.raises(ValueError, match="look like logits"):
        compute_metrics("multilabel", [[2.3, -1.0, 0.0]], [[1, 0, 0]])


ID2LABEL = {"0": "B-LOC", "1": "B-PER", "2": "I-PER", "3": "O"}


def test_token_classification_entities_and_tokens():
    refs = [[1, 2, 3, 0], [3, 0]]  # [B-PER I-PER O B-LOC], [O B-LOC]: entities PER, LOC, LOC
    preds = [[1, 2, 3, 3], [0, 0]]  # [B-PER I-PER O O], [B-LOC B-LOC]: PER (right), LOC (wrong), LOC (right)
    scores = compute_metrics("token-classification", preds, refs, id2label=ID2LABEL)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(4 / 6)


def test_token_classification_drops_ignored_positions():
    # The same sentences with -100 where the references have special tokens and non-first pieces.
    refs = [[-100, 1, -100, 2, 3, 0, -100], [-100, 3, 0, -100]]
    preds = [[0, 1, 0, 2, 3, 3, 1], [2, 0, 0, 2]]
    scores = compute_metrics("token-classification", preds, refs, id2label=ID2LABEL)
    assert scores == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "accuracy": 4 / 6})


def test_token_classification_conll_conventions():
    refs = [[1, 2, 3, 0]]  # B-PER I-PER O B-LOC
    # An entity that opens with I- (IOB1) still counts; a partly found entity does not.
    assert compute_metrics("token-classification", [[2, 2, 3, 0]], refs, id2label=ID2LABEL)["f1"] == 1.0
    partial = compute_metrics("token-classification", [[1, 3, 3, 0]], refs, id2label=ID2LABEL)
    assert partial["precision"] == 0.5 and partial["recall"] == 0.5 and partial["accuracy"] == 0.75
    with pytest.raises(ValueError, match="sentence 0: 3 predicted tags for 4"):
        compute_metrics("token-classification", [[1, 2, 3]], refs, id2label=ID2LABEL)
    with pytest.raises(ValueError, match="need id2label"):
        compute_metrics("token-classification", refs, refs)


def test_main_metrics_and_direction():
    for task_type, name in MAIN_METRIC.items():
        assert name in METRICS[task_type]
    assert MAIN_METRIC["classification"] == "accuracy" and MAIN_METRIC["token-classification"] == "f1"
    assert not greater_is_better("mse")
    assert all(greater_is_better(name) for name in ("accuracy", "f1", "mcc", "pearson", "spearman", "f1_micro"))


def test_metric_names():
    assert compute_metrics("classification", BINARY_PREDS, BINARY_REFS, metric_names=["mcc"]) == {
        "mcc": pytest.approx(14 / 24)
    }
    with pytest.raises(ValueError, match="classification has no metric pearson; choose from accuracy, f1, mcc"):
        compute_metrics("classification", BINARY_PREDS, BINARY_REFS, metric_names=["pearson"])
    with pytest.raises(ValueError, match="unknown task type"):
        compute_metrics("ranking", [1], [1])
    with pytest.raises(ValueError, match="no examples to score"):
        compute_metrics("classification", [], [])
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        compute_metrics("regression", [1.0, 2.0, 3.0], [1.0, 2.0])
