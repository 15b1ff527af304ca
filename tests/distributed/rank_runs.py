"""Start ranks of a gloo group as processes with a torchrun-like environment, and the rank program the
commit tests run: store-level writes of deterministic tensors, committed across ranks (no engine)."""
from __future__ import annotations

import json
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp

from offload_bitnet import create_model
from offload_bitnet.distributed.rank_stores import make_rank_store
from offload_bitnet.distributed.sharding import rank_store_dir, shard_plan
from offload_bitnet.io import faults
from offload_bitnet.store.blockstore import BlockStore

ALONE_S = 60  # a rank left alone (its peer killed) gives up after this long at the latest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(program, world_size: int, results_dir: str, *, faults_by_rank: dict | None = None, timeout_s=120,
           **kwargs) -> list[dict]:
    """Run ``program(context, results...)`` on ``world_size`` spawned ranks; returns each rank's result dict
    (``{"exitcode": ..., "error": ..., **program's result}``). Killed ranks leave the others running: a rank
    that dies between the two manifest switches must not take the others down before they switch."""
    os.makedirs(results_dir, exist_ok=True)
    spawn = _context()
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world_size,
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        fault = (faults_by_rank or {}).get(rank, "")
        process = spawn.Process(target=_rank_main, args=(program, env, fault, results_dir, kwargs))
        process.start()
        processes.append(process)
    results = []
    for rank, process in enumerate(processes):
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
        path = os.path.join(results_dir, f"rank{rank}.json")
        result = json.load(open(path)) if os.path.exists(path) else {}
        if os.path.exists(path):
            os.remove(path)
        results.append(dict(result, exitcode=process.exitcode))
    return results


def _context():
    """forkserver: one server imports torch and the package once, and each rank is forked from it (a rank
    then starts in well under a second instead of importing torch anew, as spawn does); the server itself
    never runs torch ops, so forking it is safe, unlike forking the test process."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "offload_bitnet.store.blockstore",
                                    "offload_bitnet.distributed.commit", "rank_runs", "train_runs"])
    return context


def _rank_main(program, env, fault, results_dir, kwargs):
    os.environ.update({name: str(value) for name, value in env.items()})
    torch.set_num_threads(1)
    faults.configure(fault)
    result = {}
    try:
        result = program(**kwargs) or {}
    except BaseException as error:  # reported to the test, which asserts on it
        result = {"error": str(error), "error_type": type(error).__name__, "traceback": traceback.format_exc()}
    with open(os.path.join(results_dir, f"rank{env['RANK']}.json"), "w") as handle:
        json.dump(result, handle)
    if "error" in result:
        os._exit(1)


# ---------------------------------------------------------------------------------------- stores
def rank_stores(folder, world_size: int = 2, n_layers: int = 2) -> list[str]:
    """Each rank's store, made from one demo model in ``folder`` (the manifests record the world size and
    rank)."""
    folder = str(folder)
    source = BlockStore(create_model(os.path.join(folder, "model"), size="demo", arch="bitnet", n_layers=n_layers))
    plan = shard_plan(source.config, world_size, source.settings)
    paths = [rank_store_dir(folder, rank) for rank in range(world_size)]
    for rank, path in enumerate(paths):
        make_rank_store(source, path, plan, rank).close()
    return paths


def store_state(path):
    """The committed manifest and every tensor of every part of a store."""
    store = BlockStore(path)
    tensors = {(unit, part): store.read(unit, part) for unit, parts in store.manifest["files"].items()
               for part in parts}
    return store.manifest, tensors


def assert_same_state(path_a, path_b):
    manifest_a, tensors_a = store_state(path_a)
    manifest_b, tensors_b = store_state(path_b)
    assert manifest_a["step"] == manifest_b["step"] and manifest_a["files"] == manifest_b["files"]
    assert manifest_a["extra"] == manifest_b["extra"] and "previous" not in manifest_a
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        for name in tensors_a[key]:
            assert torch.equal(tensors_a[key][name], tensors_b[key][name]), (key, name)


# ---------------------------------------------------------------------------------------- the commit program
def step_tensors(tensors: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """A deterministic "update" that depends on the previous contents (a wrong rollback shows in the result)."""
    out = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            out[name] = (tensor.float() * 0.5 + 0.25 * step).to(tensor.dtype)
        else:
            out[name] = tensor.to(torch.int32).add(3 * step + 1).remainder(256).to(tensor.dtype)
    return out


def moments(tensors: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    return {f"{name}.exp_avg": (tensor.float() * 0.01 + step).flatten()[:64].clone()
            for name, tensor in tensors.items()}


def _on_own_store(store_dirs: list[str], body) -> dict:
    """Join the group, open this rank's store (``store_dirs[rank]``) for writing, recover it, and return
    ``body(context, store, committer, start)``; errors name the rank."""
    from offload_bitnet.distributed.commit import RankCommit
    from offload_bitnet.distributed.env import init_distributed, named_rank_errors
    from offload_bitnet.store.blockstore import BlockStore

    context = init_distributed("cpu", timeout_s=ALONE_S)

    @named_rank_errors(context)
    def run():
        store = BlockStore(store_dirs[context.rank], writable=True)
        try:
            committer = RankCommit(context, store)
            return body(context, store, committer, committer.recover())
        finally:
            store.close()

    try:
        return run()
    finally:
        context.close()


def commit_program(store_dirs: list[str], steps: int, targets_seed: int = 0) -> dict:
    """Each rank: recover, then commit ``steps`` steps: every unit's weights, and moments for the units this
    rank owns (shard_plan). Reports the steps and the global token count of a batch split over the ranks."""
    from offload_bitnet.distributed.batching import global_target_tokens, rank_sequences
    from offload_bitnet.distributed.sharding import shard_plan

    def body(context, store, committer, start):
        plan = shard_plan(store.config, context.world_size, store.settings)
        for step in range(start + 1, steps + 1):
            for unit in store.units:
                weights = store.read(unit, "weights")
                store.write(unit, "weights", step_tensors(weights, step), step)
                if plan.owner(unit) == context.rank:
                    store.write(unit, "optim", moments(weights, step), step)
            committer.commit(step, {"position": step})
        targets = torch.randint(-1, 5, (8, 6), generator=torch.Generator().manual_seed(targets_seed))
        targets[targets < 0] = -100
        mine = rank_sequences(targets, context.world_size, 2, context.rank)
        return {"start": start, "step": store.step, "tokens": global_target_tokens(context, mine)}
    return _on_own_store(store_dirs, body)


def same_step_program(store_dirs: list[str], position: str | None) -> dict:
    """Each rank: recover; at step 0 commit step 1 (every unit's weights changed); with ``position``, commit
    step 1 again with only its extra changed (what a skipped step commits). Reports the recovered state."""
    def body(context, store, committer, start):
        recovered = {"start": start, "position": store.extra.get("position")}
        if start == 0:
            for unit in store.units:
                store.write(unit, "weights", step_tensors(store.read(unit, "weights"), 1), 1)
            committer.commit(1, {"position": "step 1"})
        if position is not None:
            committer.commit(1, {"position": position})
        return dict(recovered, step=store.step, now=store.extra.get("position"))
    return _on_own_store(store_dirs, body)


def collectives_program() -> dict:
    """Each rank contributes rank-dependent values to every collective of DistContext."""
    from offload_bitnet.distributed.env import init_distributed

    context = init_distributed("cpu", timeout_s=ALONE_S)
    try:
        tensor = torch.full((3,), 0.1 * (context.rank + 1))
        context.all_reduce_sum_(tensor)
        return {"describe": context.describe(), "is_main": context.is_main, "backend": context.backend,
                "sum": context.all_reduce_sum_int([context.rank + 1, 10]),
                "min": context.all_reduce_min_int([context.rank + 5]),
                "max": context.all_reduce_max_int([context.rank]),
                "tensor": tensor.tolist(), "gathered": context.all_gather_object({"r": context.rank})}
    finally:
        context.close()
