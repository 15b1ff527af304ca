"""The run configuration: one dataclass filled from defaults, then ``--config run.toml``, then flags.

Every field is a command-line flag (``--max-seq-len``, also spelled ``--max_seq_len``) and a TOML key
(``max_seq_len`` or ``max-seq-len``); a flag's aliases (``--learning-rate``) are TOML keys too. ``validate`` reports every problem at once, naming where each value came from.
Relative paths in a TOML file are resolved against the folder of that file.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from offload_bitnet.argparsing import DEVICE_PATTERN, parse_size
from offload_bitnet.distributed.env import BACKENDS as DIST_BACKENDS
from offload_bitnet.formats import EXPORT_FORMATS, GGUF_TYPES
from offload_bitnet.judge import JudgeError, check_url
from offload_bitnet.model.config import SIZES
from offload_bitnet.model.lora import ALL_TARGETS, ATTENTION
from offload_bitnet.store.units import MODES as STORE_MODES
from offload_bitnet.train.schedule import SCHEDULES

DATA_FORMATS = ("auto", "text", "alpaca", "chat")
# What a run trains: the store modes (the weights of a qat or full store) or lora (adapters beside a frozen store).
TRAINING_MODES = (*STORE_MODES, "lora")
STATE_DTYPES = ("fp32", "bf16", "int8")
DEMO_EXPERIMENT = "demo"
# The checkout (offload_bitnet/train/ is two folders below it): the demo trains on its test_data/demo.txt.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The demo's recipe: a byte-level model from random init learns byte statistics in ~150 steps on 2 CPU cores.
DEMO_DEFAULTS = {"num_train_iters": 150, "lr": 3e-3, "max_seq_len": 128, "batch_size": 8, "eval_every": 25,
                 "val_fraction": 0.1}
PATH_FIELDS = ("model", "data", "val_data", "runs_dir", "export_path", "tokenizer")


class RunConfigError(ValueError):
    """The run configuration is invalid; the message lists every problem and where each value came from."""


def opt(default, help: str, *, kind: str, flag: str | None = None, aliases: tuple = (), choices=None):
    """A config field with its command-line help (``kind``: int, float, str, bool, list, size)."""
    metadata = {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=list, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything a fine-tuning run needs to know. ``None`` means "decide from the model" (see help)."""

    # What to train and where.
    model: str | None = opt(None, "store or importable model (HF folder, Meta folder, .gguf); "
                                  "none: create a small BitNet demo model", kind="str")
    size: str = opt("demo", "size of the model created when no MODEL is given", kind="str")
    tokenizer: str | None = opt(None, "tokenizer to use instead of the model's own (needed when the model carries "
                                      "none): a folder with tokenizer.json or tokenizer.model, one of those files, "
                                      "a .gguf file, a store, or 'byte' for the built-in byte tokenizer", kind="str")
    experiment: str | None = opt(None, "run name: outputs go to RUNS_DIR/EXPERIMENT "
                                       "(default: 'demo', or the model's folder name)", kind="str")
    runs_dir: str = opt("runs", "folder holding one subfolder per run", kind="str")
    restart: bool = opt(False, "discard this experiment's progress and start over", kind="bool")
    # Data.
    data: list = opt([], "training data file (.txt, .json, .jsonl); repeat for several", flag="--data",
                     kind="list")
    val_data: list = opt([], "validation data file; repeat for several (default: hold out --val-fraction)",
                         kind="list")
    val_fraction: float = opt(0.05, "fraction of the training examples held out for validation when no "
                                    "--val-data is given (0: no validation)", kind="float")
    data_format: str = opt("auto", "record format: text (plain text files or {\"text\"} records), alpaca, chat; "
                                   "auto: from the file extension and the first record",
                           choices=DATA_FORMATS, kind="str")
    max_seq_len: int = opt(512, "longest training sequence in tokens (longer examples are truncated)", kind="int")
    packing: bool = opt(False, "pack short examples together into max-length sequences", kind="bool")
    train_on_prompt: bool = opt(False, "also train on prompt tokens of Alpaca and chat records "
                                       "(default: completions only)", kind="bool")
    skip_bad_records: bool = opt(False, "skip malformed records (and count them) instead of stopping",
                                 kind="bool")
    # Optimization.
    mode: str | None = opt(None, "training mode: qat (ternary BitNet weights), full (full-precision weights) or "
                                 "lora (adapters on a frozen base that stays unmodified); default: the store's "
                                 "(qat for BitNet, full for LLaMA)", choices=TRAINING_MODES, kind="str")
    lora_rank: int = opt(8, "LoRA: rank of the adapter matrices", kind="int")
    lora_alpha: float = opt(16.0, "LoRA: scale; the adapters' output is multiplied by alpha / rank", kind="float")
    lora_dropout: float = opt(0.0, "LoRA: dropout on the adapters' input", kind="float")
    lora_targets: str = opt("all", "LoRA: projections that get adapters, comma-separated from "
                                   "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, or all, attention, mlp",
                            kind="names")
    quant_warmup: int = opt(0, "convert a full-precision model to ternary: the quantization mix rises linearly "
                               "from 0 to 1 over this many steps, then stays 1 (needs a qat store: import with "
                               "--mode qat)", kind="int")
    lr: float | None = opt(None, "peak learning rate (default: 3e-3 for a new demo model, 2e-4 for lora, "
                                 "1e-4 for qat, 2e-5 for full)", aliases=("--learning-rate",), kind="float")
    schedule: str = opt("cosine", "learning-rate schedule", choices=SCHEDULES, kind="str")
    warmup_fraction: float = opt(0.05, "fraction of the steps spent warming the learning rate up", kind="float")
    eta_min: float = opt(0.0, "final learning rate of the cosine decay", kind="float")
    stage2_lr_fraction: float = opt(0.1, "two-stage schedule: stage-2 peak as a fraction of the peak lr",
                                    kind="float")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices (two-stage: 0 in stage 2)", kind="float")
    adam_beta1: float = opt(0.9, "AdamW beta1", kind="float")
    adam_beta2: float = opt(0.999, "AdamW beta2", kind="float")
    adam_eps: float = opt(1e-8, "AdamW epsilon", kind="float")
    batch_size: int = opt(8, "effective batch size: sequences per optimizer step", kind="int")
    grad_accum: int = opt(1, "micro-batches per optimizer step (each block is still read once per step)",
                          aliases=("--gradient-accumulation",), kind="int")
    exact_grad_sums: bool = opt(False, "sum the micro-batches' gradients in float64: exact, so N torchrun ranks x "
                                       "--grad-accum G train bit for bit what one process trains with N x G "
                                       "(a block's gradients then take 8 bytes per parameter, not 4)", kind="bool")
    num_epochs: float | None = opt(None, "passes over the training data (default 1; exclusive with "
                                         "--num-train-iters)", aliases=("--epochs",), kind="float")
    num_train_iters: int | None = opt(None, "optimizer steps (exclusive with --num-epochs)",
                                      aliases=("--steps",), kind="int")
    dropout: float = opt(0.0, "dropout probability (attention and residual branches)", kind="float")
    seed: int = opt(0, "seed of data shuffling and dropout", kind="int")
    state_dtype: str | None = opt(None, "optimizer state dtype for new stores: fp32, bf16 or int8 (8-bit "
                                        "blockwise) (default fp32; an existing store keeps its own)", kind="str")
    max_skipped_steps: int = opt(3, "a step with a non-finite loss or gradient is skipped (nothing is updated); "
                                    "this many in a row stop the run", kind="int")
    # Evaluation and generation.
    eval_batch_size: int = opt(8, "sequences per validation batch", kind="int")
    eval_at_start: bool = opt(True, "validate before the first step, as a baseline (with --quant-warmup: the "
                                    "full-precision and the ternary model)", kind="bool")
    eval_every: int = opt(0, "validate every N steps (0: only at the end)", kind="int")
    eval_max_batches: int = opt(0, "validate on at most this many batches (0: all)", kind="int")
    generate_every: int = opt(0, "generate from the prompts every N steps (0: only at the end)", kind="int")
    prompts: list = opt([], "prompt to generate from; repeat for several", flag="--prompt", kind="list")
    max_new_tokens: int = opt(64, "tokens to generate per prompt", kind="int")
    # System.
    device: str = opt("cpu", "compute device: cpu, cuda, cuda:N, mps or mlx (Apple MLX)", kind="str")
    dist_backend: str | None = opt(None, "under torchrun: the torch.distributed backend (default: gloo for cpu, "
                                         "mps and mlx; nccl for cuda)", choices=DIST_BACKENDS, kind="str")
    world_size: int | None = opt(None, "with --dry-run: plan a data-parallel run on this many processes "
                                       "(default: torchrun's WORLD_SIZE, else 1)", kind="int")
    memory_budget: str = opt("1GiB", "activation memory budget (block inputs beyond it spill to disk), "
                                     "e.g. 512M, 4G (G = GiB; GB = 10^9 bytes)", kind="size")
    resident_budget: str = opt("0", "RAM for keeping the forward weights (packed projections, norms, embedding, "
                                    "head) across steps, so later steps do not read them again (0: off), "
                                    "e.g. 20G (G = GiB; GB = 10^9 bytes)", kind="size")
    export_path: str | None = opt(None, "export the trained model here at the end", kind="str")
    export_format: str = opt("source", "export format (source: the format it was imported from; hf, hf-bitnet, "
                                       "meta; gguf: llama.cpp, from any store)",
                             choices=EXPORT_FORMATS, kind="str")
    gguf_type: str | None = opt(None, "tensor type of a gguf export (default: tq2_0 for a ternary qat model, f16 "
                                      "otherwise)", choices=GGUF_TYPES, kind="str")
    merge: bool = opt(False, "LoRA: fold the adapters into a new 16-bit store RUN_DIR/merged at the end "
                             "(--export-path then exports that store)", kind="bool")
    max_hours: float | None = opt(None, "stop cleanly at a step boundary after this many hours", kind="float")
    until: str | None = opt(None, "stop cleanly at a step boundary before this local time (HH:MM)", kind="str")
    log_every: int = opt(1, "print a progress line every N steps", kind="int")
    plot: bool = opt(True, "draw RUNS_DIR/EXPERIMENT/loss.png at the end (needs matplotlib)", kind="bool")
    plot_only: bool = opt(False, "only redraw loss.png from metrics.jsonl and exit", kind="bool")
    dry_run: bool = opt(False, "print the plan (sizes, bytes per step, memory, time) and exit", kind="bool")
    recalibrate: bool = opt(False, "with --dry-run: measure this machine's disk and compute speeds again instead "
                                   "of using the cached ones", kind="bool")
    judge_model: str | None = opt(None, "at the end of a finished run, grade the answers to the validation records "
                                        "with this judge (a store or importable model; with --judge-url, the model "
                                        "name sent to the server): RUN_DIR/judge.jsonl", kind="str")
    judge_url: str | None = opt(None, "grade them with an OpenAI-compatible endpoint on this machine instead, e.g. "
                                      "http://127.0.0.1:8080/v1 (llama.cpp server, Ollama)", kind="str")
    judge_compare_base: bool = opt(False, "also answer and grade with the base model (before fine-tuning)",
                                   kind="bool")
    debug: bool = opt(False, "show tracebacks on errors", kind="bool")

    def __post_init__(self):
        # Where each value came from, for error messages: "default", "run.toml" or "command line".
        self.sources: dict[str, str] = {}

    # ------------------------------------------------------------------ derived values
    @property
    def is_demo(self) -> bool:
        """No model given: create a demo model from random init."""
        return self.model is None

    @property
    def run_dir(self) -> str:
        return os.path.join(self.runs_dir, self.experiment_name)

    @property
    def experiment_name(self) -> str:
        if self.experiment:
            return self.experiment
        if self.is_demo:
            return DEMO_EXPERIMENT
        name = os.path.basename(os.path.normpath(self.model))
        if os.path.isfile(self.model):  # a .gguf file: its name without the extension
            name = os.path.splitext(name)[0]
        return sanitize_name(name)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def memory_budget_bytes(self) -> int:
        return parse_size(self.memory_budget)

    @property
    def resident_budget_bytes(self) -> int:
        return parse_size(self.resident_budget)

    @property
    def is_lora(self) -> bool:
        return self.mode == "lora"

    @property
    def store_mode(self) -> str | None:
        """The store mode a new or imported store gets (None: the creator's or importer's default).

        LoRA leaves the base as the importer makes it; a quantization warmup needs the shadow weights of qat."""
        if self.mode in ("qat", "full"):
            return self.mode
        return "qat" if self.quant_warmup > 0 and not self.is_lora else None

    @property
    def lora_target_list(self) -> tuple:
        """The projections of ``lora_targets`` in model order; ValueError naming an unknown one."""
        return parse_targets(self.lora_targets)

    def source_of(self, name: str) -> str:
        return self.sources.get(name, "default")

    def describe(self, name: str) -> str:
        """``name=value (from source)`` for messages."""
        return f"{name}={getattr(self, name)!r} (from {self.source_of(name)})"

    # ------------------------------------------------------------------ validation
    def validate(self):
        """Raise RunConfigError listing every invalid value and what to do about it."""
        problems = []

        def bad(message):
            problems.append(message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                bad(f"{self.describe(f.name)} is not one of: {', '.join(choices)}")
        if self.gguf_type and self.export_format not in ("gguf", "source"):
            bad(f"{self.describe('gguf_type')} applies to --export-format gguf, not {self.export_format}")
        for name in ("max_seq_len", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "log_every"):
            if getattr(self, name) < 1:
                bad(f"{self.describe(name)} must be a positive integer")
        if self.max_seq_len == 1:
            bad(f"{self.describe('max_seq_len')} must be at least 2: a sequence needs a token to predict")
        for name in ("eval_every", "generate_every", "eval_max_batches", "seed"):
            if getattr(self, name) < 0:
                bad(f"{self.describe(name)} must be 0 or more")
        if self.world_size is not None and self.world_size < 1:
            bad(f"{self.describe('world_size')} must be at least 1")
        if self.num_epochs is not None and self.num_train_iters is not None:
            bad(f"set either num_epochs or num_train_iters, not both: got {self.describe('num_epochs')} and "
                f"{self.describe('num_train_iters')}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            bad(f"{self.describe('num_epochs')} must be positive")
        if self.num_train_iters is not None and self.num_train_iters < 1:
            bad(f"{self.describe('num_train_iters')} must be at least 1")
        if self.batch_size >= 1 and self.grad_accum >= 1 and self.batch_size % self.grad_accum:
            options = [g for g in range(1, self.batch_size + 1) if self.batch_size % g == 0]
            bad(f"batch_size ({self.batch_size}, from {self.source_of('batch_size')}) must be divisible by "
                f"grad_accum ({self.grad_accum}, from {self.source_of('grad_accum')}): each step splits the batch "
                f"into grad_accum equal micro-batches. grad_accum could be one of {options}")
        if self.lr is not None and not self.lr > 0:
            bad(f"{self.describe('lr')} must be positive")
        if self.eta_min < 0 or (self.lr is not None and self.lr > 0 and self.eta_min > self.lr):
            bad(f"{self.describe('eta_min')} must be between 0 and the learning rate")
        for name, low, high in (("warmup_fraction", 0.0, 1.0), ("val_fraction", 0.0, 1.0), ("dropout", 0.0, 1.0),
                                ("adam_beta1", 0.0, 1.0), ("adam_beta2", 0.0, 1.0)):
            if not low <= getattr(self, name) < high:
                bad(f"{self.describe(name)} must be in [{low:g}, {high:g})")
        if self.schedule == "two-stage" and self.warmup_fraction >= 0.5:
            bad(f"{self.describe('warmup_fraction')} must be below 0.5 with the two-stage schedule "
                "(stage 2 starts halfway)")
        if not 0 < self.stage2_lr_fraction <= 1:
            bad(f"{self.describe('stage2_lr_fraction')} must be in (0, 1]")
        if self.weight_decay < 0:
            bad(f"{self.describe('weight_decay')} must be 0 or more")
        if not self.adam_eps > 0:
            bad(f"{self.describe('adam_eps')} must be positive")
        if self.max_skipped_steps < 1:
            bad(f"{self.describe('max_skipped_steps')} must be at least 1")
        self._validate_lora(bad)
        if self.quant_warmup < 0:
            bad(f"{self.describe('quant_warmup')} must be 0 or more")
        elif self.quant_warmup > 0 and self.mode == "full":
            bad(f"{self.describe('quant_warmup')} converts a model to ternary, which needs a qat store, but "
                f"{self.describe('mode')} asks for full precision: use --mode qat (or leave --mode out)")
        if self.state_dtype is not None and self.state_dtype not in STATE_DTYPES:
            bad(f"{self.describe('state_dtype')} must be fp32, bf16 or int8 (8-bit blockwise); fp16 moments underflow")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            bad(f"{self.describe('device')} must be cpu, cuda, cuda:N, mps or mlx")
        try:
            if self.memory_budget_bytes <= 0:
                bad(f"{self.describe('memory_budget')} must be positive")
        except ValueError as error:
            bad(f"{self.describe('memory_budget')}: {error}")
        try:
            self.resident_budget_bytes
        except ValueError as error:
            bad(f"{self.describe('resident_budget')}: {error}")
        if self.max_hours is not None and not self.max_hours > 0:
            bad(f"{self.describe('max_hours')} must be positive")
        if self.until is not None and not re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", self.until):
            bad(f"{self.describe('until')} must be a local time HH:MM, e.g. 07:30")
        if self.experiment is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.experiment):
            bad(f"{self.describe('experiment')} may contain only letters, digits, '.', '_' and '-'")
        if self.model is not None and not self.data and not (self.plot_only or self.dry_run):
            bad("a MODEL was given but no training data: add --data FILE (.txt, .json or .jsonl)")
        if self.is_demo and self.size not in SIZES:
            bad(f"{self.describe('size')} is not a known size; choose one of {', '.join(SIZES)}")
        self._validate_judge(bad)
        if problems:
            raise RunConfigError(_join_problems(problems))
        return self

    def _validate_judge(self, bad):
        """Judge options are checked before hours of training, not after."""
        if self.judge_url:
            try:
                check_url(self.judge_url)
            except JudgeError as error:
                bad(str(error))
        elif self.judge_model and not os.path.exists(self.judge_model):
            bad(f"{self.describe('judge_model')} does not exist: give a store or importable model, or --judge-url")
        if self.judge_compare_base and not (self.judge_model or self.judge_url):
            bad(f"{self.describe('judge_compare_base')} needs a judge: --judge-model PATH or --judge-url URL")

    def _validate_lora(self, bad):
        """LoRA options: valid values with --mode lora, and only there."""
        lora_only = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "merge")
        if not self.is_lora:
            for name in lora_only:
                if self.source_of(name) != "default":
                    bad(f"{self.describe(name)} applies only to --mode lora")
            return
        if self.lora_rank < 1:
            bad(f"{self.describe('lora_rank')} must be a positive integer")
        if not self.lora_alpha > 0:
            bad(f"{self.describe('lora_alpha')} must be positive")
        if not 0 <= self.lora_dropout < 1:
            bad(f"{self.describe('lora_dropout')} must be in [0, 1)")
        try:
            self.lora_target_list
        except ValueError as error:
            bad(f"{self.describe('lora_targets')}: {error}")
        if self.quant_warmup > 0:
            bad(f"{self.describe('quant_warmup')} converts the model's own weights, which --mode lora keeps "
                "frozen: convert first (--mode qat --quant-warmup N), then train adapters on the result")
        if self.export_path and not self.merge:
            bad(f"{self.describe('export_path')}: a LoRA run's result is its adapters (RUN_DIR/adapter, PEFT "
                "format); add --merge to fold them into the model and export that")

    def apply_demo_defaults(self):
        """Without a MODEL, fill the demo's recipe and data into fields the user left at their defaults."""
        if not self.is_demo:
            return self
        for name, value in DEMO_DEFAULTS.items():
            if self.source_of(name) == "default":
                if name == "num_train_iters" and self.num_epochs is not None:
                    continue
                setattr(self, name, value)
        if not self.data:
            self.data = [demo_data_path()]
        return self


def _join_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid run configuration: {problems[0]}"
    return "invalid run configuration:\n" + "\n".join(f"  - {p}" for p in problems)


def demo_data_path() -> str:
    """``test_data/demo.txt`` of the source checkout (it does not ship inside the package)."""
    return os.path.join(REPO_ROOT, "test_data", "demo.txt")


# The --lora-targets groups, from the LoRA module's projection lists (in model order).
TARGET_GROUPS = {"all": ALL_TARGETS, "attention": ATTENTION, "mlp": tuple(t for t in ALL_TARGETS if t not in ATTENTION)}


def parse_targets(text: str) -> tuple:
    """``"q_proj,v_proj"`` or a group name (all, attention, mlp) -> projection names in model order."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    chosen = set()
    for name in names:
        if name in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[name])
        elif name in TARGET_GROUPS["all"]:
            chosen.add(name)
        else:
            raise ValueError(f"unknown projection {name!r}; choose from {', '.join(TARGET_GROUPS['all'])} or "
                             f"{', '.join(TARGET_GROUPS)}")
    if not chosen:
        raise ValueError("name at least one projection, e.g. q_proj,v_proj or all")
    return tuple(name for name in TARGET_GROUPS["all"] if name in chosen)


def sanitize_name(name: str) -> str:
    """A run name made of safe characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"
    return cleaned


def resume_fingerprint(config: RunConfig) -> dict:
    """The settings a resumed run must share with the interrupted one for the result to be the same."""
    keys = ("data", "val_data", "val_fraction", "data_format", "max_seq_len", "packing", "train_on_prompt",
            "skip_bad_records", "seed", "batch_size", "grad_accum", "lr", "schedule", "warmup_fraction",
            "eta_min", "stage2_lr_fraction", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "dropout",
            "num_epochs", "num_train_iters", "quant_warmup")
    values = {key: getattr(config, key) for key in keys}
    if config.is_lora:
        values["lora"] = {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                          "targets": list(config.lora_target_list)}
    values["data"] = [os.path.abspath(p) for p in config.data]
    values["val_data"] = [os.path.abspath(p) for p in config.val_data]
    if config.tokenizer:  # only when given, so that runs started before the option resume unchanged
        values["tokenizer"] = config.tokenizer if config.tokenizer == "byte" else os.path.abspath(config.tokenizer)
    return values
