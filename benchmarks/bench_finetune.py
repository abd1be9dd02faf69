"""The built-in task end to end: minibert's train_finetune.py against transformers fine-tuning the same model,
each in full precision (fp32) and in bf16 autocast, over several seeds.

    python benchmarks/bench_finetune.py                  # 4 systems x 3 seeds, ~1.5 hours on 2 CPU cores
    python benchmarks/bench_finetune.py --quick          # 1 seed, 640 training examples, 1 epoch: ~2 minutes
    python benchmarks/bench_finetune.py --systems minibert-fp32 minibert-bf16 --seeds 42 1 2 \
        --out benchmarks/results/finetune-precision.json # does bf16 keep fp32's accuracy? (paired by seed)
    python benchmarks/bench_finetune.py --aligned --seeds 42 --systems minibert-fp32 transformers-fp32
                                                         # randomness aligned: the two must agree step by step

Systems: minibert-fp32, minibert-bf16 and minibert-auto (train_finetune.py --precision ...; auto is what
it does by default: fp32 on a CPU while minibert.training.CPU_AUTO_BF16 is off, bf16 where the CPU
multiplies bf16 natively once it is on), transformers-fp32 and transformers-bf16
(torch.autocast(bfloat16) around every forward pass, training and evaluation: what transformers' Trainer
does with bf16=True on a CPU).

All start from the pretrained MiniLM (sentence-transformers/all-MiniLM-L6-v2, offline), fine-tune on the
movie-review polarity split of minibert.data.movie_reviews with the same hyper-parameters (train_finetune.py's
defaults: AdamW lr 5e-5, no decay on biases/LayerNorm, 10% warmup then linear decay, batch 32, 3 epochs,
max length 128, clipping at 1.0) and the same tokenized examples, and keep the checkpoint with the best
validation accuracy. transformers runs as a plain loop around BertForSequenceClassification with its
default (sdpa) attention, fused AdamW (as minibert), and the batching of its Trainer's defaults: shuffled batches padded to their
longest example. minibert groups batches by length and runs unpadded: that is the speed difference
being measured. --same-batches gives transformers minibert's length-grouped batches instead, which
isolates the model's own speed. --aligned takes every random difference away (minibert's batches for
both, minibert's initial classifier copied into transformers', dropout off), so that runs of the same
precision must give the same losses and accuracies: it separates a real accuracy difference from seed noise.

Records validation and test accuracy, wall time and training examples/s of every run; then, per system, the
mean and spread over the seeds, the paired (same seed) test-accuracy differences against minibert-fp32 and
transformers-fp32, and the wall-time speed-ups of minibert-auto. Writes benchmarks/results/finetune.json
(--quick: runs/finetune-quick.json), rewritten after every run so that a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch
import transformers

from _common import add_run_flags, measured_on, output_path, write_result
import bf16_emulation
import train_finetune
from minibert import training
from minibert.assets import minilm_dir
from minibert.data.batching import collate, eval_batches, in_original_order, train_batches
from minibert.data.encoding import encode_examples
from minibert.data.labels import LabelVocab
from minibert.data.tasks import movie_reviews
from minibert.metrics import compute_metrics
from minibert.precision import cpu_has_native_bf16, resolve_precision
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


def autocast_for(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def transformers_finetune(cfg: train_finetune.FinetuneConfig, precision: str, same_batches: bool, aligned: bool = False) -> dict:
    """The reference: the same data, batches and recipe, with transformers' model and a plain loop.
    precision "bf16": autocast around each forward pass, as transformers' Trainer(bf16=True) on a CPU.
    aligned: dropout off and minibert's initial classifier, so that nothing random differs."""
    torch.manual_seed(cfg.seed)
    train, validation, test = movie_reviews("classification")
    if 0 < cfg.max_train_examples < len(train):  # the subset train_finetune.py draws for --max-train-examples
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(train), cfg.max_train_examples, replace=False))
        train = [train[i] for i in keep]
    vocab = LabelVocab.from_examples(train, "classification")
    tokenizer = load_tokenizer(str(minilm_dir()))
    encode = lambda ex: encode_examples(tokenizer, ex, max_length=128, task_type="classification", label_vocab=vocab)  # noqa: E731
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
    steps_per_epoch = len(train_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=0))
    total = cfg.epochs * steps_per_epoch
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)

    def evaluate(features):
        model.eval()
        batches = eval_batches([len(f) for f in features], cfg.eval_batch_size)
        outputs = []
        with torch.no_grad():
            for batch in batches:
                inputs = collate([features[i] for i in batch], 0)
                inputs.pop("labels")
                with autocast_for(precision):
                    outputs.append(model(**inputs).logits.float().numpy())
        preds = np.stack(in_original_order(batches, outputs))
        return compute_metrics("classification", preds, np.array([f.label for f in features]))

    best, best_state, train_seconds, examples, losses = None, None, 0.0, 0, []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        batches = (train_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch) if same_batches
                   else shuffled_batches(len(train_f), cfg.batch_size, cfg.seed, epoch))
        for batch in batches:
            model.train()
            with autocast_for(precision):
                loss = model(**collate([train_f[i] for i in batch], 0)).loss
            losses.append(loss.item())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            examples += len(batch)
        train_seconds += time.perf_counter() - t0
        metrics = evaluate(val_f)
        print(f"transformers-{precision} epoch {epoch + 1}: validation {metrics}", flush=True)
        if best is None or metrics["accuracy"] > best["accuracy"]:
            best, best_state = metrics, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test_metrics = evaluate(test_f)
    return {"precision": precision, "validation": best, "test": test_metrics, "wall_seconds": time.perf_counter() - start,
            "train_examples_per_s": examples / train_seconds, "losses": losses}


def minibert_finetune(cfg: train_finetune.FinetuneConfig, precision: str, output_dir: str, extra: list[str]) -> dict:
    # No checkpoints between evaluations: the transformers loop it is timed against writes none.
    argv = ["--output-dir", output_dir, "--epochs", str(cfg.epochs), "--seed", str(cfg.seed), "--save-steps", "0",
            "--max-train-examples", str(cfg.max_train_examples), "--precision", precision, "--no-progress", *extra]
    start = time.perf_counter()
    results = train_finetune.main(argv)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    resolved = json.loads((Path(output_dir) / "finetune_config.json").read_text())["resolved"]["precision"]
    return {"precision": resolved, "validation": {k: v for k, v in results["eval"].items() if k not in ("step", "epoch")},
            "test": results["test"], "wall_seconds": wall, "train_examples_per_s": results["train"]["examples_per_s"],
            "losses": [r["loss"] for r in rows if r["split"] == "train"]}


SYSTEMS = ("minibert-fp32", "minibert-bf16", "minibert-auto", "transformers-fp32", "transformers-bf16")


def auto_system() -> str:
    """The run that minibert-auto is on this machine: train_finetune.py's default precision (fp32 on a CPU
    while training.CPU_AUTO_BF16 is off)."""
    chosen = resolve_precision("auto", torch.device("cpu"), cpu_auto_bf16=training.CPU_AUTO_BF16)
    return f"minibert-{chosen.name}"


def summarize(runs: list[dict]) -> dict:
    """Per system: mean and sample standard deviation over seeds; paired (same-seed) test-accuracy
    differences against each fp32 system; wall-time speed-ups of minibert-auto over each transformers system."""
    by_system: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_system.setdefault(r["system"], {})[r["seed"]] = r
    summary = {}
    for system, per_seed in by_system.items():
        acc = [r["test"]["accuracy"] for r in per_seed.values()]
        wall = [r["wall_seconds"] for r in per_seed.values()]
        summary[system] = {"seeds": list(per_seed), "precision": sorted({r["precision"] for r in per_seed.values()}),
                           "test_accuracy_mean": statistics.mean(acc),
                           "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
                           "wall_seconds_mean": statistics.mean(wall),
                           "train_examples_per_s_mean": statistics.mean(r["train_examples_per_s"] for r in per_seed.values())}
    paired = {}
    for base in ("minibert-fp32", "transformers-fp32", "transformers-bf16"):
        for system in by_system:
            seeds = [s for s in by_system[system] if s in by_system.get(base, {})] if system != base else []
            if seeds and f"{base} - {system}" not in paired:
                diffs = [by_system[system][s]["test"]["accuracy"] - by_system[base][s]["test"]["accuracy"] for s in seeds]
                paired[f"{system} - {base}"] = {"seeds": seeds, "test_accuracy_differences": diffs,
                                                 "mean": statistics.mean(diffs),
                                                 "std": statistics.stdev(diffs) if len(diffs) > 1 else None}
    speedups = {}  # not for runs whose bf16 matrix products were emulated: their times are not bf16 times
    timed = {s: v for s, v in summary.items() if not any(r.get("bf16_matmuls") == "emulated" for r in by_system[s].values())}
    if "minibert-auto" not in timed and auto_system() in timed:
        timed["minibert-auto"] = timed[auto_system()]
    for ours in ("minibert-auto", "minibert-bf16", "minibert-fp32"):
        for ref in ("transformers-bf16", "transformers-fp32"):
            if ours in timed and ref in timed:
                speedups[f"{ours} vs {ref}"] = timed[ref]["wall_seconds_mean"] / timed[ours]["wall_seconds_mean"]
    return {"systems": summary, "paired_test_accuracy": paired, "speedup_wall": speedups}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--systems", nargs="+", default=["minibert-fp32", "minibert-bf16", "transformers-fp32", "transformers-bf16"],
                        choices=SYSTEMS, help="minibert-auto is minibert-bf16 or minibert-fp32, whichever train_finetune.py "
                        "picks on this machine; the default runs both and reports auto as the one it picks")
    parser.add_argument("--bf16-matmuls", choices=["auto", "native", "emulated"], default="auto",
                        help="emulated: bf16 runs compute their nn.Linear products as fp32 GEMMs on bf16-rounded values "
                             "(bf16_emulation.py: the same numbers, fp32's speed), for accuracy on a CPU without native "
                             "bf16; auto: emulated exactly there")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--epochs", type=int, default=train_finetune.FinetuneConfig.epochs)
    parser.add_argument("--max-train-examples", type=int, default=0, help="train on a seeded subset (0 = all)")
    parser.add_argument("--minibert-args", default="", help="more train_finetune.py flags, e.g. --minibert-args=--no-group-by-length (with the =)")
    parser.add_argument("--same-batches", action="store_true", help="give transformers minibert's length-grouped batches")
    parser.add_argument("--aligned", action="store_true",
                        help="take every difference of randomness away (same batches, same initial classifier, dropout "
                             "off): then runs of the same precision must reach the same accuracy, and their losses are "
                             "compared step by step")
    parser.add_argument("--output-dir", default="runs/bench-finetune")
    add_run_flags(parser, "finetune", quick="one seed, 640 training examples, one epoch: about 2 minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.max_train_examples = args.seeds[:1], 1, args.max_train_examples or 640
    out = output_path(args, "finetune")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    extra = args.minibert_args.split()
    if args.aligned:
        args.same_batches = True
        extra += ["--dropout", "0"]
    emulate = args.bf16_matmuls == "emulated" or (args.bf16_matmuls == "auto" and not cpu_has_native_bf16())
    result = {**measured_on(args.threads), "cpu_native_bf16": cpu_has_native_bf16(), "minibert_auto_is": auto_system(),
              "bf16_matmuls": "emulated" if emulate else "native",
              "bf16_emulation_check": bf16_emulation.self_check() if emulate else None,
              "transformers": transformers.__version__, "command": sys.argv[1:] if argv is None else argv,
              "minibert_args": args.minibert_args,
              "transformers_batches": "length-grouped (minibert's)" if args.same_batches else "shuffled, padded to longest",
              "aligned": args.aligned, "runs": []}
    for seed in args.seeds:
        cfg = train_finetune.FinetuneConfig(epochs=args.epochs, seed=seed, max_train_examples=args.max_train_examples)
        if args.aligned:
            cfg.dropout = 0.0
        losses = {}  # (system, precision it ran in) -> training losses of this seed
        for system in args.systems:
            framework, precision = system.split("-")
            emulated = emulate and (precision == "bf16" or system == "minibert-auto" and auto_system() == "minibert-bf16")
            with bf16_emulation.EmulatedBf16Linear() if emulated else contextlib.nullcontext():
                if framework == "minibert":
                    run = minibert_finetune(cfg, precision, f"{args.output_dir}/{system}-seed{seed}", extra)
                else:
                    run = transformers_finetune(cfg, precision, args.same_batches, args.aligned)
            if run["precision"] == "bf16":
                run["bf16_matmuls"] = "emulated" if emulated else "native"
            run_losses = run.pop("losses")
            result["runs"].append({"system": system, "seed": seed, **run,
                                   "recipe": {k: getattr(cfg, k) for k in ("lr", "batch_size", "epochs", "warmup_ratio",
                                                                           "weight_decay", "max_train_examples")}})
            print(f"{system} seed {seed}:", json.dumps(result["runs"][-1]), flush=True)
            # The other framework in the same precision, same seed: how far apart the training losses are.
            for (other, other_precision), other_losses in losses.items():
                if other.split("-")[0] != framework and other_precision == run["precision"]:
                    gaps = [abs(a - b) for a, b in zip(run_losses, other_losses)]
                    result.setdefault("loss_gap", {})[f"{system} vs {other}, seed {seed}"] = {
                        "max": max(gaps), "first_10_max": max(gaps[:10]), "steps": len(gaps)}
            losses[system, run["precision"]] = run_losses
            result["summary"] = summarize(result["runs"])
            write_result(out, result)

    summary = result["summary"]
    print(f"\n{'':20s}{'precision':>10s}{'test acc (mean +- sd)':>24s}{'wall s':>9s}{'train ex/s':>12s}")
    for system, s in summary["systems"].items():
        sd = f" +- {s['test_accuracy_std']:.4f}" if s["test_accuracy_std"] is not None else ""
        print(f"{system:20s}{'/'.join(s['precision']):>10s}{s['test_accuracy_mean']:>14.4f}{sd:10s}"
              f"{s['wall_seconds_mean']:9.0f}{s['train_examples_per_s_mean']:12.1f}")
    for name, p in summary["paired_test_accuracy"].items():
        print(f"paired test accuracy, {name}: " + ", ".join(f"{d:+.4f}" for d in p["test_accuracy_differences"])
              + f" (mean {p['mean']:+.4f})")
    print(f"minibert-auto is {auto_system()} on this machine")
    for name, ratio in summary["speedup_wall"].items():
        print(f"wall-time speed-up, {name}: {ratio:.2f}x")
    if emulate:
        print("bf16 matrix products were emulated (no native bf16 on this CPU): bf16 accuracies hold, bf16 times do not")
    for name, gap in result.get("loss_gap", {}).items():
        print(f"training loss |difference|, {name}: first 10 steps at most {gap['first_10_max']:.2e}, "
              f"whole run at most {gap['max']:.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
