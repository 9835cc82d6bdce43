"""The one task type of train.py and evaluate.py: train/test questions, candidate pool, tokenizer (when
the task has its own), the scripted warm-start agent, reference rows for the final table, and the
training split's per-candidate outcomes that learned routers fit on."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from envs.candidates.pool import CandidatePool, load_pool
from envs.conditioning import spec_values
from envs.prompts import build_prompt, condition_text


@dataclass
class Task:
    """What a run plays: questions are dicts {"id", "question", "golden_answers", "dataset", ...}."""

    name: str
    train: list  # training questions (empty where the task knows them only as outcomes: llmrouter)
    test: list
    pool: CandidatePool
    tokenizer: object | None = None  # the task's own tokenizer (RouteWorld); None: the model's
    script: Callable | None = None  # scripted_turn(example, replies, rng, names) for the SFT warm start
    references: Callable | None = None  # references(alpha, normalizer) -> {row name: scripted turn}
    val: list = field(default_factory=list)  # model-selection questions (empty: none held out for it)
    extra: dict = field(default_factory=dict)
    # () -> agents.routers.outcomes.OutcomeData of the training split, for learned routers (evaluate.py);
    # None: the task has none
    train_outcomes: Callable | None = None
    # (episode summaries) -> {name: mean over episodes} the task adds to its metrics; None: none
    episode_stats: Callable | None = None


def routeworld_world(world_overrides: dict, preset: str = "default"):
    """The RouteWorld of a config: the preset's WorldConfig with `world_overrides` applied."""
    import dataclasses
    from envs.routeworld import WorldConfig, easy_world_config, make_world
    base = easy_world_config() if preset == "easy" else WorldConfig()
    return make_world(dataclasses.replace(base, **world_overrides))


def make_routeworld_task(world_overrides: dict, n_test: int, max_turns: int, prompt_template: str,
                         preset: str = "default", cues: Sequence[str] = ()) -> Task:
    """RouteWorld's splits, simulated pool, world tokenizer (with `cues` as single tokens), scripted
    warm start (random routing) and oracle-plan reference."""
    from envs.routeworld import make_world_tokenizer, routeworld_pool, scripted_turn
    from envs.routeworld.decomposition import decomposition_stats
    world = routeworld_world(world_overrides, preset)
    pool = routeworld_pool(world)
    train, val, test = world.questions("train"), world.questions("val"), world.questions("test")[:n_test]
    prompts = [build_prompt(q["question"], pool.specs, prompt_template, max_turns) for q in train[:200]]
    tokenizer = make_world_tokenizer(world, extra_texts=prompts, cues=cues)

    def script(example, replies, rng, names):
        return scripted_turn(example, replies, rng, names, "random", max_turns=max_turns)

    def oracle_script(alpha: float, normalizer):
        """The oracle plan at `alpha` (the best expected reward under `normalizer`), played in the env."""
        def turn(example, replies, rng, names):
            return scripted_turn(example, replies, rng, names, "oracle", world=world, alpha=alpha,
                                 cost_normalizer=normalizer, max_turns=max_turns)
        return turn

    def references(alpha: float, normalizer) -> dict[str, Callable]:
        """The scripted reference routers of the final table that no evaluation router plays (the
        fixed candidates are evaluate.py's `fixed:<name>` routers), each played on the test questions."""
        return {"oracle plan": oracle_script(alpha, normalizer)}

    return Task("routeworld", train, test, pool, val=val, tokenizer=tokenizer, script=script, references=references,
                extra={"world": world}, episode_stats=partial(decomposition_stats, world))


def make_qa_task(train_path: str, test_path: str | None, pool_path: str, n_test: int) -> Task:
    """Questions from local files. The last tenth of the training file (at most `n_test` questions) is
    kept back for checkpoint selection; with no test file, the test questions are the first `n_test`
    training questions (then the test figures are not held out)."""
    from envs.data import QADataConfig, load_qa
    for path in (train_path, test_path):
        if path and path.endswith((".jsonl", ".json", ".parquet", ".csv")) and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such data file; prepare the paper's splits with "
                                    "`python -m envs.data prepare --out data/` (see README, Data)")
    rows = [e.__dict__ for e in load_qa(QADataConfig(path=train_path))]
    n_val = min(len(rows) // 10, n_test)
    train, val = rows[:len(rows) - n_val], rows[len(rows) - n_val:]
    test = [e.__dict__ for e in load_qa(QADataConfig(path=test_path))][:n_test] if test_path else train[:n_test]
    return Task("qa", train, test, load_pool(pool_path), val=val or test)


def make_task(cfg) -> Task:
    """Build the task named by `cfg.task` (a TrainConfig)."""
    t = cfg.task
    if t.name == "routeworld":
        # a conditioned policy reads its cost weight from one token, as it reads a name
        cues = [condition_text(a).strip() for a in spec_values(cfg.episode.alpha)] if cfg.episode.conditioned else []
        return make_routeworld_task(t.world, t.n_test, cfg.episode.max_turns, cfg.episode.prompt_template,
                                    t.world_preset, cues)
    return make_qa_task(t.train_path, t.test_path, t.pool, t.n_test)


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng((seed, *keys))
