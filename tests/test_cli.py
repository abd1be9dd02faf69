"""The scripts as command-line programs: --config FIELD=VALUE overrides, and how a run ends on Ctrl-C."""

import json
import logging

import pytest
from safetensors import safe_open
from test_finetune import sentiment_rows, write_csv

import train_finetune
import train_pretrain
from minibert.cli import CONFIG_FIELDS, config_overrides, interrupted_message, run_cli, setup_logging


def test_config_overrides_are_typed_by_the_field():
    assert config_overrides(["hidden_act=silu", "num_hidden_layers=4", "layer_norm_eps=1e-6", "unpad=false",
                             "classifier_dropout=none", "classifier_dropout = 0.2", 'id2label={"0": "neg", "1": "pos"}']) \
        == {"hidden_act": "silu", "num_hidden_layers": 4, "layer_norm_eps": 1e-6, "unpad": False,
            "classifier_dropout": 0.2, "id2label": {"0": "neg", "1": "pos"}}
    assert config_overrides([]) == {}
    assert "extra" not in CONFIG_FIELDS and "attn_impl" in CONFIG_FIELDS


@pytest.mark.parametrize("item, message", [
    ("hidden_layers=4", r"--config hidden_layers=4: BertConfig has no field 'hidden_layers'; the fields are vocab_size, "),
    ("num_hidden_layers", r"--config num_hidden_layers: give it as FIELD=VALUE; the fields are "),
    ("num_hidden_layers=4.5", r"num_hidden_layers takes an integer, not '4.5'; the fields are "),
    ("unpad=maybe", r"unpad takes true or false, not 'maybe'"),
    ("classifier_dropout=high", r"classifier_dropout takes a number or none, not 'high'"),
    ("id2label=[1]", r"id2label takes a JSON object or none"),
])
def test_a_wrong_override_is_one_line_naming_the_fields(item, message):
    with pytest.raises(ValueError, match=message) as error:
        config_overrides([item])
    assert "\n" not in str(error.value) and "hidden_act" in str(error.value)


def test_finetuning_with_config_overrides_trains_and_saves_that_model(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    out = tmp_path / "out"
    train_finetune.main(["--init", str(tiny_init_dir), "--train-file", str(train), "--validation-file", str(train),
                         "--output-dir", str(out), "--batch-size", "4", "--max-steps", "2", "--no-progress",
                         "--config", "hidden_act=silu", "--config", "num_hidden_layers=1"])
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_act"], config["num_hidden_layers"]) == ("silu", 1)
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert not any(".layer.1." in key for key in weights.keys()) and any(".layer.0." in key for key in weights.keys())
    assert json.loads((out / "finetune_config.json").read_text())["config"] == ["hidden_act=silu", "num_hidden_layers=1"]


def test_an_override_the_model_cannot_take_fails_before_training(tiny_init_dir, tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    args = ["--init", str(tiny_init_dir), "--train-file", str(train), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"hidden_size 32 is not divisible by num_attention_heads 5"):
        train_finetune.main([*args, "--config", "num_attention_heads=5"])
    with pytest.raises(ValueError, match="hidden_act 'swiglu' is not supported"):
        train_pretrain.main(["--data", str(train), "--output-dir", str(tmp_path / "pre"), "--config", "hidden_act=swiglu"])
    with pytest.raises(ValueError, match="BertConfig has no field 'depth'"):
        train_pretrain.main(["--data", str(train), "--output-dir", str(tmp_path / "pre"), "--config", "depth=2"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "pre").exists()


def test_ctrl_c_says_where_the_last_checkpoint_is_in_one_line(tmp_path, capsys):
    class Settings:
        output_dir = str(tmp_path / "run")

    def interrupted(settings):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as end:
        run_cli(interrupted, lambda argv: Settings(), "train_finetune.py")
    assert end.value.code == 130
    assert capsys.readouterr().err == (f"minibert: interrupted before the first checkpoint in {tmp_path / 'run'} was "
                                       "written: there is nothing to resume\n")
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "training_state.pt").write_bytes(b"")
    assert interrupted_message(str(tmp_path / "run"), "train_pretrain.py") == (
        f"minibert: interrupted; the last checkpoint is {tmp_path / 'run' / 'checkpoint'}: continue with "
        f"`python train_pretrain.py --output-dir {tmp_path / 'run'} --resume`")


def test_under_torchrun_only_rank_0_logs(monkeypatch):
    logger = logging.getLogger("minibert")
    level = logger.level
    monkeypatch.setenv("RANK", "1")
    try:
        setup_logging()
        assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)
    finally:
        logger.setLevel(level)
