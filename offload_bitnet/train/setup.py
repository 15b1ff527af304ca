"""What a run prepares before its first step: the store (created, imported or reused, and its settings checked
against the request), the data (checked against the model's vocabulary), the run length and the engine options."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import shutil

from offload_bitnet.engine.streaming import EngineOptions
from offload_bitnet.formats import ensure_store, hf, import_model
from offload_bitnet.formats.adapters import peft_base_model
from offload_bitnet.model.adamw import AdamWConfig
from offload_bitnet.model.lora import AdapterCheckpoint, LoRAConfig
from offload_bitnet.store.blockstore import BlockStore, StoreSettings, no_master_weights, store_is_complete
from offload_bitnet.store.write import create_model
from offload_bitnet.tokenizers.loaders import install_tokenizer
from offload_bitnet.train import data as datalib
from offload_bitnet.train.messages import TrainError, say
from offload_bitnet.train.records import DataOptions
from offload_bitnet.train.run_commands import RunCommand
from offload_bitnet.train.run_folder import (RunPaths, check_run_folder, restart_run, source_label, training_kind,
                                             write_json)
from offload_bitnet.train.runconfig import RunConfig


def prepare_store(config: RunConfig, paths: RunPaths, command: RunCommand) -> None:
    """Create (demo) or import the store into the run folder unless a finished one is already there."""
    os.makedirs(paths.run_dir, exist_ok=True)
    if config.restart:
        restart_run(config, paths, command)
    recorded = check_run_folder(config, paths, command)
    if paths.origin == "cache":
        paths.store_dir = ensure_store(config.model, progress=True)  # imports, or says it uses the cache
    elif paths.origin != "store" and not store_is_complete(paths.store_dir):
        if os.path.exists(paths.store_dir):
            say(f"removing the unfinished store {paths.store_dir} (its creation or import was interrupted)")
            shutil.rmtree(paths.store_dir)
        if paths.origin == "demo":
            say(f"creating a {config.size} BitNet model in {paths.store_dir} (random init, seed {config.seed}); "
                f"re-running the same command resumes this run, {command.restart} starts it over")
            create_model(paths.store_dir, size=config.size, arch="bitnet", mode=config.store_mode,
                         state_dtype=config.state_dtype or "fp32", seed=config.seed)
        else:
            if not config.is_lora and hf.is_packed_checkpoint(config.model):  # refused before a long import
                raise TrainError(no_master_weights(f"{config.model} is a packed BitNet checkpoint"))
            say(f"importing {config.model} into {paths.store_dir} (the original is left untouched)")
            import_model(config.model, paths.store_dir, import_settings(config), progress=True)
        if config.tokenizer:  # the run's own copy carries the tokenizer it is trained with (test_gen, exports)
            install_tokenizer(paths.store_dir, config.tokenizer)
    if not recorded or config.restart:
        write_json(paths.run_json, {"source": source_label(config), "store": paths.store_dir,
                                    "training": training_kind(config),
                                    "created": datetime.datetime.now().isoformat(timespec="seconds")})


def import_settings(config: RunConfig) -> StoreSettings | None:
    """Store settings for an import: the importer's defaults unless --mode (qat/full), --quant-warmup or
    --state-dtype asks otherwise."""
    if config.store_mode is None and config.state_dtype is None:
        return None
    mode = config.store_mode or guess_mode(config.model)
    return StoreSettings(mode=mode, state_dtype=config.state_dtype or "fp32")


def guess_mode(model_path: str) -> str:
    """qat for a BitNet Hugging Face folder, full otherwise (the importers' own default)."""
    config_path = os.path.join(model_path, "config.json")
    text = open(config_path).read().lower() if os.path.isfile(config_path) else ""
    return "qat" if "bitnet" in text else "full"


def check_store_settings(config: RunConfig, store: BlockStore):
    """Mode and optimizer-state dtype are fixed when a store is made; refuse a request to change them, and
    training the weights of a store that has none to train (packed-only)."""
    if not config.is_lora:
        store.require_master_weights()
    if config.quant_warmup > 0 and store.settings.mode != "qat":
        raise TrainError(f"{config.describe('quant_warmup')} needs a qat store (full-precision shadow weights "
                         f"with a ternary copy), but {store.path} is a {store.settings.mode} store. Import the "
                         "model with --mode qat: python finetune.py MODEL --mode qat --quant-warmup N ... (under a "
                         "new --experiment NAME, or with --restart), or offload-bitnet import MODEL OUT --mode qat.")
    wanted_mode = None if config.is_lora else config.store_mode
    for name, wanted, actual in (("mode", wanted_mode, store.settings.mode),
                                 ("state_dtype", None if config.is_lora else config.state_dtype,
                                  store.settings.state_dtype)):
        if wanted is not None and wanted != actual:
            raise TrainError(f"{config.describe(name)} differs from the store's {name} {actual!r} "
                             f"({store.path}); it is fixed when a store is created or imported. Drop the option, "
                             "or train a fresh import under a new --experiment NAME.")


def default_lr(config: RunConfig, store: BlockStore) -> float:
    if config.lr is not None:
        return config.lr
    if config.is_lora:
        return 2e-4
    return 1e-4 if store.settings.mode == "qat" else 2e-5


def load_data(config: RunConfig, tokenizer, vocab_size: int) -> datalib.Dataset:
    """The run's dataset, checked against the model's vocabulary."""
    options = DataOptions(max_seq_len=config.max_seq_len, data_format=config.data_format,
                                  completion_only=not config.train_on_prompt,
                                  skip_bad_records=config.skip_bad_records, packing=config.packing)
    dataset = datalib.load_dataset(config.data, config.val_data, tokenizer, options, config.val_fraction, config.seed)
    top = dataset.max_token_id()
    if top >= vocab_size:
        raise TrainError(f"the tokenizer produced token id {top}, but the model's vocabulary has only {vocab_size} "
                         "entries: the store's tokenizer does not match its model")
    return dataset


def files_digest(paths: list[str]) -> str:
    """SHA-256 over the data files' bytes: a resumed run must read the same data, not just the same names."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def total_steps(config: RunConfig, dataset: datalib.Dataset) -> int:
    if config.num_train_iters is not None:
        return config.num_train_iters
    return dataset.steps_for_epochs(config.num_epochs if config.num_epochs is not None else 1.0, config.batch_size)


def run_adapter_options(options: EngineOptions, store: BlockStore, paths: RunPaths, share=None) -> EngineOptions:
    """LoRA: ``options`` with the run's adapter folder as the engine's commit record. The trainer owns the folder:
    it resumes the adapters from their last commit, and the engine commits each step to it. Activations beyond
    the budget spill into the run folder, not STORE/scratch: a LoRA base stays untouched (it may be read-only,
    or shared by several LoRA runs). ``share``: wraps the folder's checkpoint (a data-parallel run's
    ``distributed.training.SharedAdapterCheckpoint``)."""
    checkpoint = AdapterCheckpoint(paths.adapter_dir, options.adapter_base or store.path)
    if share is not None:
        checkpoint = share(checkpoint)
    return dataclasses.replace(options, adapters=checkpoint.restore(store.config, options.lora),
                               adapter_checkpoint=checkpoint, lora=None, adapter_dir=None,
                               scratch_dir=paths.scratch_dir)


def engine_options(config: RunConfig, store: BlockStore, paths: RunPaths | None = None) -> EngineOptions:
    """The engine's settings for this run; with --mode lora, adapters saved in the run's adapter folder."""
    lora = None
    if config.is_lora:
        lora = LoRAConfig(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          targets=config.lora_target_list, init_seed=config.seed)
    return EngineOptions(device=config.device, dropout=config.dropout, seed=config.seed,
                         exact_grad_sums=config.exact_grad_sums, activation_budget_bytes=config.memory_budget_bytes,
                         resident_bytes=config.resident_budget_bytes,
                         optim=AdamWConfig(lr=default_lr(config, store), beta1=config.adam_beta1,
                                           beta2=config.adam_beta2, eps=config.adam_eps,
                                           weight_decay=config.weight_decay),
                         lora=lora, adapter_dir=paths.adapter_dir if lora and paths else None,
                         adapter_base=peft_base_model(store) if lora else None)
