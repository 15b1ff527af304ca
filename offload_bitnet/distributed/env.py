"""The torchrun environment and the process group: one ``DistContext`` per process, a single-process one
(rank 0 of 1, no process group) when not started by torchrun, so nothing changes without it."""
from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torchrun sets these for every process it starts; MASTER_ADDR/MASTER_PORT are the rendezvous of the group.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("gloo", "nccl")


class DistributedError(RuntimeError):
    """The distributed setup is wrong (environment, backend, stores of the ranks); the message says what to do."""


class RankError(RuntimeError):
    """An exception raised on one rank, its message prefixed with ``rank R of N: ``."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun told this process (``from_environ``); None outside torchrun."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ=None) -> "TorchrunEnv | None":
        """Read the torchrun variables; None when none is set, DistributedError when some are missing or bad."""
        environ = os.environ if environ is None else environ
        present = [name for name in TORCHRUN_VARIABLES if name in environ]
        if not present:
            return None
        missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
        if missing:
            raise DistributedError(f"the torchrun environment is incomplete: {', '.join(present)} set but "
                                   f"{', '.join(missing)} not. Start the run with torchrun (it sets them all), or "
                                   f"unset {', '.join(present)} to run in one process.")
        try:
            values = {name: int(environ[name]) for name in TORCHRUN_VARIABLES if name != "MASTER_ADDR"}
        except ValueError:
            bad = [f"{n}={environ[n]!r}" for n in TORCHRUN_VARIABLES if n != "MASTER_ADDR" and
                   not environ[n].strip().lstrip("-").isdigit()]
            raise DistributedError(f"torchrun variables must be integers, got {', '.join(bad)}") from None
        env = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"],
                  environ["MASTER_ADDR"], values["MASTER_PORT"])
        if not 0 <= env.rank < env.world_size or not 0 <= env.local_rank < env.local_world_size:
            raise DistributedError(f"bad torchrun environment: RANK={env.rank} WORLD_SIZE={env.world_size} "
                                   f"LOCAL_RANK={env.local_rank} LOCAL_WORLD_SIZE={env.local_world_size}")
        return env


def torchrun_command(script: str, environ=None) -> str | None:
    """How to launch ``script`` again as torchrun launched this process (for the resume commands a run prints),
    or None outside torchrun (or in an environment too incomplete to say)."""
    try:
        env = TorchrunEnv.from_environ(environ)
    except DistributedError:
        return None
    if env is None:
        return None
    if env.world_size == env.local_world_size:
        return f"torchrun --standalone --nproc_per_node {env.local_world_size} {script}"
    nodes = env.world_size // env.local_world_size
    return (f"torchrun --nnodes {nodes} --nproc_per_node {env.local_world_size} --node_rank R "
            f"--rdzv_endpoint {env.master_addr}:{env.master_port} {script}")


def default_backend(device: str) -> str:
    """gloo for ``cpu`` and ``mps`` (and MLX), NCCL for ``cuda``."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


@dataclass
class DistContext:
    """This process's place in the run: rank, world size, the backend; collectives that do nothing alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and writes the run's metrics and status."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def describe(self) -> str:
        """``rank 1 of 2`` (``one process`` alone), for messages."""
        return f"rank {self.rank} of {self.world_size}" if self.distributed else "one process"

    def barrier(self):
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def _reduce(self, values: list[int | float], op, dtype) -> list:
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=dtype, device=self._collective_device())
        dist.all_reduce(tensor, op=op)
        return tensor.cpu().tolist()

    def all_reduce_sum_int(self, values: list[int]) -> list[int]:
        """Element-wise sums of integers over the ranks (int64: exact)."""
        return self._reduce(values, dist.ReduceOp.SUM, torch.int64)

    def all_reduce_min_int(self, values: list[int]) -> list[int]:
        """Element-wise minima of integers over the ranks."""
        return self._reduce(values, dist.ReduceOp.MIN, torch.int64)

    def all_reduce_max_int(self, values: list[int]) -> list[int]:
        """Element-wise maxima of integers over the ranks."""
        return self._reduce(values, dist.ReduceOp.MAX, torch.int64)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place (gloo and NCCL both reduce in a fixed order: repeatable)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def _collective_device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def rank_error(self, error: BaseException) -> RankError:
        """``error`` as a RankError whose message names this rank (the original is its ``__cause__``)."""
        text = str(error) or type(error).__name__
        return RankError(text if text.startswith(self.describe()) else f"{self.describe()}: {text}")

    def together(self, what: str, function, *args, **kwargs):
        """Run ``function`` on every rank, then agree on the outcome: when it failed on some rank, it fails on
        every rank (each re-raises its own error; the others a DistributedError naming the rank that failed and
        why), so no rank goes on to wait in a collective that another will never reach. Returns the result."""
        error = None
        try:
            result = function(*args, **kwargs)
        except Exception as caught:  # noqa: BLE001 - told to every rank, then re-raised
            error = caught
        outcomes = self.all_gather_object(None if error is None else (str(error) or type(error).__name__))
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(outcomes) if text is not None]
        if failed:
            rank, text = failed[0]
            raise DistributedError(f"{self.describe()}: stopped because rank {rank} failed {what}: {text}")
        return result

    def close(self):
        """Leave and destroy the process group (idempotent)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None


def init_distributed(device: str = "cpu", backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group of the ranks torchrun started (``init_process_group``, meeting through
    torchrun's store: ``_rendezvous``), or return a single-process DistContext when this process was not
    started by torchrun.

    ``backend``: gloo or nccl (default: ``default_backend(device)``). ``timeout_s``: how long a collective
    waits for a rank that does not come (a crashed rank then turns into an error on the others)."""
    env = TorchrunEnv.from_environ()
    if env is None:
        return DistContext(device=device)
    backend = backend or default_backend(device)
    if backend not in BACKENDS:
        raise DistributedError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "nccl" and not str(device).startswith("cuda"):
        raise DistributedError(f"the nccl backend needs --device cuda (got {device!r}); use gloo for cpu and mps")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedError("the nccl backend needs CUDA, which this torch cannot use; use --dist-backend gloo")
    if not dist.is_backend_available(backend):
        raise DistributedError(f"this torch build has no {backend} backend; install one that has it")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                **_rendezvous(env, timeout))
    except Exception as error:
        raise DistributedError(f"rank {env.rank} of {env.world_size} could not join the process group at "
                               f"{env.master_addr}:{env.master_port} ({backend}): {error}. Check that every "
                               "machine reaches that address and port, and that all ranks use the same command.")\
            from error
    return DistContext(env.rank, env.world_size, env.local_rank, backend, device)


def _rendezvous(env: TorchrunEnv, timeout: datetime.timedelta) -> dict:
    """How the ranks find each other: through torchrun's agent store, under a prefix of its own for each
    restart (``torchrun --max-restarts``: the agent keeps one store across restarts here, and a restarted
    group would otherwise read the previous attempt's gloo addresses and fail to connect); else ``env://``."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return {"init_method": "env://"}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"offload_bitnet/attempt_{attempt}", store)}


def named_rank_errors(context: DistContext):
    """Decorate a function run on every rank so that its exceptions reach the user naming the rank:
    ``rank 1 of 2: <its message>``, a RankError whose ``__cause__`` is the original (single-process runs
    keep their exceptions as they are)."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (KeyboardInterrupt, SystemExit, RankError):
                raise
            except Exception as error:
                if not context.distributed:
                    raise
                raise context.rank_error(error) from error
        return wrapper
    return decorate
