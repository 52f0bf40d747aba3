"""The OpenAI-compatible backend against a stub server on 127.0.0.1 (ephemeral port, started and stopped by
each test): retries on 429/5xx and timeouts, the concurrency bound, clear 401/404 errors, the API key kept
out of every message and file, the cache (a second run asks nothing), and resuming after a kill."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from autointerp_fakes import StubServer, cat_feature

from fastsae.analysis.autointerp.autointerp_run import parse_backend
from fastsae.analysis.autointerp.context_sources import save_examples
from fastsae.analysis.autointerp.interpret import interpret_many
from fastsae.analysis.autointerp.llm_backends import BackendError
from fastsae.analysis.autointerp.llm_prompts import CUE, Prompt
from fastsae.analysis.autointerp.openai_client import OpenAIBackend
from fastsae.analysis.autointerp.request_cache import CachedBackend

KEY = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK"
PROMPT = Prompt("We are studying features.", f"Explanation of feature B: {CUE}")


def backend(server, **kw) -> OpenAIBackend:
    kw = {"api_key_env": "FASTSAE_TEST_KEY", "timeout": 5.0, "max_retries": 3, "backoff": 0.01, **kw}
    return OpenAIBackend(server.url, "oracle-1", **kw)


def test_retries_429_and_5xx_then_answers(monkeypatch):
    monkeypatch.setenv("FASTSAE_TEST_KEY", KEY)
    with StubServer() as server:
        server.script = [429, 500, 503]
        reply = backend(server).generate(PROMPT, 8, stop=("\n",))
        assert reply.text == " the word cat" and len(server.requests) == 4
        assert all(r["authorization"] == f"Bearer {KEY}" for r in server.requests)
        server.script = [502] * 10
        with pytest.raises(BackendError, match=r"no answer after 3 tries \(last: 502"):
            backend(server, max_retries=2).generate(PROMPT, 8)
        assert len(server.requests) == 4 + 3


def test_a_slow_answer_times_out_and_is_retried():
    with StubServer(slow=3.0) as server:
        server.script = ["slow"]
        start = time.perf_counter()
        reply = backend(server, timeout=0.5).generate(PROMPT, 8, stop=("\n",))
        assert reply.text == " the word cat" and len(server.requests) == 2
        assert time.perf_counter() - start < 2.5  # it did not wait for the slow answer
        server.script = ["slow"] * 3
        with pytest.raises(BackendError, match="no answer after 2 tries.*time"):
            backend(server, timeout=0.3, max_retries=1).generate(PROMPT, 8)


def test_concurrency_is_bounded():
    with StubServer(delay=0.15) as server:
        b = backend(server, concurrency=3)
        threads = [threading.Thread(target=b.generate, args=(Prompt("s", f"Text: {i}\nAnswer:"), 2))
                   for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(server.requests) == 12 and server.max_in_flight == 3


def test_401_and_404_are_clear_and_the_key_never_leaks(monkeypatch, caplog, capsys):
    monkeypatch.setenv("FASTSAE_TEST_KEY", KEY)
    with StubServer() as server:
        server.status_only = 401
        with pytest.raises(BackendError) as err:
            backend(server).generate(PROMPT, 8)
        assert "401" in str(err.value) and "$FASTSAE_TEST_KEY" in str(err.value)
        assert len(server.requests) == 1  # refused keys are not retried
        server.status_only = None
        with pytest.raises(BackendError, match="404 .*no model 'nope'"):
            OpenAIBackend(server.url, "nope", api_key_env="FASTSAE_TEST_KEY").generate(PROMPT, 8)
        monkeypatch.delenv("FASTSAE_TEST_KEY")
        server.status_only = 401
        with pytest.raises(BackendError, match=r"no key was sent \(\$FASTSAE_TEST_KEY is not set\)"):
            backend(server).generate(PROMPT, 8)
    monkeypatch.setenv("FASTSAE_TEST_KEY", KEY)
    b = backend(server)
    assert KEY not in repr(b) and KEY not in str(vars(b))
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text


def test_server_quoting_the_key_back_is_scrubbed(monkeypatch):
    monkeypatch.setenv("FASTSAE_TEST_KEY", KEY)
    with StubServer() as server:
        server.status_only = 400
        server.message = lambda req: f"bad request with key {req['authorization']}"
        with pytest.raises(BackendError) as err:
            backend(server).generate(PROMPT, 8)
        assert "bad request with key Bearer ***" in str(err.value) and KEY not in str(err.value)


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIBackend("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="model"):
        OpenAIBackend("http://127.0.0.1:8000/v1", "")
    with pytest.raises(ValueError, match="--backend"):
        parse_backend("anthropic:x")
    assert parse_backend("openai:http://h:1/v1/", model="m").name == "openai:http://h:1/v1"


@pytest.mark.parametrize("echo,chat_logprobs,chat,method", [(True, True, True, "all_at_once_logprobs"),
                                                            (False, True, True, "generated_logprobs"),
                                                            (False, False, True, "generated_numbers"),
                                                            (True, False, False, "all_at_once_logprobs")])
def test_pipeline_over_http_scores_the_oracle_and_caches(tmp_path, echo, chat_logprobs, chat, method):
    features = {f"sae/{i}": cat_feature(seed=i) for i in range(3)}
    with StubServer(echo=echo, chat_logprobs=chat_logprobs) as server:
        first = CachedBackend(backend(server, concurrency=3, chat=chat), tmp_path)
        results = interpret_many(first, features, progress=False)
        asked = len(server.requests)
        assert asked > 0 and server.max_in_flight <= 3
        paths = {r["path"] for r in server.requests}
        assert paths == ({"/v1/chat/completions", "/v1/completions"} if chat else {"/v1/completions"})
        for r in results.values():
            assert r["explanation"] == "the word cat"
            assert r["simulation"]["score"] == pytest.approx(1.0) and r["simulation"]["method"] == method
            assert r["detection"]["balanced_accuracy"] == r["fuzzing"]["balanced_accuracy"] == 1.0
        again = interpret_many(CachedBackend(backend(server), tmp_path), features, progress=False)
        assert len(server.requests) == asked  # the second run asked the server nothing
        assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


def _argv(examples, url, out, cache):
    return ["autointerp", "--examples", str(examples), "--backend", f"openai:{url}", "--model", "oracle-1",
            "--api-key-env", "FASTSAE_TEST_KEY", "--features", "all", "--concurrency", "2", "--out", str(out),
            "--cache", str(cache), "--no-progress"]


def test_resume_after_a_kill_and_the_key_is_in_no_file(tmp_path, monkeypatch, capsys):
    from fastsae.cli import main

    examples = tmp_path / "examples.json"
    save_examples(examples, {f"sae/{i}": cat_feature(seed=i) for i in range(4)})
    monkeypatch.setenv("FASTSAE_TEST_KEY", KEY)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with StubServer(delay=0.05) as server:
        code = f"import sys; from fastsae.cli import main; sys.exit(main({_argv(examples, server.url, out, cache)!r}))"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.time() + 120
        while len(server.requests) < 25 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: what it left on disk must be sound
        log, _ = proc.communicate()
        assert not (out / "report.json").exists(), "the run finished before it was killed: slow the stub down"
        before = [json.dumps(r["body"], sort_keys=True) for r in server.requests]
        assert main(_argv(examples, server.url, out, cache)) == 0
        after = [json.dumps(r["body"], sort_keys=True) for r in server.requests[len(before):]]
        # nothing answered before the kill was asked again, except what was in flight (at most 2)
        assert len(set(before) & set(after)) <= 2 and len(after) == len(set(after)) and after
        report = json.loads((out / "report.json").read_text())
        assert report["summary"]["sae"]["simulation"]["mean"] == pytest.approx(1.0)
        assert report["meta"]["usage"]["cached"] >= len(before) - 2
        n_requests = len(server.requests)
        assert main(_argv(examples, server.url, tmp_path / "out2", cache)) == 0  # a finished run reruns for free
        assert len(server.requests) == n_requests
    printed = capsys.readouterr()
    for path in [*tmp_path.rglob("*")]:
        if path.is_file() and path.suffix != ".png":
            assert KEY not in path.read_text(errors="replace"), path
    assert KEY not in log + printed.out + printed.err
    assert (out / "summary.md").is_file() and (out / "scores.png").is_file()


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from fastsae.cli import main

    examples = tmp_path / "examples.json"
    save_examples(examples, {"sae/1": cat_feature()})
    with StubServer() as server:
        capsys.readouterr()
        assert main(["autointerp", "--examples", str(examples), "--backend", f"openai:{server.url}", "--model",
                     "gpt-x", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--no-progress",
                     "--retries", "0"]) == 2
        assert re.match(r"fastsae autointerp: 404 .*no model 'gpt-x'", capsys.readouterr().err)
    assert main(["autointerp", "--examples", str(examples), "--features", "7,", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "--features" in capsys.readouterr().err


def test_examples_file_round_trips(tmp_path):
    from fastsae.analysis.autointerp.context_sources import interleave, load_examples, select

    features = {"sae/3": cat_feature(), "pca/0": cat_feature(seed=1)}
    save_examples(tmp_path / "e.json", features)
    loaded = load_examples(tmp_path / "e.json")
    assert loaded["pca/0"].top[0].tokens == features["pca/0"].top[0].tokens
    (tmp_path / "bad.json").write_text(json.dumps({"format_version": 1, "features": {"sae/1": {"top": [{"x": 1}]}}}))
    with pytest.raises(ValueError, match="bad.json: feature sae/1"):
        load_examples(tmp_path / "bad.json")
    assert select(list(range(100)), "5", seed=0) == select(list(range(100)), 5, seed=0)
    assert len(select(list(range(100)), "5")) == 5 and select([4, 8], "8,") == [8]
    assert set(select(list(range(100)), "5")) < set(select(list(range(100)), "12"))  # more keeps the first
    assert list(interleave({"sae/1": 1, "sae/2": 2, "pca/0": 0, "ica/4": 4})) == ["sae/1", "pca/0", "ica/4", "sae/2"]
    assert Path(tmp_path / "e.json").is_file()
