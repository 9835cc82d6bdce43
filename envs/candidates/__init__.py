"""Candidate LLMs: specs, backends (openai-compatible HTTP, local transformers, simulated, replay),
the SQLite response cache, and the pool that routes calls and keeps the cost ledger."""

from envs.candidates.pool import CandidatePool, load_pool
from envs.candidates.spec import Backend, CallRecord, CandidateError, CandidateSpec, Completion, RequestConfig

__all__ = ["Backend", "CandidatePool", "CandidateError", "load_pool", "CallRecord", "CandidateSpec",
           "Completion", "RequestConfig"]
