"""Temperature scaling on real data: ECE, Brier score and NLL of MiniLM fine-tuned on the built-in movie-review
polarity task, before (T = 1) and after the temperature fitted on its validation set, on two test sets.

    python benchmarks/calibration.py                          # fine-tunes with the defaults first (make finetune's run)
    python benchmarks/calibration.py --model runs/minilm-polarity   # a model already fine-tuned on the built-in task
    python benchmarks/calibration.py --quick                  # fine-tunes on 1,600 sentences for 2 epochs (runs/calibration-quick.json)

The two test sets, both from the vaderSentiment source package (minibert.assets), rated by people in -4..4
(a positive label for a positive rating, the sentences rated exactly 0 left out):
- movie-reviews: the built-in task's test split (in domain);
- amazon-reviews: all 3,708 Amazon product-review snippets of the same archive (out of domain: the model
  never saw product reviews, and T still comes from the movie-review validation set).
T is fitted exactly as train_finetune.py fits it (minibert.calibration.fit_temperature on the validation
logits); the logits are the model's own, computed here in fp32. ECE: 15 equal-width bins, top label (Guo et
al. 2017). Writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from _common import add_run_flags, measured_on, output_path, write_result
import train_finetune
from minibert import assets
from minibert.calibration import calibration_metrics, fit_temperature
from minibert.data.tasks import movie_reviews
from minibert.model import BertForSequenceClassification
from minibert.tokenizer import load_tokenizer

AMAZON_FILE = "amazonReviewSnippets_GroundTruth.txt"  # beside the movie-review file, in the same archive


def amazon_reviews() -> list[tuple[str, str]]:
    """(text, label) of every Amazon snippet with a non-zero rating."""
    rows = []
    for line in (assets.movie_reviews_file().parent / AMAZON_FILE).read_text(encoding="utf-8").splitlines():
        if line.strip():
            _, rating, text = line.split("\t", 2)
            if float(rating) != 0:
                rows.append((text, "positive" if float(rating) > 0 else "negative"))
    return rows


@torch.no_grad()
def logits_of(model, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(N, L) fp32 logits, texts cut at 128 tokens as in fine-tuning."""
    tokenizer.enable_truncation(128)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(texts[start : start + batch_size])
        as_tensor = lambda name: torch.tensor([getattr(e, name) for e in batch])  # noqa: E731
        out.append(model(as_tensor("ids"), as_tensor("attention_mask"), as_tensor("type_ids")).logits.float().numpy())
    return np.concatenate(out)


def evaluate(model_dir: Path) -> dict:
    model = BertForSequenceClassification.from_pretrained(str(model_dir), verbose=False).eval()
    tokenizer = load_tokenizer(model_dir)
    label2id = {label: i for i, label in model.config.id2label.items()}
    _, validation, test = movie_reviews("classification")
    sets = {"movie-reviews": [(ex.text, ex.label) for ex in test], "amazon-reviews": amazon_reviews()}
    val_logits = logits_of(model, tokenizer, [ex.text for ex in validation])
    temperature = fit_temperature("classification", val_logits, np.array([label2id[ex.label] for ex in validation]))
    result = {"model": str(model_dir), "temperature": round(temperature, 4), "validation_examples": len(validation), "test": {}}
    for name, rows in sets.items():
        logits, labels = logits_of(model, tokenizer, [t for t, _ in rows]), np.array([label2id[label] for _, label in rows])
        before = calibration_metrics("classification", logits, labels)
        after = calibration_metrics("classification", logits, labels, temperature)
        result["test"][name] = {"examples": len(rows), "accuracy": round(float(np.mean(logits.argmax(-1) == labels)), 4),
                                "before": {k: round(v, 4) for k, v in before.items()},
                                "after": {k: round(v, 4) for k, v in after.items()}}
        print(name, json.dumps(result["test"][name]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model fine-tuned on the built-in task (default: fine-tune one)")
    add_run_flags(parser, "calibration", quick="fine-tune on 1,600 sentences for 2 epochs")
    args = parser.parse_args()
    out = output_path(args, "calibration")
    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        quick = ["--max-train-examples", "1600", "--epochs", "2"] if args.quick else []
        model_dir = train_finetune.main([*quick, "--no-progress", "--output-dir",
                                         f"runs/calibration/movie-reviews{'-quick' if args.quick else ''}"])["output_dir"]
    result = {**measured_on(args.threads),
              "what": "MiniLM fine-tuned on movie-review polarity: test calibration before and after the temperature "
                      "fitted on its validation set", "quick": args.quick, **evaluate(Path(model_dir))}
    write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
