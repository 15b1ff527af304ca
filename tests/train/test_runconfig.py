import os

import pytest

import dataclasses

from offload_bitnet.model.lora import ALL_TARGETS, ATTENTION
from offload_bitnet.store.units import MODES
from offload_bitnet.train.runconfig import (DEMO_DEFAULTS, TARGET_GROUPS, TRAINING_MODES, RunConfig, RunConfigError,
                                            demo_data_path, parse_targets, resume_fingerprint)
from offload_bitnet.train.runconfig_loading import flag_of, load_toml, parse_args
from repo_paths import REPO

ROOT = REPO
EXAMPLE_TOML = os.path.join(ROOT, "test_data", "run.toml")


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_is_the_demo():
    config = parse_args([])
    assert config.is_demo and config.experiment_name == "demo"
    assert config.data == [demo_data_path()] and os.path.isfile(config.data[0])
    for name, value in DEMO_DEFAULTS.items():
        assert getattr(config, name) == value
    assert config.run_dir == os.path.join("runs", "demo")


def test_demo_defaults_never_override_what_the_user_set():
    config = parse_args(["--lr", "1e-3", "--num-epochs", "2"])
    assert config.lr == 1e-3 and config.num_epochs == 2 and config.num_train_iters is None


def test_model_run_defaults():
    config = parse_args(["some/model-dir/", "--data", "a.jsonl", "--data", "b.txt"])
    assert config.experiment_name == "model-dir"
    assert config.data == ["a.jsonl", "b.txt"]
    assert config.lr is None and config.num_train_iters is None and config.max_seq_len == 512


def test_flags_override_the_toml_file_and_paths_resolve_against_it(tmp_path):
    path = write(tmp_path, 'data = ["train.jsonl"]\nlr = 1e-4\nbatch-size = 16\ngrad_accum = 4\n'
                           'prompts = "Hello"\nmemory_budget = "2GiB"\n')
    config = parse_args(["--config", path, "--lr", "5e-5"])
    assert config.lr == 5e-5 and config.source_of("lr") == "command line"
    assert config.batch_size == 16 and config.source_of("batch_size") == "run.toml"
    assert config.data == [str(tmp_path / "train.jsonl")]
    assert config.prompts == ["Hello"]
    assert config.memory_budget_bytes == 2 * 2**30
    assert config.micro_batch_size == 4


def test_example_toml_is_valid():
    config = parse_args(["--config", EXAMPLE_TOML])
    assert config.schedule == "two-stage" and config.experiment == "toml-demo"
    assert config.data == [os.path.join(ROOT, "test_data", "demo.txt")]


def test_mutually_exclusive_length_names_both_sources(tmp_path):
    path = write(tmp_path, "num_epochs = 2\n")
    with pytest.raises(RunConfigError) as info:
        parse_args(["--config", path, "--num-train-iters", "100"])
    message = str(info.value)
    assert "either num_epochs or num_train_iters" in message
    assert "num_epochs=2.0 (from run.toml)" in message and "num_train_iters=100 (from command line)" in message


def test_batch_size_must_divide_by_grad_accum():
    with pytest.raises(RunConfigError, match=r"batch_size \(6, from command line\) must be divisible by grad_accum "
                                             r"\(4, from command line\).*\[1, 2, 3, 6\]"):
        parse_args(["--batch-size", "6", "--grad-accum", "4"])


def test_every_problem_is_reported_at_once():
    with pytest.raises(RunConfigError) as info:
        parse_args(["--batch-size", "0", "--max-seq-len", "1", "--dropout", "1.5", "--lr", "-1",
                    "--until", "25:61", "--device", "tpu", "--eval-every", "-2"])
    message = str(info.value)
    for fragment in ("batch_size=0", "max_seq_len=1", "dropout=1.5", "lr=-1.0", "until='25:61'", "device='tpu'",
                     "eval_every=-2"):
        assert fragment in message
    assert message.count("\n  - ") >= 7


@pytest.mark.parametrize("args, fragment", [
    (["--lora-rank", "4"], "lora_rank=4 (from command line) applies only to --mode lora"),
    (["--merge"], "merge=True (from command line) applies only to --mode lora"),
    (["--mode", "lora", "--lora-targets", "q_proj,qkv"], "unknown projection 'qkv'"),
    (["--mode", "lora", "--lora-rank", "0"], "lora_rank=0 (from command line) must be a positive integer"),
    (["--mode", "lora", "--lora-dropout", "1"], "lora_dropout=1.0 (from command line) must be in [0, 1)"),
    (["--mode", "lora", "--export-path", "out"], "add --merge to fold them into the model"),
    (["--mode", "lora", "--quant-warmup", "10"], "--mode lora keeps frozen"),
    (["--mode", "full", "--quant-warmup", "10"], "needs a qat store"),
    (["--quant-warmup", "-1"], "quant_warmup=-1 (from command line) must be 0 or more"),
    (["--max-skipped-steps", "0"], "max_skipped_steps=0 (from command line) must be at least 1"),
    (["--mode", "int4"], "is not one of: qat, full, lora"),
    (["--state-dtype", "fp64"], "must be fp32, bf16 or int8 (8-bit blockwise)"),
    (["--state-dtype", "fp16"], "fp16 moments underflow"),
    (["--memory-budget", "lots"], "expected a size like 512MiB"),
    (["--schedule", "two-stage", "--warmup-fraction", "0.6"], "below 0.5 with the two-stage schedule"),
    (["--experiment", "../escape"], "may contain only letters"),
    (["--eta-min", "1", "--lr", "0.1"], "eta_min=1.0"),
    (["--schedule", "linear"], "schedule='linear' (from command line) is not one of: cosine, constant, two-stage"),
    (["--size", "huge"], "not a known size"),
    (["--max-hours", "0"], "max_hours=0.0"),
    (["model-dir"], "no training data: add --data FILE"),
])
def test_invalid_values_get_clear_messages(args, fragment):
    with pytest.raises(RunConfigError) as info:
        parse_args(args)
    assert fragment in str(info.value)


def test_toml_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(RunConfigError, match=r"run\.toml: unknown key 'learning_rat'; did you mean 'learning_rate'\?"):
        load_toml(write(tmp_path, "learning_rat = 1e-3\n"))
    assert load_toml(write(tmp_path, "learning-rate = 1e-3\nsteps = 5\n")) == {"lr": 1e-3, "num_train_iters": 5}
    with pytest.raises(RunConfigError, match=r"run\.toml: batch_size must be an integer, got 8\.5"):
        load_toml(write(tmp_path, "batch_size = 8.5\n"))
    with pytest.raises(RunConfigError, match=r"packing must be true or false, got 'yes'"):
        load_toml(write(tmp_path, 'packing = "yes"\n'))
    with pytest.raises(RunConfigError, match="is not valid TOML"):
        load_toml(write(tmp_path, "lr = = 3\n"))
    with pytest.raises(RunConfigError, match="does not exist"):
        load_toml(str(tmp_path / "missing.toml"))


def test_boolean_flags_have_negations():
    config = parse_args(["--no-plot", "--packing", "--train-on-prompt", "--skip-bad-records"])
    assert not config.plot and config.packing and config.train_on_prompt and config.skip_bad_records


def test_resume_fingerprint_uses_absolute_data_paths():
    config = RunConfig(data=["rel.txt"], val_data=["val.txt"])
    fingerprint = resume_fingerprint(config)
    assert fingerprint["data"] == [os.path.abspath("rel.txt")]
    assert fingerprint["val_data"] == [os.path.abspath("val.txt")]
    assert "seed" in fingerprint and "batch_size" in fingerprint and "max_hours" not in fingerprint


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--num-train-iters", "--grad-accum", "--max-hours", "--skip-bad-records", "--dry-run", "--config"):
        assert flag in out


def test_experiment_name_of_a_model_file_drops_the_extension(tmp_path):
    model = tmp_path / "Some Model.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    assert parse_args([str(model), "--data", "x.txt"]).experiment_name == "Some-Model.Q4_1"


def test_lora_options():
    config = parse_args(["model", "--data", "a.jsonl", "--mode", "lora", "--lora-rank", "16", "--lora-alpha", "32",
                         "--lora-targets", "v_proj, q_proj,mlp", "--merge", "--export-path", "out"])
    assert config.is_lora and config.store_mode is None  # LoRA leaves the base as the importer makes it
    assert config.lora_target_list == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    assert resume_fingerprint(config)["lora"] == {"rank": 16, "alpha": 32.0, "dropout": 0.0,
                                                  "targets": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
    assert "lora" not in resume_fingerprint(parse_args([]))
    assert parse_targets("all") == parse_targets("attention,mlp") and parse_targets("o_proj") == ("o_proj",)
    with pytest.raises(ValueError, match="name at least one projection"):
        parse_targets(" , ")


def test_lora_targets_from_toml_as_a_list_or_a_string(tmp_path):
    assert load_toml(write(tmp_path, 'mode = "lora"\nlora_targets = ["q_proj", "v_proj"]\n'))["lora_targets"] == \
        "q_proj,v_proj"
    assert load_toml(write(tmp_path, 'lora-targets = "attention"\n'))["lora_targets"] == "attention"
    with pytest.raises(RunConfigError, match="lora_targets must be a comma-separated string or a list of strings"):
        load_toml(write(tmp_path, "lora_targets = 3\n"))


def test_quant_warmup_makes_new_stores_qat():
    assert parse_args(["--quant-warmup", "20"]).store_mode == "qat"
    assert parse_args(["--mode", "qat", "--quant-warmup", "20"]).store_mode == "qat"
    assert parse_args([]).store_mode is None and parse_args(["--mode", "full"]).store_mode == "full"
    assert resume_fingerprint(parse_args(["--quant-warmup", "20"]))["quant_warmup"] == 20


DOCS = os.path.join(ROOT, "README.md")


def test_every_option_is_documented():
    """README.md names every RunConfig field by its flag (derived here, so a new field needs docs)."""
    text = open(DOCS).read()
    missing = [flag_of(f) for f in dataclasses.fields(RunConfig) if f.name != "model" and flag_of(f) not in text]
    assert not missing, f"README.md does not mention {missing}"
    assert "MODEL" in text


def test_tokenizer_option_and_toml_key(tmp_path):
    assert parse_args(["--tokenizer", "byte"]).tokenizer == "byte"
    (tmp_path / "run.toml").write_text('tokenizer = "tok/tokenizer.json"\n')
    config = parse_args(["--config", str(tmp_path / "run.toml")])
    assert config.tokenizer == str(tmp_path / "tok" / "tokenizer.json")  # relative to the TOML file
    (tmp_path / "byte.toml").write_text('tokenizer = "byte"\n')
    assert parse_args(["--config", str(tmp_path / "byte.toml")]).tokenizer == "byte"  # a name, not a path
    assert "tokenizer" not in resume_fingerprint(parse_args([]))  # runs from before the option resume as they were
    assert resume_fingerprint(config)["tokenizer"] == config.tokenizer


def test_training_modes_and_target_groups_come_from_their_one_definition():
    assert TRAINING_MODES == (*MODES, "lora")  # the store's modes, and LoRA beside a frozen store
    assert TARGET_GROUPS["all"] == ALL_TARGETS and TARGET_GROUPS["attention"] == ATTENTION
    assert set(TARGET_GROUPS["mlp"]) == set(ALL_TARGETS) - set(ATTENTION)
    assert parse_targets("mlp,q_proj") == ("q_proj", "gate_proj", "up_proj", "down_proj")
