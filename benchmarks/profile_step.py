"""Where a training step's time goes: torch.profiler on minibert's fine-tuning step, by kind of operation.

    python benchmarks/profile_step.py                     # MiniLM and bert-base, bf16 and fp32: ~3 minutes on 2 cores
    python benchmarks/profile_step.py --quick             # MiniLM, bf16 only, 2 profiled steps: ~30 seconds

The step is what Trainer.step runs for BertForSequenceClassification on a batch of 32 movie-review
sentences of real lengths (drawn as bench_cpu.py draws them, padded to the longest, run unpadded): the
forward pass under autocast, the backward pass, gradient clipping, and the fused AdamW update. Each
operator's own (self) CPU time is put in one bucket of BUCKETS and in one phase (forward, backward,
optimizer: clipping, AdamW, zeroing the gradients), from the profiler's record_function ranges.

The matmul-only ceiling is the step time if everything but the matrix products (the matmul bucket and
the fused attention kernel) took no time: step / (matmul + attention). It bounds what fusing or removing
the other operators can gain. Prints a table and writes benchmarks/results/profile.json (--quick:
runs/profile-quick.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from _common import add_run_flags, measured_on, output_path, write_result
import minibert
from bench_cpu import SIZES, make_batch, movie_review_lengths
from minibert.training import Trainer, TrainingSettings

# Operator name -> bucket; the first pattern contained in the name wins. Backward kernels carry their
# forward op's name (native_layer_norm_backward), so they share its bucket.
BUCKETS = [
    ("attention kernel", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("dtype casts", ("aten::copy_", "aten::_to_copy")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("dropout", ("dropout", "bernoulli")),
    ("softmax, loss", ("softmax", "cross_entropy", "nll_loss")),
    ("embedding", ("embedding",)),
    ("pad/unpad gathers", ("aten::index", "index_put", "index_select", "scatter", "nonzero", "masked")),
    ("optimizer (AdamW)", ("adam",)),
    ("gradient clipping", ("norm", "clamp", "_foreach_mul")),
    ("zero fills", ("aten::zero_", "aten::fill_", "aten::zeros", "aten::new_zeros")),
    ("elementwise add/mul", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::tanh", "aten::sum")),
]
PHASES = ("forward", "backward", "optimizer")


def bucket_of(name: str) -> str:
    for bucket, patterns in BUCKETS:
        if any(p in name for p in patterns):
            return bucket
    return "other"


def build(size: str, precision: str):
    sizes = SIZES[size]
    torch.manual_seed(0)
    model = minibert.BertForSequenceClassification(minibert.BertConfig(**sizes, num_labels=2, attn_impl="sdpa", unpad=True))
    trainer = Trainer(model, TrainingSettings(precision=precision), total_steps=10**6, output_dir="runs/profile")
    return trainer


def train_step(trainer: Trainer, batch: dict) -> None:
    """Trainer.step's work, cut into the three phases the profile reports."""
    model = trainer.train_model
    model.train()
    with record_function("forward"), trainer.autocast():
        loss = model(**batch).loss
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.settings.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)


def phase_of(event, ranges: list[tuple[str, int, int]]) -> str | None:
    start = event.time_range.start
    for name, lo, hi in ranges:
        if lo <= start <= hi:
            return name
    return None


def profile_size(size: str, precision: str, batch: dict, steps: int) -> dict:
    trainer = build(size, precision)
    for _ in range(2):  # warm-up: oneDNN primitives, the optimizer's state
        train_step(trainer, batch)
    wall = []
    for _ in range(steps):  # unprofiled step times, for the total
        start = time.perf_counter()
        train_step(trainer, batch)
        wall.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(trainer, batch)
    events = prof.events()
    ranges = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in PHASES]
    ms = defaultdict(float)  # (phase, bucket) -> milliseconds per step
    ops = defaultdict(float)  # (phase, operator) -> milliseconds per step
    for e in events:
        if e.name in PHASES:
            continue
        phase = phase_of(e, ranges)
        if phase is None or e.self_cpu_time_total == 0:
            continue
        ms[phase, bucket_of(e.name)] += e.self_cpu_time_total / 1000 / steps
        ops[phase, e.name] += e.self_cpu_time_total / 1000 / steps
    profiled = sum(ms.values())
    table = {phase: {bucket: ms[phase, bucket] for bucket in [b for b, _ in BUCKETS] + ["other"] if ms[phase, bucket] > 0}
             for phase in PHASES}
    matmul = sum(v for (phase, bucket), v in ms.items() if bucket in ("matmul", "attention kernel"))
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
    return {"size": size, "precision": precision, "step_ms_unprofiled_median": 1000 * statistics.median(wall),
            "step_ms_profiled_self_total": profiled, "matmul_and_attention_ms": matmul,
            "matmul_share": matmul / profiled, "matmul_only_ceiling_speedup": profiled / matmul,
            "ms_by_phase_and_bucket": table,
            "top_operators": [{"phase": p, "op": o, "ms": v} for (p, o), v in top]}


def print_table(r: dict) -> None:
    print(f"\n{r['size']} {r['precision']}: step {r['step_ms_unprofiled_median']:.0f} ms unprofiled, "
          f"{r['step_ms_profiled_self_total']:.0f} ms of operator time profiled; matrix products "
          f"{r['matmul_share']:.0%}, matmul-only ceiling {r['matmul_only_ceiling_speedup']:.2f}x")
    buckets = [b for b, _ in BUCKETS] + ["other"]
    total = r["step_ms_profiled_self_total"]
    print(f"{'bucket':22s}" + "".join(f"{p:>12s}" for p in PHASES) + f"{'step':>12s}{'share':>8s}")
    for b in buckets:
        row = [r["ms_by_phase_and_bucket"][p].get(b, 0.0) for p in PHASES]
        if sum(row) > 0:
            print(f"{b:22s}" + "".join(f"{v:12.1f}" for v in row) + f"{sum(row):12.1f}{sum(row) / total:8.1%}")
    sums = [sum(r["ms_by_phase_and_bucket"][p].values()) for p in PHASES]
    print(f"{'total':22s}" + "".join(f"{v:12.1f}" for v in sums) + f"{sum(sums):12.1f}")
    print("top operators (ms per step):", ", ".join(f"{o['phase'][:3]} {o['op']} {o['ms']:.1f}" for o in r["top_operators"][:12]))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["minilm", "bert-base"], choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per size (and as many timed without the profiler)")
    add_run_flags(parser, "profile", quick="MiniLM in bf16 only, 2 profiled steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.precisions, args.steps = ["minilm"], ["bf16"], 2
    out = output_path(args, "profile")
    torch.set_num_threads(args.threads)
    lengths = sorted(np.random.default_rng(0).choice(movie_review_lengths(), 32).tolist(), reverse=True)  # bench_cpu's "variable 32"
    ids, mask = make_batch(lengths)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(0))}
    results = []
    for size in args.sizes:
        for precision in args.precisions:
            results.append(profile_size(size, precision, batch, args.steps))
            print_table(results[-1])
            write_result(out, {**measured_on(args.threads), "lengths": lengths, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
