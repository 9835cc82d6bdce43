"""Evaluate routers side by side: python evaluate.py --config configs/eval/X.yaml --routers a,b,c [--out DIR] [key=value ...].

Every router (a trained policy, a prompted LLM, or a baseline that writes its routing decision as text)
acts in the same env, so one reward function and one cost ledger score them all. Writes results.json,
results.csv, results.md (the paper's table layout: routers by datasets) and pareto.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from agents.call_errors import CallFailureAbort, first_error
from agents.config import load_dataclass
from agents.routers import LLMRouter, RouterContext, RouterOptions, make_router, parse_router_spec
from agents.routers.base import Answerer
from agents.routers.llm import PolicyRouter
from agents.routing_settings import load_routing_settings
from agents.routers.outcomes import from_calls, from_replay_table
from envs.atomic import write_atomic, write_text_atomic
from envs.conditioning import check_spec, is_sampled
from envs.episode import EpisodeConfig, with_conditions
from envs.routeworld import extract_reply_answer
from envs.tasks import Task
from rewards import exact_match, extract_answer, f1_score, make_cost_normalizer
from rewards.metrics import aiq, apgr, bootstrap_ci, cpt, pareto_hull, routing_score, routing_score_bounds, summarize_by
from rewards.table import markdown_table

log = logging.getLogger("evaluate")
TASKS = ("llmrouter", "routeworld", "qa")


@dataclass
class EvalConfig:
    task: str = "llmrouter"  # llmrouter (replayed outcomes of 9 real models) | routeworld | qa (local files)
    data_dir: str = "data/llmrouter"  # llmrouter: test = test.json questions with golden answers, train = train.json
    pool: str = "configs/candidates/llmrouter_replay.yaml"  # candidate pool YAML (llmrouter, qa)
    test_files: list = field(default_factory=list)  # qa: one mapping of envs.data.QADataConfig fields per file
    train_file: dict | None = None  # qa: a QA file sent whole to every candidate to train learned routers
    world: dict = field(default_factory=dict)  # routeworld: WorldConfig overrides
    world_preset: str = "default"  # routeworld: default | easy (envs.routeworld.easy_world_config)
    max_questions: int | None = None  # keep the first N test questions (None: all)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    # where each trained policy (policy:DIR) is played: one point per alpha x max_cost, tracing a
    # conditioned policy's curve (empty: episode.alpha, and the cap the policy was trained with)
    alphas: list = field(default_factory=list)
    max_costs: list = field(default_factory=list)
    cost_normalizer: str = "budget"  # the frozen normalizer of the reward's cost score (rewards.make_cost_normalizer)
    cost_options: dict = field(default_factory=lambda: {"budget": 150.0})
    routers: RouterOptions = field(default_factory=RouterOptions)
    router_price_per_1m: float = 0.2  # $/1M of an LLM router's own prompt + generated tokens (full cost)
    outcome_matrix: bool = True  # call every candidate on every test question for Routing Score bounds
    batch_size: int = 32  # episodes per rollout batch of an LLM router
    bootstrap_resamples: int = 1000
    seed: int = 0
    device: str = "cpu"  # where LLM routers run: cpu | cuda
    out: str = "runs/eval"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}; choose one of {list(TASKS)}")
        if self.task == "qa" and not self.test_files:
            raise ValueError("task=qa needs test_files: a list of {path, question_column, answers_column, ...}")
        if self.max_questions is not None and self.max_questions < 1:
            raise ValueError(f"max_questions must be >= 1 or null, got {self.max_questions}")
        if self.router_price_per_1m < 0 or self.batch_size < 1 or self.bootstrap_resamples < 1:
            raise ValueError("router_price_per_1m must be >= 0, batch_size and bootstrap_resamples >= 1")
        for key, unit in (("alphas", True), ("max_costs", False)):
            for i, value in enumerate(getattr(self, key)):
                check_spec(f"{key}[{i}]", value, unit)


# ---------------------------------------------------------------------------------------------------
# Questions, candidates and training outcomes of a task (an envs.tasks.Task, as in train.py)

def _check_jsonl_rows(path: Path, question_column: str, answers_column: str) -> None:
    """Raw JSON types, which `datasets` would coerce (42 -> "42"): the question must be a string and the
    golden answers a string or a non-empty list of strings. Errors name the file, row and field."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} row {n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} row {n}: expected a JSON object, got {type(row).__name__}")
            if question_column in row and not isinstance(row[question_column], str):
                raise ValueError(f"{path} row {n}: field {question_column!r} is {row[question_column]!r} "
                                 f"({type(row[question_column]).__name__}), expected a string")
            answers = row.get(answers_column)
            if isinstance(answers, list) and (not answers or not all(isinstance(a, str) for a in answers)):
                raise ValueError(f"{path} row {n}: field {answers_column!r} is {answers!r}; "
                                 "expected a non-empty list of strings")


def load_questions(spec: dict, where: str) -> list[dict]:
    """A QA file read strictly: a missing column, a bad or empty field, or a non-string question in any
    row stops the evaluation with the file, row and field (no row is silently skipped)."""
    from envs.data import QADataConfig, load_qa_with_report
    try:
        qcfg = QADataConfig(**spec)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    path = Path(qcfg.path)
    if path.suffix.lower() in (".jsonl", ".json") and path.is_file():
        _check_jsonl_rows(path, qcfg.question_column, qcfg.answers_column)
    examples, report = load_qa_with_report(qcfg)
    if report.skipped:
        raise ValueError(f"{report.skipped[0]} ({report.n_skipped} bad row(s) in all); fix or remove them")
    return [ex.as_dict() for ex in examples]


def resolve_answer_mode(cfg: EvalConfig) -> str:
    """auto: RouteWorld replies are read with `extract_reply_answer`; LLMRouter replays are the answer;
    free-text replies (qa) are read by `routers.reader_model` when given, else taken whole."""
    mode = cfg.routers.answer_mode
    if mode != "auto":
        return mode
    return {"routeworld": "routeworld", "llmrouter": "reply"}.get(cfg.task, "reader" if cfg.routers.reader_model else "reply")


def make_answerer(mode: str, reader=None) -> Answerer:
    """The answerer of a resolved answer mode; "routeworld" reads replies with RouteWorld's
    `extract_reply_answer` (the router base knows no task)."""
    return Answerer(mode, reader, extract_reply_answer if mode == "routeworld" else None)


def build_task(cfg: EvalConfig) -> Task:
    """The task of `cfg`: its first `max_questions` test questions, its pool, the env's tokenizer for
    scripted routers, and its training outcomes (`train_outcomes`) where it has any."""
    from envs.candidates.pool import load_pool
    from agents.routers.tokenizer import text_tokenizer
    mode = resolve_answer_mode(cfg)
    if cfg.task == "routeworld":
        from envs.tasks import make_routeworld_task
        rw = make_routeworld_task(cfg.world, 10**9, cfg.episode.max_turns, cfg.episode.prompt_template,
                                  cfg.world_preset)
        test = [{k: q[k] for k in ("id", "question", "golden_answers", "dataset")} for q in rw.test]
        answerer = make_answerer("routeworld")
        train = rw.train
        loader = lambda: from_calls(rw.pool, [q["question"] for q in train], [q["golden_answers"] for q in train],
                                    lambda q, r: answerer.answer(0, q, r))
        return replace(rw, test=test[:cfg.max_questions], train_outcomes=loader)
    pool = load_pool(cfg.pool)
    if cfg.task == "llmrouter":
        from envs.candidates.replay import load_llmrouter_outcomes, resolve_data_dir
        root = resolve_data_dir(cfg.data_dir)
        pool_dir = getattr(getattr(pool.backend, "backend", pool.backend), "data_dir", None)  # behind a cache too
        if pool_dir is not None and resolve_data_dir(pool_dir).resolve() != root.resolve():
            pool.close()  # episodes from one folder, replies from another: every call would fail
            raise ValueError(f"data_dir={cfg.data_dir!r} but the pool {cfg.pool} replays {pool_dir!r}; "
                             "point both at the same folder")
        _, table, examples = load_llmrouter_outcomes(root)
        test_qs = {row["question"].strip() for row in json.loads((root / "test.json").read_text())}
        test = [ex.as_dict() for ex in examples if ex.question in test_qs]
        train_qs = [row["question"].strip() for row in json.loads((root / "train.json").read_text())]
        loader = lambda: from_replay_table(table, pool.specs, train_qs)
        texts, train = train_qs[:2000] + [q["question"] for q in test], []
    else:
        test = [q for i, spec in enumerate(cfg.test_files) for q in load_questions(spec, f"test_files[{i}]")]
        loader, train = None, []
        if cfg.train_file:
            train = load_questions(cfg.train_file, "train_file")
            answerer = make_answerer(mode if mode != "reader" else "reply")
            loader = lambda: from_calls(pool, [q["question"] for q in train], [q["golden_answers"] for q in train],
                                        lambda q, r: answerer.answer(0, q, r))
        texts = [q["question"] for q in test]
    return Task(cfg.task, train, test[:cfg.max_questions], pool, tokenizer=text_tokenizer(texts, pool.names),
                train_outcomes=loader)


# ---------------------------------------------------------------------------------------------------
# Playing a router and scoring its episodes

def _record(router: str, label: str, example: dict, summary: dict, own_tokens: int, price: float) -> dict:
    """One question's outcome: EM/F1 of the extracted answer (0 when the trajectory is malformed), the
    call ledger's raw cost, and the full cost (calls' prompt + completion tokens at their input/output
    prices, plus the router's own LLM tokens at `price` per 1M)."""
    ok = summary["reward"]["format"] == 0
    answer = extract_answer(summary["trajectory"]) if ok else None
    golden = example["golden_answers"]
    return {
        "router": router, "setting": label, "id": example["id"], "dataset": example["dataset"],
        "em": exact_match(answer, golden) if answer is not None else 0.0,
        "f1": f1_score(answer, golden) if answer is not None else 0.0,
        "raw_cost": summary["raw_cost"], "full_cost": summary["full_cost"] + own_tokens * price,
        "calls": summary["n_calls"], "format_ok": ok, "reward": summary["reward"]["total"],
        "failed_calls": sum(bool(c.get("error")) for c in summary["calls"]),
        "first_error": first_error([summary]),
        "called": [c["candidate"] for c in summary["calls"]], "answer": answer,
    }


def play_scripted_router(router, setting, cfg: EvalConfig, task: Task, ctx: RouterContext, normalizer,
                         rng: np.random.Generator) -> list[dict]:
    """All test questions as one batch of episodes; the router's text is played by `play_scripted`."""
    from agents.sft import play_scripted
    from envs.vector import MultiRouteVectorEnv
    episode_cfg = router.episode_config(cfg.episode)
    env = MultiRouteVectorEnv(task.tokenizer, task.pool, episode_cfg)
    questions = [q["question"] for q in task.test]
    golden = [q["golden_answers"] for q in task.test] if router.needs_golden else None
    ctx.answerer.reset()
    turn = router.turn_fn(questions, setting, golden)
    examples = with_conditions([{**q, "index": i} for i, q in enumerate(task.test)], episode_cfg, cfg.seed, "eval")
    play_scripted(env, examples, lambda ex, replies, r, names: turn(ex["index"], replies, r), rng,
                  max_chunks=episode_cfg.max_turns + 2)
    return [_record(router.name_spec, setting.label, q, s, ctx.answerer.tokens.get(i, 0), cfg.router_price_per_1m)
            for i, (q, (_, s)) in enumerate(zip(task.test, env.finish(normalizer)))]


def policy_points(router: LLMRouter, cfg: EvalConfig, task: Task) -> list[tuple[str, EpisodeConfig]]:
    """(setting label, episode settings) of each point an LLM router is played at. A trained policy
    (policy:DIR) is played as its routing settings say (policy/routing.json: prompt, limits; a pool
    other than the trained one is refused) at each of `alphas` x `max_costs`, warning outside the
    trained range; other LLM routers once, with the evaluation's episode settings."""
    if not isinstance(router, PolicyRouter):
        return [("", router.episode_config(cfg.episode))]
    settings = load_routing_settings(router.path)
    try:
        settings.check_pool(task.pool.specs)
    except ValueError as e:
        raise ValueError(f"policy:{router.path}: {e}") from None
    alpha = cfg.episode.alpha if not is_sampled(cfg.episode.alpha) else None
    points = []
    for a in cfg.alphas or [alpha]:
        for c in cfg.max_costs or [None]:
            cap = [] if c is None else ["no cap" if math.isinf(c) else f"max_cost={c:g}"]
            label = ", ".join(([f"alpha={a:g}"] if cfg.alphas else []) + cap)
            points.append((label, settings.episode_config(alpha=a, max_cost=c)))
    return points


def play_llm_router(router: LLMRouter, cfg: EvalConfig, task: Task, normalizer, bar,
                    episode: EpisodeConfig | None = None) -> list[dict]:
    """Greedy rollouts of the router's model under `episode` (default: the router's view of the
    evaluation's settings) in batches of `cfg.batch_size`, a sampled alpha or cap drawn per question;
    the model's prompt and every token of its response (its own and the inserted replies it reads)
    are charged to full cost."""
    from agents.rollout import run_rollouts
    from envs.vector import MultiRouteVectorEnv
    episode = episode or router.episode_config(cfg.episode)
    model, tokenizer = router.load(cfg.device)
    env = MultiRouteVectorEnv(tokenizer, task.pool, episode)
    records = []
    questions = with_conditions(task.test, episode, cfg.seed, "eval")
    for start in range(0, len(task.test), cfg.batch_size):
        batch = questions[start:start + cfg.batch_size]
        run_rollouts(model, env, batch, 0.0, 1.0, cfg.seed, 0, tokenizer.pad_token_id, index_offset=start)
        for q, e, (_, s) in zip(batch, env.episodes, env.finish(normalizer)):
            own = len(e.prompt_ids) + len(e.response_ids)
            records.append(_record(router.name_spec, "", q, s, own, cfg.router_price_per_1m))
        bar.update(len(batch))
    return records


# ---------------------------------------------------------------------------------------------------
# Metrics over the records

def point_metrics(records: list[dict], cfg: EvalConfig, bounds_costs: tuple[float, float] | None) -> dict:
    """Per dataset and overall summaries, bootstrap 95% CIs of EM and raw cost, and the Routing Score."""
    table = summarize_by(records, "dataset")
    em = [r["em"] for r in records]
    cost = [r["raw_cost"] for r in records]
    calls = sum(r["calls"] for r in records)
    out = {"by_dataset": table, "reward": float(np.mean([r["reward"] for r in records])),
           "calls": calls, "call_error_rate": sum(r["failed_calls"] for r in records) / max(calls, 1),
           "em_ci": bootstrap_ci(em, cfg.bootstrap_resamples, seed=cfg.seed)[1:],
           "raw_cost_ci": bootstrap_ci(cost, cfg.bootstrap_resamples, seed=cfg.seed)[1:]}
    if bounds_costs is not None:
        out["routing_score"] = routing_score(em, cost, *bounds_costs)
    return out


def curve_metrics(points: list[dict], cost_range: tuple[float, float],
                  two: tuple[str, str, float, float] | None) -> dict:
    """AIQ of a router's (cost, EM) points over the shared `cost_range` (the smallest and largest cost
    of every router, so curves compare); with two candidates (weak, strong, their EMs) also APGR and
    CPT(50%) over the share of questions that called the strong one."""
    pts = [(p["raw_cost"], p["em"]) for p in points]
    out = {"aiq": aiq(pts, c_min=cost_range[0], c_max=cost_range[1])}
    if two is not None:
        weak, strong, weak_em, strong_em = two
        pcts = [100.0 * p["strong_share"] for p in points]
        try:
            out["apgr"] = apgr(pcts, [p["em"] for p in points], weak_em, strong_em)
            out["cpt50"] = cpt(pcts, [p["em"] for p in points], weak_em, strong_em, 0.5)
        except ValueError as e:  # an empty gap, or PGR never reaching 50%: reported, not invented
            out["pgr_note"] = str(e)
    return out


# ---------------------------------------------------------------------------------------------------
# Writing results (temp file + rename)

def results_table(rows: list[dict], datasets: list[str], curves: dict[str, dict]) -> str:
    """Routers as rows, datasets as columns (EM), then the overall EM with its 95% CI and the costs,
    as in the Router-R1 paper's tables; a second table gives each router curve's AIQ and RS."""
    head = ["router"] + [f"{d} EM" for d in datasets] + ["overall EM [95% CI]", "F1", "raw cost", "full cost",
                                                        "calls/q", "call err", "fmt err", "reward", "RS"]
    body = []
    for r in rows:
        m, all_ = r["metrics"], r["metrics"]["by_dataset"]["overall"]
        lo, hi = m["em_ci"]
        cells = [r["name"]] + [f"{m['by_dataset'][d]['em']:.3f}" if d in m["by_dataset"] else "-" for d in datasets]
        cells += [f"{all_['em']:.3f} [{lo:.3f}, {hi:.3f}]", f"{all_['f1']:.3f}", f"{all_['raw_cost']:.1f}",
                  f"{all_['full_cost']:.1f}", f"{all_['calls_per_question']:.2f}", f"{m['call_error_rate']:.3f}",
                  f"{all_['format_error_rate']:.3f}",
                  f"{m['reward']:.3f}", f"{m['routing_score']:.3f}" if "routing_score" in m else "-"]
        body.append(cells)
    curve_rows = [[name, c["points"], f"{c['aiq']:.3f}",
                   *([f"{c['apgr']:.3f}", f"{c['cpt50']:.1f}"] if "apgr" in c else ["-", "-"])]
                  for name, c in curves.items()]
    return (markdown_table(head, body) + "\n\n"
            + markdown_table(["router", "points", "AIQ", "APGR", "CPT(50%)"], curve_rows) + "\n")


def plot_pareto(path: Path, rows: list[dict]) -> None:
    """EM against mean raw cost: one marker or curve per router, the hull of all points dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_router: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        o = r["metrics"]["by_dataset"]["overall"]
        by_router.setdefault(r["router"], []).append((o["raw_cost"], o["em"]))
    for name, pts in by_router.items():
        pts = sorted(pts)
        ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "o", label=name, markersize=5)
    hull = pareto_hull([p for pts in by_router.values() for p in pts])
    xs, ys = [c for c, _ in hull], [q for _, q in hull]
    right = max(c for pts in by_router.values() for c, _ in pts)
    ax.plot(xs + [right], ys + [ys[-1]], "k--", linewidth=1, label="hull")
    ax.set_xlabel("mean raw cost per question (micro-$)")
    ax.set_ylabel("EM")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_results(out: Path, result: dict, rows: list[dict], table: str) -> None:
    fields = ["router", "setting", "dataset", "n", "em", "f1", "raw_cost", "full_cost", "calls_per_question",
              "format_error_rate", "em_ci_low", "em_ci_high", "routing_score"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        m = r["metrics"]
        for ds, s in m["by_dataset"].items():
            extra = {"em_ci_low": m["em_ci"][0], "em_ci_high": m["em_ci"][1],
                     "routing_score": m.get("routing_score", "")} if ds == "overall" else {}
            writer.writerow({"router": r["router"], "setting": r["setting"], "dataset": ds, **s, **extra})
    write_text_atomic(out / "results.json", json.dumps(result, indent=2, default=float))
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.md", table)
    plot_pareto(out / "pareto.png", rows)


# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="eval YAML, e.g. configs/eval/llmrouter.yaml")
    p.add_argument("--routers", required=True, help="comma-separated router specs, e.g. largest,knn,fixed:Gemma-2-9B-IT")
    p.add_argument("--out", default=None, help="output folder (default: the config's `out`)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. routers.lambdas=[0,0.5]")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = load_dataclass(EvalConfig, args.config, args.overrides)  # `extends:` and overrides as in train.py
    specs = [s.strip() for s in args.routers.split(",") if s.strip()]
    try:
        result = evaluate_routers(cfg, specs, Path(args.out or cfg.out))
    except CallFailureAbort as e:
        sys.exit(f"evaluate.py: {e}")
    print(f"\n{result['n_questions']} questions, task {cfg.task}, alpha={cfg.episode.alpha}\n\n{result['table']}\n"
          f"written to {args.out or cfg.out}/")
    return result


def evaluate_routers(cfg: EvalConfig, specs: Sequence[str], out: Path) -> dict:
    """Play every router of `specs` on the task's test questions, score them, and write the results
    into `out`. Returns results.json's content plus the Markdown table (`table`)."""
    if not specs:
        raise ValueError("--routers lists no router")
    for s in specs:
        parse_router_spec(s)  # an unknown name stops here, before any data loads

    task = build_task(cfg)  # bad data stops here, before anything is written
    try:
        return _evaluate(cfg, specs, out, task)
    finally:
        task.pool.close()  # on any error too: a pool left open would keep the process alive


def _evaluate(cfg: EvalConfig, specs: Sequence[str], out: Path, task: Task) -> dict:
    reader, answer_mode = None, resolve_answer_mode(cfg)
    if answer_mode == "reader":
        from agents.routers.reader import AnswerReader
        reader = AnswerReader(cfg.routers.reader_model, device=cfg.device)
    ctx = RouterContext(task.pool, cfg.routers, make_answerer(answer_mode, reader), task.train_outcomes)
    routers = []
    for s in specs:
        router = make_router(s, ctx)
        router.name_spec = s
        routers.append(router)
    # each LLM router's points (a trained policy's routing settings read and its pool checked first)
    points = {k: policy_points(r, cfg, task) for k, r in enumerate(routers) if isinstance(r, LLMRouter)}
    normalizer = make_cost_normalizer(cfg.cost_normalizer, **cfg.cost_options)

    matrix, bounds, bounds_costs = None, None, None
    if cfg.outcome_matrix:
        matrix = from_calls(task.pool, [q["question"] for q in task.test], [q["golden_answers"] for q in task.test],
                            lambda q, r: ctx.answerer.answer(-1, q, r))
        bounds = routing_score_bounds(matrix.quality, matrix.cost)
        bounds_costs = (float(matrix.cost.min()), float(matrix.cost.max()))
    names = task.pool.names
    two = None
    if len(names) == 2 and matrix is not None:
        costs = matrix.cost.mean(0)
        weak, strong = (0, 1) if costs[0] <= costs[1] else (1, 0)
        two = (names[weak], names[strong], float(matrix.quality[:, weak].mean()), float(matrix.quality[:, strong].mean()))

    rows = []
    total = sum(len(r.settings()) if not isinstance(r, LLMRouter) else len(points[k]) for k, r in enumerate(routers))
    bar = tqdm(total=total, desc="routers", dynamic_ncols=True)
    for k, router in enumerate(routers):
        bar.set_postfix(router=router.name_spec)
        if isinstance(router, LLMRouter):
            runs = []
            for label, episode in points[k]:
                inner = tqdm(total=len(task.test), desc=f"{router.name_spec} {label}", leave=False, dynamic_ncols=True)
                runs.append((label, play_llm_router(router, cfg, task, normalizer, inner, episode)))
                inner.close()
        else:
            router.fit()
            runs = []
            for j, setting in enumerate(router.settings()):
                rng = np.random.default_rng((cfg.seed, k, j))
                runs.append((setting.label, play_scripted_router(router, setting, cfg, task, ctx, normalizer, rng)))
                bar.update(1)
        for label, records in runs:
            metrics = point_metrics(records, cfg, bounds_costs)
            share = float(np.mean([two[1] in r["called"] for r in records])) if two else None
            rows.append({"router": router.name_spec, "setting": label,
                         "name": f"{router.name_spec} ({label})" if label else router.name_spec,
                         "metrics": metrics, "strong_share": share,
                         "first_error": next((r["first_error"] for r in records if r["first_error"]), None)})
        if isinstance(router, LLMRouter):
            bar.update(len(runs))
    bar.close()

    costs = [r["metrics"]["by_dataset"]["overall"]["raw_cost"] for r in rows]
    curves = {}
    for spec in specs:
        pts = [{**r["metrics"]["by_dataset"]["overall"], "strong_share": r["strong_share"]}
               for r in rows if r["router"] == spec]
        curves[spec] = {"points": len(pts), **curve_metrics(pts, (min(costs), max(costs)), two)}
    datasets = sorted({d for r in rows for d in r["metrics"]["by_dataset"] if d != "overall"})
    table = results_table(rows, datasets, curves)
    if bounds is not None:
        table += (f"\nRouting Score bounds over {len(names)} candidates: oracle {bounds['oracle']:.3f}, "
                  f"quality-only {bounds['quality_only']:.3f} (costs scaled over [{bounds_costs[0]:.1f}, "
                  f"{bounds_costs[1]:.1f}] micro-$).\n")
    result = {"config": asdict(cfg), "routers": specs, "n_questions": len(task.test), "datasets": datasets,
              "cost_range": [min(costs), max(costs)],
              "rows": rows, "curves": curves, "routing_score_bounds": bounds, "two_model": two,
              "answer_mode": answer_mode,
              "features": ctx._featurizer.name if ctx._featurizer is not None else None}
    write_results(out, result, rows, table)
    dead = sorted({r["name"] for r in rows if r["metrics"]["calls"] and r["metrics"]["call_error_rate"] == 1.0})
    if dead:  # written first, so nothing is lost; but a table of zeros must not pass for a result
        first = next(r["first_error"] for r in rows if r["name"] in dead)
        raise CallFailureAbort(f"every candidate call of {', '.join(dead)} failed (first error: {first}); "
                               f"results in {out}/ are not a measurement. Check the pool's backend.")
    return {**result, "table": table}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # a bad config, data file or pool: one line
        sys.exit(f"evaluate.py: {e}")
