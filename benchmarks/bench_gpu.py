"""GPU speed on one GPU, in under 8 minutes: the kernel, fine-tuning steps/s, pretraining MFU.

    python benchmarks/bench_gpu.py                 # on a CUDA machine; writes benchmarks/results/gpu.json
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke   # tiny shapes on the CPU: checks the script runs (runs/gpu-smoke.json)

1. Attention kernel, forward+backward TFLOP/s, bf16, head dim 64, sequence 128 and 512: minibert's Triton
   kernel against torch SDPA's flash backend; with padding (half the sequences at a random 30-100% of the
   length), the kernel on the packed real tokens against SDPA with a key mask (flash takes no mask, so
   torch picks another backend), FLOPs counted on real tokens only (4·B·H·T²·D forward, 2.5x that backward).
2. Fine-tuning bert-base (random weights, 2 labels), bf16 autocast, batch 32, lengths up to 128 drawn
   from a log-normal fitted to the movie-review sentences: optimizer steps/s of minibert (triton,
   unpadded) against transformers with sdpa, both AdamW fused, same batches.
3. Pretraining bert-base at sequence 128, batch 256, bf16: tokens/s and model FLOPs utilisation,
   counting 6·N·tokens plus attention against the 989 TFLOP/s dense bf16 peak (H100/H200).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import minibert
from minibert.config import IGNORE_INDEX
from minibert.kernels import flash_attention
from minibert.pretraining import flops_per_token

PEAK = 989e12
# log-normal fitted to the movie-review sentences' token counts (MiniLM tokenizer, [CLS]/[SEP] included)
LOG_MEAN, LOG_STD = 3.20, 0.46  # mean 27 tokens, 99th percentile 55, longest 79


def timed(fn, device, warmup=3, iters=10) -> float:
    """Mean seconds per call, measured with CUDA events (perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def bench_kernel(device, dtype, shapes, iters) -> list[dict]:
    rows = []
    for B, T, H, D in shapes:
        for padded in (False, True):
            g = torch.Generator().manual_seed(0)
            lengths = torch.full((B,), T)
            if padded:
                lengths[B // 2 :] = (T * (0.3 + 0.7 * torch.rand(B - B // 2, generator=g))).long().clamp(min=1)
            mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
            q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(B, T, H, D, device=device, dtype=dtype)
            mask_d = mask.to(device)
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
            idx = mask_d.flatten().nonzero().flatten()
            qp, kp, vp = (t.detach().flatten(0, 1)[idx].requires_grad_() for t in (q, k, v))
            gp = grad.flatten(0, 1)[idx]

            def ours():
                if padded:
                    out = flash_attention(qp, kp, vp, cu_seqlens=cu, max_seqlen=T)
                    out.backward(gp)
                else:
                    flash_attention(q, k, v).backward(grad)

            def sdpa():
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                if padded:
                    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask_d[:, None, None, :])
                    out.backward(grad.transpose(1, 2))
                else:
                    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).backward(grad.transpose(1, 2))

            flops = 3.5 * 4 * H * D * float((lengths.double() ** 2).sum())
            t_ours, t_sdpa = timed(ours, device, iters=iters), timed(sdpa, device, iters=iters)
            row = {"B": B, "T": T, "H": H, "D": D, "padded": padded, "triton_tflops": flops / t_ours / 1e12,
                   "sdpa_tflops": flops / t_sdpa / 1e12, "ratio": t_sdpa / t_ours}
            print(f"kernel B={B} T={T} padded={padded}: triton {row['triton_tflops']:.1f} TFLOP/s, "
                  f"sdpa {row['sdpa_tflops']:.1f} TFLOP/s, triton/sdpa speed {row['ratio']:.2f}", flush=True)
            rows.append(row)
    return rows


def random_batches(n, batch, max_len, vocab, device, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = np.clip(np.exp(rng.normal(LOG_MEAN, LOG_STD, batch)).astype(int), 4, max_len)
        T = int(lengths.max())
        ids = torch.randint(1000, vocab, (batch, T))
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device),
                    "labels": torch.randint(0, 2, (batch,)).to(device)})
    return out


def bench_finetune(device, sizes, batch, steps) -> dict:
    batches = random_batches(steps, batch, 128, 30522, device)
    results = {}
    for name in ("minibert", "transformers"):
        torch.manual_seed(0)
        if name == "minibert":
            cfg = minibert.BertConfig(**sizes, num_labels=2, attn_impl="triton" if device.type == "cuda" else "sdpa")
            model = minibert.BertForSequenceClassification(cfg)
        else:
            hf_cfg = transformers.BertConfig(**sizes, num_labels=2, attn_implementation="sdpa")
            model = transformers.BertForSequenceClassification(hf_cfg)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=device.type == "cuda")
        it = iter(range(10**9))

        def step():
            b = batches[next(it) % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # Warm up on every batch once: each new shape may compile kernels (Triton's, and cuBLAS picks), which
        # belongs to the first epoch, not to the steady speed being measured.
        results[name] = 1.0 / timed(step, device, warmup=len(batches), iters=len(batches))
        print(f"fine-tuning bert-base, {name}: {results[name]:.2f} steps/s", flush=True)
        del model, opt
    results["speedup"] = results["minibert"] / results["transformers"]
    return results


def bench_pretrain(device, sizes, batch, seq_len, steps) -> dict:
    cfg = minibert.BertConfig(**sizes, attn_impl="triton" if device.type == "cuda" else "sdpa")
    model = minibert.BertForPreTraining(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(1000, cfg.vocab_size, (batch, seq_len), device=device)
    labels = torch.where(torch.rand(batch, seq_len, device=device) < 0.15, ids, IGNORE_INDEX)
    nsp = torch.randint(0, 2, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, labels=labels, next_sentence_label=nsp).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, device, warmup=3, iters=steps)
    tokens_per_s = batch * seq_len / seconds
    mfu = tokens_per_s * flops_per_token(cfg, seq_len) / PEAK
    print(f"pretraining bert-base seq {seq_len}: {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}", flush=True)
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "batch": batch, "seq_len": seq_len}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on the CPU")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu.json, or runs/gpu-smoke.json with --smoke")
    args = parser.parse_args(argv)
    if args.out is None:  # smoke numbers are not results: keep them out of benchmarks/results/
        args.out = "runs/gpu-smoke.json" if args.smoke else str(Path(__file__).parent / "results" / "gpu.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        dtype, shapes, iters = torch.float32, [(2, 32, 2, 32)], 1
        sizes = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
        ft = dict(batch=4, steps=2)
        pt = dict(batch=4, seq_len=32, steps=2)
    else:
        dtype, shapes, iters = torch.bfloat16, [(32, 128, 12, 64), (8, 512, 12, 64)], 20
        sizes = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)
        ft = dict(batch=32, steps=30)
        pt = dict(batch=256, seq_len=128, steps=10)
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # Written after each part: a run cut short by a time limit still keeps what it measured.
    for part, run in (("kernel", lambda: bench_kernel(device, dtype, shapes, iters)),
                      ("finetune", lambda: bench_finetune(device, sizes, **ft)),
                      ("pretrain", lambda: bench_pretrain(device, sizes, **pt))):
        result[part] = run()
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
