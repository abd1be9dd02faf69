"""Does a non-matmul speed-up pay? The fine-tuning step with and without torch.compile and each AdamW
implementation, A/B interleaved on batches of real, changing lengths.

    python benchmarks/bench_step_fusion.py            # MiniLM, fp32 and (where native) bf16: ~10 minutes on 2 cores
    python benchmarks/bench_step_fusion.py --quick    # MiniLM fp32, eager against compiled layers: ~2 minutes

Variants of the step profile_step.py profiles (forward under autocast, backward, clipping, AdamW):
    eager            the Trainer as it is: eager model, fused AdamW (the baseline)
    compile-layers   each encoder Layer compiled (torch.compile, dynamic=True: the packed token count
                     and the longest length change every batch, and must not recompile per batch); the
                     unpad/pad gathers and the heads stay eager. Inductor fuses the residual add, dropout,
                     LayerNorm and GELU around the matrix products.
    compile-model    the whole model compiled, dynamic=True (what --compile does, plus dynamic shapes)
    adamw-foreach    eager, AdamW(foreach=True) instead of fused=True
    adamw-loop       eager, AdamW's per-parameter loop (foreach=False, fused=False)

Every variant gets the same weights and the same batches: --batches batches of 32 movie-review sentences,
lengths drawn as bench_cpu.py draws them (a new draw per batch, so shapes change), cycled. After warm-up
(which includes compilation: its seconds are reported, with the number of graphs compiled), rounds run
each variant once per batch in turn, A B A B, so that machine noise hits them alike; a variant's time is
the median over rounds of its mean step time, and its ratio to eager is the median of the per-round
ratios. Writes benchmarks/results/step-fusion.json (--quick: runs/step-fusion-quick.json).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _common import add_run_flags, measured_on, output_path, write_result
from bench_cpu import make_batch, movie_review_lengths
from profile_step import build, train_step
from minibert.precision import cpu_has_native_bf16

VARIANTS = ("eager", "compile-layers", "compile-model", "adamw-foreach", "adamw-loop")


def make_variant(name: str, size: str, precision: str):
    trainer = build(size, precision)  # same seed: the same initial weights for every variant
    if name == "compile-layers":
        for layer in trainer.model.bert.layers:
            layer.compile(dynamic=True)
    elif name == "compile-model":
        trainer.train_model = torch.compile(trainer.model, dynamic=True)
    elif name.startswith("adamw-"):
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in trainer.optimizer.param_groups]
        foreach = name == "adamw-foreach"
        trainer.optimizer = torch.optim.AdamW(groups, fused=False, foreach=foreach)
    return trainer


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                        help="default fp32, and bf16 where the CPU multiplies it natively")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batches", type=int, default=4, help="distinct batch shapes, cycled")
    parser.add_argument("--rounds", type=int, default=5)
    add_run_flags(parser, "step-fusion", quick="fp32, eager against compile-layers, 3 batches, 3 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.precisions, args.variants, args.batches, args.rounds = ["fp32"], ["eager", "compile-layers"], 3, 3
    precisions = args.precisions or (["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"])
    out = output_path(args, "step-fusion")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    all_lengths = movie_review_lengths()
    batches = []
    for i in range(args.batches):
        ids, mask = make_batch(sorted(rng.choice(all_lengths, 32).tolist(), reverse=True), seed=i)
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(i))})
    result = {**measured_on(args.threads), "size": args.size, "cpu_native_bf16": cpu_has_native_bf16(), "batch_tokens": [int(b["attention_mask"].sum()) for b in batches],
              "results": {}}
    for precision in precisions:
        trainers, warmup = {}, {}
        for name in args.variants:
            before, start = graphs_compiled(), time.perf_counter()
            trainers[name] = make_variant(name, args.size, precision)
            for batch in batches:  # every shape once: compilation (and any recompilation) happens here
                train_step(trainers[name], batch)
            warmup[name] = {"seconds": time.perf_counter() - start, "graphs_compiled": graphs_compiled() - before}
        per_round = {name: [] for name in args.variants}  # mean step seconds per round
        for _ in range(args.rounds):
            for name in args.variants:
                before = graphs_compiled()
                start = time.perf_counter()
                for batch in batches:
                    train_step(trainers[name], batch)
                per_round[name].append((time.perf_counter() - start) / len(batches))
                warmup[name]["graphs_compiled_after_warmup"] = warmup[name].get("graphs_compiled_after_warmup", 0) + graphs_compiled() - before
        rows = {}
        for name in args.variants:
            ratios = [e / v for e, v in zip(per_round["eager"], per_round[name])] if "eager" in per_round else []
            rows[name] = {"step_ms_median": 1000 * statistics.median(per_round[name]),
                          "speedup_vs_eager_median": statistics.median(ratios) if ratios else None,
                          "speedup_vs_eager_rounds": ratios, **warmup[name]}
            s = rows[name]
            print(f"{args.size} {precision} {name:15s} step {s['step_ms_median']:7.0f} ms  "
                  f"vs eager {s['speedup_vs_eager_median'] or float('nan'):.3f}x  "
                  f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})  warm-up {s['seconds']:.0f} s, "
                  f"{s['graphs_compiled']} graphs, {s['graphs_compiled_after_warmup']} more after", flush=True)
        result["results"][precision] = rows
        write_result(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
