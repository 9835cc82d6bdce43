"""RouteWorld: an offline routing task (a seeded fictional world, its simulated candidates, tokenizer,
oracle plans and scripted trajectories) on which a tiny model learns to route in minutes on a CPU.
`make_world_tokenizer` loads on first use, so the world alone does not import transformers."""

import importlib

from envs.chunks import UNKNOWN
from envs.routeworld.candidates import (answer_query, extract_reply_answer, routeworld_candidates, routeworld_pool,
                                        success_probability)
from envs.routeworld.config import (DEFAULT_CANDIDATES, DOMAINS, ONE_HOP, TWO_HOP, CandidateProfile,
                                    WorldConfig, easy_world_config)
from envs.routeworld.oracle import (DEFAULT_COST_BUDGET, OraclePlan, OracleSummary, oracle_plan,
                                    oracle_summary, plan_disagreement)
from envs.routeworld.script import ScriptedTrajectory, scripted_trajectory, scripted_turn
from envs.routeworld.world import DATASET, RELATIONS, World, make_world

__all__ = [
    "WorldConfig", "CandidateProfile", "DEFAULT_CANDIDATES", "DOMAINS", "ONE_HOP", "TWO_HOP",
    "easy_world_config",
    "World", "make_world", "RELATIONS", "DATASET",
    "routeworld_candidates", "routeworld_pool", "answer_query", "extract_reply_answer", "success_probability",
    "UNKNOWN", "oracle_plan", "oracle_summary", "plan_disagreement", "OraclePlan", "OracleSummary",
    "DEFAULT_COST_BUDGET", "scripted_turn", "scripted_trajectory", "ScriptedTrajectory",
    "make_world_tokenizer",
]


def __getattr__(name: str):
    if name == "make_world_tokenizer":
        return importlib.import_module("envs.routeworld.tokenizer").make_world_tokenizer
    raise AttributeError(f"module 'envs.routeworld' has no attribute {name!r}")
