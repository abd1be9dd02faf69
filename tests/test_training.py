"""The shared training loop: a fine-tuning trajectory equal to transformers', checkpoints and resume."""

import json
import logging
import os

import pytest
import torch
import transformers

import minibert
from conftest import CreatesAFile, padded_batch, tiny_hf_config
from minibert.training import Trainer, TrainingSettings, TrainState, linear_schedule


def batches(num, seed=0):
    out = []
    for i in range(num):
        ids, mask, types = padded_batch(lengths=(11, 7, 3, 9)[: 2 + i % 3], seed=seed + i)
        labels = torch.arange(ids.shape[0]) % 3
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels})
    return out


def test_finetuning_trajectory_equals_transformers(tmp_path):
    """Same initial weights, batches, optimizer (AdamW, no decay on biases/LayerNorm), warmup+linear
    decay and clipping: the losses of minibert and transformers' BertForSequenceClassification agree."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(tiny_hf_config(num_labels=3))
    hf.save_pretrained(tmp_path / "init")
    mb = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "init"))
    settings = TrainingSettings(lr=2e-3, weight_decay=0.01, warmup_ratio=0.25, max_grad_norm=0.5, grad_accum=2)
    steps = 8
    trainer = Trainer(mb, settings, total_steps=steps, output_dir=tmp_path / "run")

    no_decay = [p for n, p in hf.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in hf.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    hf_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=2e-3)
    hf_sched = transformers.get_linear_schedule_with_warmup(hf_opt, num_warmup_steps=2, num_training_steps=steps)
    hf.train()

    data = batches(2 * steps)
    for step in range(steps):
        micro = data[2 * step : 2 * step + 2]
        ours = trainer.step(micro)
        ref_loss = 0.0
        for b in micro:
            loss = hf(**b).loss / 2
            loss.backward()
            ref_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
        hf_lr = hf_opt.param_groups[0]["lr"]
        hf_opt.step()
        hf_sched.step()
        hf_opt.zero_grad()
        assert abs(ours["loss"] - ref_loss) < 1e-4, (step, ours["loss"], ref_loss)
        assert ours["lr"] == pytest.approx(hf_lr)
    # and training moved the weights the same way
    hf_w = hf.classifier.weight.detach()
    assert (mb.classifier.weight.detach() - hf_w).abs().max() < 1e-4


def test_a_step_with_its_own_loss_metrics_and_clipping_equals_transformers_by_hand(tmp_path):
    """loss_fn (class weights, as --class-weights passes it) replaces the model's loss; metrics_fn's values
    are averaged over the micro-batches; clipping at a norm the gradients exceed, with the norm before
    clipping reported. Each checked against transformers' model, stepped by hand."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(tiny_hf_config(num_labels=3))
    hf.save_pretrained(tmp_path / "init")
    mb = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "init"))
    weights = torch.tensor([0.2, 1.0, 3.0])

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float(), labels, weight=weights)

    def metrics_fn(out, batch):
        return {"first_logit": float(out.logits[0, 0]), "rows": float(len(batch["labels"]))}

    settings = TrainingSettings(lr=1e-2, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=0.05, grad_accum=2)
    trainer = Trainer(mb, settings, total_steps=3, output_dir=tmp_path / "run", loss_fn=loss_fn)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, weight_decay=0.0)
    hf_sched = transformers.get_linear_schedule_with_warmup(hf_opt, num_warmup_steps=0, num_training_steps=3)
    hf.train()
    data = batches(6)
    for step in range(3):
        micro = data[2 * step: 2 * step + 2]
        ours = trainer.step(micro, metrics_fn=metrics_fn)
        ref_loss, first = 0.0, 0.0
        for b in micro:
            logits = hf(**{k: v for k, v in b.items() if k != "labels"}).logits
            loss = loss_fn(logits, b["labels"]) / 2
            loss.backward()
            ref_loss, first = ref_loss + loss.item(), first + float(logits[0, 0]) / 2
        norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.05))
        hf_lr = hf_opt.param_groups[0]["lr"]
        hf_opt.step()
        hf_sched.step()
        hf_opt.zero_grad()
        assert norm > 0.05  # the clipping acted
        assert ours["loss"] == pytest.approx(ref_loss, abs=1e-5) and ours["grad_norm"] == pytest.approx(norm, rel=1e-4)
        rows = sum(len(b["labels"]) for b in micro) / 2  # the micro-batches hold 2 to 4 rows
        assert ours["first_logit"] == pytest.approx(first, abs=1e-5) and ours["rows"] == pytest.approx(rows)
        assert ours["lr"] == pytest.approx(hf_lr)
    assert (mb.classifier.weight.detach() - hf.classifier.weight.detach()).abs().max() < 1e-5


def test_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_layer_lr_decay_and_no_decay_groups():
    cfg = minibert.BertConfig.preset("tiny", vocab_size=50, num_labels=2)
    model = minibert.BertForSequenceClassification(cfg)
    groups = model.parameter_groups(weight_decay=0.1, layer_lr_decay=0.5)
    scale_of = {id(p): (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    assert scale_of[id(model.classifier.weight)] == (0.1, 1.0)
    assert scale_of[id(model.classifier.bias)] == (0.0, 1.0)
    assert scale_of[id(model.bert.layers[1].feed_forward.up.weight)] == (0.1, 0.5)  # top layer: decay**1
    assert scale_of[id(model.bert.layers[0].attention_norm.weight)] == (0.0, 0.25)
    assert scale_of[id(model.bert.embeddings.word.weight)] == (0.1, 0.125)  # decay**(L + 1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_parameter_groups_default_to_no_decay_and_leave_out_only_the_frozen():
    cfg = minibert.BertConfig.preset("tiny", vocab_size=50, num_labels=2)
    model = minibert.BertForSequenceClassification(cfg)
    assert {g["lr_scale"] for g in model.parameter_groups(weight_decay=0.1)} == {1.0}  # layer_lr_decay 1 by default
    for p in model.bert.embeddings.parameters():  # the first parameters: what follows them must stay in
        p.requires_grad_(False)
    grouped = [p for g in model.parameter_groups(weight_decay=0.1) for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) > 0 and {id(p) for p in grouped} == {id(p) for p in trainable}


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5])
def test_layer_lr_decay_outside_zero_to_one_is_refused(decay, tiny_init_dir, tmp_path):
    """0 raised ZeroDivisionError, -0.5 gave scales -0.5, 0.25, -0.125: gradient ascent on alternate layers."""
    import train_finetune

    model = minibert.BertForSequenceClassification(minibert.BertConfig.preset("tiny", vocab_size=50))
    with pytest.raises(ValueError, match=r"layer_lr_decay must be in \(0, 1\]"):
        model.parameter_groups(weight_decay=0.0, layer_lr_decay=decay)
    with pytest.raises(ValueError, match=r"--layer-lr-decay must be in \(0, 1\]"):
        TrainingSettings(layer_lr_decay=decay)
    with pytest.raises(ValueError, match=rf"--layer-lr-decay must be in \(0, 1\] .*got {decay}"):
        train_finetune.main(["--init", str(tiny_init_dir), "--output-dir", str(tmp_path / "out"), "--layer-lr-decay",
                             str(decay), "--no-progress"])
    assert not (tmp_path / "out").exists()


def test_init_weights_of_an_empty_part_changes_nothing():
    """`part or self` took an empty ModuleList (falsy) for "no part" and re-initialised the whole model."""
    model = minibert.BertForSequenceClassification(minibert.BertConfig.preset("tiny", vocab_size=50))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights(torch.nn.ModuleList())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.init_weights(model.classifier)  # a real part is drawn again, and only it
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"classifier.weight"}  # its bias was zero and stays zero


def test_checkpoint_resume_continues_exactly(tmp_path):
    """Save after 3 steps, keep training to 6; a new trainer resumed from the save reaches the same losses.
    Dropout is on, so the RNG state must be restored too."""
    cfg = minibert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=37, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = minibert.BertForSequenceClassification(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainingSettings(lr=1e-3, warmup_ratio=0.3)
    data = batches(6)
    trainer = Trainer(model, settings, total_steps=6, output_dir=tmp_path)
    losses = []
    for step in range(6):
        losses.append(trainer.step([data[step]])["loss"])
        if step == 2:
            trainer.save_checkpoint(TrainState(step=3))
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()

    fresh = minibert.BertForSequenceClassification(cfg)
    fresh.load_state_dict(initial)
    resumed = Trainer(fresh, settings, total_steps=6, output_dir=tmp_path)
    state = resumed.resume()
    assert state.step == 3
    again = [resumed.step([data[step]])["loss"] for step in range(3, 6)]
    assert again == losses[3:]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    model = minibert.BertForSequenceClassification(minibert.BertConfig.preset("tiny", vocab_size=50))
    trainer = Trainer(model, TrainingSettings(), total_steps=1, output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        trainer.resume()


def test_damaged_checkpoint_says_to_delete_it(tmp_path):
    model = minibert.BertForSequenceClassification(minibert.BertConfig.preset("tiny", vocab_size=50))
    trainer = Trainer(model, TrainingSettings(), total_steps=2, output_dir=tmp_path)
    trainer.save_checkpoint(TrainState(step=1))
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short outside minibert
    with pytest.raises(ValueError, match=f"cannot read the checkpoint .*: delete {tmp_path / 'checkpoint'} and start again") as err:
        trainer.resume()
    assert "\n" not in str(err.value)


def test_help_text_comes_from_the_comment_on_or_above_each_setting():
    from minibert.cli import field_comments

    source = '''
@dataclass
class Settings:
    # --- data ---
    train_file: str | None = None  # a CSV file
    # Train on a subset of N examples,
    # for quick runs.
    max_train_examples: int = 0
    seed: int = 42
'''
    assert field_comments(source) == {"train_file": "a CSV file", "max_train_examples": "Train on a subset of N examples, for quick runs.",
                                      "seed": ""}


def test_a_kill_while_a_checkpoint_is_removed_leaves_all_of_it_or_none(tmp_path, monkeypatch):
    """rmtree deletes in no useful order: killed halfway, it left a folder with training_state.pt but no
    weights, which the next run took for a checkpoint and could not read. The marker now goes first."""
    import shutil

    from minibert import runs

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("model.safetensors", "config.json", "training_state.pt"):
        (checkpoint / name).write_text("x")
    assert runs.find_checkpoint(tmp_path) == checkpoint
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # killed right after the first unlink
    runs.remove_checkpoint(checkpoint)
    assert runs.find_checkpoint(tmp_path) is None and (checkpoint / "model.safetensors").exists()


def test_a_finished_run_leaves_no_checkpoint_or_temporary_files(tmp_path):
    from minibert.training import Distributed

    model = minibert.BertModel(minibert.BertConfig.preset("tiny", vocab_size=50, max_position_embeddings=16))
    trainer = Trainer(model, TrainingSettings(lr=1e-3), 10, tmp_path, Distributed())
    trainer.save_checkpoint(TrainState())
    # what kills at the wrong moment leave: a checkpoint being replaced, temporary files of atomic writes
    (tmp_path / ".checkpoint.old").mkdir()
    (tmp_path / ".model.safetensors.a1b2.tmp").write_text("")
    (tmp_path / ".tmpq9z8").write_text("")
    (tmp_path / "predictions.jsonl").write_text("{}\n")
    trainer.remove_checkpoints()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]


# ----------------------------------------------------------------------------- the training state file


def test_resume_forgets_the_metrics_logged_after_the_checkpoint_and_keeps_the_run_settings(tmp_path, minilm_dir):
    """A run killed after its step-2 checkpoint had logged steps 3 and 4: the resumed run logs them again,
    so they go. The checkpoint holds the run's settings (run_config.json) and its tokenizer, and the
    resumed model keeps the attention settings the resuming run asked for, not the saved ones."""
    config = minibert.BertConfig.preset("tiny", vocab_size=50).replace(attn_impl="eager", unpad=False)
    trainer = Trainer(minibert.BertForSequenceClassification(config), TrainingSettings(), total_steps=6,
                      output_dir=tmp_path / "run")
    for step in (1, 2):
        trainer.log_metrics({"step": step, "loss": 1.0 / step})
    train_file = tmp_path / "train.csv"
    train_file.write_text("text,label\n")
    trainer.save_checkpoint(TrainState(step=2), tokenizer=minibert.load_tokenizer(minilm_dir),
                            run_config={"lr": 1e-3, "train_file": os.path.relpath(train_file)})
    for step in (3, 4):
        trainer.log_metrics({"step": step, "loss": 1.0 / step})
    saved = json.loads((trainer.checkpoint_dir / "run_config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["train_file"] == str(train_file.resolve())  # resumable from elsewhere
    assert (trainer.checkpoint_dir / "tokenizer.json").is_file()
    resumed = Trainer(minibert.BertForSequenceClassification(config.replace(attn_impl="sdpa", unpad=True)),
                      TrainingSettings(), total_steps=6, output_dir=tmp_path / "run")
    assert resumed.resume().step == 2
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]
    assert resumed.model.config.attn_impl == "sdpa" and resumed.model.config.unpad is True


def saved_trainer(tmp_path):
    model = minibert.BertForSequenceClassification(minibert.BertConfig.preset("tiny", vocab_size=50))
    trainer = Trainer(model, TrainingSettings(), total_steps=2, output_dir=tmp_path)
    trainer.save_checkpoint(TrainState(step=1))
    return trainer


def test_a_training_state_that_would_run_code_is_refused_and_runs_none(tmp_path):
    trainer = saved_trainer(tmp_path / "run")
    marker = tmp_path / "created-by-the-pickle"
    state_file = tmp_path / "run" / "checkpoint" / "training_state.pt"
    torch.save({**torch.load(state_file, weights_only=True), "optimizer": CreatesAFile(marker)}, state_file)
    with pytest.raises(ValueError, match="holds Python objects besides tensors and plain values.*could run code") as err:
        trainer.resume()
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_training_state_of_the_previous_format_is_a_clear_error(tmp_path):
    """The previous format kept numpy's RNG state object, which only a full (code-running) unpickler reads."""
    import random

    import numpy as np

    trainer = saved_trainer(tmp_path)
    state_file = tmp_path / "checkpoint" / "training_state.pt"
    saved = torch.load(state_file, weights_only=True)
    old = {key: saved[key] for key in ("optimizer", "scheduler", "scaler", "state")}
    old["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save(old, state_file)
    with pytest.raises(ValueError, match=f"written by an older minibert.*delete {tmp_path / 'checkpoint'}") as err:
        trainer.resume()
    assert "\n" not in str(err.value)


def test_every_random_generator_is_restored_from_tensors_and_plain_values():
    import random

    import numpy as np

    from minibert.runs import rng_state, set_rng_state

    random.random(), np.random.normal(), torch.rand(1)  # numpy now holds a cached Gaussian, part of its state
    state = rng_state()
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3).tolist())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(state)
    assert (random.random(), np.random.normal(), np.random.rand(), torch.rand(3).tolist()) == expected


def test_each_rank_seeds_its_own_dropout_and_rank_zero_keeps_the_seed():
    import random

    import numpy as np

    from minibert.training import seed_everything

    def dropout_mask(seed, rank):
        seed_everything(seed, rank)
        return torch.nn.functional.dropout(torch.ones(1000), 0.5) != 0

    torch.manual_seed(7)
    single_process = torch.nn.functional.dropout(torch.ones(1000), 0.5) != 0
    assert torch.equal(dropout_mask(7, 0), single_process)  # a one-process run draws what it always did
    assert not torch.equal(dropout_mask(7, 1), dropout_mask(7, 0))
    assert torch.equal(dropout_mask(7, 1), dropout_mask(7, 1))  # and a rerun draws it again
    assert not torch.equal(dropout_mask(7, 1), dropout_mask(8, 1))
    # Python's and numpy's generators too: rank 0 (the default) from the seed itself, a rerun the same draws
    seed_everything(7)
    first = (random.random(), np.random.rand())
    random.seed(7), np.random.seed(7)
    assert (random.random(), np.random.rand()) == first
    seed_everything(7, 1)
    assert (random.random(), np.random.rand()) != first
    rank1 = int(np.random.SeedSequence([7, 1]).generate_state(1)[0])  # the documented rank seed, 32 bits
    seed_everything(7, 1)
    assert torch.initial_seed() == rank1
    assert (random.random(), np.random.rand()) == (random.Random(rank1).random(), np.random.RandomState(rank1).rand())


# ----------------------------------------------------------------------------- one live run per folder


def test_a_second_run_in_a_live_runs_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from minibert.runs import hold_output_dir
    from minibert.training import Distributed

    out = tmp_path / "out"
    with hold_output_dir(out, Distributed()):
        # Another open of the lock file, as another process's would be (flock locks belong to open files).
        with pytest.raises(FileExistsError, match=f"--output-dir {out} is in use by a live run \\(pid {os.getpid()} on "
                                                  f"host {socket.gethostname()}") as err:
            with hold_output_dir(out, Distributed()):
                pass
        assert "\n" not in str(err.value)
        (out / "model.safetensors").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # the lock goes with its run

    # kill -9 leaves no stale lock: the kernel releases it with the process.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from minibert.runs import hold_output_dir; from minibert.training import Distributed\n"
         "with hold_output_dir(sys.argv[1], Distributed()):\n    print('held', flush=True); time.sleep(300)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=f"pid {holder.pid} on host"):
            with hold_output_dir(out, Distributed()):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_output_dir(out, Distributed()):
        pass


def test_a_folder_made_for_a_run_that_stops_on_bad_input_is_removed(tmp_path):
    from minibert.runs import hold_output_dir
    from minibert.training import Distributed

    with pytest.raises(ValueError, match="bad input"):
        with hold_output_dir(tmp_path / "new" / "out", Distributed()):
            raise ValueError("bad input")
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file: give a folder"):
        with hold_output_dir(tmp_path / "file", Distributed()):
            pass
    with pytest.raises(ValueError, match="--output-dir /proc/minibert-run cannot be written"):  # even for root
        with hold_output_dir("/proc/minibert-run", Distributed()):
            pass


def test_throughput_counts_the_recent_steps_only_and_their_own_time():
    """It once divided everything since the start by the time since the start, evaluations included."""
    from minibert.training import Throughput

    speed = Throughput(window=2)
    assert speed.update(100, 1.0) == 100.0
    assert speed.update(300, 1.0) == 200.0  # (100 + 300) / 2 s
    assert speed.update(30, 2.0) == 110.0  # (300 + 30) / 3 s: the first step has left the window


# ----------------------------------------------------------------------------- optimizer groups and precision


def test_layer_lr_decay_moves_each_layer_at_its_own_rate():
    """AdamW's first step moves each weight by lr * g / (|g| + eps), which is lr for every weight whose
    gradient is far above eps: with layer_lr_decay 0.5 the largest move in the classifier is the lr, in
    the top layer half of it, in the bottom layer a quarter, in the embeddings an eighth (hand-computed,
    no weight decay, no warmup, no clipping)."""
    torch.manual_seed(0)
    model = minibert.BertForSequenceClassification(minibert.BertConfig.preset("tiny", vocab_size=99, num_labels=3))
    lr = 1e-3
    settings = TrainingSettings(lr=lr, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=0.0, layer_lr_decay=0.5)
    trainer = Trainer(model, settings, total_steps=100, output_dir="unused")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.step(batches(1))
    assert result["lr"] == lr and result["grad_norm"] is None  # the logged rate is the peak one; clipping is off
    moved = {k: (v - before[k]).abs().max().item() for k, v in model.state_dict().items()}
    expected = {"classifier.weight": lr, "bert.layers.1.feed_forward.up.weight": lr / 2,
                "bert.layers.0.attention.query.weight": lr / 4, "bert.embeddings.word.weight": lr / 8}
    assert {k: moved[k] for k in expected} == pytest.approx(expected, rel=1e-3)


def test_bf16_on_the_cpu_runs_under_autocast_and_keeps_fp32_weights(tmp_path):
    """--precision bf16 on a CPU: the forward pass runs in bfloat16 (the loss is transformers' under the same
    autocast, and not the fp32 loss), the weights and their update stay float32."""
    torch.manual_seed(0)
    # weights of std 0.5 give logits far from 0, where bfloat16's rounding shows in the loss
    hf = transformers.BertForSequenceClassification(tiny_hf_config(num_labels=3, initializer_range=0.5)).eval()
    hf.save_pretrained(tmp_path / "init")
    data = batches(1)
    losses = {}
    for precision in ("fp32", "bf16"):
        model = minibert.BertForSequenceClassification.from_pretrained(str(tmp_path / "init"), verbose=False)
        trainer = Trainer(model, TrainingSettings(lr=1e-3, precision=precision), total_steps=10, output_dir="unused")
        losses[precision] = trainer.step(data)["loss"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        fp32 = hf(**data[0]).loss.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = hf(**data[0]).loss.item()
    assert losses["fp32"] == pytest.approx(fp32, abs=1e-5)
    assert abs(losses["bf16"] - losses["fp32"]) > 1e-4  # bfloat16 keeps 8 bits of mantissa: it shows
    assert losses["bf16"] == pytest.approx(bf16, abs=abs(bf16 - fp32) / 2)


# ----------------------------------------------------------------------------- precision


def native_bf16(monkeypatch, amx: bool, avx512_bf16: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def precision_log(caplog, precision, switch=None, monkeypatch=None):
    from minibert import training

    if switch is not None:
        monkeypatch.setattr(training, "CPU_AUTO_BF16", switch)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minibert"):
        chosen = training.resolve_precision(precision, torch.device("cpu"))
    return chosen, [(r.levelname, r.getMessage()) for r in caplog.records]


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (False, False)])
def test_training_auto_on_the_cpu_is_fp32_and_the_log_says_why(monkeypatch, caplog, amx, avx512_bf16):
    native_bf16(monkeypatch, amx, avx512_bf16)
    chosen, records = precision_log(caplog, "auto")
    [(level, line)] = records
    assert chosen == "fp32" and level == "INFO" and line.startswith("minibert: training in fp32 (auto: fp32")
    # a CPU with AMX is told how to use it; one without is told why bf16 would not pay
    assert ("--precision bf16 trains in it" in line) == amx
    assert ("neither AMX nor AVX512-BF16" in line) == (not (amx or avx512_bf16))
    assert ("AVX512-BF16 but no AMX" in line) == (avx512_bf16 and not amx)


@pytest.mark.parametrize("amx, avx512_bf16, chosen, reason", [
    (True, False, "bf16", "AMX"), (False, True, "fp32", "AVX512-BF16 but no AMX"),
    (False, False, "fp32", "neither AMX nor AVX512-BF16")])
def test_with_the_switch_on_auto_trains_in_bf16_exactly_where_the_cpu_has_it(monkeypatch, caplog, amx, avx512_bf16,
                                                                             chosen, reason):
    native_bf16(monkeypatch, amx, avx512_bf16)
    got, [(level, line)] = precision_log(caplog, "auto", switch=True, monkeypatch=monkeypatch)
    assert got == chosen and level == "INFO" and line.startswith(f"minibert: training in {chosen} (auto") and reason in line


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_runs_and_warns_once_naming_fp32(monkeypatch, caplog, amx):
    native_bf16(monkeypatch, amx)
    chosen, records = precision_log(caplog, "bf16")
    warnings = [line for level, line in records if level == "WARNING"]
    assert chosen == "bf16" and ("minibert: training in bf16 (as requested)" in [line for _, line in records])
    if amx:
        assert warnings == []
    else:
        [warning] = warnings
        assert "emulates bf16" in warning and "--precision fp32" in warning and "\n" not in warning
    assert precision_log(caplog, "fp32")[1] == [("INFO", "minibert: training in fp32 (as requested)")]


def test_fp16_on_the_cpu_is_a_one_line_error():
    from minibert.training import resolve_precision

    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU") as err:
        resolve_precision("fp16", torch.device("cpu"))
    assert "\n" not in str(err.value)
