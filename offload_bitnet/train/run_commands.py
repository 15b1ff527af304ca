"""The commands a fine-tuning run prints for its user: resume it, restart it, train it longer, generate from it.

Each repeats every argument the run was started with (the model, ``--experiment``, ``--runs-dir``,
``--config``, ``--mode``, ...), so it names the same run folder and the same settings: a printed command run
literally acts on this run and on no other. Only the one-shot flags (``--restart``, ``--dry-run``,
``--plot-only``) are dropped, and the length options where a new length is asked for.
"""
from __future__ import annotations

import os
import shlex

ONE_SHOT = ("--restart", "--no-restart", "--dry-run", "--no-dry-run", "--plot-only", "--no-plot-only", "--recalibrate")
LENGTH_OPTIONS = ("--num-train-iters", "--steps", "--num-epochs", "--epochs")


def shown_path(path: str) -> str:
    """``path`` relative to the current folder when it lies under it (shorter to read and to paste)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def without_options(args: list[str], names: tuple) -> list[str]:
    """``args`` without the options ``names`` and their values (``--name VALUE`` or ``--name=VALUE``)."""
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return kept


class RunCommand:
    """The command line of one run, and the commands derived from it."""

    def __init__(self, argv: list[str], prog: str = "python finetune.py"):
        self.prog = prog
        self.args = [arg for arg in argv if arg not in ONE_SHOT]

    def line(self, *extra: str, args: list[str] | None = None) -> str:
        return f"{self.prog} {shlex.join([*(self.args if args is None else args), *extra])}".strip()

    @property
    def resume(self) -> str:
        """Continue this run from its last committed step."""
        return self.line()

    @property
    def restart(self) -> str:
        """Delete this run (and only this one) and start it over."""
        return self.line("--restart")

    def longer(self, steps: str = "N") -> str:
        """Train this (finished) run on to ``steps`` optimizer steps."""
        return self.line("--num-train-iters", steps, args=without_options(self.args, LENGTH_OPTIONS))

    def restart_with_lr(self, lr: str = "LR") -> str:
        """Start this run over with another peak learning rate."""
        return self.line("--lr", lr, "--restart", args=without_options(self.args, ("--lr", "--learning-rate")))

    def with_options(self, *extra: str) -> str:
        """This run's command with more options (for example ``--merge``)."""
        return self.line(*extra)

    def restart_named(self, experiment: str) -> str:
        """Restart, naming the run folder explicitly (``--experiment``) so that it can replace a run of another
        model there."""
        return self.line("--experiment", experiment, "--restart", args=without_options(self.args, ("--experiment",)))

    def generate(self, model: str, device: str, prompt: str, chat: bool, adapter: str | None = None,
                 tokenizer: str | None = None) -> str:
        """The test_gen.py command that answers ``prompt`` from ``model`` (a store, merged store or export), with
        LoRA ``adapter``s applied and another ``tokenizer`` when given."""
        script = "finetune.py"  # test_gen.py sits beside it; it runs in one process, also after a torchrun
        launcher, _, path = self.prog.rpartition(" ")
        prog = "python test_gen.py"
        if path.endswith(script):
            prefix = "python" if launcher.startswith("torchrun") else launcher
            prog = f"{prefix} {path[:-len(script)]}test_gen.py".strip()
        options = [*(["--adapter", shown_path(adapter)] if adapter else []),
                   *(["--tokenizer", tokenizer] if tokenizer else []), *(["--chat"] if chat else [])]
        return f"{prog} {shlex.join([shown_path(model), device, *options, '--prompt', prompt])}"


def resume_command(argv: list[str], prog: str) -> str:
    """The command that continues this run: the same arguments, without --restart."""
    return RunCommand(argv, prog).resume
