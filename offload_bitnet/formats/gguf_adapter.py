"""LoRA adapters as a llama.cpp adapter GGUF, laid out as llama.cpp's ``convert_lora_to_gguf.py`` writes them.

Metadata: ``general.architecture`` (the base's, ``llama``), ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``. Tensors: ``blk.N.<name>.weight.lora_a`` (A, numpy ``[rank, in]``, so GGUF ne
``[in, rank]``) and ``.lora_b`` (B, ``[out, rank]``) for each target projection, in F32. llama.cpp checks
``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]`` and ``a.ne[1] == b.ne[0]``, and adds
``scale * alpha / rank * B (A x)`` to ``W x``. The rows of q/k in a llama GGUF are permuted for llama.cpp's rope
(``gguf_export.to_gguf_layout``); a LoRA delta ``B A`` lives in the same row space, so B's rows get the same permutation
(A, on the input side, is unchanged), exactly what the converter's ``LoraTorchTensor.permute`` does.

The adapter applies to a GGUF of the same base: the F16/F32 GGUF export of the store the adapters were trained
on (``offload-bitnet export STORE OUT --format gguf``) or the GGUF the store was imported from.
"""
from __future__ import annotations

import os

import gguf

from offload_bitnet.formats.gguf import GGUFError
from offload_bitnet.formats.gguf_export import gguf_tensor_name, new_writer, to_gguf_layout
from offload_bitnet.store.units import block_unit


def lora_tensors(adapters, config):
    """``(gguf name, numpy fp32 array)`` of every adapter matrix, in layer order (B of q/k in the rope row order
    of the base's GGUF, as ``gguf_export`` writes the projections themselves)."""
    for layer in range(config.n_layers):
        unit = block_unit(layer)
        for short in adapters.lora.targets:
            mats = adapters.weights[(layer, short)]
            lora_b = to_gguf_layout("llama", config, short, mats["lora_B"].float())
            yield gguf_tensor_name("llama", unit, short, "lora_a"), mats["lora_A"].float().contiguous().numpy()
            yield gguf_tensor_name("llama", unit, short, "lora_b"), lora_b.contiguous().numpy()


def write_lora_gguf(adapters, store, out: str, progress: bool = True) -> str:
    """Write ``adapters`` (an AdapterSet trained on ``store``) as a llama.cpp LoRA GGUF at ``out`` (a file
    ending in .gguf, or a folder that gets ``adapter.gguf``); returns the file path."""
    config = store.config
    if config.arch != "llama":
        raise GGUFError(f"the adapters' base {store.path} is a {config.arch} model; llama.cpp LoRA adapters are "
                        "written for llama-architecture bases only. Fold the adapters in (offload-bitnet merge) "
                        "and export the merged store instead")
    path = out if out.endswith(".gguf") else os.path.join(out, "adapter.gguf")
    if os.path.exists(path):
        raise GGUFError(f"{path} exists; give a new file name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"  # written under a temporary name, renamed when complete
    writer = new_writer(tmp, "llama", config, f"LoRA r{adapters.lora.rank} for "
                        f"{os.path.basename(os.path.abspath(store.path))}", model_keys=False)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapters.lora.alpha))
    for name, array in lora_tensors(adapters, config):
        writer.add_tensor(name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if progress:
        count = sum(1 for _ in lora_tensors(adapters, config))
        print(f"wrote {count} LoRA tensors (rank {adapters.lora.rank}, alpha {adapters.lora.alpha:g}) to {path}; "
              "apply with: llama-cli -m BASE.gguf --lora " + path)
    return path
