"""train_pretrain.py end to end on a small synthetic corpus: output loads in transformers, resume, DDP."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_finetune
import train_pretrain

ROOT = Path(__file__).parents[1]
WORDS = ("the cat dog sat on a mat and ran to house garden tree bird sang loudly quietly happy sad small large "
         "river mountain walked across bridge over under morning evening friend stranger").split()


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """60 documents of 4-9 sentences, one sentence a line, a blank line between documents."""
    monkeypatch.setenv("MINIBERT_CACHE", str(tmp_path / "cache"))
    rng = random.Random(0)
    docs = []
    for _ in range(60):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(4, 9))]
        docs.append("\n".join(sentences))
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def tiny_args(corpus, out, *extra):
    return ["--data", str(corpus), "--output-dir", str(out), "--preset", "tiny", "--num-layers", "2",
            "--hidden-size", "32", "--num-heads", "2", "--vocab-size", "120", "--seq-len", "32",
            "--batch-size", "8", "--max-steps", "6", "--eval-steps", "3", "--eval-batches", "2",
            "--heldout-fraction", "0.1", "--lr", "1e-3", "--no-progress", *map(str, extra)]


def test_output_loads_in_transformers_with_identical_logits_and_finetunes(corpus, tmp_path):
    metrics = train_pretrain.main(tiny_args(corpus, tmp_path / "out"))
    assert set(metrics) == {"loss", "mlm_loss", "perplexity", "mlm_accuracy", "nsp_loss", "nsp_accuracy"}
    assert metrics["loss"] == pytest.approx(metrics["mlm_loss"] + metrics["nsp_loss"])  # as the training loss adds them
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["mlm_loss"]).exp().item(), rel=1e-6)
    out = tmp_path / "out"
    keys = load_file(out / "model.safetensors").keys()
    assert any(k.startswith("bert.encoder.") for k in keys) and "cls.predictions.bias" in keys
    hf, info = transformers.BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    import minibert

    ours = minibert.BertForPreTraining.from_pretrained(str(out)).eval()
    tok = minibert.load_tokenizer(str(out))
    enc = tok.encode("the cat sat on a mat.", "a bird sang loudly.")
    ids = torch.tensor([enc.ids])
    types = torch.tensor([enc.type_ids])
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, token_type_ids=types)
        got = ours(ids, token_type_ids=types)
    assert (ref.prediction_logits - got.mlm_logits).abs().max() < 1e-5
    assert (ref.seq_relationship_logits - got.nsp_logits).abs().max() < 1e-5
    # and the fine-tuning script takes it as --init
    rows = "text,label\n" + "".join(f"{' '.join(WORDS[i:i + 5])},{'ab'[i % 2]}\n" for i in range(12))
    (tmp_path / "train.csv").write_text(rows)
    train_finetune.main(["--init", str(out), "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                         str(tmp_path / "train.csv"), "--max-steps", "1", "--output-dir", str(tmp_path / "ft"),
                         "--no-progress", "--lr", "1e-12"])
    # it starts from the pretrained encoder (a learning rate of 1e-12 leaves it where it was loaded)
    pretrained, finetuned = load_file(out / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    encoder = [k for k in pretrained if k.startswith("bert.") and not k.startswith("bert.pooler.")]
    assert len(encoder) == 5 + 16 * 2 and set(encoder) <= set(finetuned)
    for key in encoder:
        torch.testing.assert_close(finetuned[key], pretrained[key], rtol=0, atol=1e-9, msg=key)


def test_whole_word_mask_masks_every_piece_of_a_word_or_none(corpus, tmp_path, monkeypatch):
    """With --whole-word-mask every batch the run trains and evaluates on chooses each word's pieces
    together (a piece is a continuation when the run's vocabulary spells it "##..."); without it, some
    word is cut. --no-nsp: no next-sentence labels, no NSP metric."""
    import minibert
    from minibert.pretraining_data.masking import MaskingCollator

    seen = []
    collate = MaskingCollator.__call__
    monkeypatch.setattr(MaskingCollator, "__call__", lambda self, examples: seen.append(collate(self, examples)) or seen[-1])

    def cut_words(out):
        vocab = minibert.load_tokenizer(str(out)).get_vocab()
        continues = torch.zeros(len(vocab), dtype=torch.bool)
        continues[[i for token, i in vocab.items() if token.startswith("##")]] = True
        specials = torch.tensor([vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]")])
        cut = 0
        for batch in seen:
            assert "next_sentence_label" not in batch
            chosen = batch["labels"] != -100
            original = torch.where(chosen, batch["labels"], batch["input_ids"])
            piece = continues[original[:, 1:]] & ~torch.isin(original[:, :-1], specials)
            cut += int((piece & (chosen[:, 1:] != chosen[:, :-1])).sum())
        return cut

    metrics = train_pretrain.main(tiny_args(corpus, tmp_path / "wwm", "--no-nsp", "--whole-word-mask"))
    assert "nsp_accuracy" not in metrics and "nsp_loss" not in metrics and metrics["loss"] == metrics["mlm_loss"]
    assert len(seen) >= 6
    assert cut_words(tmp_path / "wwm") == 0
    seen.clear()
    train_pretrain.main(tiny_args(corpus, tmp_path / "pieces", "--no-nsp"))
    assert cut_words(tmp_path / "pieces") > 10


def test_evaluate_gives_transformers_loss_and_accuracies_on_fixed_masks(corpus, tmp_path):
    """pretraining.evaluate on the first max_batches held-out batches: the MLM loss is the mean over all
    their masked tokens (not the mean of the batches' means), and with the accuracies it is transformers'
    on the same batches; the masks are epoch 0's whatever epoch the collator is at."""
    import minibert
    from minibert import pretraining
    from minibert.pretraining_data.dataset import PretrainingDataset, batches
    from minibert.pretraining_data.masking import MaskingCollator
    from minibert.training import Trainer, TrainingSettings

    shards = pretraining.prepare_shards([str(corpus)], vocab_size=120, seq_len=32, heldout_fraction=0.3)
    heldout = PretrainingDataset(shards, "heldout")
    assert len(heldout) > 3 * 4  # max_batches leaves some out
    torch.manual_seed(0)
    config = minibert.BertConfig.preset("tiny", vocab_size=heldout.vocab_size, max_position_embeddings=32)
    model = minibert.BertForPreTraining(config)
    collate = MaskingCollator.for_dataset(heldout, mask_prob=0.3, seed=1, epoch=5)
    metrics = pretraining.evaluate(Trainer(model, TrainingSettings(), 1, tmp_path), heldout, collate, batch_size=4,
                                   seed=0, max_batches=3)
    model.save_pretrained(tmp_path / "model")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "model").eval()
    collate.epoch = 0
    loss = correct = masked = nsp_loss = nsp_correct = pairs = 0
    for indices in list(batches(len(heldout), 4, seed=0, epoch=0, shuffle=False, drop_last=False))[:3]:
        batch = collate(heldout.batch(indices))
        with torch.no_grad():
            out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])
        chosen = batch["labels"] != -100
        logits, targets = out.prediction_logits[chosen].double(), batch["labels"][chosen]
        loss += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        masked += len(targets)
        nsp_logits = out.seq_relationship_logits.double()
        nsp_loss += torch.nn.functional.cross_entropy(nsp_logits, batch["next_sentence_label"], reduction="sum").item()
        nsp_correct += (nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
        pairs += len(indices)
    assert metrics == pytest.approx({"loss": loss / masked + nsp_loss / pairs, "mlm_loss": loss / masked,
                                     "perplexity": math.exp(loss / masked), "mlm_accuracy": correct / masked,
                                     "nsp_loss": nsp_loss / pairs, "nsp_accuracy": nsp_correct / pairs}, rel=1e-5)


def test_continued_pretraining_from_an_encoder_checkpoint_creates_the_heads(corpus, tmp_path, tiny_init_dir, caplog):
    """--init a BertModel checkpoint (no cls.* weights): its tokenizer is reused, the heads are new."""
    args = tiny_args(corpus, tmp_path / "out", "--init", tiny_init_dir, "--max-steps", 2)
    drop = {"--preset", "--num-layers", "--hidden-size", "--num-heads", "--vocab-size"}
    args = [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
    train_pretrain.main([*args, "--lr", "1e-12"])  # a learning rate that leaves the weights where they were loaded
    assert "newly initialised" in caplog.text and "mlm_head" in caplog.text and "nsp_head" in caplog.text
    before = load_file(tiny_init_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    # every encoder weight is the checkpoint's, the heads are new (BERT's initialisation: N(0, 0.02), zero bias)
    assert {k for k in after if k.startswith("bert.")} == {"bert." + k for k in before}
    for key in before:
        torch.testing.assert_close(after["bert." + key], before[key], rtol=0, atol=1e-9, msg=key)
    transform = after["cls.predictions.transform.dense.weight"]
    assert abs(transform.std().item() - 0.02) < 0.003 and after["cls.predictions.transform.dense.bias"].abs().max() < 1e-9


def train_losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_a_fresh_model_starts_at_the_unigram_loss(corpus, tmp_path):
    """With BERT's zero output bias the first MLM loss is about log(V) (uniform guesses); the unigram
    bias init starts it at the corpus's word frequencies instead, well below."""
    train_pretrain.main(tiny_args(corpus, tmp_path / "zeros", "--no-nsp", "--max-steps", 1, "--no-unigram-bias-init"))
    train_pretrain.main(tiny_args(corpus, tmp_path / "unigram", "--no-nsp", "--max-steps", 1))
    vocab_size = json.loads((tmp_path / "zeros" / "config.json").read_text())["vocab_size"]
    zeros, unigram = train_losses(tmp_path / "zeros")[0], train_losses(tmp_path / "unigram")[0]
    assert zeros == pytest.approx(math.log(vocab_size), abs=0.1)
    assert unigram < zeros - 0.5


def test_killed_and_resumed_equals_uninterrupted(corpus, tmp_path):
    train_pretrain.main(tiny_args(corpus, tmp_path / "a", "--save-steps", 2))
    assert train_pretrain.main(tiny_args(corpus, tmp_path / "b", "--save-steps", 2), _stop_after_steps=3) == {"stopped_at": 3}
    with pytest.raises(ValueError, match=r"--lr 0.01 \(the run has 0.001\)"):  # a changed run is not a resume
        train_pretrain.main(["--output-dir", str(tmp_path / "b"), "--resume", "--lr", "0.01"])
    # The run's own settings come from its checkpoint, its evaluation interval too: --output-dir (written
    # another way) and --resume are enough.
    train_pretrain.main(["--output-dir", str(tmp_path / "b") + "/", "--resume", "--no-progress"])
    evals = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "eval"]
    assert evals == [3, 6]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_bad_settings_fail_before_preprocessing(corpus, tmp_path):
    from minibert.config import BertConfig
    from minibert.model import BertForPreTraining

    BertForPreTraining(BertConfig.preset("tiny", vocab_size=120, max_position_embeddings=16)).save_pretrained(tmp_path / "init")
    from minibert.assets import minilm_dir

    (tmp_path / "bigger").mkdir()
    (tmp_path / "bigger" / "vocab.txt").write_bytes((minilm_dir() / "vocab.txt").read_bytes())
    (tmp_path / "no-mask").mkdir()
    (tmp_path / "no-mask" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    cases = [(["--mask-prob", "0"], "--mask-prob must be between 0 and 1"),
             (["--heldout-fraction", "1"], "--heldout-fraction in \\[0, 1\\)"),
             (["--init", str(tmp_path / "init"), "--seq-len", "32"], "--seq-len 32 exceeds the 16 positions of --init"),
             (["--init", str(tmp_path / "init"), "--seq-len", "16", "--tokenizer", str(tmp_path / "bigger")],
              "tokenizer has 30522 tokens but --init .* only 120 word embeddings.*drop --tokenizer"),
             (["--tokenizer", str(tmp_path / "no-mask")], r"has no \[MASK\]")]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train_pretrain.main(tiny_args(corpus, tmp_path / "out", *extra))
        assert not (tmp_path / "out").exists()


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo), global batch 8 = 2 x 4, against one process holding the same
    8 examples as 2 accumulation steps of 4: the same gradients, so the same loss trajectory. Dropout is
    off: each rank draws its own dropout masks, so with dropout the two runs differ by design."""
    train_pretrain.main(tiny_args(corpus, tmp_path / "single", "--grad-accum", 2, "--dropout", 0))  # builds the cache
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_pretrain.py"), *tiny_args(corpus, tmp_path / "ddp", "--dropout", 0)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 6
    assert max(abs(x - y) for x, y in zip(single, ddp)) < 1e-5, (single, ddp)


def test_mfu_is_each_devices_share_of_its_own_peak():
    """Under DDP the tokens per second are all processes' together: against one device's peak they once
    overstated MFU by the number of processes."""
    from minibert.pretraining import model_flops_utilization

    # 8 devices at 3,000 tokens/s each, 1e9 FLOPs per token, 1e14 FLOP/s peak: 3e12 / 1e14 = 3%.
    assert model_flops_utilization(8 * 3000.0, 1e9, 1e14, devices=8) == pytest.approx(0.03)
    assert model_flops_utilization(3000.0, 1e9, 1e14, devices=1) == pytest.approx(0.03)


FINETUNING_RESULTS = ("eval_results.json", "test_results.json", "train_results.json", "predictions.jsonl",
                      "finetune_config.json")


def test_a_new_run_replaces_every_result_file_of_the_other_script(corpus, tmp_path, tiny_init_dir):
    out = tmp_path / "out"
    out.mkdir()
    for name in FINETUNING_RESULTS:  # a finished fine-tuning run's results
        (out / name).write_text("{}")
    train_pretrain.main(tiny_args(corpus, out, "--max-steps", 1))
    assert [name for name in FINETUNING_RESULTS if (out / name).exists()] == []
    assert json.loads((out / "pretrain_config.json").read_text())["max_steps"] == 1
    rows = "text,label\n" + "".join(f"{' '.join(WORDS[i:i + 5])},{'ab'[i % 2]}\n" for i in range(12))
    (tmp_path / "train.csv").write_text(rows)
    train_finetune.main(["--init", str(tiny_init_dir), "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                         str(tmp_path / "train.csv"), "--max-steps", "1", "--output-dir", str(out), "--no-progress"])
    assert not (out / "pretrain_config.json").exists() and (out / "finetune_config.json").is_file()


@pytest.mark.parametrize("mask_prob", [0.15, 0.4])
def test_flops_per_token_counts_what_a_training_step_multiplies(mask_prob):
    """torch's FlopCounterMode counts every matmul of a real forward and backward pass: flops_per_token
    must give that count per token (eager attention, so that its two matmuls are plain bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    import minibert
    from minibert.pretraining import flops_per_token

    torch.manual_seed(0)
    config = minibert.BertConfig.preset("tiny", vocab_size=1000, hidden_size=64, num_attention_heads=2,
                                        num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
                                        attn_impl="eager")
    model = minibert.BertForPreTraining(config)
    B, T = 4, 100
    ids = torch.randint(5, 1000, (B, T))
    labels = torch.full((B, T), -100)
    masked = round(mask_prob * T)
    labels[:, :masked] = ids[:, :masked]
    with FlopCounterMode(display=False) as counter:
        out = model(ids, torch.ones(B, T, dtype=torch.long), labels=labels, next_sentence_label=torch.zeros(B, dtype=torch.long))
        out.loss.backward()
    assert flops_per_token(config, T, masked / T) == pytest.approx(counter.get_total_flops() / (B * T), rel=1e-9)


@pytest.mark.slow  # two fresh processes: a few seconds each on a quiet machine
def test_two_fresh_processes_from_empty_caches_give_the_same_tokenizer_shards_and_weights(corpus, tmp_path):
    """The README's promise for a CPU: each process trains its own tokenizer (its cache is empty) under another
    hash seed and tokenizers thread count, and both end with the same files and identical weights."""
    processes = []
    for run, hash_seed, rayon_threads in [("a", "1", "1"), ("b", "777", "2")]:
        env = {**os.environ, "MINIBERT_CACHE": str(tmp_path / f"cache-{run}"), "PYTHONHASHSEED": hash_seed,
               "RAYON_NUM_THREADS": rayon_threads, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "train_pretrain.py"), *tiny_args(corpus, tmp_path / run)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("tokenizer.json", "vocab.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    cached = [{str(p.relative_to(tmp_path / f"cache-{run}")): p.read_bytes()
               for p in sorted((tmp_path / f"cache-{run}").rglob("*")) if p.is_file()} for run in "ab"]
    assert any(name.startswith("tokenizers/wordpiece-") for name in cached[0])
    assert any(name.startswith("pretraining/") for name in cached[0])
    assert cached[0] == cached[1]  # the trained tokenizer and the shards, under the same cache keys
