"""One policy for every budget: alpha and the spending cap drawn per prompt (keyed, shared by a group),
stated in the prompt, used by the episode's reward; the cap bounds every call's max_tokens, refuses a
call it cannot pay, cuts replies that do not fit, and no episode ever spends more than its cap."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agents.advantages import repeat_for_group
from envs import EpisodeConfig, MultiRouteEnv, MultiRouteVectorEnv
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend
from envs.candidates.spec import CUT_REPLY, cut_reply
from envs.conditioning import cap_for_json, draw, stream_key
from envs.episode import OVER_BUDGET, with_conditions
from envs.prompts import build_prompt
from rewards.cost import BudgetNormalizer, affordable_tokens, call_cost
from tiny import encode, tiny_tokenizer

SPECS = [CandidateSpec("Geo-Expert", "geo", 1, 0.2), CandidateSpec("Big-Model", "big", 70, 3.0)]
QUESTION = {"question": "In which country is Korvan?", "golden_answers": ["Tessaly"]}
CALL = "<think> ask </think>\n<search> {name}: where is Korvan? </search>"
ANSWER = "<think> got it </think>\n<answer> Tessaly </answer>"


def play(env, texts_by_episode):
    """Push each episode's chunks in turn, resolving calls after each round; return the episodes."""
    rounds = max(len(t) for t in texts_by_episode)
    for r in range(rounds):
        for i, texts in enumerate(texts_by_episode):
            ep = env.episodes[i]
            if r < len(texts) and not ep.done:
                ep.push_many(encode(env.tokenizer, texts[r]))
        env.resolve()
    return env.episodes


# --- drawing per prompt --------------------------------------------------------------------------

def test_a_draw_is_fixed_by_its_key_and_differs_between_prompts():
    spec = {"low": 0.0, "high": 0.9}
    values = [draw(spec, 0, 5, i, "alpha") for i in range(50)]
    assert values == [draw(spec, 0, 5, i, "alpha") for i in range(50)]
    assert len(set(values)) > 20 and all(0.0 <= v <= 0.9 and round(v, 2) == v for v in values)
    picks = {draw({"sample": [0, 0.3, 0.8]}, 1, 2, i, "alpha") for i in range(50)}
    assert picks == {0.0, 0.3, 0.8}
    assert draw(0.4, 0, 0, 0, "alpha") == 0.4 and draw(None, 0, 0, 0, "max_cost") is None
    assert stream_key(0, 1, 2) != stream_key(0, 1, 3)


def test_a_group_shares_the_alpha_and_cap_of_its_prompt():
    cfg = EpisodeConfig(alpha={"low": 0.0, "high": 1.0}, max_cost={"sample": [5, 10, 20, 40]})
    prompts = with_conditions([dict(QUESTION, id=i) for i in range(16)], cfg, seed=3, step=7)
    examples = repeat_for_group(prompts, 4)  # as the trainer does: drawn first, then repeated
    env = MultiRouteVectorEnv(tiny_tokenizer(), CandidatePool(SPECS, SimulatedBackend({})), cfg)
    env.reset(examples)
    groups = [env.episodes[4 * g:4 * g + 4] for g in range(16)]
    assert all(len({(e.alpha, e.max_cost) for e in group}) == 1 for group in groups)
    assert len({group[0].alpha for group in groups}) > 8  # prompts differ
    assert with_conditions([{**QUESTION, "alpha": 0.25}], cfg, 0, 0)[0]["alpha"] == 0.25  # a given one stays


def test_a_cap_of_infinity_in_a_sample_set_draws_questions_with_no_cap():
    """`.inf` is no cap: those episodes state no budget and spend freely, the others state theirs."""
    cfg = EpisodeConfig(max_cost={"sample": [math.inf, 40.0]}, prompt_template="compact")
    tok = tiny_tokenizer()
    env = MultiRouteVectorEnv(tok, CandidatePool(SPECS, SimulatedBackend({})), cfg)
    env.reset(with_conditions([dict(QUESTION, id=i) for i in range(16)], cfg, seed=0, step=0))
    caps = [e.max_cost for e in env.episodes]
    assert set(caps) == {None, 40.0}
    for e in env.episodes:
        assert ("Budget: 40 micro-$." in tok.decode(e.prompt_ids)) == (e.max_cost == 40.0)
        assert e.budget_left == (None if e.max_cost is None else 40.0)
    assert cfg.longest_conditions() == (None, 40.55)  # the longest statement is the finite cap's
    assert cap_for_json({"sample": [math.inf, 40.0]}) == {"sample": [None, 40.0]} and cap_for_json(math.inf) is None
    pinned = cfg.pinned(max_cost=math.inf)  # evaluate.py's `max_costs: [.inf]`: the uncapped point
    env = MultiRouteVectorEnv(tok, CandidatePool(SPECS, SimulatedBackend({})), pinned)
    env.reset([QUESTION])
    assert env.episodes[0].max_cost is None and "Budget" not in tok.decode(env.episodes[0].prompt_ids)


def test_a_sampled_alpha_must_be_drawn_before_the_episode_starts():
    env = MultiRouteVectorEnv(tiny_tokenizer(), CandidatePool(SPECS, SimulatedBackend({})),
                              EpisodeConfig(alpha={"sample": [0, 1]}))
    with pytest.raises(ValueError, match="example 0 has no 'alpha'.*with_conditions"):
        env.reset([QUESTION])


# --- the prompt states them --------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["router_r1", "compact"])
def test_every_template_states_alpha_and_budget_in_fixed_words(template):
    text = build_prompt("Where is Korvan?", SPECS, template, alpha=0.5, max_cost=40)
    assert "Cost weight: 0.5. Budget: 40 micro-$.\nQuestion: Where is Korvan?" in text
    plain = build_prompt("Where is Korvan?", SPECS, template)
    assert "Cost weight" not in plain and "Budget" not in plain
    assert plain == text.replace("Cost weight: 0.5. Budget: 40 micro-$.\n", "")  # otherwise unchanged


def test_a_template_that_cannot_state_alpha_is_an_error_when_alpha_is_sampled():
    template = "{candidates}\nQ: {question}"
    assert build_prompt("q?", SPECS, template)  # unconditioned: fine
    with pytest.raises(ValueError, match="no {conditions} field"):
        build_prompt("q?", SPECS, template, alpha=0.3)
    env = MultiRouteVectorEnv(tiny_tokenizer(), CandidatePool(SPECS, SimulatedBackend({})),
                              EpisodeConfig(alpha={"sample": [0.3]}, prompt_template=template))
    with pytest.raises(ValueError, match="cost weight or budget"):
        env.reset(with_conditions([QUESTION], env.cfg, 0, 0))


def test_each_episode_starts_from_the_prompt_of_its_own_alpha():
    tok = tiny_tokenizer()
    env = MultiRouteVectorEnv(tok, CandidatePool(SPECS, SimulatedBackend({})), EpisodeConfig(alpha={"sample": [0, 1]}))
    env.reset([{**QUESTION, "alpha": 0.0}, {**QUESTION, "alpha": 0.8}])
    texts = [tok.decode(e.prompt_ids) for e in env.episodes]
    assert "Cost weight: 0." in texts[0] and "Cost weight: 0.8." in texts[1]


# --- the reward uses the episode's alpha ---------------------------------------------------------

def test_the_reward_of_each_episode_uses_its_own_alpha():
    pool = CandidatePool(SPECS, SimulatedBackend({"Geo-Expert": lambda r: ("Tessaly.", 10)}))
    env = MultiRouteVectorEnv(tiny_tokenizer(), pool, EpisodeConfig(alpha={"sample": [0, 1]}))
    env.reset([{**QUESTION, "alpha": a} for a in (0.0, 0.5, 1.0)])
    play(env, [[CALL.format(name="Geo-Expert"), ANSWER]] * 3)
    totals = [r.total for r, _ in env.finish(BudgetNormalizer(10.0))]
    score = 1 - 10 * 0.2 / 10.0  # 10 tokens at $0.2/M against a budget of 10
    assert totals == pytest.approx([1.0, 0.5 + 0.5 * score, score])


# --- the cap --------------------------------------------------------------------------------------

def test_a_call_gets_at_most_the_tokens_the_budget_left_buys_and_the_ledger_shows_what_is_left():
    seen = []
    responders = {"Big-Model": lambda r: seen.append(r.sampling["max_tokens"]) or ("Tessaly. Truly.", 3)}
    env = MultiRouteVectorEnv(tiny_tokenizer(), CandidatePool(SPECS, SimulatedBackend(responders)), EpisodeConfig())
    env.reset([{**QUESTION, "max_cost": 40.0}])
    ep = play(env, [[CALL.format(name="Big-Model")] * 2 + [ANSWER]])[0]
    assert seen == [13, 10]  # floor(40 / 3), then floor(31 / 3): $3/M output, 3 tokens a reply
    assert [c.budget_left for c in ep.calls] == pytest.approx([31.0, 22.0])
    assert ep.raw_cost == pytest.approx(18.0) and ep.budget_left == pytest.approx(22.0)


def test_priced_input_tokens_are_paid_first():
    spec = CandidateSpec("Big-Model", "big", 70, 3.0, price_per_1m_input=1.0)
    seen = []
    pool = CandidatePool([spec], SimulatedBackend({"Big-Model": lambda r: seen.append(r.sampling["max_tokens"]) or "ok."}),
                         count_prompt_tokens=True)
    prompt_tokens = sum(len(m["content"].split()) for m in pool.request.messages("where is Korvan?"))
    env = MultiRouteVectorEnv(tiny_tokenizer(), pool, EpisodeConfig())
    env.reset([{**QUESTION, "max_cost": 60.0}])
    ep = play(env, [[CALL.format(name="Big-Model"), ANSWER]])[0]
    assert seen == [math.floor((60.0 - prompt_tokens * 1.0) / 3.0)]
    assert ep.calls[0].prompt_tokens == prompt_tokens and ep.raw_cost <= 60.0


def test_a_call_the_budget_cannot_pay_is_refused_with_an_info_and_charges_nothing():
    called = []
    pool = CandidatePool(SPECS, SimulatedBackend({"Big-Model": lambda r: called.append(1) or ("Tessaly.", 2)}))
    env = MultiRouteVectorEnv(tiny_tokenizer(), pool, EpisodeConfig(min_reply_tokens=4))
    env.reset([{**QUESTION, "max_cost": 11.0}])  # 3 tokens of Big-Model: fewer than 4
    ep = play(env, [[CALL.format(name="Big-Model"), ANSWER]])[0]
    assert called == [] and ep.calls == [] and ep.raw_cost == 0.0
    assert f"<info> {OVER_BUDGET.format(left=11.0, name='Big-Model')} </info>" in ep.text
    reward, summary = env.finish(BudgetNormalizer(10.0))[0]
    assert reward.format == 0.0 and summary["max_cost"] == 11.0  # a refusal is no format error


@pytest.mark.parametrize("max_tokens, reply", [
    (5, "The answer is Tessaly."),  # 12 words in 14 tokens: 5 tokens keep 4 words, the answer sentence
    (4, CUT_REPLY),  # cut inside it
    (1, CUT_REPLY),
])
def test_a_reply_cut_before_its_answer_sentence_ends_says_unknown(max_tokens, reply):
    text = "The answer is Tessaly. I hope this helps you with your trip."
    assert cut_reply(text, 14, max_tokens) == (reply, max_tokens)
    assert cut_reply(text, 14, 14) == (text, 14)  # no cut


def test_a_capped_simulated_reply_is_cut_and_charged_the_cap():
    text = "The answer is Tessaly. I hope this helps you with your trip."
    pool = CandidatePool(SPECS, SimulatedBackend({"Big-Model": lambda r: (text, 14)}))
    env = MultiRouteVectorEnv(tiny_tokenizer(), pool, EpisodeConfig())
    env.reset([{**QUESTION, "max_cost": 12.0}])  # 4 tokens at $3/M
    ep = play(env, [[CALL.format(name="Big-Model"), ANSWER]])[0]
    record = ep.calls[0]
    assert (record.reply, record.completion_tokens, record.cost) == (CUT_REPLY, 4, 12.0)
    assert record.extra == {"cut": True} and record.budget_left == 0.0


def test_affordable_tokens_never_pass_the_cap_in_float_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        spent, cap = float(rng.uniform(0, 50)), float(rng.uniform(0, 100))
        prompt, p_in, p_out = int(rng.integers(0, 200)), float(rng.uniform(0, 2)), float(rng.uniform(0.01, 7))
        n = affordable_tokens(spent, cap, prompt, p_in, p_out, 512)
        assert n == 0 or spent + call_cost(prompt, n, p_in, p_out) <= cap
        assert n == 512 or spent + call_cost(prompt, n + 1, p_in, p_out) > cap or n == 0


reply_words = st.lists(st.sampled_from(["Tessaly.", "The", "answer", "is", "Korvan", "I", "think", "so."]),
                       min_size=0, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap=st.floats(0.05, 80.0), prices=st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 9.0)),
                                                 min_size=2, max_size=2),
       replies=st.lists(st.tuples(reply_words, st.one_of(st.none(), st.integers(0, 400))), min_size=4, max_size=4),
       count_prompt=st.booleans(), calls=st.lists(st.sampled_from(["Cheap", "Dear"]), min_size=1, max_size=4))
@example(cap=1.0, prices=[(0.0, 5e-324), (0.0, 0.0)], replies=[([], None)] * 4, count_prompt=False,
         calls=["Cheap"])  # a price so small that budget / price overflows
def test_no_episode_spends_more_than_its_cap(cap, prices, replies, count_prompt, calls):
    """Random caps, prices (input ones charged or not), replies and reported token counts (None: the
    pool counts them): the ledger's raw cost stays within the cap, and so does every call's budget left."""
    specs = [CandidateSpec(n, n.lower(), 1, p_out, p_in) for n, (p_in, p_out) in zip(("Cheap", "Dear"), prices)]
    out = iter(replies)

    def respond(request):
        words, tokens = next(out)
        return " ".join(words) if tokens is None else (" ".join(words), tokens)
    pool = CandidatePool(specs, SimulatedBackend({"Cheap": respond, "Dear": respond}), count_prompt_tokens=count_prompt)
    env = MultiRouteVectorEnv(tiny_tokenizer(), pool, EpisodeConfig(max_turns=4, min_reply_tokens=1))
    env.reset([{**QUESTION, "max_cost": cap}])
    ep = play(env, [[CALL.format(name=n) for n in calls] + [ANSWER]])[0]
    assert ep.done and ep.raw_cost <= cap
    assert all(c.budget_left >= 0 for c in ep.calls)


def test_the_gym_env_draws_a_sampled_alpha_from_its_own_generator():
    env = MultiRouteEnv(tiny_tokenizer(), CandidatePool(SPECS, SimulatedBackend({})),
                        config=EpisodeConfig(alpha={"sample": [0.0, 0.3, 0.8]}))
    alphas = [env.reset(seed=s, options=QUESTION)[1]["alpha"] for s in range(12)]
    assert alphas == [env.reset(seed=s, options=QUESTION)[1]["alpha"] for s in range(12)]  # reset(seed) fixes it
    assert set(alphas) == {0.0, 0.3, 0.8}
    assert env.reset(seed=0, options={**QUESTION, "alpha": 0.5})[1]["alpha"] == 0.5  # or the options give it


def test_a_conditioned_routeworld_reads_each_cost_weight_as_one_token_and_the_main_job_is_unchanged():
    from agents.config import load_config
    from envs.conditioning import spec_values
    from envs.prompts import condition_text
    from envs.tasks import make_task
    assert spec_values({"low": 0.1, "high": 0.13}) == [0.1, 0.11, 0.12, 0.13]
    assert spec_values({"sample": [0.8, 0, 0.3, 0.8]}) == [0.0, 0.3, 0.8]
    conditioned = make_task(load_config("configs/routeworld_tiny_conditioned.yaml", [])).tokenizer
    plain = make_task(load_config("configs/routeworld_tiny.yaml", [])).tokenizer
    for alpha in (0.0, 0.3, 0.5, 0.8):
        cue = condition_text(alpha).strip()
        assert conditioned.encode(cue, add_special_tokens=False) == [conditioned.convert_tokens_to_ids(cue)]
        assert len(plain.encode(cue, add_special_tokens=False)) > 1
    assert len(conditioned) == len(plain) + 4


def test_a_conditioned_scripted_thought_restates_the_cost_weight_and_a_plain_one_is_unchanged():
    from envs.routeworld.script import hop_thought, scripted_turn
    from envs.routeworld.world import WorldConfig, make_world
    world = make_world(WorldConfig(seed=0))
    question = world.questions("train")[0]
    names = [c.name for c in world.config.candidates]
    plain = scripted_turn(question, [], np.random.default_rng(0), names)
    conditioned = scripted_turn({**question, "alpha": 0.8}, [], np.random.default_rng(0), names)
    thought = hop_thought(question["hops"][0]["relation"], question["hops"][0]["subject"])
    assert f"<think> {thought} </think>" in plain
    assert f"<think> {thought}. Cost weight: 0.8. </think>" in conditioned
    assert plain.split("</think>")[1] == conditioned.split("</think>")[1]  # the same random call


# --- a curriculum over the cost weight -------------------------------------------------------------

def test_curriculum_stages_draw_their_own_alphas_then_the_trained_set():
    from agents.config import load_config
    cfg = load_config("configs/routeworld_tiny_conditioned.yaml",
                      ["alpha_curriculum=[[2, 0.8], [4, {sample: [0.5, 0.8]}]]"])
    questions = [dict(QUESTION, question=f"{QUESTION['question']} ({i})") for i in range(40)]

    def alphas(config, step):
        drawn = with_conditions(questions, config.episode, config.seed, step, alpha=config.alpha_at(step))
        return {e.get("alpha") for e in drawn}
    assert alphas(cfg, 0) == alphas(cfg, 1) == {0.8}
    assert alphas(cfg, 2) == alphas(cfg, 3) == {0.5, 0.8}
    assert alphas(cfg, 4) == {0.0, 0.3, 0.5, 0.8} and cfg.alpha_at(4) is None
    # a fixed-alpha run's stage sets the alpha its reward uses; after it, the config's own applies
    plain = load_config("configs/routeworld_tiny.yaml", ["episode.alpha=0.5", "alpha_curriculum=[[3, 0.8]]"])
    assert alphas(plain, 2) == {0.8} and alphas(plain, 3) == {None}


def test_a_fixed_alpha_runs_curriculum_changes_the_reward_and_not_the_prompt():
    pool = CandidatePool(SPECS, SimulatedBackend({"Geo-Expert": lambda r: ("Tessaly.", 10)}))
    env = MultiRouteVectorEnv(tiny_tokenizer(), pool, EpisodeConfig(alpha=0.5))
    env.reset([QUESTION] + with_conditions([QUESTION], env.cfg, 0, 0, alpha=0.8))
    play(env, [[CALL.format(name="Geo-Expert"), ANSWER]] * 2)
    assert env.episodes[0].prompt_ids == env.episodes[1].prompt_ids  # the prompt states no cost weight
    totals = [r.total for r, _ in env.finish(BudgetNormalizer(10.0))]
    score = 1 - 10 * 0.2 / 10.0
    assert totals == pytest.approx([0.5 + 0.5 * score, 0.2 + 0.8 * score])


@pytest.mark.parametrize("stages, match", [
    ("[[40, 0.9]]", r"alpha_curriculum\[0\]\[1\]=0.9 gives 0.9, outside episode.alpha"),
    ("[[40, {low: 0.5, high: 0.8}]]", r"gives 0.51, 0.52, 0.53, 0.54, \.\.\., outside"),  # a range over a sample set
    ("[[0, 0.8]]", r"alpha_curriculum\[0\]=\[0, 0.8\] must be \[until_step, alpha spec\]"),
    ("[[40, 0.8], [40, 0.5]]", r"alpha_curriculum\[1\].*above 40"),
    ("[[40, 1.5]]", r"alpha_curriculum\[0\]\[1\]=1.5 must lie in \[0, 1\]"),
    ("[40]", r"alpha_curriculum\[0\]=40"),
])
def test_a_bad_curriculum_is_refused_when_the_config_is_read(stages, match):
    from agents.config import load_config
    with pytest.raises(ValueError, match=match):
        load_config("configs/routeworld_tiny_conditioned.yaml", [f"alpha_curriculum={stages}"])


def test_a_fixed_alpha_runs_curriculum_stage_is_one_number():
    from agents.config import load_config
    with pytest.raises(ValueError, match=r"alpha_curriculum\[0\]\[1\].*is one number"):
        load_config("configs/routeworld_tiny.yaml", ["alpha_curriculum=[[40, {sample: [0.5, 0.8]}]]"])
