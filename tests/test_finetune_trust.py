"""train_finetune.py's calibration and seeds, as a user runs them, against independent references: the
temperature and metrics recomputed from transformers' logits of the saved model, thresholds tuned again on
calibrated probabilities, and --seeds against each seed run alone.

All runs use conftest.tiny_init_dir (a tiny random BERT with the real uncased vocabulary) and a few steps.
"""

import html
import json
import logging

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from scipy.special import expit, log_softmax, softmax

from conftest import NEGATIVE, POSITIVE, write_csv
import train_finetune
from minibert.calibration import calibration_metrics
from minibert.thresholds import tune_thresholds

def noisy_rows(n, flip_every, offset=0):
    """Sentiment rows with every flip_every-th label flipped: no model gets them all right, so T can be fitted."""
    rows = []
    for i in range(offset, offset + n):
        positive = i % 2 == 0
        if i % flip_every == flip_every - 1:
            positive = not positive
        text = POSITIVE[i % 6] if i % 2 == 0 else NEGATIVE[i % 6]
        rows.append((text, "pos" if positive else "neg"))
    return rows


def run(tiny_init_dir, out, *args):
    argv = ["--init", str(tiny_init_dir), "--output-dir", str(out), "--batch-size", "4", "--lr", "1e-3",
            "--no-progress", "--seed", "0", *map(str, args)]
    return train_finetune.main(argv)


def hf_logits(model_dir, texts, head=transformers.AutoModelForSequenceClassification):
    """The saved model's logits by transformers, float64: the reference the results are recomputed from."""
    model = head.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        return model(**batch).logits.double().numpy(), model.config


def nll(logits, labels, t):
    return -np.mean(log_softmax(logits / t, axis=-1)[np.arange(len(labels)), labels])


@pytest.fixture(scope="module")
def calibrated(tiny_init_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrated")
    files = {name: write_csv(tmp / f"{name}.csv", noisy_rows(n, flip, offset))
             for name, n, flip, offset in (("train", 40, 7, 0), ("dev", 30, 4, 1), ("test", 20, 5, 3))}
    args = ("--train-file", files["train"], "--validation-file", files["dev"], "--test-file", files["test"], "--epochs", 3)
    return tmp, files, run(tiny_init_dir, tmp / "out", *args), run(tiny_init_dir, tmp / "plain", *args, "--no-calibrate")


def test_temperature_is_the_validation_nll_minimum_saved_for_transformers_too(calibrated):
    tmp, _, results, _ = calibrated
    dev = noisy_rows(30, 4, 1)
    logits, config = hf_logits(tmp / "out", [text for text, _ in dev])
    labels = np.array([config.label2id[label] for _, label in dev])
    t = results["eval"]["calibration_temperature"]
    assert abs(np.log(t)) > 0.05  # the test means something only if T moved
    # the minimum of the validation NLL, by a float64 grid search on transformers' logits
    grid = np.exp(np.linspace(np.log(t) - 0.5, np.log(t) + 0.5, 2001))
    assert t == pytest.approx(grid[np.argmin([nll(logits, labels, g) for g in grid])], rel=2e-3)
    # transformers keeps the key in its config (and ignores it: its logits are the raw ones)
    assert config.calibration_temperature == pytest.approx(t)
    saved = json.loads((tmp / "out" / "eval_results.json").read_text())
    assert saved["calibration_temperature"] == t
    assert saved["nll"] == pytest.approx(nll(logits, labels, t), abs=1e-5)
    assert saved["nll_uncalibrated"] == pytest.approx(nll(logits, labels, 1.0), abs=1e-5)
    assert saved["nll"] <= saved["nll_uncalibrated"]


def test_test_results_and_predictions_are_calibrated_and_accuracy_is_not_changed(calibrated):
    tmp, _, results, plain = calibrated
    test = noisy_rows(20, 5, 3)
    logits, config = hf_logits(tmp / "out", [text for text, _ in test])
    labels = np.array([config.label2id[label] for _, label in test])
    t = results["eval"]["calibration_temperature"]
    reference = calibration_metrics("classification", logits, labels, t)
    before = calibration_metrics("classification", logits, labels)
    for name in ("ece", "brier", "nll"):
        assert results["test"][name] == pytest.approx(reference[name], abs=1e-5)
        assert results["test"][f"{name}_uncalibrated"] == pytest.approx(before[name], abs=1e-5)
    predictions = [json.loads(line) for line in (tmp / "out" / "predictions.jsonl").read_text().splitlines()]
    probs = softmax(logits / t, axis=-1)
    np.testing.assert_allclose([[p["probabilities"]["neg"], p["probabilities"]["pos"]] for p in predictions], probs, atol=2e-5)
    assert [p["label"] for p in predictions] == [config.id2label[i] for i in logits.argmax(-1)]
    # --no-calibrate: the same training, so the same labels and accuracy; raw probabilities, no temperature
    assert plain["test"]["accuracy"] == results["test"]["accuracy"]
    assert "calibration_temperature" not in plain["eval"] and "ece_uncalibrated" not in plain["test"]
    assert plain["test"]["ece"] == pytest.approx(before["ece"], abs=1e-5)
    assert "calibration_temperature" not in json.loads((tmp / "plain" / "config.json").read_text())
    raw = [json.loads(line) for line in (tmp / "plain" / "predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([p["probabilities"]["pos"] for p in raw], softmax(logits, axis=-1)[:, 1], atol=2e-5)
    for out in ("out", "plain"):
        assert (tmp / out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_only_applies_the_temperature(calibrated):
    tmp, files, results, _ = calibrated
    out = tmp / "predicted"
    predicted = train_finetune.main(["--init", str(tmp / "out"), "--predict-only", "--test-file", str(files["test"]),
                                     "--output-dir", str(out), "--precision", "fp32"])  # as the run evaluated
    mine = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (tmp / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["probabilities"] for p in mine] == [p["probabilities"] for p in theirs]
    scores, trained = dict(predicted["test"]), dict(results["test"])
    assert scores.pop("per_class") == trained.pop("per_class")
    assert scores == pytest.approx(trained)


def test_an_init_s_temperature_is_dropped_when_training_on(calibrated, tiny_init_dir):
    tmp, files, _, _ = calibrated
    again = run(tmp / "out", tmp / "again", "--train-file", files["train"], "--validation-file", files["dev"],
                "--max-steps", 2, "--no-calibrate")
    assert "calibration_temperature" not in json.loads((tmp / "again" / "config.json").read_text())
    assert "calibration_temperature" not in again["eval"]


def test_multilabel_temperature_per_label_and_thresholds_tuned_on_calibrated_probabilities(tiny_init_dir, tmp_path):
    texts = POSITIVE + NEGATIVE
    tags = [["acting"], ["acting", "story"], [], ["humor"], ["story"], ["acting", "humor"]]
    records = [{"text": t, "label": tags[(i * 5 + i // 12) % 6]} for i, t in enumerate(texts * 4)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = run(tiny_init_dir, tmp_path / "out", "--train-file", path, "--validation-file", path, "--task-type",
                  "multilabel", "--epochs", 2, "--tune-thresholds")
    temperatures = results["eval"]["calibration_temperature"]
    assert set(temperatures) == {"acting", "humor", "story"}
    logits, config = hf_logits(tmp_path / "out", [r["text"] for r in records])
    names = [config.id2label[i] for i in range(3)]
    labels = np.array([[name in r["label"] for name in names] for r in records], dtype=np.int64)
    t = np.array([temperatures[name] for name in names])
    for j in range(3):  # each label's T minimises its own column's NLL
        def column_nll(tj, j=j):
            p = expit(logits[:, j] / tj)
            return -np.mean(labels[:, j] * np.log(p) + (1 - labels[:, j]) * np.log(1 - p))
        assert column_nll(t[j]) <= min(column_nll(t[j] * 1.02), column_nll(t[j] / 1.02)) + 1e-12
    expected, _ = tune_thresholds(expit(logits / t), labels, names)
    assert results["eval"]["label_thresholds"] == pytest.approx(expected, abs=1e-4)
    assert config.label_thresholds == pytest.approx(expected, abs=1e-4)


def test_too_small_a_validation_set_keeps_t_1_with_a_warning(tiny_init_dir, tmp_path, caplog):
    train = write_csv(tmp_path / "train.csv", noisy_rows(16, 5))
    dev = write_csv(tmp_path / "dev.csv", noisy_rows(6, 3))
    with caplog.at_level(logging.WARNING, logger="minibert"):
        results = run(tiny_init_dir, tmp_path / "out", "--train-file", train, "--validation-file", dev, "--max-steps", 2)
    assert "kept T = 1 (no calibration): 6 validation examples, fewer than the 10 needed" in caplog.text
    assert results["eval"]["calibration_temperature"] == 1.0
    assert results["eval"]["ece"] == results["eval"]["ece_uncalibrated"]


# ----------------------------------------------------------------------------- seeds


def test_seeds_equal_each_seed_run_alone_and_the_best_is_kept(tiny_init_dir, tmp_path):
    """No validation file: the held-out share depends on the data seed, which --seeds keeps at the first seed."""
    train = write_csv(tmp_path / "train.csv", noisy_rows(40, 6))
    common = ("--train-file", train, "--max-steps", 6, "--validation-fraction", 0.3)
    argv = ["--init", str(tiny_init_dir), "--batch-size", "4", "--lr", "1e-3", "--no-progress", *map(str, common)]
    together = train_finetune.main([*argv, "--seeds", "3,4", "--output-dir", str(tmp_path / "seeds")])
    alone = {3: train_finetune.main([*argv, "--seed", "3", "--output-dir", str(tmp_path / "alone3")]),
             4: train_finetune.main([*argv, "--seed", "4", "--data-seed", "3", "--output-dir", str(tmp_path / "alone4")])}
    saved = json.loads((tmp_path / "seeds" / "seeds_results.json").read_text())
    assert saved["seeds"] == [3, 4] and saved["metric"] == "accuracy"
    for seed in (3, 4):
        assert saved["runs"][str(seed)]["eval"] == alone[seed]["eval"]  # the same run, to the bit
    for name in ("accuracy", "nll", "ece"):
        values = [alone[seed]["eval"][name] for seed in (3, 4)]
        assert saved["mean"]["eval"][name] == pytest.approx(np.mean(values))
        assert saved["std"]["eval"][name] == pytest.approx(np.std(values, ddof=1))
    assert saved["std"]["eval"]["per_class"]["pos"]["f1"] == pytest.approx(
        np.std([alone[seed]["eval"]["per_class"]["pos"]["f1"] for seed in (3, 4)], ddof=1))
    best = max((3, 4), key=lambda seed: alone[seed]["eval"]["accuracy"])  # the first of equals: 3
    assert saved["best_seed"] == best and together["eval"] == alone[best]["eval"]
    kept, reference = load_file(tmp_path / "seeds" / "model.safetensors"), load_file(tmp_path / f"alone{best}" / "model.safetensors")
    assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)
    assert json.loads((tmp_path / "seeds" / "eval_results.json").read_text()) == alone[best]["eval"]
    other = 7 - best
    assert alone[3]["eval"] != alone[4]["eval"]  # the seeds do make different runs
    assert (tmp_path / "seeds" / "seeds" / f"seed-{other}" / "model.safetensors").is_file()


class Killed(Exception):
    """Stands for a kill: nothing after it runs."""


def test_a_stopped_seeds_run_continues_without_training_its_finished_seeds_again(tiny_init_dir, tmp_path, monkeypatch,
                                                                                  caplog):
    """A --seeds run stopped inside its second seed, continued by the same command and stopped inside its third,
    then by --resume alone, ends as an uninterrupted run: the same seeds_results.json and weights, each seed
    trained once (the stopped ones continued from their checkpoints), the first seed's files never touched."""
    train = write_csv(tmp_path / "train.csv", noisy_rows(24, 6))
    argv = ["--init", str(tiny_init_dir), "--train-file", str(train), "--validation-file", str(train), "--batch-size", "4",
            "--lr", "1e-3", "--max-steps", "4", "--eval-steps", "2", "--seeds", "3,1,2", "--no-progress"]
    train_finetune.main([*argv, "--output-dir", str(tmp_path / "whole")])
    finetune, trained = train_finetune.finetune, []  # the seeds a start of the run trains, in order

    def stop_inside(stopped_seed):
        def run_or_stop(cfg, **kwargs):
            trained.append(cfg.seed)
            if cfg.seed != stopped_seed:
                return finetune(cfg, **kwargs)
            assert finetune(cfg, _stop_after_steps=3) == {"stopped_at": 3}  # its checkpoint: step 2's evaluation
            raise Killed
        monkeypatch.setattr(train_finetune, "finetune", run_or_stop)

    out = tmp_path / "stopped"
    stop_inside(1)
    with pytest.raises(Killed):
        train_finetune.main([*argv, "--output-dir", str(out)])
    assert trained == [3, 1]
    first = {path: path.stat().st_mtime_ns for path in (out / "seeds" / "seed-3").rglob("*")}
    assert out / "seeds" / "seed-3" / "model.safetensors" in first
    # A changed setting is the single run's one-line error, and starts nothing.
    with pytest.raises(FileExistsError, match=r"holds an unfinished run, and this one differs \(--lr 0.002 \(the run "
                                              r"has 0.001\)\): add --resume .* or delete .*seeds to start over"):
        train_finetune.main([*argv, "--lr", "2e-3", "--output-dir", str(out)])
    with pytest.raises(FileExistsError, match=r"differs \(--seeds 3,1 \(the run has 3,1,2\)\)"):
        train_finetune.main([*argv[:-3], "--seeds", "3,1", "--no-progress", "--output-dir", str(out)])
    trained.clear()
    stop_inside(2)
    with caplog.at_level(logging.INFO, logger="minibert"), pytest.raises(Killed):
        train_finetune.main([*argv, "--output-dir", str(out)])  # the same command
    assert trained == [1, 2]
    assert "seed 3 (1 of 3) finished before" in caplog.text
    assert f"continuing the unfinished run in {out / 'seeds' / 'seed-1'}" in caplog.text
    trained.clear()
    stop_inside(None)
    summary = train_finetune.main(["--output-dir", str(out), "--resume", "--no-progress"])["seeds"]
    assert trained == [2]
    whole = json.loads((tmp_path / "whole" / "seeds_results.json").read_text())
    assert json.loads((out / "seeds_results.json").read_text()) == whole == json.loads(json.dumps(summary))
    assert len({json.dumps(run["eval"]) for run in whole["runs"].values()}) == 3  # three different runs were compared
    for folder in ("seeds/seed-3", "seeds/seed-1", "seeds/seed-2", "."):
        a, b = load_file(tmp_path / "whole" / folder / "model.safetensors"), load_file(out / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
        logged = [(tmp_path / "whole" / folder / "metrics.jsonl").read_text(), (out / folder / "metrics.jsonl").read_text()]
        assert logged[0] == logged[1], folder  # every loss and evaluation, to the bit
    assert {path: path.stat().st_mtime_ns for path in (out / "seeds" / "seed-3").rglob("*")} == first
    # Finished: nothing is left to continue, and the same command again is a new run.
    assert sorted(p.name for p in (out / "seeds").iterdir()) == ["seed-1", "seed-2", "seed-3"]
    with pytest.raises(FileNotFoundError, match="has finished"):
        train_finetune.main(["--output-dir", str(out), "--resume", "--no-progress"])


def test_repeated_seed_is_an_error_before_anything_is_written(tiny_init_dir, tmp_path):
    with pytest.raises(ValueError, match="repeats 42"):
        run(tiny_init_dir, tmp_path / "out", "--seeds", "42,1,42")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --predict-only --explain


def test_predict_only_explain_writes_attributions_and_the_page(calibrated):
    tmp, files, _, _ = calibrated
    out = tmp / "explained"
    train_finetune.main(["--init", str(tmp / "out"), "--predict-only", "--explain", "--test-file", str(files["test"]),
                         "--output-dir", str(out)])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["probabilities"] for r in records] == [p["probabilities"] for p in plain]  # explaining changes no prediction
    for record in records:
        assert record["explains"] == f"probability of {record['label']!r}"
        # the explained score is the calibrated probability the record reports
        assert record["explained_score"] == pytest.approx(record["probabilities"][record["label"]], abs=1e-5)
        assert [w["word"] for w in record["attributions"]] == record["text"].split(" ")
        assert all(record["text"][w["start"] : w["end"]] == w["word"] for w in record["attributions"])
        check = record["completeness"]
        assert check["within_tolerance"] and check["attribution_sum"] == pytest.approx(check["score_change"], abs=0.05 * abs(check["score_change"]) + 1e-4)
    page = (out / "explanations.html").read_text()
    assert page.count('<article class="card"') == len(records)
    assert all(f">{html.escape(w['word'])}</span>" in page for w in records[0]["attributions"])  # each word shaded
    named = tmp / "named"
    train_finetune.main(["--init", str(tmp / "out"), "--predict-only", "--explain", "--explain-target", "neg",
                         "--test-file", str(files["test"]), "--output-dir", str(named)])
    first = json.loads((named / "predictions.jsonl").read_text().splitlines()[0])
    assert first["explains"] == "probability of 'neg'"
    assert first["explained_score"] == pytest.approx(first["probabilities"]["neg"], abs=1e-5)
    # a text read in sliding windows has no one reading to explain: refused in one line, nothing written
    windows = tmp / "windows"
    with pytest.raises(ValueError, match="was read in windows.*explain without sliding windows") as err:
        train_finetune.main(["--init", str(tmp / "out"), "--predict-only", "--explain", "--sliding-window",
                             "--max-length", "8", "--stride", "2", "--test-file", str(files["test"]),
                             "--output-dir", str(windows)])
    assert "\n" not in str(err.value) and not (windows / "predictions.jsonl").exists()


def test_explain_names_what_a_regression_and_a_tagger_explain(tiny_init_dir, tmp_path):
    rows = [{"text": text, "label": 0.5 * (i % 5)} for i, text in enumerate(POSITIVE + NEGATIVE)]
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(tiny_init_dir, tmp_path / "reg", "--train-file", path, "--validation-file", path, "--task-type", "regression",
        "--max-steps", 2)
    train_finetune.main(["--init", str(tmp_path / "reg"), "--predict-only", "--explain", "--test-file", str(path),
                         "--output-dir", str(tmp_path / "reg-explained")])
    record = json.loads((tmp_path / "reg-explained" / "predictions.jsonl").read_text().splitlines()[0])
    assert record["explains"].startswith("predicted value") and record["explained_score"] == pytest.approx(
        record["value"], abs=1e-5)
    with pytest.raises(ValueError, match="explains its value: drop --explain-target"):
        train_finetune.main(["--init", str(tmp_path / "reg"), "--predict-only", "--explain", "--explain-target", "x",
                             "--test-file", str(path), "--output-dir", str(tmp_path / "reg-named")])
    sentences = [{"tokens": ["John", "Smithson", "lives", "in", "Pittsburgh"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
                 {"tokens": ["Acme", "hired", "Mary"], "tags": ["B-ORG", "O", "B-PER"]}] * 6
    tagged = tmp_path / "ner.jsonl"
    tagged.write_text("".join(json.dumps(s) + "\n" for s in sentences))
    run(tiny_init_dir, tmp_path / "ner", "--train-file", tagged, "--validation-file", tagged, "--task-type",
        "token-classification", "--epochs", 8, "--lr", "3e-3")
    train_finetune.main(["--init", str(tmp_path / "ner"), "--predict-only", "--explain", "--test-file", str(tagged),
                         "--output-dir", str(tmp_path / "ner-explained")])
    record = json.loads((tmp_path / "ner-explained" / "predictions.jsonl").read_text().splitlines()[0])
    explained = record["explanations"]
    assert explained["text"] == "John Smithson lives in Pittsburgh"
    entities = {(e["entity"], e["text"]) for e in explained["entities"]}
    spans = {(tag[2:], word) for word, tag in zip(record["tokens"], record["tags"]) if tag.startswith("B-")}
    assert {kind for kind, _ in entities} == {kind for kind, _ in spans} and entities  # one explanation per entity
    for entity in explained["entities"]:
        assert entity["explains"] == f"score of {entity['entity']} {entity['text']!r}"
        assert explained["text"][entity["start"] : entity["end"]] == entity["text"]
        assert entity["completeness"]["within_tolerance"]
    assert "Pittsburgh" in (tmp_path / "ner-explained" / "explanations.html").read_text()


def test_explain_without_predict_only_is_an_error(tiny_init_dir, tmp_path):
    with pytest.raises(ValueError, match="--explain explains the predictions of --predict-only"):
        run(tiny_init_dir, tmp_path / "out", "--explain")
