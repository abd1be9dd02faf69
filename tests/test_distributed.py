"""Both scripts under torchrun (2 CPU processes, gloo), end to end: each rank draws its own dropout, a
killed run resumes with exactly the losses of an uninterrupted one on every rank, and a second run in the
folder of a live one stops at once while the live one finishes unharmed.

The runs go through tests/ddp_probe.py, which records each rank's own losses and dropout masks. These
are the slowest tests of the suite (a torchrun start costs seconds), so each run serves several checks.
"""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers

import train_finetune
import train_pretrain

ROOT = Path(__file__).parents[1]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def probe(script, record, *args, stop_after=0, hold="-"):
    return [*TORCHRUN, str(ROOT / "tests" / "ddp_probe.py"), script, str(record), str(stop_after), str(hold), "--",
            *map(str, args)]


def run(cmd, **kwargs):
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(record_dir, rank):
    lines = [json.loads(line) for line in (Path(record_dir) / f"rank{rank}.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def wait_for_pid(record_dir, live, timeout=240):
    """The live run's pid, once it holds its output folder and waits at the probe's hold."""
    path = Path(record_dir) / "rank0.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert live.poll() is None, live.communicate()[1][-3000:]
        if path.is_file() and path.read_text().strip():
            return json.loads(path.read_text().splitlines()[0])["pid"]
        time.sleep(0.1)
    raise AssertionError("the live run did not start")


def check_live_run_and_second_run(tmp_path, script, args, second_run):
    """Start the reference run, held before its first step; a second run in its folder must stop at once,
    naming it; then the reference run goes on and must finish. Returns the reference run's stdout (its log)."""
    live = subprocess.Popen(probe(script, tmp_path / "a", *args, "--output-dir", tmp_path / "a-out",
                                  hold=tmp_path / "go"), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_pid(tmp_path / "a", live)
        second = second_run(tmp_path / "a-out")
        (tmp_path / "go").touch()
        stdout, stderr = live.communicate(timeout=300)
    finally:
        (tmp_path / "go").touch()  # never leave its workers waiting
        live.kill()
    assert live.returncode == 0, stderr[-3000:]
    expected = f"--output-dir {tmp_path / 'a-out'} is in use by a live run (pid {pid} on host {socket.gethostname()}"
    assert expected in second, second[-3000:]
    assert not (tmp_path / "a-out" / ".minibert-run.lock").exists()  # a finished run leaves no lock behind
    return stdout


def check_ranks_and_resume(tmp_path, script, args, stop_after, resumed_from):
    """The ranks' dropout masks differ at every step; the run killed after `stop_after` steps, resumed from
    its checkpoint at step `resumed_from`, repeats the reference run's losses and masks exactly, rank by rank.

    The examples have different lengths, so the ranks' batches have different shapes and draw different
    numbers of random values: when both ranks were seeded alike, their generators agreed at the first step
    only (the masks there were the same), and a resume that gave every rank rank 0's generator was wrong
    from the first step after it. Masks of different lengths compare on their common beginning: a
    generator in one state draws the same first values whatever the size."""
    out = tmp_path / "b-out"
    run(probe(script, tmp_path / "b", *args, "--output-dir", out, stop_after=stop_after))
    # A different number of processes would give each rank other data and other random states.
    main = train_finetune.main if script == "finetune" else train_pretrain.main
    with pytest.raises(ValueError, match="started with 2 process\\(es\\) and is resumed with 1: resume it with 2"):
        main(["--output-dir", str(out), "--resume", "--no-progress"])
    run(probe(script, tmp_path / "b", "--output-dir", out, "--resume", "--no-progress"))

    reference = [records(tmp_path / "a", rank) for rank in (0, 1)]
    assert len(reference[0]) == len(reference[1]) == 6
    assert any(r0["shape"] != r1["shape"] for r0, r1 in zip(*reference))
    for r0, r1 in zip(*reference):
        common = min(len(r0["mask"]), len(r1["mask"]))
        assert r0["mask"][:common] != r1["mask"][:common]
    for rank in (0, 1):
        killed_and_resumed = records(tmp_path / "b", rank)
        expected = reference[rank][:stop_after] + reference[rank][resumed_from:]
        assert [r["loss"] for r in killed_and_resumed] == [r["loss"] for r in expected], rank
        assert [r["mask"] for r in killed_and_resumed] == [r["mask"] for r in expected], rank


@pytest.mark.slow
def test_finetune_under_torchrun(tiny_init_dir, tmp_path):
    texts = [("great fun film", "pos"), ("dull sad film", "neg"), ("a fine and good show today", "pos"),
             ("a bad and poor show today", "neg")]
    rows = [texts[i % 4] for i in range(16)]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    data = tmp_path / "train.csv"
    args = ["--init", tiny_init_dir, "--train-file", data, "--validation-file", data, "--test-file", data,
            "--batch-size", 4, "--max-steps", 6, "--eval-steps", 3, "--lr", "1e-3", "--dropout", 0.2, "--no-group-by-length", "--no-progress"]
    def second_run(out):  # the other script, called here in the test's process
        with pytest.raises(FileExistsError) as err:
            train_pretrain.main(["--output-dir", str(out), "--preset", "tiny", "--max-steps", "1", "--no-progress"])
        return str(err.value)

    log = check_live_run_and_second_run(tmp_path, "finetune", args, second_run)
    assert log.count("minibert: newly initialised") == 1  # one-time messages: rank 0 only
    # What the live run wrote: evaluated on rank 0 at steps 3 and 6, logged once, one model that transformers loads.
    logged = [json.loads(line) for line in (tmp_path / "a-out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "eval"] == [3, 6]
    assert [r["step"] for r in logged if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "a-out" / "predictions.jsonl").read_text().splitlines()) == 16
    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "a-out")
    # Killed after step 3, whose evaluation wrote a checkpoint, and resumed from there.
    check_ranks_and_resume(tmp_path, "finetune", args, stop_after=3, resumed_from=3)


@pytest.mark.slow
def test_pretrain_under_torchrun(tiny_init_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBERT_CACHE", str(tmp_path / "cache"))
    words = "the cat dog sat on a mat and ran to house garden tree bird sang river walked over".split()
    rng = random.Random(0)
    # Sentences of 4 to 14 words, without NSP: rows of one sentence each, of different lengths.
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(40))
            for _ in range(8)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    args = ["--data", tmp_path / "corpus.txt", "--preset", "tiny", "--num-layers", 1, "--hidden-size", 32,
            "--num-heads", 2, "--vocab-size", 120, "--seq-len", 16, "--batch-size", 8, "--max-steps", 6,
            "--eval-steps", 6, "--eval-batches", 1, "--save-steps", 2, "--heldout-fraction", 0.2, "--lr", "1e-3",
            "--no-nsp", "--no-progress"]
    def second_run(out):  # the other script, under torchrun: both of its ranks must stop, each saying why
        result = subprocess.run([*TORCHRUN, str(ROOT / "train_finetune.py"), "--init", str(tiny_init_dir), "--output-dir",
                                 str(out), "--max-steps", "1", "--no-progress"], env=env(), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode != 0
        assert result.stderr.count("error: --output-dir") == 2, result.stderr[-3000:]
        return result.stderr

    check_live_run_and_second_run(tmp_path, "pretrain", args, second_run)
    check_ranks_and_resume(tmp_path, "pretrain", args, stop_after=3, resumed_from=2)


def assert_close_results(got, expected, where="results"):
    """Nested results (seeds_results.json): every number within 1e-6, everything else equal."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_close_results(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-6), where
    else:
        assert got == expected, where


@pytest.mark.slow
@pytest.mark.parametrize("method, flags", [
    ("full, --seeds", ["--lr", "1e-2", "--seeds", "3,5"]),
    ("lora", ["--lr", "5e-2", "--lora-rank", 4, "--lora-targets", "query,value,down", "--lora-dropout", 0]),
])
def test_finetune_two_processes_equal_one_process_with_the_same_global_batch(tiny_init_dir, tmp_path, method, flags):
    """torchrun with 2 processes of 4 examples against one process taking 2 accumulation steps of 4: with
    8 training examples each step takes all of them (one global batch an epoch), so which rank holds which
    example does not matter, and the two runs must agree in losses, evaluations and weights (a LoRA run's
    merged model and its adapter; with --seeds, each seed's run, the kept one and seeds_results.json).
    Dropout is off, LoRA's too: each rank draws its own masks, by design."""
    import torch
    from safetensors.torch import load_file

    texts = ["great fun film", "dull sad film", "a fine and good show today", "a bad and poor show today"]
    rows = [(texts[i % 4], "pos" if i % 2 == 0 else "neg") for i in range(8)]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    data = tmp_path / "train.csv"
    args = ["--init", tiny_init_dir, "--train-file", data, "--validation-file", data, "--batch-size", 4, "--epochs", 3,
            "--warmup-ratio", 0, "--dropout", 0, "--precision", "fp32", "--no-progress", *flags]
    # One thread, as each torchrun process has (OMP_NUM_THREADS=1): a matrix product split over two threads rounds
    # otherwise, and AdamW, which divides each gradient element by its own running size, turns a last-bit
    # difference in an element whose gradients nearly cancel into ~1e-5 in its weight.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_finetune.main([*map(str, args), "--grad-accum", "2", "--output-dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    run([*TORCHRUN, str(ROOT / "train_finetune.py"), *map(str, args), "--output-dir", str(tmp_path / "two")])

    def logged(out, split):
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]

    one, two = tmp_path / "one", tmp_path / "two"
    runs = ["seeds/seed-3", "seeds/seed-5", "."] if "--seeds" in flags else ["."]  # "." with --seeds: the kept run
    weights = ["model.safetensors"] + (["adapter/adapter_model.safetensors"] if method == "lora" else [])
    for folder in runs:
        assert [r["step"] for r in logged(two / folder, "train")] == [1, 2, 3], folder
        for split, key in (("train", "loss"), ("eval", "accuracy")):
            assert [r[key] for r in logged(two / folder, split)] == pytest.approx(
                [r[key] for r in logged(one / folder, split)], abs=1e-6), folder
        for name in weights:
            a, b = load_file(one / folder / name), load_file(two / folder / name)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{folder}/{name}: {key}")
        losses = [r["loss"] for r in logged(one / folder, "train")]
        assert abs(losses[2] - losses[0]) > 1e-4  # it trained: a run that took no step would agree as well
    if "--seeds" in flags:
        assert logged(one / runs[0], "train") != logged(one / runs[1], "train")  # the seeds make different runs
        assert_close_results(json.loads((two / "seeds_results.json").read_text()),
                             json.loads((one / "seeds_results.json").read_text()))
        assert not (two / "seeds" / "run_config.json").exists()  # finished: nothing left to continue
    if method == "lora":  # and the adapter of the 2-process run is one that peft reads as minibert wrote it
        peft = pytest.importorskip("peft")
        base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_init_dir, num_labels=2)
        theirs = peft.PeftModel.from_pretrained(base, two / "adapter").eval()
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(two).eval()
        inputs = transformers.AutoTokenizer.from_pretrained(tiny_init_dir)(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            assert (theirs(**inputs).logits - merged(**inputs).logits).abs().max() <= 1e-5
        trained = load_file(two / "adapter" / "adapter_model.safetensors")
        assert all(trained[k].any() for k in trained if ".lora_B." in k)  # B moved off zero: the update is not empty
