"""minibert's deterministic WordPiece trainer against the one it replaced (tokenizers' WordPieceTrainer),
on the built-in corpus at --vocab-size 8192: speed, word pieces per word, [UNK] share, held-out MLM loss.

    python benchmarks/tokenizer_quality.py           # ~45 min on 2 quiet cores
                                                     # writes benchmarks/results/tokenizer-quality.json
    python benchmarks/tokenizer_quality.py --quick   # a minute or two: a fifth of the corpus, 60 pretraining
                                                     # steps, one seed; writes runs/tokenizer-quality-quick.json
    # on a busy machine: two timings each, 200 single-threaded pretraining steps, one seed
    python benchmarks/tokenizer_quality.py --repeats 2 --pretrain-steps 200 --seeds 0 --threads 1

1. Every 20th document is held out; both trainers learn a vocabulary from the other 19 in 20, alternately
   (old, new, old, new, ... --repeats times), timed (wall clock and CPU time of all threads) in the same
   process, the text already in memory. The old trainer is the recipe minibert used before (below, as
   ``upstream_wordpiece_tokenizer``); each of its runs gives another vocabulary (huggingface/tokenizers#1794),
   so two of them show how much the measures move without any change of recipe: that is the noise.
2. On the held-out documents: word pieces per word, and the share of pieces (and of words) that are [UNK];
   the difference in pieces per word from the old trainer's first vocabulary, with its standard error.
3. A BERT-Tiny is pretrained with train_pretrain.py on the whole (sub)corpus with each vocabulary (the same
   seed, steps and settings; with --seeds 0 1, a second seed for the old vocabulary and the new one), and
   its MLM loss and accuracy on all of train_pretrain's held-out split are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, models, trainers

import train_pretrain
from minibert.pretraining_data.corpus import builtin_corpus_documents
from minibert.tokenizer import SPECIAL_TOKENS, bert_text_splitting, bert_wordpiece_tokenizer, save_tokenizer
from minibert.tokenizer_training import train_wordpiece_tokenizer


def upstream_wordpiece_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """minibert's trainer before its own (tokenizer_training.py until minibert.wordpiece): BertWordPieceTokenizer's
    recipe on tokenizers' WordPieceTrainer, in the same BERT tokenizer."""
    tokenizer = bert_text_splitting(Tokenizer(models.WordPiece(unk_token="[UNK]")))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, limit_alphabet=1000,
                                        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return bert_wordpiece_tokenizer(tokenizer.get_vocab(with_added_tokens=True))


def heldout_counts(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """(len(texts), 3): each text's words, word pieces and [UNK] pieces (a word that is [UNK] is one piece)."""
    unk = tokenizer.token_to_id("[UNK]")
    return np.array([(len(set(e.word_ids)), len(e.ids), e.ids.count(unk))
                     for e in tokenizer.encode_batch(texts, add_special_tokens=False)])


def heldout_measures(counts: np.ndarray, reference: np.ndarray, vocab_size: int) -> dict:
    """Pieces per word and [UNK] shares, and the difference in pieces per word from ``reference`` (the same
    texts through another tokenizer) with its standard error over texts, by a seeded bootstrap: how far the
    difference could move on other held-out text of the same kind."""
    words, pieces, unk = counts.sum(0)
    rng = np.random.default_rng(0)
    resamples = rng.integers(0, len(counts), size=(1000, len(counts)))  # (1000, texts)
    per_word = counts[resamples, 1].sum(1) / counts[resamples, 0].sum(1)
    reference_per_word = reference[resamples, 1].sum(1) / reference[resamples, 0].sum(1)
    return {"vocab_size": vocab_size, "words": int(words), "pieces": int(pieces), "pieces_per_word": pieces / words,
            "unk_share_of_pieces": unk / pieces, "unk_share_of_words": unk / words,
            "pieces_per_word_minus_old_run_1": pieces / words - reference[:, 1].sum() / reference[:, 0].sum(),
            "its_standard_error": float(np.std(per_word - reference_per_word))}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a fifth of the corpus, 60 pretraining steps, one repeat")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="timed trainings of each trainer, alternating")
    parser.add_argument("--pretrain-steps", type=int, default=3000)  # ~8 min a run for a BERT-Tiny on 2 cores
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="pretraining seeds: the first for all three vocabularies, the others for old run 1 "
                        "and new")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the pretraining runs (1 on a busy "
                        "machine: two-thread processes stall each other); the old trainer always uses every core")
    parser.add_argument("--runs", default="runs/tokenizer-quality")
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/tokenizer-quality.json (--quick: runs/)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.pretrain_steps = 1, min(args.pretrain_steps, 60)
    out = Path(args.out or ("runs/tokenizer-quality-quick.json" if args.quick else
                            Path(__file__).parent / "results" / "tokenizer-quality.json"))
    runs = Path(args.runs + ("-quick" if args.quick else ""))
    runs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    documents = list(builtin_corpus_documents())
    if args.quick:
        documents = documents[::5]
    train_texts = [p for i, doc in enumerate(documents) if i % 20 for p in doc]
    heldout_texts = [p for i, doc in enumerate(documents) if not i % 20 for p in doc]
    print(f"{len(train_texts):,} paragraphs to train on, {len(heldout_texts):,} held out", flush=True)

    # 1. Speed, alternating, and the vocabularies.
    seconds = {"old": [], "new": []}
    cpu_seconds = {"old": [], "new": []}  # all threads' CPU time: less disturbed than the wall clock by others' work
    trained = {"old": [], "new": []}
    for repeat in range(max(args.repeats, 2)):  # the old trainer twice at least: its noise
        for name, train in (("old", upstream_wordpiece_tokenizer), ("new", train_wordpiece_tokenizer)):
            if name == "new" and repeat >= args.repeats:
                continue
            start, cpu_start = time.perf_counter(), time.process_time()
            tokenizer = train(train_texts, args.vocab_size)
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
            trained[name].append(tokenizer)
            print(f"{name} trainer: {seconds[name][-1]:.1f} s ({cpu_seconds[name][-1]:.1f} s of CPU)", flush=True)
    old_seconds, new_seconds = statistics.median(seconds["old"]), statistics.median(seconds["new"])
    old_cpu, new_cpu = statistics.median(cpu_seconds["old"]), statistics.median(cpu_seconds["new"])
    vocabularies = {
        "old, run 1": trained["old"][0], "old, run 2": trained["old"][1], "new": trained["new"][0],
    }
    same = {name: len({t.to_str() for t in runs_of}) == 1 for name, runs_of in trained.items()}

    # 2. Held-out pieces per word and [UNK].
    counts = {name: heldout_counts(tokenizer, heldout_texts) for name, tokenizer in vocabularies.items()}
    quality = {name: heldout_measures(counts[name], counts["old, run 1"], vocabularies[name].get_vocab_size())
               for name in vocabularies}
    for name, measures in quality.items():
        print(f"{name}: {measures['pieces_per_word']:.5f} pieces/word "
              f"({measures['pieces_per_word_minus_old_run_1']:+.5f} ± {measures['its_standard_error']:.5f}), "
              f"[UNK] {measures['unk_share_of_pieces']:.5%} of pieces", flush=True)

    # 3. The same short pretraining run with each vocabulary.
    corpus = runs / "corpus.txt"
    corpus.write_text("".join("\n".join(doc) + "\n\n" for doc in documents), encoding="utf-8")
    os.environ["MINIBERT_CACHE"] = str(runs / "cache")  # its shards, apart from the user's cache
    pretraining = []
    first, *others = args.seeds[:1] if args.quick else args.seeds
    plan = [("old, run 1", first), ("old, run 2", first), ("new", first)]
    plan += [(name, seed) for seed in others for name in ("old, run 1", "new")]
    for name, seed in plan:
        tokenizer_dir = runs / "tokenizers" / name.replace(", ", "-").replace(" ", "-")
        tokenizer_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer(vocabularies[name], tokenizer_dir)
        start = time.perf_counter()
        metrics = train_pretrain.main([
            "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--preset", "tiny", "--no-nsp",
            "--seq-len", "64", "--batch-size", "32", "--lr", "2e-3", "--dropout", "0",
            "--max-steps", str(args.pretrain_steps), "--eval-steps", str(args.pretrain_steps), "--eval-batches", "0",
            "--save-steps", "0", "--seed", str(seed), "--no-progress",
            "--output-dir", str(runs / "pretrain" / f"{tokenizer_dir.name}-seed{seed}")])
        pretraining.append({"vocabulary": name, "seed": seed, "heldout_mlm_loss": metrics["mlm_loss"],
                            "heldout_mlm_accuracy": metrics["mlm_accuracy"], "seconds": time.perf_counter() - start})
        print(f"{name}, seed {seed}: held-out MLM loss {metrics['mlm_loss']:.4f}, "
              f"accuracy {metrics['mlm_accuracy']:.4f}", flush=True)

    result = {
        "command": "python benchmarks/tokenizer_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "corpus": "built-in" + (", every 5th document" if args.quick else ""),
        "vocab_size": args.vocab_size, "train_paragraphs": len(train_texts), "heldout_paragraphs": len(heldout_texts),
        "training_seconds": {"old": seconds["old"], "new": seconds["new"], "old_median": old_seconds,
                             "new_median": new_seconds, "new_over_old": new_seconds / old_seconds,
                             "cpu_old": cpu_seconds["old"], "cpu_new": cpu_seconds["new"],
                             "cpu_new_over_old": new_cpu / old_cpu},
        "same_vocabulary_every_run": same,
        "heldout": quality,
        "pretraining": {"settings": f"BERT-Tiny, no NSP, {args.pretrain_steps} steps x 32 x 64, lr 2e-3, dropout 0",
                        "runs": pretraining},
        "versions": {"tokenizers": tokenizers.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "cpus": os.cpu_count(), "torch_threads": args.threads, "load_average_at_end": os.getloadavg(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"new / old training time: {new_seconds / old_seconds:.2f} (medians {new_seconds:.1f} s, "
          f"{old_seconds:.1f} s), CPU time {new_cpu / old_cpu:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
