"""LLM-as-judge evaluation: answer held-out Alpaca or chat records greedily, then have a judge model grade each
answer against the record's reference answer, 1-5, with a fixed rubric in the style of Prometheus.

The judge is a model this tool opens (a store or an importable model, streamed through ``generate.Generator``
with its chat template) or an OpenAI-compatible chat-completions endpoint on this machine (a llama.cpp server,
Ollama), reached with the standard library only. A reply without a recognisable score is counted as
*unparsed*, never guessed. Results: ``judge.jsonl`` (one line per model and record) and ``judge_summary.json``.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from offload_bitnet.formats import ensure_store
from offload_bitnet.formats.merge import load_adapters
from offload_bitnet.generate import DEFAULT_MEMORY_BUDGET, Generator, SamplingOptions, decode_continuation
from offload_bitnet.io.files import write_file_atomic
from offload_bitnet.progress import Progress
from offload_bitnet.store.blockstore import BlockStore
from offload_bitnet.tokenizers.loaders import open_tokenizer
from offload_bitnet.train import data as datalib
from offload_bitnet.train.records import DataOptions, alpaca_prompt, messages_prompt_ids

SYSTEM_PROMPT = ("You are a fair judge assistant tasked with providing clear, objective feedback based on specific "
                 "criteria, ensuring each assessment reflects the absolute standards set for performance.")
CRITERIA = ("Does the response follow the instruction and give the content of the reference answer, in the "
            "reference answer's style, clearly, accurately and concisely?")
# The 1-5 rubric of the Llama-3.2 SFT seed (which judged with Prometheus through Ollama).
RUBRIC = {
    1: "The response fails to address the instructions, providing irrelevant, incorrect, or excessively verbose "
       "information that detracts from the user's request.",
    2: "The response partially addresses the instructions but includes significant inaccuracies, irrelevant "
       "details, or excessive elaboration that detracts from the main task.",
    3: "The response follows the instructions with some minor inaccuracies or omissions. It is generally relevant "
       "and clear, but may include some unnecessary details or could be more concise.",
    4: "The response adheres to the instructions, offering clear, accurate, and relevant information in a concise "
       "manner, with only occasional, minor instances of excessive detail or slight lack of clarity.",
    5: "The response fully adheres to the instructions, providing a clear, accurate, and relevant answer in a "
       "concise and efficient manner. It addresses all aspects of the request without unnecessary details or "
       "elaboration.",
}
TASK_DESCRIPTION = """###Task Description:
An instruction (might include an Input inside it), a response to evaluate, a reference answer that gets a score of 5, and a score rubric representing an evaluation criterion are given.
1. Write a short feedback (one to three sentences) that assesses the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing the feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "Feedback: (a short feedback for the criterion) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations."""
PROMPT_TEMPLATE = TASK_DESCRIPTION + """

###The instruction to evaluate:
{instruction}

###Response to evaluate:
{response}

###Reference Answer (Score 5):
{reference}

###Score Rubrics:
{rubric}

###Feedback: """
SCORES = (1, 2, 3, 4, 5)
MAX_FAILED_IN_A_ROW = 3  # an endpoint that fails this many records in a row is down: stop asking it
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy


class JudgeError(ValueError):
    """The evaluation cannot run; the message says what to change."""


def rubric_text() -> str:
    return f"[{CRITERIA}]\n" + "\n".join(f"Score {score}: {RUBRIC[score]}" for score in SCORES)


def build_judge_prompt(instruction: str, response: str, reference: str) -> str:
    """The Prometheus-style absolute-grading prompt (the user message; ``SYSTEM_PROMPT`` is the system one)."""
    return PROMPT_TEMPLATE.format(instruction=instruction.strip(), response=response.strip(),
                                  reference=reference.strip(), rubric=rubric_text())


def judge_messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


# ---------------------------------------------------------------------------------------------- scores
_NUMBER = r"\(?\s*(\d+(?:\.\d+)?)\b(?!\.\d)"
# In order of authority: the format the prompt asks for, a labelled score, a fraction of 5, a bare number.
_SCORE_PATTERNS = (
    re.compile(r"(?:\[\s*RESULT\s*\]|\bRESULT\s*:)\s*[:=-]?\s*" + _NUMBER, re.I),
    re.compile(r"\b(?:score|rating|grade)\s*(?:is|of|=|:|-)\s*" + _NUMBER, re.I),
    re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*5\b", re.I),
    re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\s*\**\s*\.?\s*$"),
)
# Prompt text a weak judge may echo back; it mentions scores without being one.
_ECHOES = tuple(line for line in (TASK_DESCRIPTION + "\n" + rubric_text()).splitlines() if line.strip()) + (
    "(Score 5)", "a score of 5", "between 1 and 5")


def parse_score(reply: str | None) -> int | None:
    """The 1-5 score in a judge's reply, or None when it holds none (see ``read_score``)."""
    return read_score(reply)[0]


def read_score(reply: str | None) -> tuple[int | None, str]:
    """``(score, "")``, or ``(None, why not)`` for a reply without one clear 1-5 verdict.

    The ``[RESULT] N`` the prompt asks for wins; without one a labelled ``Score: N`` (also rating/grade, "is",
    "of"); then ``N/5`` or ``N out of 5``; then a reply that is just the number. Echoed prompt text is ignored.
    Matches of the deciding form that disagree (a weak judge listing every score), a value outside 1-5 or a
    fraction are not resolved into a score: that would be a guess."""
    if not reply or not reply.strip():
        return None, "empty reply"
    text = reply
    for echo in _ECHOES:
        text = text.replace(echo, " ")
    for pattern in _SCORE_PATTERNS:
        found = pattern.findall(text)
        if not found:
            continue
        values = sorted(set(found), key=float)
        if len(values) > 1:
            return None, f"conflicting scores {', '.join(values)}"
        if "." in values[0] or int(values[0]) not in SCORES:
            return None, f"score {values[0]} is not an integer from 1 to 5"
        return int(values[0]), ""
    return None, "no score"


def summarize_scores(scores: list[int | None]) -> dict:
    """Mean over the parsed scores, the count of each score, and how many replies had none."""
    parsed = [s for s in scores if s is not None]
    return {"records": len(scores), "scored": len(parsed), "unparsed": len(scores) - len(parsed),
            "mean": round(sum(parsed) / len(parsed), 4) if parsed else None,
            "distribution": {str(score): parsed.count(score) for score in SCORES}}


def describe_summary(label: str, summary: dict) -> str:
    mean = f"mean score {summary['mean']:.2f}" if summary["mean"] is not None else "no score parsed"
    spread = ", ".join(f"{score}: {count}" for score, count in summary["distribution"].items())
    return (f"{label}: {mean} over {summary['scored']} of {summary['records']} records "
            f"({summary['unparsed']} unparsed); scores {spread}")


def compare(base: list[int | None], tuned: list[int | None]) -> dict:
    """Per record, where both replies were scored: how often the tuned model scored higher, the same, lower."""
    pairs = [(b, t) for b, t in zip(base, tuned) if b is not None and t is not None]
    return {"paired": len(pairs), "better": sum(t > b for b, t in pairs), "same": sum(t == b for b, t in pairs),
            "worse": sum(t < b for b, t in pairs),
            "mean_difference": round(sum(t - b for b, t in pairs) / len(pairs), 4) if pairs else None}


# ---------------------------------------------------------------------------------------------- records
@dataclasses.dataclass
class JudgeItem:
    """One held-out record: what the judge reads as the instruction, the reference, the model's prompt ids."""

    instruction: str
    reference: str
    prompt_ids: list[int]


def record_item(record: dict, tokenizer) -> JudgeItem:
    """An Alpaca record (instruction, input, output) or a chat (everything before its last assistant turn)."""
    if "messages" not in record:
        text = record["instruction"] + (f"\n\n{record['input']}" if (record.get("input") or "").strip() else "")
        return JudgeItem(text, record["output"],
                         tokenizer.encode(alpaca_prompt(record), bos=True, eos=False))
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context = messages[:last]
    if len(context) == 1 and context[0]["role"] == "user":
        text = context[0]["content"]
    else:
        text = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in context)
    return JudgeItem(text, messages[last]["content"], messages_prompt_ids(tokenizer, context))


def judge_items(examples: list, tokenizer, max_records: int = 0) -> list[JudgeItem]:
    """The judgeable records behind ``examples`` (``data.Example``; plain text has no reference to grade)."""
    items = [record_item(e.source, tokenizer) for e in examples if e.source is not None]
    return items[:max_records] if max_records else items


def load_items(paths: list[str], tokenizer, max_seq_len: int, max_records: int = 0) -> list[JudgeItem]:
    """Every Alpaca or chat record of ``paths`` (read and checked by ``data.load_dataset``)."""
    options = DataOptions(max_seq_len=max_seq_len)
    dataset = datalib.load_dataset(paths, [], tokenizer, options, val_fraction=0.0, seed=0)
    items = judge_items(dataset.train, tokenizer, max_records)
    if not items:
        raise JudgeError(f"{', '.join(paths)} holds no Alpaca or chat records: the judge grades answers against "
                         "the reference answer of each record, which plain text does not have")
    return items


# ---------------------------------------------------------------------------------------------- answers
def answer_with_store(store, tokenizer, items: list[JudgeItem], max_new_tokens: int, label: str,
                      device: str = "cpu", memory_budget: int | None = None, batch_size: int = 4,
                      adapters=None) -> list[str]:
    """Greedy answers from a store (a path or an open ``BlockStore``) through ``generate.Generator``, with LoRA
    ``adapters`` (an ``AdapterSet``) applied when given, without merging."""
    generator = Generator(store, device=device, memory_budget=memory_budget or DEFAULT_MEMORY_BUDGET,
                          adapters=adapters)
    bar = Progress(len(items), f"answering ({label})")
    answers = []
    try:
        for start in range(0, len(items), batch_size):
            batch = [fit_prompt(item.prompt_ids, generator.config.max_seq_len)
                     for item in items[start:start + batch_size]]
            result = generator.generate(batch, SamplingOptions(max_new_tokens=max_new_tokens),
                                        stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
            answers += [decode_continuation(tokenizer, p, t) for p, t in zip(batch, result.tokens)]
            bar.update(len(answers))
    finally:
        generator.close()
    return answers


def fit_prompt(ids: list[int], context: int) -> list[int]:
    """A prompt that leaves room for an answer: an over-long one keeps its end (where the question is asked)."""
    return ids if len(ids) < context - 1 else ids[-(context // 2):]


# ---------------------------------------------------------------------------------------------- judges
class EngineJudge:
    """A judge model this tool opens (store or importable model), streamed through ``generate.Generator``."""

    def __init__(self, path: str, device: str = "cpu", memory_budget: int | None = None, max_tokens: int = 256,
                 batch_size: int = 4):
        if not os.path.exists(path):
            raise JudgeError(f"judge model {path} does not exist; give a store, an HF or Meta folder, or a .gguf "
                             "file (or --judge-url for a server)")
        self.name = os.path.abspath(path)
        self.store = BlockStore(ensure_store(path, progress=True), writable=False)
        self.tokenizer = open_tokenizer(self.store.path, self.store.extra.get("tokenizer"))
        self.generator = Generator(self.store, device=device, memory_budget=memory_budget or DEFAULT_MEMORY_BUDGET)
        self.max_tokens, self.batch_size = max_tokens, batch_size

    def replies(self, prompts: list[str], on_done) -> list[dict]:
        """``{"reply": text}`` per prompt, greedy, in batches; ``on_done(count)`` after each batch."""
        context = self.generator.config.max_seq_len
        results = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [messages_prompt_ids(self.tokenizer, judge_messages(p))
                       for p in prompts[start:start + self.batch_size]]
            fits = [ids for ids in encoded if len(ids) < context - 1]
            replies = iter([])
            if fits:
                room = min(self.max_tokens, context - max(len(ids) for ids in fits))
                result = self.generator.generate(fits, SamplingOptions(max_new_tokens=room),
                                                 stop_ids=self.tokenizer.stop_ids, pad_id=self.tokenizer.pad_id)
                replies = iter(decode_continuation(self.tokenizer, ids, t) for ids, t in zip(fits, result.tokens))
            for ids in encoded:
                results.append({"reply": next(replies)} if len(ids) < context - 1 else
                               {"reply": None, "error": f"the judge prompt has {len(ids)} tokens; the judge's "
                                                        f"context is {context}"})
            on_done(len(results))
        return results

    def close(self):
        self.generator.close()
        self.store.close()


def check_url(url: str) -> str:
    """The chat-completions address of an OpenAI-compatible ``url`` (``http://127.0.0.1:8080/v1``); only this
    machine's loopback addresses are accepted: held-out data is not sent elsewhere."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise JudgeError(f"--judge-url {url!r}: give an http address on this machine, e.g. http://127.0.0.1:8080/v1 "
                         "(llama.cpp server) or http://127.0.0.1:11434/v1 (Ollama); other hosts are refused so that "
                         "the held-out data stays here (forward a remote server with ssh -L PORT:HOST:PORT)")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class HttpJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint on this machine (temperature 0).

    Each request waits at most ``timeout`` seconds and is tried at most ``attempts`` times; after
    ``MAX_FAILED_IN_A_ROW`` records in a row without an answer the endpoint is taken to be down."""

    def __init__(self, url: str, model: str | None = None, max_tokens: int = 256, timeout: float = 300.0,
                 attempts: int = 2):
        self.endpoint = check_url(url)
        self.model = model or "judge"
        self.name = f"{self.model} at {self.endpoint}"
        self.max_tokens, self.timeout, self.attempts = max_tokens, timeout, max(1, attempts)

    def ask(self, prompt: str) -> str:
        """One reply, or ``JudgeError`` saying why there was none."""
        body = json.dumps({"model": self.model, "messages": judge_messages(prompt), "temperature": 0,
                           "max_tokens": self.max_tokens, "seed": 0, "stream": False}).encode()
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(2.0 * attempt, 5.0))
            request = urllib.request.Request(self.endpoint, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with _LOOPBACK.open(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read().decode("utf-8"))
                return answer["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code}: {error.read()[:300].decode('utf-8', 'replace')}"
                if 400 <= error.code < 500:
                    break  # the request itself is wrong: asking again gives the same answer
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                problem = f"no answer from {self.endpoint}: {getattr(error, 'reason', error)}"
            except (ValueError, KeyError, IndexError, TypeError) as error:
                problem = f"{self.endpoint} did not answer like an OpenAI chat-completions endpoint: {error!r}"
                break
        raise JudgeError(problem)

    def replies(self, prompts: list[str], on_done) -> list[dict]:
        results, failed = [], 0
        for prompt in prompts:
            try:
                results.append({"reply": self.ask(prompt)})
                failed = 0
            except JudgeError as error:
                failed += 1
                if failed >= min(MAX_FAILED_IN_A_ROW, len(prompts)):
                    raise JudgeError(f"the judge at {self.endpoint} failed {failed} record(s) in a row ({error}); "
                                     "is the server running? Start it (python -m llama_cpp.server --model "
                                     "FILE.gguf --port PORT, or ollama serve) and run again") from None
                results.append({"reply": None, "error": str(error)})
            on_done(len(results))
        return results

    def close(self):
        pass


def open_judge(model: str | None, url: str | None, device: str = "cpu", memory_budget: int | None = None,
               max_tokens: int = 256, timeout: float = 300.0):
    """``HttpJudge`` with ``url`` (``model``: the name sent to the server), else ``EngineJudge`` of ``model``."""
    if url:
        return HttpJudge(url, model, max_tokens=max_tokens, timeout=timeout)
    if not model:
        raise JudgeError("name a judge: --judge-model PATH (a store or importable model) or --judge-url URL")
    return EngineJudge(model, device=device, memory_budget=memory_budget, max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------- the run
def evaluate(items: list[JudgeItem], answers: dict[str, list[str]], judge, out_dir: str, say=print) -> dict:
    """Grade ``answers`` (model label -> one answer per item) with ``judge``; writes ``judge.jsonl`` and
    ``judge_summary.json`` in ``out_dir`` and returns the summary."""
    rows, scores = [], {}
    for label, texts in answers.items():
        prompts = [build_judge_prompt(item.instruction, text, item.reference) for item, text in zip(items, texts)]
        bar = Progress(len(prompts), f"judging ({label})")
        replies = judge.replies(prompts, lambda done, note="": bar.update(done, note))
        readings = [read_score(r["reply"]) for r in replies]
        scores[label] = [score for score, _ in readings]
        for index, (item, text, reply, (score, why)) in enumerate(zip(items, texts, replies, readings)):
            rows.append({"model": label, "index": index, "prompt": item.instruction, "reference": item.reference,
                         "answer": text, "judge_reply": reply["reply"], "score": score,
                         **({"unparsed": reply.get("error") or why} if score is None else {}),
                         **({"error": reply["error"]} if "error" in reply else {})})
    summary = {"judge": judge.name, "rubric": rubric_text(),
               "models": {label: summarize_scores(values) for label, values in scores.items()}}
    if "base" in scores and "tuned" in scores:
        summary["tuned_vs_base"] = compare(scores["base"], scores["tuned"])
    os.makedirs(out_dir, exist_ok=True)
    write_file_atomic(os.path.join(out_dir, "judge.jsonl"),
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
    write_file_atomic(os.path.join(out_dir, "judge_summary.json"), (json.dumps(summary, indent=1) + "\n").encode())
    say(f"judge: {judge.name}")
    for label, values in summary["models"].items():
        say("  " + describe_summary(label, values))
    if "tuned_vs_base" in summary:
        c = summary["tuned_vs_base"]
        difference = f"{c['mean_difference']:+.2f}" if c["mean_difference"] is not None else "n/a"
        say(f"  tuned vs base on {c['paired']} records scored for both: {c['better']} better, {c['same']} the same, "
            f"{c['worse']} worse (mean difference {difference})")
    say(f"  per-record results: {os.path.join(out_dir, 'judge.jsonl')}")
    return summary


def add_arguments(parser):
    """The options of ``offload-bitnet judge``."""
    parser.add_argument("model", help="the model to evaluate: a store or importable model (HF folder, Meta folder, "
                        ".gguf); with --adapter, the base the adapters were trained on")
    parser.add_argument("--data", action="append", required=True, metavar="FILE",
                        help="held-out Alpaca or chat records (.jsonl/.json); repeat for several")
    parser.add_argument("--judge-model", metavar="PATH", help="the judge: a store or importable model run through "
                        "the engine with its chat template; with --judge-url, the model name sent to the server")
    parser.add_argument("--judge-url", metavar="URL", help="an OpenAI-compatible endpoint on this machine, e.g. "
                        "http://127.0.0.1:8080/v1 (llama.cpp server) or http://127.0.0.1:11434/v1 (Ollama)")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapters to apply without merging (RUN_DIR/adapter "
                        "or a PEFT folder)")
    parser.add_argument("--compare-base", action="store_true", help="answer the same records with the base model "
                        "too (MODEL without --adapter, else --base-model) and compare")
    parser.add_argument("--base-model", metavar="PATH", help="the base model for --compare-base without --adapter")
    parser.add_argument("--out", default=".", help="folder for judge.jsonl and judge_summary.json")
    parser.add_argument("--max-records", type=int, default=0, help="judge at most this many records (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer")
    parser.add_argument("--judge-max-tokens", type=int, default=256, help="tokens per judge reply")
    parser.add_argument("--judge-timeout", type=float, default=300.0, help="seconds one --judge-url request may take")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer of MODEL instead of its own")
    parser.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N or mps")


def run_command(args) -> int:
    """``offload-bitnet judge``: answer, grade, report."""
    if args.max_records < 0 or args.max_new_tokens < 1 or args.judge_max_tokens < 1:
        raise JudgeError("--max-records must be 0 or more, --max-new-tokens and --judge-max-tokens at least 1")
    if args.compare_base and not (args.adapter or args.base_model):
        raise JudgeError("--compare-base needs a base: --adapter DIR (the base is MODEL) or --base-model PATH")
    if args.judge_url:
        check_url(args.judge_url)  # before minutes of answering
    elif not args.judge_model:
        raise JudgeError("name a judge: --judge-model PATH (a store or importable model) or --judge-url URL")
    store_path = ensure_store(args.model, progress=True)
    store = BlockStore(store_path, writable=False)
    tokenizer = open_tokenizer(store.path, store.extra.get("tokenizer"), args.tokenizer)
    model_config = store.config
    context = model_config.max_seq_len
    store.close()
    items = load_items(args.data, tokenizer, context, args.max_records)
    answers = {}
    if args.compare_base:
        base = store_path if args.adapter else ensure_store(args.base_model, progress=True)
        answers["base"] = answer_with_store(base, tokenizer, items, args.max_new_tokens, "base", args.device)
    adapters = load_adapters(args.adapter, model_config) if args.adapter else None
    answers["tuned"] = answer_with_store(store_path, tokenizer, items, args.max_new_tokens, "tuned", args.device,
                                         adapters=adapters)
    judge = open_judge(args.judge_model, args.judge_url, args.device, max_tokens=args.judge_max_tokens,
                       timeout=args.judge_timeout)
    try:
        evaluate(items, answers, judge, args.out)
    finally:
        judge.close()
    return 0


def judge_finished_run(trainer, say=print):
    """``finetune.py --judge-model/--judge-url``: grade the finished run's answers to its validation records
    (RUN_DIR/judge.jsonl); with ``--judge-compare-base`` the base model's answers too."""
    config, paths = trainer.config, trainer.paths
    items = judge_items(trainer.dataset.val, trainer.tokenizer)
    if not items:
        say("note: no judge evaluation: the validation data holds no Alpaca or chat records")
        return None
    budget, tokens = config.memory_budget_bytes, config.max_new_tokens
    answers = {}
    if config.judge_compare_base:
        if trainer.lora:  # the adapters' base store is never written
            answers["base"] = answer_with_store(trainer.store, trainer.tokenizer, items, tokens, "base",
                                                config.device, budget)
        elif paths.origin == "import":
            answers["base"] = answer_with_store(ensure_store(config.model, progress=True), trainer.tokenizer, items,
                                                tokens, "base", config.device, budget)
        else:
            say("note: --judge-compare-base skipped: this run trained "
                + ("a new demo model (its base is random)" if config.is_demo else f"{paths.store_dir} in place, so "
                   "its base weights are gone; run offload-bitnet judge --compare-base --base-model on a copy"))
    if trainer.lora and not config.merge:
        answers["tuned"] = answer_with_store(trainer.store, trainer.tokenizer, items, tokens, "tuned", config.device,
                                             budget, adapters=trainer.engine.adapters)
    else:
        trainer.engine.flush()  # the generator reads the store: every update of the last step must be there
        tuned = paths.merged_dir if trainer.lora else trainer.store
        answers["tuned"] = answer_with_store(tuned, trainer.tokenizer, items, tokens, "tuned", config.device, budget)
    try:
        judge = open_judge(config.judge_model, config.judge_url, config.device, budget)
        try:
            summary = evaluate(items, answers, judge, paths.run_dir, say=say)
        finally:
            judge.close()
    except JudgeError as error:  # the training is finished and saved: a judge that fails does not undo it
        say(f"note: no judge evaluation: {error}. The run is finished and saved; judge it later with "
            "offload-bitnet judge MODEL --data VAL.jsonl (--adapter RUN_DIR/adapter) --judge-model/--judge-url ...")
        return None
    trainer.metrics.append({"type": "judge", "step": trainer.committed_step(), "judge": summary["judge"],
                            **{f"{label}_mean": s["mean"] for label, s in summary["models"].items()},
                            **{f"{label}_unparsed": s["unparsed"] for label, s in summary["models"].items()}})
    return summary
