"""GGUF export of any store (HF, Meta, GGUF, created, merged), written with the ``gguf`` package alone.

Tensor types (``gguf_type``): ``f32``, ``f16``, ``bf16``, ``q8_0``, ``tq2_0``, ``tq1_0``. A ternary (qat) store
defaults to ``tq2_0``: its projections are exported as the codes times the per-tensor scale the model computes
with, which TQ2_0/TQ1_0 encode exactly up to their fp16 block scale. Other stores default to ``f16``. Following
llama.cpp's own converter, norms stay F32, the embedding and head stay F16 in the ternary types, and a tensor
whose rows do not split into the type's blocks (256 values for TQ, 32 for Q8_0) falls back to F16 with a note.

Architectures: a LLaMA-shaped store becomes llama.cpp's ``llama`` (q/k rows permuted for its rope, the inverse
of what the importer undoes); a BitNet store (sub-norms) becomes ``bitnet``, which llama.cpp computes with SiLU
and a tied head, so a relu² model (transformers' BitNetForCausalLM, and this tool's ``bitnet`` arch) or an
untied head is refused with a message saying what works instead. Names and keys come from ``gguf.constants``.

Reusable pieces (also for the LoRA adapter GGUF): ``gguf_architecture``, ``gguf_tensor_name``,
``to_gguf_layout``, ``new_writer``, ``plan_tensor`` / ``encode_tensor`` and ``write_planned``.
"""
from __future__ import annotations

import os

import gguf
import numpy as np
import torch

from offload_bitnet.formats import GGUF_TYPES
from offload_bitnet.formats.gguf import GGUFError, permute_qk
from offload_bitnet.formats.gguf_vocab import gguf_vocabulary, write_vocabulary
from offload_bitnet.formats.ollama import write_modelfile
from offload_bitnet.model.block import rope_inverse_frequencies
from offload_bitnet.model.config import ModelConfig
from offload_bitnet.progress import Progress
from offload_bitnet.store.layout import Layout
from offload_bitnet.store.units import block_index, is_block, unit_shapes
from offload_bitnet.tokenizers.base import TokenizerError

TERNARY_TYPES = ("tq2_0", "tq1_0")
FILE_NAME = "model.gguf"


def quant_type(gguf_type: str):
    """The ``gguf.GGMLQuantizationType`` of one of ``GGUF_TYPES``."""
    return getattr(gguf.GGMLQuantizationType, gguf_type.upper())


def file_type(gguf_type: str):
    """The ``general.file_type`` (``gguf.LlamaFileType``) llama.cpp's converter writes for ``gguf_type``."""
    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
             "tq2_0": "MOSTLY_TQ2_0", "tq1_0": "MOSTLY_TQ1_0"}
    return getattr(gguf.LlamaFileType, names[gguf_type])


# ---------------------------------------------------------------------------------------------- names
def _store_tensors():
    t = gguf.MODEL_TENSOR
    return {"rope_freqs": t.ROPE_FREQS,
            "q_proj": t.ATTN_Q, "k_proj": t.ATTN_K, "v_proj": t.ATTN_V, "o_proj": t.ATTN_OUT,
            "gate_proj": t.FFN_GATE, "up_proj": t.FFN_UP, "down_proj": t.FFN_DOWN,
            "input_layernorm": t.ATTN_NORM, "post_attention_layernorm": t.FFN_NORM,
            "attn_sub_norm": t.ATTN_SUB_NORM, "ffn_sub_norm": t.FFN_SUB_NORM,
            "embed": t.TOKEN_EMBD, "norm": t.OUTPUT_NORM, "head": t.OUTPUT}


def gguf_architecture(config: ModelConfig, where: str = "the store") -> str:
    """llama.cpp's architecture name for ``config`` (``llama`` or ``bitnet``); GGUFError when llama.cpp has none
    that computes this model."""
    if config.arch == "llama":
        return "llama"
    activation = config.extra.get("hidden_act", "relu2")
    problems = []
    if activation != "silu":
        problems.append(f"its MLP uses {activation} (relu squared, as transformers' BitNetForCausalLM), while "
                        "llama.cpp's bitnet graph hard-codes SiLU, so llama.cpp would compute a different model")
    if not config.tie_embeddings:
        problems.append("its head is not tied to the embedding, and llama.cpp has no architecture for sub-norms "
                        "with an untied head")
    if config.n_heads * config.head_dim != config.dim:
        problems.append(f"its attention width ({config.n_heads} x {config.head_dim}) differs from dim "
                        f"({config.dim}), which llama.cpp's bitnet graph assumes")
    if problems:
        raise GGUFError(f"{where} is a BitNet model (sub-norms) that no upstream llama.cpp architecture runs: "
                        + "; ".join(problems) + ". Export it for transformers instead (--format hf-bitnet, packed "
                        "BitNetForCausalLM, or --format hf), or train a LLaMA-architecture ternary model "
                        "(--arch llama --mode qat), which exports to GGUF as llama with TQ2_0 weights")
    return "bitnet"


def gguf_tensor_name(arch: str, unit: str, name: str = "weight", suffix: str | None = None) -> str:
    """The GGUF name of a store tensor: ``unit`` (``embed``, ``block.N``, ``norm``, ``head``) and its short
    ``name`` (``q_proj``, ``input_layernorm``..., ``weight`` for the global units), e.g. ``blk.3.attn_q.weight``.
    ``suffix``: ``lora_a`` / ``lora_b`` for an adapter's tensors (``blk.3.attn_q.weight.lora_a``, as llama.cpp's
    ``convert_lora_to_gguf`` names them). GGUFError for a tensor ``arch`` lacks."""
    key = unit if not is_block(unit) else name
    tensor = _store_tensors().get(key)
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    if tensor is None or tensor not in gguf.MODEL_TENSORS[model_arch]:
        raise GGUFError(f"llama.cpp's {arch} architecture has no tensor for {unit} {name}")
    bid = block_index(unit) if is_block(unit) else None
    name = f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.weight"
    return f"{name}.{suffix}" if suffix else name


def to_gguf_layout(arch: str, config: ModelConfig, name: str, weight: torch.Tensor) -> torch.Tensor:
    """A store tensor (transformers' layout) as llama.cpp reads it: the ``llama`` graph uses interleaved rope
    pairs, so q/k rows (or a LoRA B matrix of q/k) are permuted as ``convert_hf_to_gguf`` does; ``bitnet`` uses
    the half-split (NEOX) rope of transformers, unchanged."""
    if arch == "llama" and name == "q_proj":
        return permute_qk(weight, config.n_heads)
    if arch == "llama" and name == "k_proj":
        return permute_qk(weight, config.n_kv_heads)
    return weight


# ---------------------------------------------------------------------------------------------- writer
def new_writer(path: str, arch: str, config: ModelConfig, name: str | None = None, gguf_type: str | None = None,
               model_keys: bool = True):
    """A ``gguf.GGUFWriter`` for ``path`` with ``general.architecture``/``name`` (and ``file_type``) and, with
    ``model_keys``, the model's hyperparameters (``{arch}.context_length``, heads, rope, norm epsilon,
    ``{arch}.hidden_activation``...). An adapter file passes ``model_keys=False`` and adds ``general.type``."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name or "offload_bitnet export")
    if gguf_type:
        writer.add_file_type(file_type(gguf_type))
    if not model_keys:
        return writer
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    activation = "silu" if config.arch == "llama" else config.extra.get("hidden_act", "relu2")
    writer.add_string(f"{arch}.hidden_activation", activation)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":
        writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", 8192)))
    elif arch == "bitnet":  # as llama.cpp's BitnetModel converter writes it
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(1.0)
    elif kind not in (None, "default"):
        raise GGUFError(f"GGUF export of rope scaling {kind!r} is not supported (supported: linear, llama3)")
    return writer


def rope_factors(config: ModelConfig) -> torch.Tensor | None:
    """llama3 rope scaling as llama.cpp's ``rope_freqs`` tensor: each inverse frequency's divisor."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    plain = rope_inverse_frequencies(ModelConfig(**dict(config.to_dict(), rope_scaling=None)))
    return plain / rope_inverse_frequencies(config)


def plan_tensor(writer, name: str, shape: tuple, qtype):
    """Announce one tensor (numpy ``shape`` [rows, cols], type ``qtype``) before the header is written."""
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=qtype)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def encode_tensor(value: torch.Tensor, qtype) -> np.ndarray:
    """``value`` encoded as ``qtype`` with ``gguf.quants.quantize`` (F32, F16, BF16, Q8_0, TQ1_0, TQ2_0...)."""
    return gguf.quants.quantize(value.detach().float().contiguous().numpy(), qtype)


def write_planned(writer, tensors, progress: Progress | None = None):
    """Write the header, metadata and tensor infos, then the data of ``tensors`` (an iterable of
    ``(name, np.ndarray)`` in planned order, produced one at a time), and close the writer."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    planned = [name for shard in writer.tensors for name in shard]
    done = 0
    for name, array in tensors:
        if done >= len(planned) or planned[done] != name:
            raise RuntimeError(f"GGUF writer: tensor {name} arrives out of the planned order")
        writer.write_tensor_data(array)
        done += 1
        if progress:
            progress.update(done, name)
    if done != len(planned):
        raise RuntimeError(f"GGUF writer: {len(planned) - done} planned tensors were never written")
    writer.close()


# ---------------------------------------------------------------------------------------------- export
def default_gguf_type(store) -> str:
    """``tq2_0`` for a ternary (qat) store, ``f16`` otherwise."""
    return "tq2_0" if store.settings.mode == "qat" else "f16"


def tensor_types(store, arch: str, gguf_type: str) -> tuple[dict, list[str]]:
    """``({gguf name: (numpy shape, qtype)}, notes)`` in store order, choosing each tensor's type as
    llama.cpp's converter does (norms F32, embedding/head F16 in TQ files, F16 where rows do not fit blocks)."""
    Q = gguf.GGMLQuantizationType
    config = store.config
    wanted = quant_type(gguf_type)
    plan, notes = {}, []
    factors = rope_factors(config)
    if factors is not None:
        plan[gguf_tensor_name(arch, "rope_freqs")] = ((factors.numel(),), Q.F32)
    for unit in store.units:
        for name, shape in unit_shapes(config, unit).items():
            tensor = gguf_tensor_name(arch, unit, name)
            if len(shape) < 2:
                qtype = Q.F32
            elif not is_block(unit) and gguf_type in TERNARY_TYPES:
                qtype = Q.F16
            else:
                qtype = wanted
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                if shape[-1] % block:
                    notes.append(f"{tensor}: rows of {shape[-1]} values are not a multiple of {block}, so it is "
                                 f"written as F16 instead of {gguf_type.upper()}")
                    qtype = Q.F16
            plan[tensor] = (tuple(shape), qtype)
    return plan, notes


def export_from_store(store, out_dir: str, gguf_type: str | None = None, file_name: str = FILE_NAME,
                      progress: bool = True, modelfile: bool = True, **_ignored) -> str:
    """Write ``out_dir/model.gguf`` (and an Ollama ``Modelfile`` beside it) from ``store``; returns the GGUF's
    path. Everything is checked before a byte is written; the file appears only when complete."""
    config = store.config
    gguf_type = (gguf_type or default_gguf_type(store)).lower()
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if gguf_type in TERNARY_TYPES and store.settings.mode != "qat":
        raise GGUFError(f"--gguf-type {gguf_type} encodes ternary weights only, and store {store.path} is a "
                        f"{store.settings.mode} store with full-precision weights; choose f16, bf16, q8_0 or f32")
    arch = gguf_architecture(config, f"store {store.path}")
    try:
        vocabulary, notes = gguf_vocabulary(store)
    except TokenizerError as error:
        raise GGUFError(f"cannot write the tokenizer of store {store.path} into the GGUF: {error}") from None
    plan, type_notes = tensor_types(store, arch, gguf_type)
    notes += type_notes
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, file_name)
    partial = path + ".partial"
    writer = new_writer(partial, arch, config, _model_name(store), gguf_type)
    write_vocabulary(writer, vocabulary)
    for name, (shape, qtype) in plan.items():
        plan_tensor(writer, name, shape, qtype)
    layout = Layout(store.settings)

    def arrays():
        factors = rope_factors(config)
        if factors is not None:
            name = gguf_tensor_name(arch, "rope_freqs")
            yield name, encode_tensor(factors, plan[name][1])
        for unit in store.units:
            weights = store.read(unit, "weights")
            names = config.block_shapes if is_block(unit) else ("weight",)
            for name in names:
                # What the forward pass computes with (a ternary projection: its codes times its scale), decoded
                # one tensor at a time so memory stays one fp32 projection even at 70B width.
                part = {key: value for key, value in weights.items() if key == name or key.startswith(name + ".")}
                value = layout.forward_tensors(unit, part, torch.float32, "cpu")[name]
                tensor = gguf_tensor_name(arch, unit, name)
                yield tensor, encode_tensor(to_gguf_layout(arch, config, name, value), plan[tensor][1])
                del value

    bar = Progress(len(plan), f"exporting {file_name} ({gguf_type})") if progress else None
    try:
        write_planned(writer, arrays(), bar)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    if modelfile:
        write_modelfile(out_dir, file_name, vocabulary)
    for note in notes:
        print(f"note: {note}", flush=True)
    return path


def _model_name(store) -> str:
    source = store.extra.get("source") or {}
    return source.get("name") or os.path.basename(os.path.abspath(store.path))
