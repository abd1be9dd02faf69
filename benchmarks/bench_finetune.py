"""The built-in task end to end: minibert's train_finetune.py against transformers fine-tuning the same model.

    python benchmarks/bench_finetune.py                  # both runs, ~15 minutes on 2 CPU cores
    python benchmarks/bench_finetune.py --epochs 1 --out runs/finetune-1-epoch.json   # a shorter comparison
    python benchmarks/bench_finetune.py --aligned        # randomness aligned: the two must agree step by step

Both start from the pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2, offline), fine-tune on the
movie-review polarity split of minibert.data.movie_reviews with the same hyper-parameters (train_finetune.py's
defaults: AdamW lr 5e-5, no decay on biases/LayerNorm, 10% warmup then linear decay, batch 32, 3 epochs,
max length 128, clipping at 1.0) and the same tokenized examples, and keep the checkpoint with the best
validation accuracy. transformers runs as a plain loop around BertForSequenceClassification with its
default (sdpa) attention, fused AdamW (as minibert), and the batching of its Trainer's defaults: shuffled batches padded to their
longest example. minibert groups batches by length and runs unpadded: that is the speed difference
being measured. --same-batches gives transformers minibert's length-grouped batches instead, which
isolates the model's own speed. --aligned takes every random difference away (minibert's batches for
both, minibert's initial classifier copied into transformers', dropout off), so the two runs must give
the same losses and accuracies: it separates a real accuracy difference from seed noise. Records validation and test accuracy,
wall time and training examples/s of each, writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from types import SimpleNamespace
from pathlib import Path
import numpy as np
import torch
import transformers

import train_finetune
from minibert import data as D
from minibert.assets import minilm_dir
from minibert.metrics import compute_metrics
from minibert.tokenizer import load_tokenizer


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Trainer's default sampling: a fresh permutation each epoch, cut into batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def minibert_initial_classifier(cfg: train_finetune.FinetuneConfig, vocab) -> dict:
    """The classifier head train_finetune.py starts from with cfg.seed: it builds the model right after
    seeding, so building it the same way draws the same weights."""
    train_finetune.seed_everything(cfg.seed)
    model = train_finetune.build_model(cfg, SimpleNamespace(task_type="classification", train=[]), vocab, minilm_dir())
    return {"weight": model.classifier.weight.detach().clone(), "bias": model.classifier.bias.detach().clone()}


def transformers_finetune(cfg: train_finetune.FinetuneConfig, same_batches: bool, aligned: bool = False) -> dict:
    """The reference: the same data, batches and recipe, with transformers' model and a plain loop.
    aligned: dropout off and minibert's initial classifier, so that nothing random differs."""
    torch.manual_seed(cfg.seed)
    train, validation, test = D.movie_reviews("classification")
    vocab = D.LabelVocab.from_examples(train, "classification")
    tokenizer = load_tokenizer(str(minilm_dir()))
    encode = lambda ex: D.encode_examples(tokenizer, ex, max_length=128, task_type="classification", label_vocab=vocab)  # noqa: E731
    train_f, val_f, test_f = encode(train), encode(validation), encode(test)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if aligned else {}
    model = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, **no_dropout)
    if aligned:
        model.classifier.load_state_dict(minibert_initial_classifier(cfg, vocab))
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    lengths = [len(f) for f in train_f]
    steps_per_epoch = len(D.train_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=0))
    total = cfg.epochs * steps_per_epoch
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)

    def evaluate(features):
        model.eval()
        batches = D.eval_batches([len(f) for f in features], cfg.eval_batch_size)
        outputs = []
        with torch.no_grad():
            for batch in batches:
                inputs = D.collate([features[i] for i in batch], 0)
                inputs.pop("labels")
                outputs.append(model(**inputs).logits.numpy())
        preds = np.stack(D.in_original_order(batches, outputs))
        return compute_metrics("classification", preds, np.array([f.label for f in features]))

    best, best_state, train_seconds, examples, losses = None, None, 0.0, 0, []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        batches = (D.train_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch) if same_batches
                   else shuffled_batches(len(train_f), cfg.batch_size, cfg.seed, epoch))
        for batch in batches:
            model.train()
            loss = model(**D.collate([train_f[i] for i in batch], 0)).loss
            losses.append(loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            examples += len(batch)
        train_seconds += time.perf_counter() - t0
        metrics = evaluate(val_f)
        print(f"transformers epoch {epoch + 1}: validation {metrics}", flush=True)
        if best is None or metrics["accuracy"] > best["accuracy"]:
            best, best_state = metrics, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test_metrics = evaluate(test_f)
    return {"validation": best, "test": test_metrics, "wall_seconds": time.perf_counter() - start,
            "train_examples_per_s": examples / train_seconds, "losses": losses}


def minibert_finetune(cfg: train_finetune.FinetuneConfig, output_dir: str, extra: list[str]) -> dict:
    # No checkpoints between evaluations: the transformers loop it is timed against writes none.
    argv = ["--output-dir", output_dir, "--epochs", str(cfg.epochs), "--seed", str(cfg.seed), "--save-steps", "0",
            "--no-progress", *extra]
    start = time.perf_counter()
    results = train_finetune.main(argv)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"validation": {k: v for k, v in results["eval"].items() if k not in ("step", "epoch")},
            "test": results["test"], "wall_seconds": wall, "train_examples_per_s": results["train"]["examples_per_s"],
            "losses": [r["loss"] for r in rows if r["split"] == "train"]}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=train_finetune.FinetuneConfig.epochs)
    parser.add_argument("--seed", type=int, default=train_finetune.FinetuneConfig.seed)
    parser.add_argument("--minibert-args", default="", help="more train_finetune.py flags, e.g. --minibert-args=--no-group-by-length (with the =)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--same-batches", action="store_true", help="give transformers minibert's length-grouped batches")
    parser.add_argument("--aligned", action="store_true",
                        help="take every difference of randomness away (same batches, same initial classifier, dropout "
                             "off): then the two runs must reach the same accuracy, and the losses are compared step by step")
    parser.add_argument("--output-dir", default="runs/bench-finetune")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = train_finetune.FinetuneConfig(epochs=args.epochs, seed=args.seed)

    extra = args.minibert_args.split()
    if args.aligned:
        cfg.dropout, args.same_batches = 0.0, True
        extra += ["--dropout", "0"]
    ours = minibert_finetune(cfg, args.output_dir, extra)
    print("minibert:", json.dumps({k: v for k, v in ours.items() if k != "losses"}), flush=True)
    ref = transformers_finetune(cfg, args.same_batches, args.aligned)
    print("transformers:", json.dumps({k: v for k, v in ref.items() if k != "losses"}), flush=True)
    gaps = [abs(a - b) for a, b in zip(ours.pop("losses"), ref.pop("losses"))]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{args.threads} threads", "torch": torch.__version__, "transformers": transformers.__version__,
              "recipe": {k: getattr(cfg, k) for k in ("lr", "batch_size", "epochs", "warmup_ratio", "weight_decay", "seed")},
              "minibert_args": args.minibert_args,
              "transformers_batches": "length-grouped (minibert's)" if args.same_batches else "shuffled, padded to longest",
              "aligned": args.aligned,
              "loss_gap": {"max": max(gaps), "first_10_max": max(gaps[:10]), "steps": len(gaps)},
              "minibert": ours, "transformers": ref,
              "speedup_wall": ref["wall_seconds"] / ours["wall_seconds"]}
    print(f"\n{'':14s}{'val acc':>9s}{'test acc':>10s}{'wall s':>9s}{'train ex/s':>12s}")
    for name in ("minibert", "transformers"):
        r = result[name]
        print(f"{name:14s}{r['validation']['accuracy']:9.4f}{r['test']['accuracy']:10.4f}{r['wall_seconds']:9.0f}"
              f"{r.get('train_examples_per_s', math.nan):12.1f}")
    print(f"training loss, |minibert - transformers| over {len(gaps)} steps: first 10 steps at most "
          f"{max(gaps[:10]):.2e}, whole run at most {max(gaps):.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
