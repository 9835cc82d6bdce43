"""Reward functions: pure, torch-free; the only home of reward arithmetic."""

from rewards.answer import exact_match, extract_answer, f1_score, normalize_answer
from rewards.compose import RewardBreakdown, compute_reward
from rewards.cost import CostNormalizer, make_cost_normalizer, raw_cost, register_cost_normalizer
from rewards.format import FORMAT_PENALTY, format_errors, format_reward

__all__ = [
    "normalize_answer", "exact_match", "f1_score", "extract_answer", "format_reward", "format_errors",
    "FORMAT_PENALTY", "raw_cost", "make_cost_normalizer", "register_cost_normalizer", "CostNormalizer",
    "compute_reward", "RewardBreakdown",
]
