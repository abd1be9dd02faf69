"""Class weights on a real imbalanced task: the movie-review polarity data with the positive class cut to one
in ten, fine-tuned from the pretrained MiniLM with and without `--class-weights balanced`.

    python benchmarks/imbalance.py            # 2 seeds, ~25 minutes on 2 CPU cores
    python benchmarks/imbalance.py --quick    # 1 seed, a small subset, ~1-2 minutes (writes runs/imbalance-quick.json)

Every split (train, validation, test of minibert.data.movie_reviews) keeps all its negative sentences and a
seeded tenth as many positive ones, so the test set is as imbalanced as the training set. Both runs keep the
checkpoint with the best validation F1 of the positive class (--best-metric f1: accuracy would favour a model that
never says positive) and use train_finetune.py's defaults otherwise (3 epochs, lr 5e-5, batch 32). Reports the minority (positive) class's
precision, recall and F1, the macro F1 and the accuracy on the test set (per_class in test_results.json), and
writes benchmarks/results/imbalance.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from _common import add_run_flags, measured_on, output_path, write_result
import train_finetune
from minibert.data.tasks import movie_reviews

MINORITY = "positive"


def imbalanced(examples: list, ratio: int, seed: int) -> list:
    """All the majority-class examples and one minority example for every `ratio` of them, seeded."""
    majority = [ex for ex in examples if ex.label != MINORITY]
    minority = [ex for ex in examples if ex.label == MINORITY]
    keep = np.random.default_rng(seed).permutation(len(minority))[: max(1, len(majority) // ratio)]
    chosen = set(keep.tolist())
    return [ex for ex in examples if ex.label != MINORITY] + [ex for i, ex in enumerate(minority) if i in chosen]


def write_csv(path: Path, examples: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([ex.text, ex.label] for ex in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_flags(parser, "imbalance", quick="one seed, 1,200 training sentences, 1 epoch")
    parser.add_argument("--ratio", type=int, default=10, help="majority examples per minority example")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    out = output_path(args, "imbalance")
    torch.set_num_threads(args.threads)

    data_dir = Path("runs/imbalance-data")
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = dict(zip(("train", "validation", "test"), movie_reviews("classification")))
    counts = {}
    for name, examples in splits.items():
        subset = imbalanced(examples, args.ratio, seed=len(name))
        if args.quick:
            subset = [subset[i] for i in np.random.default_rng(1).permutation(len(subset))[: {"train": 1200}.get(name, 400)]]
        write_csv(data_dir / f"{name}.csv", subset)
        counts[name] = {label: sum(ex.label == label for ex in subset) for label in ("negative", "positive")}
    print("examples:", counts)

    runs = []
    for seed in seeds:
        for weights in ("none", "balanced"):
            argv = ["--train-file", str(data_dir / "train.csv"), "--validation-file", str(data_dir / "validation.csv"),
                    "--test-file", str(data_dir / "test.csv"), "--seed", str(seed), "--no-progress",
                    "--best-metric", "f1",
                    "--output-dir", f"runs/imbalance/{weights}-seed{seed}"]
            if weights == "balanced":
                argv += ["--class-weights", "balanced"]
            if args.quick:
                argv += ["--epochs", "1"]
            started = time.perf_counter()
            results = train_finetune.main(argv)
            test = json.loads((Path(results["output_dir"]) / "test_results.json").read_text())
            minority = test["per_class"][MINORITY]
            macro_f1 = float(np.mean([scores["f1"] for scores in test["per_class"].values()]))
            runs.append({"seed": seed, "class_weights": weights, "minority_precision": minority["precision"],
                         "minority_recall": minority["recall"], "minority_f1": minority["f1"], "macro_f1": macro_f1,
                         "accuracy": test["accuracy"], "seconds": round(time.perf_counter() - started, 1)})
            print(runs[-1])

    summary = {}
    for weights in ("none", "balanced"):
        mine = [r for r in runs if r["class_weights"] == weights]
        summary[weights] = {key: round(float(np.mean([r[key] for r in mine])), 4)
                            for key in ("minority_recall", "minority_precision", "minority_f1", "macro_f1", "accuracy")}
    result = {**measured_on(args.threads), "task": f"movie-review polarity, positive class cut to 1:{args.ratio}",
              "examples": counts, "seeds": seeds, "quick": args.quick, "runs": runs, "mean": summary}
    write_result(out, result)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
