"""offload_bitnet.judge: the score parser, the rubric prompt, judging with a store end to end (CLI and
finetune.py), --compare-base with LoRA adapters applied unmerged, and the HTTP path against a real llama.cpp
server (skipped when llama-cpp-python and its server extra are not installed)."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from offload_bitnet import create_model
from offload_bitnet import judge as judge_module
from offload_bitnet.cli import main as cli_main
from offload_bitnet.judge import (HttpJudge, JudgeError, JudgeItem, RUBRIC, SYSTEM_PROMPT, build_judge_prompt,
                                  check_url, evaluate, judge_messages, parse_score, summarize_scores)
from offload_bitnet.train.trainer import main as finetune_main
from real_models import smollm2_or_skip as smollm2_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(ROOT, "test_data")


# ---------------------------------------------------------------------------------------------- score parser
@pytest.mark.parametrize("reply, score", [
    ("Feedback: The response is correct and concise. [RESULT] 4", 4),
    ("Feedback: fine.\n[RESULT] 5", 5),
    ("[RESULT]: 3", 3),
    ("[Result] 2", 2),
    ("[ RESULT ] (1)", 1),
    ("RESULT: 5", 5),
    ("The answer is good. Score: 4", 4),
    ("score = 2", 2),
    ("I would give it a score of 3.", 3),
    ("Rating: 5/5", 5),
    ("Overall: 4/5.", 4),
    ("This deserves 2 out of 5.", 2),
    ("4", 4),
    ("**3**", 3),
    ("Score: 2. On reflection... [RESULT] 4", 4),          # the asked-for format wins
    ("The score is 5, and the score is a perfect 5.", 5),  # repeated, the same
    ("Feedback: misses the style, 3/5 overall. Score: 2", 2),  # a labelled score before a fraction
])
def test_scores_are_parsed_from_many_reply_shapes(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", [
    None, "", "The response is fine.", "[RESULT] 7", "Score: 0", "[RESULT] 4.5", "Score: 3.5/5",
    "[RESULT] (an integer number between 1 and 5)",
    # A weak judge echoing the prompt: its rubric names every score, none of them a verdict.
    "###Reference Answer (Score 5):\nParis.\n###Score Rubrics:\nScore 1: " + RUBRIC[1] + "\nScore 5: " + RUBRIC[5],
    "a reference answer that gets a score of 5, and a score rubric",
    "Feedback: 12 apples were on the table",
    "[RESULT] 2 ... no wait [RESULT] 5",
    # A degenerate reply cycling through every score (SmolLM2-135M as judge does this) holds no verdict.
    "The score is 5, and it is short. The score is 1, and it is short. The score is 2, and it is short.",
])
def test_replies_without_a_valid_score_are_not_guessed(reply):
    assert parse_score(reply) is None


def test_unparsed_replies_say_why():
    from offload_bitnet.judge import read_score

    assert read_score("Fine. [RESULT] 4") == (4, "")
    assert read_score("  ") == (None, "empty reply")
    assert read_score("Good answer.") == (None, "no score")
    assert read_score("Score: 3. Score: 1") == (None, "conflicting scores 1, 3")
    assert read_score("[RESULT] 4.5") == (None, "score 4.5 is not an integer from 1 to 5")


def test_summary_counts_every_score_and_the_unparsed():
    summary = summarize_scores([5, 4, None, 4, 1, None])
    assert summary == {"records": 6, "scored": 4, "unparsed": 2, "mean": 3.5,
                       "distribution": {"1": 1, "2": 0, "3": 0, "4": 2, "5": 1}}
    assert summarize_scores([None])["mean"] is None


# ---------------------------------------------------------------------------------------------- the rubric
def test_the_rubric_prompt_is_built_as_documented():
    prompt = build_judge_prompt("  What is 2+2?\n", "Four.", "4")
    sections = ["###Task Description:", "###The instruction to evaluate:\nWhat is 2+2?\n",
                "###Response to evaluate:\nFour.\n", "###Reference Answer (Score 5):\n4\n", "###Score Rubrics:\n[",
                "###Feedback: "]
    positions = [prompt.index(section) for section in sections]
    assert positions == sorted(positions) and prompt.endswith("###Feedback: ")
    assert '"Feedback: (a short feedback for the criterion) [RESULT] (an integer number between 1 and 5)"' in prompt
    for score, text in RUBRIC.items():
        assert f"Score {score}: {text}\n" in prompt + "\n"
    messages = judge_messages(prompt)
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert RUBRIC[1] in readme and RUBRIC[5] in readme  # the rubric is documented as it is used


class FixedReplies:
    """A judge whose replies are given (for the bookkeeping of ``evaluate``, not for any judge's behaviour)."""

    name = "fixed"

    def __init__(self, replies):
        self.replies_by_response = replies

    def replies(self, prompts, on_done):
        out = [{"reply": self.replies_by_response[p.split("###Response to evaluate:\n")[1].split("\n")[0]]}
               for p in prompts]
        on_done(len(out))
        return out


def test_evaluate_writes_per_record_results_summary_and_comparison(tmp_path):
    items = [JudgeItem("q1", "r1", [1]), JudgeItem("q2", "r2", [1]), JudgeItem("q3", "r3", [1])]
    judge = FixedReplies({"b1": "[RESULT] 2", "b2": "no idea", "b3": "Score: 3",
                          "t1": "Good. [RESULT] 5", "t2": "[RESULT] 4", "t3": "3/5"})
    lines = []
    summary = evaluate(items, {"base": ["b1", "b2", "b3"], "tuned": ["t1", "t2", "t3"]}, judge, str(tmp_path),
                       say=lines.append)
    rows = [json.loads(line) for line in open(tmp_path / "judge.jsonl")]
    assert [(r["model"], r["index"], r["prompt"], r["reference"], r["answer"], r["score"]) for r in rows] == [
        ("base", 0, "q1", "r1", "b1", 2), ("base", 1, "q2", "r2", "b2", None), ("base", 2, "q3", "r3", "b3", 3),
        ("tuned", 0, "q1", "r1", "t1", 5), ("tuned", 1, "q2", "r2", "t2", 4), ("tuned", 2, "q3", "r3", "t3", 3)]
    assert rows[1]["judge_reply"] == "no idea" and rows[1]["unparsed"] == "no score" and "unparsed" not in rows[0]
    assert summary["models"]["base"]["mean"] == 2.5 and summary["models"]["base"]["unparsed"] == 1
    assert summary["models"]["tuned"]["mean"] == 4.0
    assert summary["tuned_vs_base"] == {"paired": 2, "better": 1, "same": 1, "worse": 0, "mean_difference": 1.5}
    assert json.load(open(tmp_path / "judge_summary.json")) == summary
    assert any("tuned: mean score 4.00 over 3 of 3 records (0 unparsed)" in line for line in lines)
    assert any("1 better, 1 the same, 0 worse (mean difference +1.50)" in line for line in lines)


# ---------------------------------------------------------------------------------------------- a store as judge
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A tiny model to evaluate and a tiny random judge with room for the rubric prompt (byte tokens)."""
    root = tmp_path_factory.mktemp("judge_stores")
    model = create_model(str(root / "model"), size="demo", arch="llama", n_layers=2)
    judge = create_model(str(root / "judge"), size="demo", arch="llama", n_layers=1, dim=64, n_heads=2,
                         n_kv_heads=1, hidden_dim=128, max_seq_len=4096, seed=1)
    return model, judge


def test_a_random_store_as_judge_end_to_end_counts_unparsed_replies(stores, tmp_path, capsys):
    model, judge = stores
    out = tmp_path / "out"
    assert cli_main(["judge", model, "--data", os.path.join(TEST_DATA, "alpaca.jsonl"), "--judge-model", judge,
                     "--max-records", "3", "--max-new-tokens", "6", "--judge-max-tokens", "12",
                     "--out", str(out)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in open(out / "judge.jsonl")]
    first = json.loads(open(os.path.join(TEST_DATA, "alpaca.jsonl")).readline())
    assert len(rows) == 3 and {r["model"] for r in rows} == {"tuned"}
    assert rows[0]["prompt"] == first["instruction"] + (f"\n\n{first['input']}" if first["input"] else "")
    assert rows[0]["reference"] == first["output"]
    for row in rows:
        assert isinstance(row["answer"], str) and isinstance(row["judge_reply"], str)
        assert row["score"] == parse_score(row["judge_reply"])
    # Random weights write no verdict: every reply is counted as unparsed, none is turned into a score.
    summary = json.load(open(out / "judge_summary.json"))["models"]["tuned"]
    assert summary["unparsed"] == 3 and summary["scored"] == 0 and summary["mean"] is None
    assert "tuned: no score parsed over 0 of 3 records (3 unparsed)" in captured.out
    assert "judging (tuned) 3/3" in captured.err and "ETA" in captured.err


def test_clear_errors_for_bad_judge_options(stores, tmp_path, capsys):
    model, judge = stores
    data = os.path.join(TEST_DATA, "alpaca.jsonl")
    assert cli_main(["judge", model, "--data", data]) == 1
    assert "name a judge: --judge-model PATH" in capsys.readouterr().err
    assert cli_main(["judge", model, "--data", data, "--judge-url", "http://example.com/v1"]) == 1
    assert "other hosts are refused" in capsys.readouterr().err
    assert cli_main(["judge", model, "--data", data, "--judge-model", judge, "--compare-base"]) == 1
    assert "--compare-base needs a base" in capsys.readouterr().err
    assert cli_main(["judge", model, "--data", os.path.join(TEST_DATA, "text.jsonl"), "--judge-model", judge]) == 1
    assert "holds no Alpaca or chat records" in capsys.readouterr().err
    assert cli_main(["judge", model, "--data", data, "--judge-model", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_urls_must_be_loopback_and_become_chat_completions():
    assert check_url("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1/chat/completions"
    assert check_url("http://localhost:11434/v1/") == "http://localhost:11434/v1/chat/completions"
    assert check_url("http://[::1]:9/v1/chat/completions") == "http://[::1]:9/v1/chat/completions"
    for url in ("http://10.0.0.2:8080/v1", "http://example.com/v1", "ftp://127.0.0.1/v1", "127.0.0.1:8080"):
        with pytest.raises(JudgeError, match="other hosts are refused"):
            check_url(url)


LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_judge_url_with_no_server_fails_fast_and_bounded(monkeypatch):
    # Bounded by counting requests and back-off sleeps, not by the wall clock (a loaded machine is slow).
    judge = HttpJudge(f"http://127.0.0.1:{free_port()}/v1", timeout=5, attempts=2)
    opened, slept = [], []
    real_open = judge_module._LOOPBACK.open
    monkeypatch.setattr(judge_module._LOOPBACK, "open", lambda *a, **k: (opened.append(k.get("timeout")),
                                                                        real_open(*a, **k))[1])
    monkeypatch.setattr(judge_module.time, "sleep", slept.append)
    calls = []
    with pytest.raises(JudgeError, match="failed 3 record\\(s\\) in a row.*is the server running"):
        judge.replies(["a", "b", "c", "d", "e"], calls.append)
    assert calls == [1, 2]  # stopped after 3 records, not all 5
    assert opened == [5] * 6 and slept == [2.0] * 3  # 2 attempts per record, each waiting at most 5 s


# ---------------------------------------------------------------------------------------------- with training
def test_finetune_judges_a_lora_run_with_its_adapters_and_compares_with_the_base(stores, tmp_path, capsys):
    from offload_bitnet.engine.streaming import EngineOptions, StreamingEngine
    from offload_bitnet.generate import decode_continuation
    from offload_bitnet.judge import judge_items
    from offload_bitnet.formats.merge import load_adapters
    from offload_bitnet.store.blockstore import BlockStore
    from offload_bitnet.tokenizers.base import ByteTokenizer

    @torch.no_grad()
    def engine_continuations(engine, tokenizer, encoded, max_new_tokens):
        """Greedy new tokens computed with the engine's own forward (an independent reference)."""
        results = []
        for ids in encoded:
            new = []
            while len(new) < max_new_tokens and len(ids) + len(new) < engine.config.max_seq_len:
                token = int(engine.logits(torch.tensor([ids + new]))[0, -1].argmax())
                if token in tokenizer.stop_ids:
                    break
                new.append(token)
            results.append(new)
        return results

    def open_adapter_engine(store_path, adapter_dir):
        store = BlockStore(store_path, writable=False)
        adapters = load_adapters(adapter_dir, store.config)
        engine = StreamingEngine(store, EngineOptions(lora=adapters.lora, adapter_dir=adapter_dir,
                                                      scratch_dir=os.path.join(adapter_dir, "scratch")))
        engine.adapters = adapters
        return engine

    model, judge = stores
    data = os.path.join(TEST_DATA, "alpaca.jsonl")
    assert finetune_main([model, "--data", data, "--runs-dir", str(tmp_path / "runs"), "--experiment", "j",
                          "--mode", "lora", "--lora-rank", "4", "--num-train-iters", "3", "--batch-size", "2",
                          "--max-seq-len", "512", "--lr", "5e-2", "--val-fraction", "0.25", "--no-plot",
                          "--max-new-tokens", "6", "--judge-model", judge, "--judge-compare-base"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "j"
    rows = [json.loads(line) for line in open(run_dir / "judge.jsonl")]
    base = [r for r in rows if r["model"] == "base"]
    tuned = [r for r in rows if r["model"] == "tuned"]
    assert len(base) == len(tuned) >= 1 and [r["prompt"] for r in base] == [r["prompt"] for r in tuned]
    assert "base: no score parsed" in out and "tuned: no score parsed" in out
    record = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["type"] == "judge"]
    assert record and record[0]["tuned_unparsed"] == len(tuned) and record[0]["base_mean"] is None

    # The held-out records are the run's validation split; the tuned answers are the adapters' (not merged).
    tokenizer = ByteTokenizer()
    lines = [json.loads(line) for line in open(data)]
    assert all(any(r["reference"] == line["output"] for line in lines) for r in tuned)
    engine = open_adapter_engine(model, str(run_dir / "adapter"))
    try:
        from offload_bitnet.train import data as datalib
        from offload_bitnet.train.records import DataOptions

        val = datalib.load_dataset([data], [], tokenizer, DataOptions(max_seq_len=512), 0.25, 0).val
        items = judge_items(val, tokenizer)
        assert [i.reference for i in items] == [r["reference"] for r in tuned]
        expected = engine_continuations(engine, tokenizer, [i.prompt_ids for i in items], 6)
        assert [decode_continuation(tokenizer, i.prompt_ids, t) for i, t in zip(items, expected)] == \
            [r["answer"] for r in tuned]
    finally:
        engine.close()
    # A plain PEFT copy of the adapters (no run checkpoint) gives the same answers.
    import shutil

    peft_dir = tmp_path / "peft"
    os.makedirs(peft_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run_dir / "adapter" / name, peft_dir / name)
    engine = open_adapter_engine(model, str(peft_dir))
    try:
        assert engine_continuations(engine, tokenizer, [i.prompt_ids for i in items], 6) == expected
    finally:
        engine.close()
    plain = StreamingEngine(BlockStore(model))
    base_tokens = engine_continuations(plain, tokenizer, [i.prompt_ids for i in items], 6)
    assert [decode_continuation(tokenizer, i.prompt_ids, t) for i, t in zip(items, base_tokens)] == \
        [r["answer"] for r in base]
    assert base_tokens != expected  # the adapters changed the answers: they took part


def test_cli_compare_base_with_an_adapter_folder(stores, tmp_path, capsys):
    model, judge = stores
    data = os.path.join(TEST_DATA, "chat.jsonl")
    assert finetune_main([model, "--data", data, "--runs-dir", str(tmp_path / "runs"), "--experiment", "c",
                          "--mode", "lora", "--lora-rank", "4", "--num-train-iters", "2", "--batch-size", "2",
                          "--max-seq-len", "128", "--lr", "5e-2", "--val-fraction", "0", "--no-plot"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli_main(["judge", model, "--adapter", str(tmp_path / "runs" / "c" / "adapter"), "--data", data,
                     "--compare-base", "--judge-model", judge, "--max-new-tokens", "4", "--judge-max-tokens", "8",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "judge.jsonl")]
    records = [json.loads(line) for line in open(data)]
    assert [r["model"] for r in rows] == ["base"] * len(records) + ["tuned"] * len(records)
    assert [r["reference"] for r in rows[:len(records)]] == [rec["messages"][-1]["content"] for rec in records]
    spider = rows[1]["prompt"]  # a system message and a user turn: the judge sees both, labelled
    assert spider == "System: You answer briefly.\nUser: How many legs does a spider have?"
    summary = json.load(open(out / "judge_summary.json"))
    assert set(summary["models"]) == {"base", "tuned"} and summary["tuned_vs_base"]["paired"] == 0
    assert "tuned vs base on 0 records scored for both" in capsys.readouterr().out


def test_a_judge_server_that_is_down_leaves_the_finished_run_finished(tmp_path, capsys):
    assert finetune_main(["--runs-dir", str(tmp_path), "--num-train-iters", "1", "--max-seq-len", "320",
                          "--batch-size", "2", "--no-plot", "--data", os.path.join(TEST_DATA, "alpaca.jsonl"),
                          "--val-fraction", "0.2", "--max-new-tokens", "2",
                          "--judge-url", f"http://127.0.0.1:{free_port()}/v1"]) == 0
    out = capsys.readouterr().out
    assert "note: no judge evaluation: the judge at http://127.0.0.1:" in out and "is the server running?" in out
    assert "summary: finished" in out and not os.path.exists(tmp_path / "demo" / "judge.jsonl")


def test_finetune_refuses_bad_judge_options_before_training(tmp_path, capsys):
    assert finetune_main(["--runs-dir", str(tmp_path), "--judge-url", "http://192.168.1.5:8080/v1"]) == 2
    assert "other hosts are refused" in capsys.readouterr().err
    assert finetune_main(["--runs-dir", str(tmp_path), "--judge-compare-base"]) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert finetune_main(["--runs-dir", str(tmp_path), "--judge-model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "demo")  # nothing was created or trained


# ---------------------------------------------------------------------------------------------- llama.cpp server
def llama_cpp_server_available() -> bool:
    try:
        return importlib.util.find_spec("llama_cpp") is not None and \
            importlib.util.find_spec("llama_cpp.server") is not None and \
            all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn", "sse_starlette",
                                                            "starlette_context", "pydantic_settings"))
    except (ImportError, ValueError):
        return False


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` with SmolLM2 on a free loopback port; stopped after the module."""
    if not llama_cpp_server_available():
        pytest.skip("llama-cpp-python with its server extra is not installed (pip install 'llama-cpp-python[server]')")
    gguf = smollm2_gguf()
    port = free_port()
    # Its log (~200 KB while loading) goes to a file: a pipe nobody reads would fill and stall the server.
    log = open(tmp_path_factory.mktemp("llama_server") / "server.log", "w+b")
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                                "--port", str(port), "--n_ctx", "4096", "--n_threads", "2"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama_cpp.server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                with LOOPBACK.open(url + "/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer within 180 s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_the_http_judge_against_a_real_llama_cpp_server(stores, llama_server, tmp_path, capsys):
    model, _ = stores
    out = tmp_path / "out"
    assert cli_main(["judge", model, "--data", os.path.join(TEST_DATA, "style_chat_val.jsonl"), "--judge-url",
                     llama_server, "--max-records", "3", "--max-new-tokens", "4", "--judge-max-tokens", "48",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "judge.jsonl")]
    assert len(rows) == 3
    for row in rows:
        assert isinstance(row["judge_reply"], str) and row["judge_reply"].strip() and "error" not in row
        assert row["score"] == parse_score(row["judge_reply"])
    summary = json.load(open(out / "judge_summary.json"))
    assert summary["judge"] == f"judge at {llama_server}/chat/completions"
    tuned = summary["models"]["tuned"]
    assert tuned["scored"] + tuned["unparsed"] == 3
    assert tuned["scored"] == sum(tuned["distribution"].values())
    # Greedy at temperature 0: the same request gives the same reply.
    again = HttpJudge(llama_server, max_tokens=48).ask(build_judge_prompt(rows[0]["prompt"], rows[0]["answer"],
                                                                          rows[0]["reference"]))
    assert again == rows[0]["judge_reply"]
