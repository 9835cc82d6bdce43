"""Failed candidate calls are counted, reported and, when (nearly) all calls fail, stop the run."""

import json

import pytest

import evaluate
import train
from agents.call_errors import (CallFailureAbort, CallFailureConfig, CallFailureMonitor, call_failure_metrics,
                                error_kind)


def _summary(*calls):
    return {"calls": [{"candidate": c, "error": e} for c, e in calls]}


def test_failed_calls_are_counted_per_candidate_and_kind_and_refusals_are_not_calls():
    summaries = [_summary(("A", None), ("B", "B: HTTP 503 after 5 attempt(s)")),
                 _summary(("A", "A: ReadTimeout (timeout 2s) after 1 attempt(s)")),
                 _summary()]  # an episode whose searches the env refused: no call made
    m = call_failure_metrics(summaries, "eval")
    assert m["eval/call_error_rate"] == pytest.approx(2 / 3)
    assert m["eval/failed_calls"] == pytest.approx(2 / 3)
    assert m["eval/call_errors_B"] == pytest.approx(1 / 3) and m["eval/call_errors_A"] == pytest.approx(1 / 3)
    assert m["eval/call_errors_kind_http_503"] == pytest.approx(1 / 3)
    assert m["eval/call_errors_kind_timeout"] == pytest.approx(1 / 3)
    assert call_failure_metrics([_summary()], "x")["x/call_error_rate"] == 0.0


@pytest.mark.parametrize("error, kind", [
    ("A: HTTP 401: bad key after 1 attempt(s)", "http_401"),
    ("A: no whole reply within 1s (timeout) after 2 attempt(s)", "timeout"), ("A: ConnectError: refused after 3 attempt(s)", "connection"),
    ("environment variable KEY (API key for http://x) is not set", "api_key"),
    ("A: reply is not JSON with choices[0].message.content after 2 attempt(s)", "bad_reply"),
    ("replay: no recorded outcomes for question 'q'", "replay"), ("KeyError: 'x'", "other")])
def test_error_kinds(error, kind):
    assert error_kind(error) == kind


def test_the_monitor_stops_when_nearly_every_call_of_the_window_failed(caplog):
    monitor = CallFailureMonitor(CallFailureConfig(abort_rate=0.9, min_calls=20, window_steps=2))
    monitor.observe(10, 10, "A: HTTP 500")  # 10 calls: too few to judge
    assert "first error: A: HTTP 500" in caplog.text
    monitor.observe(30, 3, None)  # 13 of 40 over the window
    monitor.observe(30, 28, "A: x")  # 31 of 60
    with pytest.raises(CallFailureAbort, match="58 of 60 candidate calls failed.*A: y"):
        monitor.observe(30, 30, "A: y")  # 58 of 60


@pytest.mark.parametrize("bad", [{"abort_rate": 0.0}, {"abort_rate": 1.5}, {"min_calls": 0}, {"window_steps": 0}])
def test_bad_monitor_settings_are_refused(bad):
    with pytest.raises(ValueError, match="calls\\."):
        CallFailureConfig(**bad)


EASY = ["device=cpu", "task.world_preset=easy", "task.n_test=8", "episode.max_turns=1",
        "episode.max_response_tokens=40", "sft.n_examples=64", "sft.epochs=1", "rollout.n_prompts=16",
        "algorithm.minibatch_size=16", "total_steps=2", "eval_every=0", "save_every=0",
        "model.init={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, "
        "intermediate_size: 64}"]


def test_training_stops_when_every_candidate_call_fails(tmp_path, monkeypatch):
    """Every responder raising: the warm start's scripted play stops the run with the first error."""
    from envs.routeworld import candidates

    def broken(world, profile):
        def respond(request):
            raise ConnectionError(f"{profile.name} is down")
        return respond
    monkeypatch.setattr(candidates, "make_responder", broken)
    with pytest.raises(CallFailureAbort, match="warm-start rounds.*is down"):
        train.main(["--config", "configs/routeworld_tiny.yaml", f"run_dir={tmp_path}", *EASY])


def test_evaluate_exits_non_zero_when_all_of_a_routers_calls_failed(tmp_path, monkeypatch):
    from envs.routeworld import candidates

    def broken(world, profile):
        def respond(request):
            raise ConnectionError("down")
        return respond
    monkeypatch.setattr(candidates, "make_responder", broken)
    with pytest.raises(SystemExit, match="every candidate call of largest failed"):
        evaluate.main(["--config", "configs/eval/routeworld.yaml", "--routers", "largest", "--out", str(tmp_path),
                       "world_preset=easy", "outcome_matrix=false"])
    result = json.loads((tmp_path / "results.json").read_text())  # written before exiting
    assert result["rows"][0]["metrics"]["call_error_rate"] == 1.0


def test_an_eval_whose_data_dir_differs_from_its_pools_is_refused(tmp_path):
    """Episodes from one folder and replayed replies from another would make every call fail."""
    import shutil
    shutil.copytree("data/llmrouter", tmp_path / "copy")
    with pytest.raises(ValueError, match="replays 'data/llmrouter'; point both at the same folder"):
        evaluate.main(["--config", "configs/eval/llmrouter.yaml", "--routers", "largest", "--out",
                       str(tmp_path / "out"), f"data_dir={tmp_path / 'copy'}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cfg, message", [
    ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "timout_s": 3}}, "backend 'openai':.*timout_s"),
    ({"backend": {"base_url": "x"}}, "'backend' needs a 'kind'"),
    ({"candidates": ["A"]}, r"candidates\[0\] is 'A'"),
])
def test_a_bad_pool_file_names_the_file_and_the_key(tmp_path, cfg, message):
    import yaml
    from envs.candidates.pool import load_pool
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"candidates": [{"name": "A", "model": "m", "params_b": 1,
                                                    "price_per_1m_output": 1.0}], **cfg}))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_pool(path)


def test_a_garbage_cache_file_is_named(tmp_path):
    from envs.candidates.pool import load_pool
    cache = tmp_path / "cache.sqlite"
    cache.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match=f"cache.path '{cache}' is not a readable SQLite cache"):
        load_pool({"candidates": [{"name": "A", "model": "m", "params_b": 1, "price_per_1m_output": 1.0}],
                   "cache": {"mode": "readwrite", "path": str(cache)}})
