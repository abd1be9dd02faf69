"""Full fine-tuning against LoRA r = 8 on the built-in task, and peft's LoRA on transformers' BERT beside them.

    python benchmarks/bench_lora.py            # 3 seeds of each run, ~45 min on 2 CPU cores -> benchmarks/results/lora.json
    python benchmarks/bench_lora.py --quick    # about a minute: 1 seed, 10 steps a run -> runs/bench-lora-quick.json

The task is minibert.data.movie_reviews (movie-review polarity) from the pretrained MiniLM
(sentence-transformers/all-MiniLM-L6-v2, offline), through train_finetune.py:
- full: every weight trains, the script's defaults (AdamW lr 5e-5, 3 epochs, batch 32, 10% warmup);
- lora: --lora-rank 8 (alpha 16, dropout 0.1, query and value, classifier in full) with a higher learning
  rate (--lora-lr), as LoRA needs one; everything else the same.
Each with seeds 1, 2, 3; reported: test accuracy of the checkpoint best on validation (mean and each seed),
validation accuracy (what a learning rate is chosen by), the size of what a run must keep (the whole
model.safetensors, or adapter/).

The result file is also the benchmark's memory: run again with another --lora-lr (or more --seeds), it keeps
the step timing and the runs whose settings it already holds, does only the missing ones, and keeps runs at
other learning rates under "other_learning_rates" (summarized, to compare them on validation accuracy).

Step time and memory are measured apart from those runs, on the same 32-example training batches (grouped by
length, as train_finetune.py batches them) for three models: minibert full, minibert LoRA, and peft's LoRA
on transformers' BertForSequenceClassification with the same settings (r, alpha, dropout, targets, fused
AdamW, clipping at 1.0). One step is forward, backward, clipping, AdamW; the rounds alternate the models
(A B C A B C ...) so that a busy machine slows each alike, and the median step is reported. Memory is the
bytes of parameters + gradients + AdamW state, counted from the tensors after a step (activations are not
counted: they are the same for all three, and depend on the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from _common import add_run_flags, measured_on, output_path, write_result
import train_finetune
from minibert import BertForSequenceClassification
from minibert.assets import minilm_dir
from minibert.data.batching import collate, train_batches
from minibert.data.encoding import encode_examples
from minibert.data.labels import LabelVocab
from minibert.data.tasks import movie_reviews
from minibert.lora import LoraModel, LoraSettings
from minibert.tokenizer import load_tokenizer

LORA = LoraSettings(rank=8, alpha=16, dropout=0.1, targets=("query", "value"))
LORA_FLAGS = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0.1", "--lora-targets", "query,value"]
LEARNING_RATES = {"full": 5e-5, "lora": 2e-3}  # --full-lr, --lora-lr; LoRA's chosen on validation (README)


def directory_bytes(path: Path, names: tuple[str, ...]) -> int:
    return sum((path / name).stat().st_size for name in names if (path / name).is_file())


def finetune(kind: str, seed: int, lr: float, output_dir: Path, quick: bool) -> dict:
    """One train_finetune.py run; returns its test accuracy, training time, and the size of what it keeps."""
    short = ["--max-steps", "10", "--eval-steps", "10", "--max-train-examples", "320"] if quick else []
    argv = ["--output-dir", str(output_dir), "--seed", str(seed), "--save-steps", "0", "--no-progress", "--lr", str(lr),
            *(LORA_FLAGS if kind == "lora" else []), *short]
    results = train_finetune.main(argv)
    train = results["train"]
    kept = (directory_bytes(output_dir / "adapter", ("adapter_model.safetensors", "adapter_config.json")) if kind == "lora"
            else directory_bytes(output_dir, ("model.safetensors", "config.json")))
    return {"seed": seed, "lr": lr, "test_accuracy": results["test"]["accuracy"], "validation_accuracy": results["eval"]["accuracy"],
            "train_seconds": train["seconds"], "steps": train["steps"], "kept_bytes": kept,
            "trainable_parameters": train.get("trainable_parameters"), "total_parameters": train.get("total_parameters")}


# ----------------------------------------------------------------------------- step time and memory


def training_batches(count: int, batch_size: int = 32) -> list[dict]:
    train, _, _ = movie_reviews("classification")
    vocab = LabelVocab.from_examples(train, "classification")
    tokenizer = load_tokenizer(str(minilm_dir()))
    features = encode_examples(tokenizer, train, max_length=128, task_type="classification", label_vocab=vocab)
    batches = train_batches([len(f) for f in features], batch_size, seed=0, epoch=0)[:count]
    return [collate([features[i] for i in batch], tokenizer.token_to_id("[PAD]")) for batch in batches]


def optimizer_for(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as train_finetune.py's: fused, weight decay 0.01 except on biases and LayerNorms (1-D weights)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, fused=True)


def minibert_full() -> torch.nn.Module:
    return BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2, verbose=False)


def minibert_lora() -> torch.nn.Module:
    return LoraModel(minibert_full(), LORA, base=str(minilm_dir()))


def peft_lora() -> torch.nn.Module:
    import peft
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    config = peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=list(LORA.targets),
                             task_type="SEQ_CLS")
    return peft.get_peft_model(model, config)


def train_step(model, optimizer, batch) -> None:
    model.train()
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory, as it is held during training


def state_bytes(model, optimizer) -> dict:
    """Bytes of the parameters, their gradients and AdamW's state, counted from the tensors."""
    params = {id(p): p for p in model.parameters()}.values()
    grads = [p.grad for p in params if p.grad is not None]
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    return {"parameters": size(params), "gradients": size(grads), "optimizer": size(state),
            "total": size(params) + size(grads) + size(state)}


def time_steps(batches: list[dict], rounds: int, peft_available: bool) -> dict:
    builders = {"full": minibert_full, "lora": minibert_lora}
    if peft_available:
        builders["peft_lora"] = peft_lora
    torch.manual_seed(0)
    models = {name: build() for name, build in builders.items()}
    optimizers = {name: optimizer_for(model) for name, model in models.items()}
    for name in models:  # warm-up: the first step allocates gradients and AdamW's state
        train_step(models[name], optimizers[name], batches[0])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            start = time.perf_counter()
            for batch in batches:
                train_step(models[name], optimizers[name], batch)
            times[name].append((time.perf_counter() - start) / len(batches))
    return {name: {"step_seconds": statistics.median(t), "rounds": t, **state_bytes(models[name], optimizers[name])}
            for name, t in times.items()}


# ----------------------------------------------------------------------------- main


def summarize(runs: list[dict]) -> dict:
    """Mean and spread of test and validation accuracy over seeds, and what a run trains and keeps."""
    test, validation = [r["test_accuracy"] for r in runs], [r["validation_accuracy"] for r in runs]
    return {"lr": runs[0]["lr"], "test_accuracy_mean": statistics.mean(test),
            "test_accuracy_stdev": statistics.stdev(test) if len(test) > 1 else 0.0,
            "validation_accuracy_mean": statistics.mean(validation),
            "kept_bytes": runs[0]["kept_bytes"], "trainable_parameters": runs[0]["trainable_parameters"],
            "total_parameters": runs[0]["total_parameters"]}


def continued_from(out: Path, result: dict, lrs: dict) -> dict:
    """What an earlier run of this benchmark left in `out` with the same settings, so that a stopped or
    extended run (another --lora-lr, more --seeds) does only what is missing: the step timing (which no
    learning rate changes) moves into `result`, and its fine-tuning runs are returned by (kind, seed) where
    their learning rate is this run's; runs at other learning rates are kept in result["other_learning_rates"]."""
    if not out.is_file():
        return {}
    old = json.loads(out.read_text())
    if old.get("quick") != result["quick"] or old.get("lora") != result["lora"]:
        return {}
    if "timing" in old:  # delete it from the file to time the steps again and keep the runs
        result["timing"] = old["timing"]
    earlier, others = {}, list(old.get("other_learning_rates", []))
    for kind, runs in old.get("runs", {}).items():
        for run in runs:
            if run["lr"] == lrs[kind]:
                earlier[kind, run["seed"]] = run
            else:
                others.append({"kind": kind, **run})
    result["other_learning_rates"] = [r for r in others if r["lr"] != lrs[r["kind"]]]
    earlier.update({(r["kind"], r["seed"]): {k: v for k, v in r.items() if k != "kind"} for r in others if r["lr"] == lrs[r["kind"]]})
    return earlier



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_flags(parser, "lora", quick="1 seed, 10 steps a run, 1 timing round: about a minute",
                  quick_out="runs/bench-lora-quick.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--timing-batches", type=int, default=8, help="batches per timing round")
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--output-dir", default="runs/bench-lora")
    parser.add_argument("--full-lr", type=float, default=LEARNING_RATES["full"])
    parser.add_argument("--lora-lr", type=float, default=LEARNING_RATES["lora"])
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.timing_batches, args.timing_rounds = args.seeds[:1], 2, 1
    out = output_path(args, "lora", quick_out="runs/bench-lora-quick.json")
    try:
        import peft  # noqa: F401

        peft_available = True
    except ImportError:
        peft_available = False
        print("peft is not installed: the peft-on-transformers column is left out (pip install peft)")

    lrs = {"full": args.full_lr, "lora": args.lora_lr}
    result = {**measured_on(args.threads), "quick": args.quick,
              "lora": {"rank": LORA.rank, "alpha": LORA.alpha, "dropout": LORA.dropout, "targets": list(LORA.targets)},
              "runs": {kind: [] for kind in lrs}, "other_learning_rates": []}
    earlier = continued_from(out, result, lrs)

    def write():
        write_result(out, result)

    if "timing" not in result:
        result["timing"] = time_steps(training_batches(args.timing_batches), args.timing_rounds, peft_available)
        write()
    for seed in args.seeds:  # full and LoRA in turns, so a slow patch of the machine hits both
        for kind, lr in lrs.items():
            if (kind, seed) in earlier:
                result["runs"][kind].append(earlier[kind, seed])
                continue
            run = finetune(kind, seed, lr, Path(args.output_dir) / f"{kind}-seed{seed}-lr{lr:g}", args.quick)
            print(f"{kind} seed {seed}: {json.dumps(run)}", flush=True)
            result["runs"][kind].append(run)
            write()
    summary = {kind: summarize(runs) for kind, runs in result["runs"].items()}
    others: dict[tuple, list] = {}
    for run in result["other_learning_rates"]:
        others.setdefault((run["kind"], run["lr"]), []).append(run)
    result["other_learning_rates_summary"] = [{"kind": kind, "lr": lr, "seeds": [r["seed"] for r in runs], **summarize(runs)}
                                              for (kind, lr), runs in sorted(others.items())]
    timing = result["timing"]
    full, lora = timing["full"], timing["lora"]
    result["summary"] = summary
    result["targets"] = {
        "accuracy_gap_points": 100 * (summary["full"]["test_accuracy_mean"] - summary["lora"]["test_accuracy_mean"]),
        "gradient_and_optimizer_memory_ratio": (lora["gradients"] + lora["optimizer"]) / (full["gradients"] + full["optimizer"]),
        "step_time_ratio_lora_to_full": lora["step_seconds"] / full["step_seconds"],
        **({"step_time_ratio_lora_to_peft": lora["step_seconds"] / timing["peft_lora"]["step_seconds"]} if "peft_lora" in timing else {}),
    }
    write()

    print(f"\n{'':12s}{'test acc':>10s}{'trainable':>12s}{'step s':>9s}{'params+grads+Adam MB':>22s}{'kept MB':>9s}")
    for name in ("full", "lora", "peft_lora"):
        if name not in timing:
            continue
        s = summary.get(name)
        accuracy = f"{100 * s['test_accuracy_mean']:9.2f}%" if s else f"{'-':>10s}"
        trainable = f"{s['trainable_parameters']:12,d}" if s and s["trainable_parameters"] else f"{'-':>12s}"
        kept = f"{s['kept_bytes'] / 1e6:9.2f}" if s else f"{'-':>9s}"
        print(f"{name:12s}{accuracy}{trainable}{timing[name]['step_seconds']:9.3f}{timing[name]['total'] / 1e6:22.1f}{kept}")
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
