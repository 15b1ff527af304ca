"""Numerical parity of the streaming engine with transformers' own models (acceptance for the engine).

Every case builds a tiny random model in transformers, saves it with ``save_pretrained``, imports the folder
into an fp32 store and compares, on the same token batch:

* logits: ``StreamingEngine.logits`` vs transformers' forward (atol 1e-4). Proves the block math, RoPE (incl.
  Llama-3 scaling), GQA, head_dim, tied heads and (BitNet) the weight/activation quantization agree.
* loss: ``StreamingEngine.loss`` and the loss ``train_step`` reports vs transformers' ``labels=`` loss (mean
  over the shifted tokens, -100 ignored). Proves the label shift and the token-mean reduction, also across
  micro-batches.
* gradients: the gradient of that loss w.r.t. every weight, as the engine computes it inside ``train_step``,
  vs transformers' autograd (for BitNet: the straight-through gradient of the latent weights, which is what
  QAT updates). The engine applies its gradients at once, so they are read back exactly: with AdamW
  ``beta1 = 0`` the first moment the engine stores after one step *is* the gradient (``lerp(0, g, 1) = g``),
  and ``lr = 0`` leaves the weights alone. The in-memory reference (``InMemoryModel``, plain autograd) is
  compared too, so a failure says whether the math or the streaming differs.

transformers' BitNet quantizers are wrapped in ``torch.compile``; compiling them costs ~35 s on this CPU, so
dynamo is disabled here and the functions run eagerly (the same arithmetic, see ``test_ternary``).
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
import torch._dynamo  # noqa: E402

from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine  # noqa: E402
from offload_bitnet.formats import hf  # noqa: E402
from offload_bitnet.reference.inmemory import InMemoryModel  # noqa: E402
from offload_bitnet.model.adamw import AdamWConfig  # noqa: E402
from offload_bitnet.store.blockstore import BlockStore, StoreSettings  # noqa: E402

VOCAB = 128
# transformers refuses to load BitNet-quantized checkpoints without accelerate (BitNetHfQuantizer).
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason="transformers loads BitNet checkpoints only with accelerate installed")
LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
# Gradients are compared relative to the largest gradient of the same tensor (fp32 accumulation order
# differs between transformers' eager attention and the engine's SDPA and chunked cross-entropy).
GRAD_RTOL = 2e-5  # measured: <= 1.3e-6
MEASURED = {}


@pytest.fixture(autouse=True, scope="module")
def _eager_and_report(eager_transformers_quantizers):
    yield
    if MEASURED:
        print("\nmax abs errors vs transformers:", json.dumps(MEASURED, indent=1))


def _randomize(model: torch.nn.Module, seed: int):
    """Non-trivial weights: matrices N(0, 0.05), norms 1 + N(0, 0.1) (so a mixed-up norm is caught)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


LLAMA_CASES = {
    "untied-gqa": dict(tie_word_embeddings=False, num_key_value_heads=2),
    "tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "gqa-headdim-llama3rope": dict(tie_word_embeddings=False, num_key_value_heads=2, head_dim=24,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}),
}


def llama_folder(tmp_path, case: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, attn_implementation="eager", **LLAMA_CASES[case])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _randomize(model, seed)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model.eval(), folder


def bitnet_folder(tmp_path, tie: bool, seed: int = 0):
    """A latent BitNet checkpoint whose config asks transformers for online (QAT) autobitlinear quantization;
    transformers only applies it through from_pretrained, so the model is reloaded from the folder."""
    from transformers import BitNetConfig, BitNetForCausalLM

    config = BitNetConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = BitNetForCausalLM(config)
    _randomize(model, seed)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    config_json = json.loads((folder / "config.json").read_text())
    config_json["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                          "quantization_mode": "online", "modules_to_not_convert": ["lm_head"]}
    (folder / "config.json").write_text(json.dumps(config_json))
    loaded = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    from transformers.integrations.bitnet import AutoBitLinear

    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, AutoBitLinear) and q_proj.online_quant, "transformers did not enable online QAT"
    assert not isinstance(loaded.lm_head, AutoBitLinear)
    return loaded.eval(), folder


def import_fp32(folder, tmp_path, mode: str) -> str:
    return hf.import_to_store(str(folder), str(tmp_path / "store"),
                              StoreSettings(mode=mode, shadow_dtype="fp32", state_dtype="fp32"), progress=False)


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 14), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[1, -2:] = -100
    return ids, labels


def transformers_grads(model, ids, labels) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def engine_grads(store_path: str, micro_batches) -> tuple[float, dict[tuple[str, str], torch.Tensor]]:
    """The gradients the engine computes in one ``train_step``, read back from its AdamW first moments."""
    store = BlockStore(store_path, writable=True)
    engine = StreamingEngine(store, EngineOptions(optim=AdamWConfig(lr=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0)))
    try:
        stats = engine.train_step(micro_batches)
        engine.flush()
        grads = {}
        for unit in store.units:
            optim = store.read(unit, "optim")
            for key, value in optim.items():
                if key.endswith(".exp_avg"):
                    grads[(unit, key[: -len(".exp_avg")])] = value.float()
    finally:
        engine.close()
    return stats.loss, grads


def inmemory_grads(store_path: str, micro_batches) -> dict[tuple[str, str], torch.Tensor]:
    model = InMemoryModel.from_store(BlockStore(store_path))
    model.step_loss(micro_batches).backward()
    return {(unit, name): p.grad for unit, params in model.named_unit_tensors().items() for name, p in params.items()}


def compare_grads(reference: dict[str, torch.Tensor], ours: dict[tuple[str, str], torch.Tensor],
                  config) -> tuple[float, float]:
    """Assert every transformers gradient matches ours; returns the largest abs and relative errors."""
    owners = hf.key_owners(config)
    assert len(reference) == len(ours) == len({owners[k] for k in reference}), "parameter sets differ"
    worst, worst_relative = 0.0, 0.0
    for key, expected in reference.items():
        got = ours[owners[key]]
        assert got.shape == expected.shape, key
        scale = expected.abs().max().item()
        assert scale > 0, f"{key}: zero gradient, the test would prove nothing"
        error = (got - expected).abs().max().item()
        assert error <= GRAD_RTOL * scale, f"{key}: max abs error {error:.3g} (largest gradient {scale:.3g})"
        worst, worst_relative = max(worst, error), max(worst_relative, error / scale)
    return worst, worst_relative


def check_case(label, reference_model, store_path, micro: int):
    ids, labels = batch()
    with torch.no_grad():
        reference = reference_model(input_ids=ids, labels=labels)
    engine = StreamingEngine(BlockStore(store_path))
    logits = engine.logits(ids)
    loss = engine.loss(ids, labels)
    engine.close()
    logits_error = (logits - reference.logits).abs().max().item()
    assert logits_error <= LOGITS_ATOL, f"logits differ by {logits_error}"
    assert loss == pytest.approx(reference.loss.item(), abs=LOSS_ATOL)

    ref_loss, ref_grads = transformers_grads(reference_model, ids, labels)
    micro_batches = [(ids, labels)] if micro == 1 else [(ids[i:i + 1], labels[i:i + 1]) for i in range(2)]
    config = BlockStore(store_path).config
    memory_error = compare_grads(ref_grads, inmemory_grads(store_path, micro_batches), config)
    step_loss, grads = engine_grads(store_path, micro_batches)
    assert step_loss == pytest.approx(ref_loss, abs=LOSS_ATOL)
    engine_error = compare_grads(ref_grads, grads, config)
    MEASURED[label] = {"logits": logits_error, "loss": abs(loss - reference.loss.item()),
                       "grad_engine_abs": engine_error[0], "grad_engine_rel": engine_error[1],
                       "grad_inmemory_abs": memory_error[0], "grad_inmemory_rel": memory_error[1]}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_engine_matches_transformers(tmp_path, case):
    model, folder = llama_folder(tmp_path, case)
    check_case(f"llama-{case}", model, import_fp32(folder, tmp_path, "full"), micro=2 if "tied" in case else 1)


@needs_accelerate
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_bitnet_qat_engine_matches_transformers_online_quantization(tmp_path, tie):
    model, folder = bitnet_folder(tmp_path, tie)
    store_path = import_fp32(folder, tmp_path, "qat")
    assert BlockStore(store_path).extra["source"]["weights"] == "latent"
    check_case(f"bitnet-{'tied' if tie else 'untied'}", model, store_path, micro=2 if tie else 1)


def test_gradient_comparison_detects_a_wrong_gradient(tmp_path):
    """The gradient check is not vacuous: one mis-scaled block gradient fails it."""
    model, folder = llama_folder(tmp_path, "untied-gqa")
    ids, labels = batch()
    _, ref_grads = transformers_grads(model, ids, labels)
    store_path = import_fp32(folder, tmp_path, "full")
    grads = inmemory_grads(store_path, [(ids, labels)])
    grads[("block.001", "up_proj")] = grads[("block.001", "up_proj")] * 1.001
    with pytest.raises(AssertionError, match="mlp.up_proj"):
        compare_grads(ref_grads, grads, BlockStore(store_path).config)


@pytest.mark.slow
@needs_accelerate
def test_bitnet_logits_match_with_transformers_compiled_quantizers(tmp_path):
    """The eager run above stands in for transformers' torch.compile'd WeightQuant/ActQuant; check once that
    the compiled kernels give the same logits (~40 s of compilation on CPU, hence slow)."""
    model, folder = bitnet_folder(tmp_path, tie=False)
    store_path = import_fp32(folder, tmp_path, "qat")
    ids, labels = batch()
    torch._dynamo.config.disable = False
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels)
    finally:
        torch._dynamo.config.disable = True
    engine = StreamingEngine(BlockStore(store_path))
    assert (engine.logits(ids) - expected.logits).abs().max() <= LOGITS_ATOL
    assert engine.loss(ids, labels) == pytest.approx(expected.loss.item(), abs=LOSS_ATOL)
    engine.close()
