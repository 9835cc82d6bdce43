"""evaluate.py end to end on a small offline file (questions replayed from data/llmrouter), and its
refusal of bad input before anything is written."""

from __future__ import annotations

import csv
import dataclasses
import json

import matplotlib.image
import pytest
import yaml
from tiny import tiny_qwen, tiny_tokenizer

import evaluate
from agents.config import load_dataclass
from agents.routers import make_router
from agents.routing_settings import RoutingRangeWarning, RoutingSettings, save_routing_settings
from envs.candidates.pool import load_pool
from envs.episode import EpisodeConfig
from rewards.metrics import apgr

POOL = "configs/candidates/llmrouter_replay.yaml"
QUESTIONS = [  # (question, golden answer) rows of data/llmrouter/default_query_test.jsonl
    json.loads(line) for line in open("data/llmrouter/default_query_test.jsonl", encoding="utf-8")
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, test_file, **extra):
    cfg = {"task": "qa", "pool": POOL, "test_files": [{"path": str(test_file), "dataset_column": "task"}],
           "episode": {"max_response_tokens": 4096}, "bootstrap_resamples": 50, **extra}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def small_file(tmp_path):
    test_qs = {r["question"].strip() for r in json.load(open("data/llmrouter/test.json"))}
    rows = [{"question": r["query"], "golden_answers": [str(r["ground_truth"])], "task": r["task_name"]}
            for r in QUESTIONS if r["query"].strip() in test_qs][::25][:12]
    return write_jsonl(tmp_path / "small.jsonl", rows)


def test_three_routers_end_to_end(tmp_path, small_file):
    out = tmp_path / "out"
    result = evaluate.main(["--config", str(config(tmp_path, small_file)), "--routers", "largest,cheapest,oracle",
                            "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "results.csv", "results.json", "results.md"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["routers"] == ["largest", "cheapest", "oracle"] and saved["n_questions"] == 12
    overall = {r["router"]: r["metrics"]["by_dataset"]["overall"] for r in saved["rows"]}
    assert overall["oracle"]["em"] >= max(overall["largest"]["em"], overall["cheapest"]["em"])
    assert overall["cheapest"]["raw_cost"] == pytest.approx(100 * 0.1)  # 100 tokens at Gemma's 0.1 $/M
    assert all(o["calls_per_question"] == 1.0 and o["format_error_rate"] == 0.0 for o in overall.values())
    assert saved["routing_score_bounds"]["oracle"] >= max(r["metrics"]["routing_score"] for r in saved["rows"]) - 1e-9
    table = (out / "results.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["largest", "cheapest", "oracle"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["router"] for r in rows if r["dataset"] == "overall"} == {"largest", "cheapest", "oracle"}
    image = matplotlib.image.imread(out / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 100
    # one point over the shared cost range: quality 0 below its cost, its EM from there on
    lo, hi = result["cost_range"]
    o = overall["oracle"]
    assert result["curves"]["oracle"]["aiq"] == pytest.approx(o["em"] * (hi - o["raw_cost"]) / (hi - lo))


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q?", "golden_answers": []}], r"row 1: field 'golden_answers' .*non-empty list"),
    ([{"question": "q?", "golden_answers": ["a"]}, {"question": 42, "golden_answers": ["a"]}],
     r"row 2: field 'question' is 42 \(int\), expected a string"),
    ([{"query": "q?", "golden_answers": ["a"]}], r"no column 'question'"),
])
def test_bad_rows_stop_before_anything_is_written(tmp_path, rows, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = config(tmp_path, bad)
    with open(cfg) as f:
        data = yaml.safe_load(f)
    data["test_files"][0].pop("dataset_column")
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as e:
        evaluate.main(["--config", str(cfg), "--routers", "cheapest", "--out", str(out)])
    assert "bad.jsonl" in str(e.value)
    assert not out.exists()


def test_unknown_router_stops_before_anything_is_written(tmp_path, small_file):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown router 'bogus'.*known: .*cheapest"):
        evaluate.main(["--config", str(config(tmp_path, small_file)), "--routers", "cheapest,bogus", "--out", str(out)])
    assert not out.exists()


def test_unknown_config_key_is_an_error(tmp_path, small_file):
    with pytest.raises(ValueError, match="unknown config key"):
        load_dataclass(evaluate.EvalConfig, config(tmp_path, small_file), ["routers.nope=1"])


def test_an_eval_config_extends_its_parent(tmp_path, small_file):
    """evaluate.py reads configs with train.py's loader: `extends:` is merged under the child's keys."""
    config(tmp_path, small_file)  # eval.yaml, the parent
    (tmp_path / "child.yaml").write_text("extends: eval.yaml\nbootstrap_resamples: 7\n")
    cfg = load_dataclass(evaluate.EvalConfig, tmp_path / "child.yaml", ["seed=3"])
    assert (cfg.task, cfg.bootstrap_resamples, cfg.seed, cfg.episode.max_response_tokens) == ("qa", 7, 3, 4096)


def test_a_two_model_pool_reports_each_routers_apgr_and_cpt(tmp_path):
    """With two candidates the cheaper is the weak model and the other the strong one; each router's
    curve gets APGR and CPT(50%) over the share of questions that called the strong model."""
    pool = yaml.safe_load(open(POOL))
    pool["candidates"] = [c for c in pool["candidates"] if c["name"] in ("Gemma-2-9B-IT", "Llama-3.3-Nemotron-Super-49B-v1")]
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"task": "llmrouter", "pool": str(tmp_path / "pool.yaml"), "max_questions": 16,
                                   "bootstrap_resamples": 20, "episode": {"max_response_tokens": 4096}}))
    result = evaluate.main(["--config", str(cfg), "--routers", "cheapest,largest,random", "--out", str(tmp_path / "out")])
    weak, strong, weak_em, strong_em = result["two_model"]
    assert (weak, strong) == ("Gemma-2-9B-IT", "Llama-3.3-Nemotron-Super-49B-v1")  # 0.1 against 0.9 $/M
    rows = {r["router"]: r for r in result["rows"]}
    assert rows["cheapest"]["strong_share"] == 0.0 and rows["largest"]["strong_share"] == 1.0
    assert rows["cheapest"]["metrics"]["by_dataset"]["overall"]["em"] == pytest.approx(weak_em)
    assert rows["largest"]["metrics"]["by_dataset"]["overall"]["em"] == pytest.approx(strong_em)
    assert result["curves"]["cheapest"]["apgr"] == pytest.approx(0.5)  # the endpoints alone: a straight line
    share, em = rows["random"]["strong_share"], rows["random"]["metrics"]["by_dataset"]["overall"]["em"]
    assert 0 < share < 1
    assert result["curves"]["random"]["apgr"] == pytest.approx(apgr([100 * share], [em], weak_em, strong_em))
    table = (tmp_path / "out" / "results.md").read_text()
    curve = result["curves"]["random"]
    assert f"| random | 1 | {curve['aiq']:.3f} | {curve['apgr']:.3f} |" in table


def save_tiny_llm(folder, tokenizer=None):
    """A random two-layer Qwen2 and a tiny BPE tokenizer, written as `save_pretrained` writes them."""
    tok = tokenizer or tiny_tokenizer()
    tiny_qwen(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_routing(folder, episode: EpisodeConfig, specs=None):
    """The routing settings train.py saves beside a policy, for the replayed pool's candidates."""
    pool = load_pool(POOL)
    save_routing_settings(folder, RoutingSettings.from_episode(episode, specs or pool.specs))
    pool.close()


def overall_by_router(result):
    return {r["router"]: r["metrics"]["by_dataset"]["overall"] for r in result["rows"]}


def test_llm_routers_play_a_local_model_greedily_in_batches(tmp_path, small_file):
    """policy and prompt-llm run the same greedy rollouts; direct's episodes allow no call; the
    model's own tokens are charged to full cost; batch size changes nothing."""
    folder = save_tiny_llm(tmp_path / "llm")
    save_routing(folder, EpisodeConfig(max_response_tokens=24, max_turns=2))  # as the eval's episode
    specs = f"policy:{folder},prompt-llm:{folder},direct:{folder}"
    runs = {}
    for batch in (5, 12):
        cfg = config(tmp_path, small_file, batch_size=batch, episode={"max_response_tokens": 24, "max_turns": 2})
        runs[batch] = overall_by_router(evaluate.main(["--config", str(cfg), "--routers", specs,
                                                       "--out", str(tmp_path / f"out{batch}")]))
    got = runs[5]
    assert set(got) == {f"policy:{folder}", f"prompt-llm:{folder}", f"direct:{folder}"}
    assert got[f"policy:{folder}"] == got[f"prompt-llm:{folder}"]
    assert got[f"direct:{folder}"]["calls_per_question"] == 0.0 == got[f"direct:{folder}"]["raw_cost"]
    assert make_router(f"direct:{folder}", None).episode_config(EpisodeConfig(max_turns=2)).max_turns == 0
    for o in got.values():  # at 0.2 $/M, at least the prompt's tokens and one more
        assert o["full_cost"] - o["raw_cost"] > 0.2 * 20
    assert runs[12] == got


def test_an_llm_router_whose_pad_is_its_eos_is_refused_before_anything_is_written(tmp_path, small_file):
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    folder = save_tiny_llm(tmp_path / "llm", tok)
    save_routing(folder, EpisodeConfig())
    policy_is_refused(tmp_path, small_file, folder, f"{folder}: the tokenizer needs a pad token distinct from EOS")


def policy_is_refused(tmp_path, small_file, folder, message):
    """Evaluating `policy:<folder>` stops with `message` before anything is written."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        evaluate.main(["--config", str(config(tmp_path, small_file)), "--routers", f"policy:{folder}", "--out", str(out)])
    assert not out.exists()


def test_a_conditioned_policy_traces_one_curve_over_alphas_with_aiq_over_the_shared_range(tmp_path, small_file):
    folder = save_tiny_llm(tmp_path / "llm")
    save_routing(folder, EpisodeConfig(alpha={"sample": [0.0, 0.5]}, max_cost={"low": 10.0, "high": 50.0},
                                     max_response_tokens=24, max_turns=2))
    cfg = config(tmp_path, small_file, alphas=[0.0, 0.5], max_costs=[30.0])
    result = evaluate.main(["--config", str(cfg), "--routers", f"policy:{folder},cheapest",
                            "--out", str(tmp_path / "out")])
    rows = [r for r in result["rows"] if r["router"] == f"policy:{folder}"]
    assert [r["setting"] for r in rows] == ["alpha=0, max_cost=30", "alpha=0.5, max_cost=30"]
    assert result["curves"][f"policy:{folder}"]["points"] == 2
    costs = [r["metrics"]["by_dataset"]["overall"]["raw_cost"] for r in result["rows"]]
    assert result["cost_range"] == [min(costs), max(costs)]
    assert max(r["metrics"]["by_dataset"]["overall"]["raw_cost"] for r in rows) <= 30.0  # the cap holds


def test_a_pool_other_than_the_trained_one_is_refused_naming_the_candidate(tmp_path, small_file):
    folder = save_tiny_llm(tmp_path / "llm")
    pool = load_pool(POOL)
    specs = [dataclasses.replace(s, price_per_1m_output=9.0) if i == 0 else s for i, s in enumerate(pool.specs)]
    pool.close()
    save_routing(folder, EpisodeConfig(max_response_tokens=24, max_turns=2), specs)
    policy_is_refused(tmp_path, small_file, folder, rf"{specs[0].name}.price_per_1m_output 9 -> ")


def test_an_alpha_outside_the_trained_range_warns_naming_the_range(tmp_path, small_file):
    folder = save_tiny_llm(tmp_path / "llm")
    save_routing(folder, EpisodeConfig(alpha={"low": 0.0, "high": 0.5}, max_response_tokens=8, max_turns=1))
    cfg = config(tmp_path, small_file, alphas=[0.9], max_questions=2)
    with pytest.warns(RoutingRangeWarning, match=r"\[0, 0.5\]"):
        evaluate.main(["--config", str(cfg), "--routers", f"policy:{folder}", "--out", str(tmp_path / "out")])
