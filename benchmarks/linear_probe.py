"""What does an encoder know about a task before fine-tuning? A linear probe on its frozen features.

    python benchmarks/linear_probe.py runs/transfer/pretrained runs/transfer/random   # after benchmarks/transfer.py
    python benchmarks/linear_probe.py runs/pretrain-mini --label-budgets 500,1000     # any checkpoint directory

For each checkpoint, scikit-learn's logistic regression is fitted on frozen features of the movie-review
training sentences (all of them and random subsets of --label-budgets) and scored on the test sentences,
with three regularisation strengths (C = 0.1, 1, 10; the best is reported, each is recorded). Three features:
the last layer's [CLS] vector, the mean of the last layer over the sentence's tokens, and the mean of the
input word vectors (what the model knows about words, before any context). Nothing is trained but the probe,
so a gain over the random-weights checkpoint is knowledge that pretraining put into the encoder.
Writes benchmarks/results/linear-probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from minibert.data.tasks import movie_reviews
from minibert.model import BertModel
from minibert.tokenizer import load_tokenizer

FEATURES = ("cls", "mean", "word_vectors")
STRENGTHS = (0.1, 1.0, 10.0)  # inverse regularisation of the probe; which is best depends on the features' scale


@torch.no_grad()
def frozen_features(model_dir: str, texts: list[str], batch_size: int = 256) -> dict[str, np.ndarray]:
    """(len(texts), hidden) arrays, one per FEATURES entry."""
    model = BertModel.from_pretrained(model_dir, verbose=False).eval()
    tokenizer = load_tokenizer(model_dir)
    pad_id = model.config.pad_token_id
    max_length = model.config.max_position_embeddings
    features = {name: [] for name in FEATURES}
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(text).ids[:max_length] for text in texts[start:start + batch_size]]
        longest = max(map(len, ids))
        input_ids = torch.tensor([row + [pad_id] * (longest - len(row)) for row in ids])  # (B, T)
        mask = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in ids])  # (B, T)
        weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1)  # (B, T, 1): a mean over real tokens
        hidden = model(input_ids, mask).last_hidden_state  # (B, T, C)
        features["cls"].append(hidden[:, 0])
        features["mean"].append((hidden * weights).sum(1))
        features["word_vectors"].append((model.embeddings.word(input_ids) * weights).sum(1))
    return {name: torch.cat(parts).numpy() for name, parts in features.items()}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+", help="model directories (or hub ids) to probe")
    parser.add_argument("--label-budgets", default="1000", help="also fit on random subsets of this many training sentences")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear-probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    train, _, test = movie_reviews("classification")
    labels = sorted({example.label for example in train})
    y_train = np.array([labels.index(example.label) for example in train])
    y_test = np.array([labels.index(example.label) for example in test])
    budgets = [len(train), *(int(n) for n in args.label_budgets.split(",") if n)]

    results = {}
    for checkpoint in args.checkpoints:
        x_train = frozen_features(checkpoint, [example.text for example in train])
        x_test = frozen_features(checkpoint, [example.text for example in test])
        results[checkpoint] = {}
        for budget in budgets:
            subset = np.random.RandomState(0).permutation(len(train))[:budget]
            for name in FEATURES:
                scores = {}
                for strength in STRENGTHS:
                    probe = LogisticRegression(C=strength, max_iter=2000).fit(x_train[name][subset], y_train[subset])
                    scores[str(strength)] = probe.score(x_test[name], y_test)
                results[checkpoint].setdefault(name, {})[str(budget)] = {"best": max(scores.values()), "by_C": scores}
                print(f"{checkpoint}: {name:>12}, {budget:>5} labels: test accuracy {max(scores.values()):.1%}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "settings": vars(args), "test_accuracy": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
