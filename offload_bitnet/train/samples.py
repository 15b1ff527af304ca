"""Sample generations during a run: each --prompt encoded as the model saw its training data, checked against
the context before training starts, and continued greedily from the weights committed so far."""
from __future__ import annotations

from offload_bitnet.generate import GenerationError, Generator, SamplingOptions, decode_continuation
from offload_bitnet.train.messages import TrainError, say
from offload_bitnet.train.records import chat_prompt_ids
from offload_bitnet.train.runconfig import RunConfig


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A prompt as the model saw its training data: a user turn when it trains on chats, else plain text."""
    if chat:
        return chat_prompt_ids(tokenizer, prompt)
    return tokenizer.encode(prompt, bos=getattr(tokenizer, "add_bos", True))


def generate_samples(engine, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                     memory_budget: int, chat: bool = False) -> list[str] | None:
    """Greedy continuations of ``prompts`` from the weights committed so far, with the engine's LoRA adapters
    when it has them; None (said why) when generation is impossible (``GenerationError``)."""
    engine.flush()  # the generator reads the store: let every update of the last step reach it
    generator = Generator(engine.store, device=engine.backend.device, memory_budget=memory_budget,
                          adapters=engine.adapters)
    try:
        encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
        result = generator.generate(encoded, SamplingOptions(max_new_tokens=max_new_tokens, seed=seed),
                                    stop_ids=getattr(tokenizer, "stop_ids", None), pad_id=tokenizer.pad_id)
    except GenerationError as error:
        say(f"note: generation skipped: {error}")
        return None
    finally:
        generator.close()
    return [decode_continuation(tokenizer, p, t) for p, t in zip(encoded, result.tokens)]


def check_prompts(config: RunConfig, tokenizer, chat: bool, context: int):
    """Refuse a --prompt that does not fit the model's context (now, not after hours of training)."""
    for prompt in config.prompts:
        length = len(encode_prompt(tokenizer, prompt, chat))
        if length >= context:
            raise TrainError(f"the prompt {prompt[:40]!r}... has {length} tokens; the model's context is "
                             f"{context}. Shorten it.")
