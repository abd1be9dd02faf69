"""Class weights, per-class scores and per-label thresholds, against hand-computed values,
scikit-learn and brute force."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_class_weight

from minibert.class_weights import ClassWeightsError, balanced_weights, class_weights, weighted_loss
from minibert.metrics import per_class_scores
from minibert.thresholds import best_threshold, threshold_vector, tune_thresholds


def test_balanced_weights_are_scikit_learns():
    ids = np.array([0] * 10 + [1] * 1 + [2] * 4)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=ids)
    np.testing.assert_allclose(balanced_weights("classification", ["a", "b", "c"], ids), expected)
    np.testing.assert_allclose(expected, [15 / 30, 15 / 3, 15 / 12])  # n / (k * count), by hand
    # Token tags: counted over tagged words only (-100 is no tag)
    tags = [np.array([-100, 0, 0, 1, -100]), np.array([-100, 0, -100])]
    np.testing.assert_allclose(balanced_weights("token-classification", ["O", "B-X"], tags), [4 / 6, 4 / 2])
    # Multilabel: pos_weight = negatives / positives per label
    multi_hot = [np.array([1, 0]), np.array([0, 0]), np.array([1, 1]), np.array([0, 0])]
    np.testing.assert_allclose(balanced_weights("multilabel", ["x", "y"], multi_hot), [2 / 2, 3 / 1])


def test_weighted_losses_equal_the_hand_written_sums():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 2, 1, 0])
    w = torch.tensor([0.5, 2.0, 1.5])
    log_p = logits.log_softmax(-1)[torch.arange(5), labels]
    expected = -(w[labels] * log_p).sum() / w[labels].sum()
    torch.testing.assert_close(weighted_loss("classification", w)(logits, labels), expected)

    tags = torch.tensor([[-100, 1, 0], [-100, 2, -100]])
    token_logits = torch.randn(2, 3, 3)
    kept = tags != -100
    log_p = token_logits[kept].log_softmax(-1)[torch.arange(3), tags[kept]]
    expected = -(w[tags[kept]] * log_p).sum() / w[tags[kept]].sum()
    torch.testing.assert_close(weighted_loss("token-classification", w)(token_logits, tags), expected)

    multi = torch.tensor([[1.0, 0, 1], [0, 0, 1]])
    x = torch.randn(2, 3)
    pos = w * multi * F.logsigmoid(x) + (1 - multi) * F.logsigmoid(-x)
    torch.testing.assert_close(weighted_loss("multilabel", w)(x, multi), -pos.mean())


def test_class_weights_file_and_its_one_line_errors(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"positive": 1, "negative": 4.5}))
    np.testing.assert_allclose(class_weights(str(path), "classification", ["negative", "positive"], []), [4.5, 1.0])
    cases = [
        ({"positive": 1, "negative": 2, "neutral": 1}, r"names labels the training data does not have: \['neutral'\]"),
        ({"positive": 1}, r"has no weight for \['negative'\]"),
        ({"positive": 1, "negative": 0}, r"weights must be positive numbers, found \{'negative': 0\}"),
        ({"positive": 1, "negative": "2"}, "weights must be positive numbers"),
        ([1, 2], "holds a list; write an object"),
    ]
    for content, message in cases:
        path.write_text(json.dumps(content))
        with pytest.raises(ClassWeightsError, match=message) as e:
            class_weights(str(path), "classification", ["negative", "positive"], [])
        assert "\n" not in str(e.value)
    with pytest.raises(ClassWeightsError, match="no such file"):
        class_weights(str(tmp_path / "nope.json"), "classification", ["a", "b"], [])
    with pytest.raises(ClassWeightsError, match="a regression task has none"):
        class_weights("balanced", "regression", [], [])
    with pytest.raises(ClassWeightsError, match=r"no example of \['c'\]"):
        class_weights("balanced", "classification", ["a", "b", "c"], [0, 1, 1])
    with pytest.raises(ClassWeightsError, match=r"every training example has \['x'\]"):
        class_weights("balanced", "multilabel", ["x"], [np.array([1]), np.array([1])])


def test_per_class_scores_by_hand():
    refs = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 0, 1, 0, 1])
    scores = per_class_scores("classification", preds, refs, id2label={0: "a", 1: "b", 2: "c"})
    assert list(scores) == ["a", "b", "c"]
    # a: tp 3, predicted 4, gold 4; b: tp 1, predicted 3, gold 2; c: never predicted
    assert scores["a"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 4, "f1": 3 / 4, "support": 4})
    assert scores["b"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4, "support": 2})
    assert scores["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    multi = per_class_scores("multilabel", np.array([[0.9, 0.2], [0.6, 0.7]]), np.array([[1, 1], [0, 1]]),
                             id2label={"0": "x", "1": "y"})
    assert multi["x"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert multi["y"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    id2label = {0: "B-PER", 1: "I-PER", 2: "O", 3: "B-LOC"}
    tags = per_class_scores("token-classification", [np.array([0, 1, 2, 3, 0])], [np.array([0, 1, 2, 3, 3])],
                            id2label=id2label)
    assert tags == {"LOC": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
                    "PER": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}}


def test_best_threshold_by_hand_and_against_every_cut():
    p = np.array([0.9, 0.8, 0.3, 0.25, 0.1])
    y = np.array([1, 0, 1, 1, 0])
    # Top 1: F1 2/(1+3) = 0.5; top 2: 2/5; top 3: 4/6; top 4: 6/7 (best); top 5: 6/8. Between 0.25 and 0.1.
    assert best_threshold(p, y) == pytest.approx(0.175)
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 30))
        p = rng.random(n).round(2)  # with ties
        y = rng.random(n) < 0.3
        if not y.any():
            assert best_threshold(p, y) is None
            continue
        t = best_threshold(p, y)
        tuned = f1_score(y, p >= t)
        every_cut = max(f1_score(y, p >= c) for c in np.append(np.unique(p), 1.1))
        assert tuned == pytest.approx(every_cut)


def test_best_threshold_never_cuts_between_copies_of_one_text():
    # Three texts, each 4 times with labels that differ between copies, read in batches of different
    # padding: float32 rounding moves each copy by ~1e-8, here so that a text's positive copies sort first.
    # The copies are one value: the cut must fall between texts, as it does for exact copies.
    p = np.repeat([0.40, 0.35, 0.30], 4)
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0])
    rounding = np.where(y == 1, 3e-8, -3e-8)
    exact = best_threshold(p, y)
    assert exact in (pytest.approx(0.375), pytest.approx(0.325), pytest.approx(0.15))  # between texts
    assert best_threshold(p + rounding, y) == pytest.approx(exact, abs=1e-7)


def test_tune_thresholds_per_label_and_their_use():
    probs = np.array([[0.9, 0.3], [0.6, 0.2], [0.4, 0.1], [0.2, 0.05]])
    gold = np.array([[1, 1], [1, 0], [0, 0], [0, 0]])
    thresholds, untuned = tune_thresholds(probs, gold, ["x", "y"])
    assert thresholds == pytest.approx({"x": 0.5, "y": 0.25}) and untuned == []
    thresholds, untuned = tune_thresholds(probs, np.zeros_like(gold), ["x", "y"])
    assert thresholds == {"x": 0.5, "y": 0.5} and untuned == ["x", "y"]
    np.testing.assert_allclose(threshold_vector({"y": 0.25, "x": 0.7}, ["x", "y"]), [0.7, 0.25])
    np.testing.assert_allclose(threshold_vector(None, ["x", "y"]), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"no threshold for \['y'\]"):
        threshold_vector({"x": 0.7}, ["x", "y"])


def test_trainer_loss_fn_replaces_the_models_loss(tmp_path):
    from minibert.config import BertConfig
    from minibert.model import BertForSequenceClassification
    from minibert.training import Trainer, TrainingSettings

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = {"input_ids": torch.randint(1, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 2, 1, 2])}
    weights = torch.tensor([1.0, 3.0, 0.5])
    results = []
    for loss_fn in (None, weighted_loss("classification", torch.ones(3)), weighted_loss("classification", weights)):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config)
        with torch.no_grad():
            expected = F.cross_entropy(model(batch["input_ids"]).logits, batch["labels"],
                                       weight=None if loss_fn is None else weights if len(results) == 2 else None)
        trainer = Trainer(model, TrainingSettings(lr=1e-2, warmup_ratio=0.0), 2, tmp_path, loss_fn=loss_fn)
        out = trainer.step([dict(batch)])
        assert out["loss"] == pytest.approx(float(expected), rel=1e-5)
        results.append(model.classifier.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])  # weights of 1: the plain loss, the same step
    assert not torch.allclose(results[0], results[2])
