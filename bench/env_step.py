"""CPU benchmark: the cost of `MultiRouteEnv.step()` per policy token at episode lengths 100, 1000
and 4000 tokens, with a simulated candidate call every few hundred tokens; it should stay flat. Then
the batched env as the rollout engine drives it: `push` per token against `push_many` per burst of 8.

    python -m bench.env_step
"""

from __future__ import annotations

import time


from bench.common import bpe_tokenizer, table, write_results
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend
from envs.env import MultiRouteEnv
from envs.episode import GENERATING, EpisodeConfig
from envs.vector import MultiRouteVectorEnv

CORPUS = ["<think> I should ask the expert about the river. </think> <search> Expert: Where is Korvan? </search>",
          "<info> Korvan is in Tessaly. </info> <answer> Tessaly </answer> the north sea river town people"]


def episode_tokens(tok, length: int, every: int) -> list[int]:
    """Policy tokens of one episode: thinking text with a `<search>` call every `every` tokens,
    ending in an answer at about `length` tokens."""
    think = tok.encode(" the river runs north to the sea", add_special_tokens=False)
    call = tok.encode(" </think>\n<search> Expert: Where is Korvan? </search>", add_special_tokens=False)
    answer = tok.encode(" </think>\n<answer> Tessaly </answer>", add_special_tokens=False)
    ids = tok.encode("<think>", add_special_tokens=False)
    since = 0
    while len(ids) < length - len(answer):
        if since >= every:
            ids += call + tok.encode("<think>", add_special_tokens=False)
            since = 0
        ids += think
        since += len(think)
    return ids + answer


def main() -> None:
    tok = bpe_tokenizer(CORPUS, 400)
    pool = CandidatePool([CandidateSpec("Expert", "expert", 7, 0.3)],
                         SimulatedBackend({"Expert": lambda r: "Korvan is in Tessaly."}))
    env = MultiRouteEnv(tok, pool, config=EpisodeConfig(max_response_tokens=10_000, max_turns=100, prompt_template="compact"))
    rows = []
    for length in (100, 1000, 4000):
        actions = episode_tokens(tok, length, every=300)
        best = float("inf")
        for _ in range(3):
            env.reset(seed=0, options={"question": "Where is Korvan?", "golden_answers": ["Tessaly"]})
            t = time.perf_counter()
            for a in actions:
                _, _, terminated, _, info = env.step(a)
                if terminated:
                    break
            best = min(best, time.perf_counter() - t)
        rows.append({"episode_tokens": len(actions), "calls": info["n_calls"], "us_per_step": 1e6 * best / len(actions)})
    base = rows[0]["us_per_step"]
    for r in rows:
        r["x_of_100"] = r["us_per_step"] / base
    print(table(rows, ["episode_tokens", "calls", "us_per_step", "x_of_100"]))
    pushes = push_rows(tok, pool, episode_tokens(tok, 1000, every=300))
    print(table(pushes, ["push", "us_per_token"]))
    print(f"wrote {write_results('env_step', {'rows': rows, 'push_rows': pushes})}")


def push_rows(tok, pool, actions: list[int], episodes: int = 64, burst: int = 8) -> list[dict]:
    """Seconds per policy token for `episodes` episodes fed their tokens burst by burst, as the
    rollout engine feeds them, with `push` per token and with `push_many` per burst."""
    env = MultiRouteVectorEnv(tok, pool, EpisodeConfig(max_response_tokens=10_000, max_turns=100,
                                                       prompt_template="compact"))
    examples = [{"question": "Where is Korvan?", "golden_answers": ["Tessaly"]}] * episodes

    def one_by_one(i: int, chunk: list[int]) -> int:
        """`push` per token until the episode leaves generating (the engine's way before `push_many`)."""
        n = 0
        while n < len(chunk) and env.episodes[i].state == GENERATING:
            env.push(i, chunk[n])
            n += 1
        return n
    rows = []
    for name, push in (("push per token", one_by_one), ("push_many per burst", env.push_many)):
        best = float("inf")
        for _ in range(3):
            env.reset(examples)
            at, pushed, t = [0] * episodes, 0, time.perf_counter()
            while any(a < len(actions) for a in at):
                for i in range(episodes):
                    if at[i] < len(actions) and not env.episodes[i].done:
                        n = push(i, actions[at[i]:at[i] + burst])
                        at[i], pushed = at[i] + n, pushed + n
                    else:
                        at[i] = len(actions)
                env.resolve()
            best = min(best, (time.perf_counter() - t) / pushed)
        rows.append({"push": name, "us_per_token": 1e6 * best})
    return rows


if __name__ == "__main__":
    main()
