"""A unit's AdamW update and the encoding of its new parts (weights, shadow, moments), as a function the writer
thread runs beside the compute of the next unit (or main runs when the writer's queue is full), one tensor at a
time or one row range at a time. Used by the full-weights trainable (``trainables.FullWeights``)."""
from __future__ import annotations

import torch

from offload_bitnet.engine.context import StepContext
from offload_bitnet.engine.stats import check_finite
from offload_bitnet.io.faults import fault_point
from offload_bitnet.io.safetensors import encoded_size
from offload_bitnet.store.units import unit_shapes


def make_update(engine, unit: str, masters: dict, grads: dict, moments, ctx: StepContext,
                keep_masters: bool = False):
    """The update of ``unit`` as a function ``update(rows=None, final=True)``: AdamW on ``rows`` (a slice of every
    master's first dimension; None: all of it), and when ``final``, the unit's new parts. Calls on disjoint row
    ranges in order, the last one final, make the same update as one call (AdamW is elementwise).
    ``keep_masters``: the caller still reads ``masters``, so the update changes fp32 copies of them."""
    step, optim, lr = ctx.step, ctx.optim, ctx.lr
    state = {}

    shapes = unit_shapes(engine.config, unit)

    def moments_of(names) -> dict:
        """fp32 moments of ``names``, decoded from the stored part (read now when none was loaded)."""
        if "optim" not in state:
            state["optim"] = moments if moments is not None else engine._optim_part(unit, stored=True)
        return engine.layout.moments(state["optim"], {n: shapes[n] for n in names}, engine.device)

    def master_of(name: str) -> torch.Tensor:
        """A master as given, or (None: see StreamingEngine.shadow_in_update) from the stored shadow, read on first use;
        every earlier write of the unit is in the store by the time its update runs."""
        if masters[name] is not None:
            return masters[name]
        if "shadow" not in state:
            state["shadow"] = engine._read_stored(unit, "shadow")
        return state["shadow"][name]

    def finish(parts: dict, unit_moments: dict):
        """Check the new weights of ``parts`` and add the encoded moments."""
        # Every master reaches these parts (qat: the shadow, and the scale derived from it), and a non-finite
        # gradient makes its weight non-finite, so this one check also catches bad gradients; and an lr so
        # large that the 16-bit weights overflow.
        for name, stored in {**parts["weights"], **parts.get("shadow", {})}.items():
            if stored.is_floating_point():
                check_finite(unit, name, stored, what="weight after the update (from a non-finite or huge "
                                                       "gradient or learning rate)")
        parts["optim"] = engine.layout.encode_moments(unit_moments)
        return parts

    def made(parts: dict) -> dict:
        """The update's parts are final: the new forward part replaces the kept one (if kept)."""
        ctx.add_submitted(sum(encoded_size(tensors) for tensors in parts.values()))
        engine.resident.replace(unit, parts["weights"])
        return parts

    def update_each() -> dict[str, dict[str, torch.Tensor]]:
        """The whole update, one tensor at a time: the fp32 master and moments of one projection exist at
        once, not a block's worth (a 70B block is 3.4 GB in fp32, with its moments 10 GB)."""
        parts: dict[str, dict] = {}
        for name in list(masters):
            unit_moments = moments_of([name])
            master = engine.layout.float32(master_of(name).detach())
            exp_avg, exp_avg_sq = unit_moments[name]
            engine.backend.adamw_update(master, grads.pop(name).float(), exp_avg, exp_avg_sq, step, optim, lr)
            for part, tensors in finish(engine.layout.encode(unit, {name: master}), unit_moments).items():
                parts.setdefault(part, {}).update(tensors)
            del master, unit_moments, exp_avg, exp_avg_sq
        # The old moments and shadow as read go now, not when the writer lets go of this function (after its
        # writes): at 7B that is 0.8 GB less in the peak.
        state.clear()
        return made(parts)

    def update(rows: slice | None = None, final: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        fault_point("update")
        if rows is None and not keep_masters:
            return update_each()
        index = slice(None) if rows is None else rows
        if "masters" not in state:
            state["moments"] = moments_of(list(masters))
            state["masters"] = {name: engine.layout.empty(master.shape, torch.float32, master.device) if keep_masters
                                else engine.layout.float32(master.detach()) for name, master in masters.items()}
        masters_32, unit_moments = state["masters"], state["moments"]
        for name, master in masters_32.items():
            if keep_masters:
                master[index] = masters[name][index]
            exp_avg, exp_avg_sq = unit_moments[name]
            engine.backend.adamw_update(master[index], grads[name][index].float(), exp_avg[index], exp_avg_sq[index],
                                        step, optim, lr)
        if not final:
            return {}
        parts = made(finish(engine.layout.encode(unit, masters_32), unit_moments))
        # The fp32 masters and moments are encoded now: let them go although the caller (an untied head's
        # row-range jobs) may keep this function until the step ends (at 13B: 2 GB).
        state.clear()
        del masters_32, unit_moments
        return parts

    return update
