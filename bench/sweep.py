"""The main job over cost weights, seeds and estimators: held-out tables (mean ± sd over seeds), AIQ
over one shared cost range, and a Pareto plot.

    python -m bench.sweep                                   # alpha 0, 0.5, 0.8 x seeds 0, 1, 2 (PPO)
    python -m bench.sweep --alphas 0 --estimators gae,grpo,rloo,reinforce_pp --out runs/estimators
    python -m bench.sweep --config configs/routeworld_tiny_conditioned.yaml --out runs/sweep_conditioned \
        --baseline runs/sweep                               # one conditioned policy per seed

Each run is `python train.py --config configs/routeworld_tiny.yaml` in a process of its own, with
`seed=S task.world={seed: S}` (each seed its own world) and the alpha's ALPHA_SETTINGS, written to
`OUT/<estimator>_a<alpha>_s<seed>`;
a run whose results.json exists is not run again. GRPO and RLOO sample 4 episodes per question from a
quarter of the questions, so every estimator sees as many episodes and takes as many optimizer steps.
With a conditioned `--config` (episode.alpha sampled, issue 26) each seed trains one policy
(`OUT/<estimator>_cond_s<seed>`), whose final table reports it at every alpha of its `report_alphas`;
`--baseline` adds a fixed-alpha sweep's trained policies as one more curve, so the AIQs compare.
Writes OUT/sweep.{json,md} and OUT/pareto.png, or OUT/estimators.{json,md} when several estimators
are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from agents.config import load_config
from envs.atomic import write_atomic, write_text_atomic
from rewards.metrics import aiq
from rewards.table import markdown_table

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "routeworld_tiny.yaml"

# What each estimator changes in the main job's config (the rest stays as it is).
ESTIMATORS = {
    "gae": [],
    "grpo": ["algorithm.advantage=grpo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3",
             "rollout.n_prompts=16", "rollout.n_per_prompt=4"],
    "rloo": ["algorithm.advantage=rloo", "algorithm.kl.placement=loss", "algorithm.kl.estimator=k3",
             "rollout.n_prompts=16", "rollout.n_per_prompt=4"],
    "reinforce_pp": ["algorithm.advantage=reinforce_pp"],
}

# What each cost weight changes in the main job's config, chosen by validation reward over seeds 0-2
# from a small grid (bench/README.md, "Settings per cost weight"): a cost-sensitive reward needs a
# faster actor and a KL pull towards the warm start, whose routing is random, to keep the cheap
# specialists in play until routing by topic emerges; at alpha 0.5, where the generalist pays almost
# as well as a specialist, the first 80 steps reward at alpha 0.8, where routing by topic pays most.
# `--as-main-job` runs every alpha as the main job.
ALPHA_SETTINGS = {
    0.5: ["optim.actor_lr=3e-4", "algorithm.kl.coef=0.05", "alpha_curriculum=[[80, 0.8]]"],
    0.8: ["optim.actor_lr=3e-4", "algorithm.kl.coef=0.05"],
}


# The final-table columns the sweep averages over seeds; two_hop_split_share (RouteWorld: the share of
# two-hop test questions asked hop by hop) exists for the policy and the oracle plan only.
METRICS = ("em", "raw_cost", "reward", "format_error", "two_hop_split_share")


def run_name(estimator: str, alpha: float | None, seed: int) -> str:
    """A run's folder: one per alpha, or (alpha None) one conditioned policy for every alpha."""
    return f"{estimator}_cond_s{seed}" if alpha is None else f"{estimator}_a{alpha:g}_s{seed}"


def train_one(out: Path, config: Path, estimator: str, alpha: float | None, seed: int, threads: int,
              extra: list[str], tuned: bool = True) -> Path:
    """One training run in a subprocess (alpha None: the config's own, sampled alpha); its stdout
    and stderr go to `<run_dir>/train.log`."""
    run_dir = out / run_name(estimator, alpha, seed)
    if (run_dir / "results.json").exists():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(config), f"run_dir={run_dir}", f"seed={seed}",
            f"task.world={{seed: {seed}}}", *([f"episode.alpha={alpha}"] if alpha is not None else []),
            *ESTIMATORS[estimator], *(ALPHA_SETTINGS.get(alpha, []) if tuned else []), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "train.log", "w") as log:
        done = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{run_dir.name} failed (exit {done.returncode}); see {run_dir / 'train.log'}")
    return run_dir


def mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def single_round_points(run_dir: Path) -> dict[str, list[tuple[str, float, float]]]:
    """Each single-round router's lambda grid: (setting, raw cost, EM) from the run's evaluation
    (whose `fixed:<name>` rows are curves of their own, read from the final table)."""
    result = json.loads((run_dir / "single_round" / "results.json").read_text())
    points: dict[str, list] = {}
    for r in (r for r in result["rows"] if not r["router"].startswith("fixed")):
        o = r["metrics"]["by_dataset"]["overall"]
        points.setdefault(r["router"], []).append((r["setting"], o["raw_cost"], o["em"]))
    return points


def final_rows(run_dir: Path, alpha: float | None = None) -> dict[str, dict]:
    """A run's final table (results.json); its best single-round row under one name for every run.
    `alpha`: a conditioned run's rows reported at that alpha (train.py names them "<row> (alpha A)"),
    under their plain names."""
    rows = json.loads((run_dir / "results.json").read_text())
    if alpha is not None:
        suffix = f" (alpha {alpha:g})"
        rows = {k[:-len(suffix)]: v for k, v in rows.items() if k.endswith(suffix)}
    return {("best single-round" if k.startswith("best single-round") else k): v for k, v in rows.items()}


def summarize(out: Path, estimators: list[str], alphas: list[float], seeds: list[int],
              conditioned: bool = False) -> dict:
    """Per (estimator, alpha): mean ± sd over seeds of every row of the runs' final tables (of one
    conditioned run per seed, read at each alpha, when `conditioned`)."""
    table: dict[str, dict] = {}
    for est in estimators:
        for alpha in alphas:
            runs = [final_rows(out / run_name(est, None, s), alpha) if conditioned
                    else final_rows(out / run_name(est, alpha, s)) for s in seeds]
            rows = {name: {m: mean_sd([r[name][f"eval/{m}"] for r in runs])
                           for m in METRICS if f"eval/{m}" in runs[0][name]}
                    for name in runs[0]}
            fixed = [k for k in rows if k.startswith("fixed: ")]
            rows["best fixed candidate"] = rows[max(fixed, key=lambda k: rows[k]["reward"][0])]
            table[f"{est}, alpha {alpha:g}"] = rows
    return table


def curves(out: Path, estimator: str, alphas: list[float], seeds: list[int], table: dict,
           conditioned: bool = False) -> dict[str, list]:
    """(raw cost, EM) curves over the sweep, means over seeds: the trained policies (one point per
    alpha), the oracle plans, each fixed candidate, and each single-round router's lambda grid."""
    rows = [table[f"{estimator}, alpha {a:g}"] for a in alphas]
    out_curves = {"trained policy": [(r["trained policy"]["raw_cost"][0], r["trained policy"]["em"][0]) for r in rows],
                  "oracle plan": [(r["oracle plan"]["raw_cost"][0], r["oracle plan"]["em"][0]) for r in rows]}
    for name in (k for k in rows[0] if k.startswith("fixed: ")):
        out_curves[name] = [(rows[0][name]["raw_cost"][0], rows[0][name]["em"][0])]
    grids = [single_round_points(out / run_name(estimator, None if conditioned else alphas[0], s)) for s in seeds]
    for router, points in grids[0].items():
        out_curves[router] = [(float(np.mean([g[router][i][1] for g in grids])),
                               float(np.mean([g[router][i][2] for g in grids]))) for i in range(len(points))]
    return out_curves


def shared_aiq(curve_points: dict[str, list]) -> tuple[dict[str, float], tuple[float, float]]:
    """Every curve's AIQ over one range: the smallest and largest cost of all curves."""
    costs = [c for pts in curve_points.values() for c, _ in pts]
    c_min, c_max = min(costs), max(costs)
    return {name: aiq(pts, c_max=c_max, c_min=c_min) for name, pts in curve_points.items()}, (c_min, c_max)


def markdown(table: dict, aiqs: dict | None, cost_range: tuple | None, n_seeds: int) -> str:
    lines = [f"Held-out RouteWorld test questions, mean ± sd over {n_seeds} seeds (each its own world).", ""]
    for setting, rows in table.items():
        lines += [f"### {setting}", "", markdown_table(
            ["router", "EM", "raw cost", "reward", "format err", "2-hop split"],
            [[name] + [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" if k in m else "-" for k in METRICS]
             for name, m in rows.items()]), ""]
    if aiqs:
        lines += [f"AIQ over the shared cost range [{cost_range[0]:.2f}, {cost_range[1]:.2f}] micro-$:", "",
                  markdown_table(["curve", "AIQ"], [[k, f"{v:.3f}"] for k, v in aiqs.items()])]
    return "\n".join(lines) + "\n"


def plot(path: Path, curve_points: dict[str, list]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, pts in curve_points.items():
        pts = sorted(pts)
        style = "*-" if name == "trained policy" else ("s--" if name == "oracle plan" else "o-" if len(pts) > 1 else "o")
        ax.plot([max(c, 1e-2) for c, _ in pts], [q for _, q in pts], style, label=name,
                markersize=10 if name == "trained policy" else 5)
    ax.set_xscale("log")
    ax.set_xlabel("mean raw cost per question (micro-$, log scale)")
    ax.set_ylabel("held-out EM")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="the runs' config (default: the main job's)")
    p.add_argument("--alphas", default=None, help="default: 0,0.5,0.8, or a conditioned config's report_alphas")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--estimators", default="gae", help=f"comma-separated, of {', '.join(ESTIMATORS)}")
    p.add_argument("--workers", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores / workers)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--as-main-job", action="store_true",
                   help="no per-alpha settings (ALPHA_SETTINGS): every alpha trains with the main job's")
    p.add_argument("--baseline", default=None, help="a sweep's output folder whose trained policies are drawn "
                   "and scored as the curve 'baseline: trained policies' (e.g. the fixed-alpha sweep)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run")
    args = p.parse_args(argv)
    run_cfg = load_config(args.config, args.overrides)  # a bad config stops here, before any run
    conditioned = run_cfg.episode.conditioned
    default = run_cfg.report_alphas if conditioned else [0.0, 0.5, 0.8]
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else default
    seeds = [int(s) for s in args.seeds.split(",")]
    estimators = args.estimators.split(",")
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; known: {list(ESTIMATORS)}")
    out = Path(args.out)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    per_seed = [None] if conditioned else alphas  # one conditioned policy for every alpha
    jobs = [(e, a, s) for e in estimators for s in seeds for a in per_seed]
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda j: train_one(out, Path(args.config), *j, threads, args.overrides,
                                                 not args.as_main_job), jobs))

    table = summarize(out, estimators, alphas, seeds, conditioned)
    aiqs, cost_range, curve_points = None, None, None
    if len(alphas) > 1:
        curve_points = curves(out, estimators[0], alphas, seeds, table, conditioned)
        if args.baseline:
            baseline = json.loads((Path(args.baseline) / "sweep.json").read_text())["curves"]["trained policy"]
            curve_points["baseline: trained policies"] = [tuple(p) for p in baseline]
        aiqs, cost_range = shared_aiq(curve_points)
        plot(out / "pareto.png", curve_points)
    text = markdown(table, aiqs, cost_range, len(seeds))
    result = {"alphas": alphas, "seeds": seeds, "estimators": estimators, "table": table, "curves": curve_points,
              "aiq": aiqs, "cost_range": cost_range, "config": args.config, "conditioned": conditioned}
    stem = "estimators" if len(estimators) > 1 else "sweep"
    for name, body in ((f"{stem}.json", json.dumps(result, indent=2)), (f"{stem}.md", text)):
        write_text_atomic(out / name, body)
    print(text)
    return result


if __name__ == "__main__":
    main()
