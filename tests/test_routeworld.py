"""RouteWorld: the world generator, its simulated candidates, tokenizer, oracle plans and scripted agents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from envs.candidates.pool import CandidatePool
from envs.candidates.simulated import SimulatedBackend
from envs.routeworld import (DEFAULT_COST_BUDGET, RELATIONS, UNKNOWN, CandidateProfile, WorldConfig,
                             answer_query, easy_world_config, extract_reply_answer, make_world,
                             make_world_tokenizer, oracle_plan, oracle_summary, plan_disagreement,
                             routeworld_candidates, routeworld_pool, scripted_trajectory, success_probability)
from envs.routeworld.candidates import reply_text, reply_tokens
from envs.routeworld.decomposition import decomposition_stats, hop_split
from rewards import compute_reward, exact_match, format_errors, make_cost_normalizer
from rewards.tags import TAGS, close_tag, open_tag


@pytest.fixture(scope="module")
def world():
    return make_world(WorldConfig())


@pytest.fixture(scope="module")
def pool(world):
    p = routeworld_pool(world)
    yield p
    p.close()


@pytest.fixture(scope="module")
def tokenizer(world):
    return make_world_tokenizer(world)


def _play(world, pool, split, policy, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [(q, scripted_trajectory(q, pool, rng, policy, world=world, **kw)) for q in world.questions(split)]


# --- the world ---------------------------------------------------------------------------------

def test_same_seed_gives_the_same_world_and_another_seed_another():
    a, b, c = (make_world(WorldConfig(seed=s)) for s in (3, 3, 4))
    for split in ("train", "val", "test"):
        assert a.questions(split) == b.questions(split)
    assert a.facts == b.facts and a.hidden == b.hidden
    assert [q["question"] for q in a.questions("train")] != [q["question"] for q in c.questions("train")]


def test_every_question_is_answered_by_following_its_relations(world):
    for split in ("train", "val", "test"):
        for q in world.questions(split):
            hops = q["hops"]
            assert q["dataset"] == "routeworld" and q["split"] == split and q["id"].startswith("routeworld-")
            relations = tuple(h["relation"] for h in hops)
            assert world.follow(relations, hops[0]["subject"]) == q["golden_answers"][0]
            assert world.lookup(q["question"]).answer == q["golden_answers"][0]
            for prev, hop in zip([None] + hops, hops):
                assert hop["answer"] == world.facts[hop["relation"]][hop["subject"]]
                assert hop["sub_question"] == RELATIONS[hop["relation"]].ask.format(hop["subject"])
                assert hop["domain"] == RELATIONS[hop["relation"]].domain
                if prev is not None:  # hop 2 asks about hop 1's answer
                    assert hop["subject"] == prev["answer"]
            if len(hops) == 1:
                assert q["question"] == hops[0]["sub_question"]
    ids = [q["id"] for s in ("train", "val", "test") for q in world.questions(s)]
    assert len(ids) == len(set(ids))


def test_the_held_out_split_has_144_questions_and_10_of_every_template(world):
    test, val = world.questions("test"), world.questions("val")
    assert len(test) >= 144
    for template in world.config.templates:
        assert sum(q["template"] == template for q in test) >= 10, template
        assert sum(q["template"] == template for q in val) >= 2, template
    texts = {s: {q["question"] for q in world.questions(s)} for s in ("train", "val", "test")}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]


# --- the split by facts: nothing in training reveals a held-out answer ----------------------------------

SAME_COUNTRY = ("city_country", "capital", "birth_city", "founder", "hq_city", "person_country",
                "founder_birth_city", "company_country")  # relations whose two ends share a country


class TrainingKnowledge:
    """What a reader of every training question and its hops (the scripted thoughts and calls name
    them) can infer with the world's rules: each entity belongs to one country; every fact chain stays
    inside one country, and a capital is a city of its country (so linked entities share a country,
    inverses included); a country has one capital and one currency, a city is the capital of at most
    one country, and a currency is shared by at most `currency_union` countries."""

    def __init__(self, world, rows):
        self.world = world
        self.parent = {e: e for e in world.kind_of}
        self.known = {}  # (relation or template, subject) -> answer
        for q in rows:
            self.known[(q["template"], q["hops"][0]["subject"])] = q["golden_answers"][0]
            for h in q["hops"]:
                self.known[(h["relation"], h["subject"])] = h["answer"]
        for (rel, subject), answer in self.known.items():
            if rel in SAME_COUNTRY:
                self.union(subject, answer)
        self.countries = world.entities_of("country")
        self.country_of = {}
        for c in self.countries:
            root = self.find(c)
            assert root not in self.country_of, "training links two countries: the world is inconsistent"
            self.country_of[root] = c
        self.currency_of = {}  # country -> currency, from currency facts and city_currency answers
        for (rel, subject), answer in self.known.items():
            if rel in ("currency", "city_currency") and self.place(subject):
                self.currency_of[self.place(subject)] = answer
        self.capital_of = {answer: c for (rel, c), answer in self.known.items() if rel == "capital"}

    def find(self, e):
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)

    def place(self, e):
        """The country training places `e` in, or None."""
        return self.country_of.get(self.find(e))

    def may_share_a_country(self, a, b):
        return self.place(a) is None or self.place(b) is None or self.place(a) == self.place(b)

    def currencies_open_to(self, country):
        """Currencies `country` may use: its known one, else any not already used by the union's size."""
        if country in self.currency_of:
            return {self.currency_of[country]}
        users = {}
        for c, cur in self.currency_of.items():
            users[cur] = users.get(cur, 0) + 1
        return {cur for cur in self.world.entities_of("currency")
                if users.get(cur, 0) < self.world.config.currency_union}

    def consistent_answers(self, q):
        """Every answer to held-out question `q` that contradicts nothing training shows."""
        hops, s = q["hops"], q["hops"][0]["subject"]
        if all((h["relation"], h["subject"]) in self.known for h in hops):
            return {hops[-1]["answer"]}  # forward composition of training facts
        kind = RELATIONS[hops[-1]["relation"]].answer_kind
        if kind == "currency":
            country = s if q["template"] == "currency" else self.place(s)
            options = [country] if country else [c for c in self.countries if self.may_share_a_country(s, c)]
            return set().union(*(self.currencies_open_to(c) for c in options))
        answers = {e for e in self.world.entities_of(kind) if self.may_share_a_country(s, e)}
        if q["template"] == "capital":
            answers = {e for e in answers if self.capital_of.get(e, s) == s}
        return answers


def test_every_held_out_question_has_10_answers_consistent_with_all_training_shows(world):
    knowledge = TrainingKnowledge(world, world.questions("train"))
    for split in ("val", "test"):
        for q in world.questions(split):
            answers = knowledge.consistent_answers(q)
            assert q["golden_answers"][0] in answers, q
            assert len(answers) >= 10, (q["question"], sorted(answers))


def test_the_checker_sees_each_route_of_leakage(world):
    """Each way training could reveal a held-out answer, added to training, is caught."""
    train = world.questions("train")
    test = world.questions("test")
    by_template = {t: next(q for q in test if q["template"] == t) for t in world.config.templates}
    pc = by_template["person_country"]
    # forward composition and a held-out fact as a hop of a training two-hop question
    leaked = TrainingKnowledge(world, train + [next(q for q in world.questions("val") + test
                                                    if q["template"] == "city_country"
                                                    and q["hops"][0]["subject"] == pc["hops"][1]["subject"])])
    assert leaked.consistent_answers(pc) == {pc["golden_answers"][0]}
    # an inverse: "the capital of X is C" places C in X
    cc = by_template["city_country"]
    capital_row = {"template": "capital", "golden_answers": [cc["hops"][0]["subject"]],
                   "hops": [{"relation": "capital", "subject": cc["golden_answers"][0],
                             "answer": cc["hops"][0]["subject"]}]}
    assert TrainingKnowledge(world, train + [capital_row]).consistent_answers(cc) == {cc["golden_answers"][0]}
    # the world's rule: an entity placed by training leaves only its country's cities as birth cities
    bc = by_template["birth_city"]
    assert TrainingKnowledge(world, train).place(bc["hops"][0]["subject"]) is not None


def test_no_held_out_fact_is_asked_in_training(world):
    asked = {t for q in world.questions("train") for t in [q["question"]] + [h["sub_question"] for h in q["hops"]]}
    for split in ("val", "test"):
        for q in world.questions(split):
            assert q["question"] not in asked
            held = [h for h in q["hops"] if (h["relation"], h["subject"]) in world.hidden]
            assert held and not any(h["sub_question"] in asked for h in held), q["question"]


def test_every_held_out_answer_is_written_by_the_warm_starts_policy(world, pool, tokenizer):
    """Each held-out answer's token is one the policy itself writes in scripted training trajectories
    (random routing, as in the warm start), so the held-out gap is about facts, not vocabulary."""
    rng = np.random.default_rng(0)
    written = set()
    for _ in range(3):
        for q in world.questions("train"):
            t = scripted_trajectory(q, pool, rng, "random")
            for chunk in t.chunks:
                written.update(tokenizer.encode(chunk, add_special_tokens=False))
    named = {e for q in world.questions("train") for h in q["hops"] for e in (h["subject"], h["answer"])}
    for split in ("val", "test"):
        for q in world.questions(split):
            ids = tokenizer.encode(q["golden_answers"][0], add_special_tokens=False)
            assert len(ids) == 1 and ids[0] in written, q["golden_answers"][0]
            assert q["hops"][0]["subject"] in named  # the subject too is named by a training question


def test_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="template 'birth_city' asks about persons"):
        WorldConfig(people_per_country=0, companies_per_country=0, templates=("birth_city",))
    with pytest.raises(ValueError, match="unknown or no templates"):
        WorldConfig(templates=("weather",))
    with pytest.raises(ValueError, match="val_fraction"):
        WorldConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="founder of its own"):
        WorldConfig(people_per_country=2, companies_per_country=3)


# --- the candidates ------------------------------------------------------------------------------

def test_each_candidates_accuracy_per_domain_matches_its_skill():
    big = make_world(WorldConfig(seed=1, n_countries=60))
    for profile in big.config.candidates:
        for domain in ("geo", "people", "business"):
            texts = [RELATIONS[r].ask.format(s) for r, facts in big.facts.items()
                     if RELATIONS[r].domain == domain for s in facts]
            right = [exact_match(extract_reply_answer(answer_query(big, profile, t)), big.lookup(t).answer)
                     for t in texts]
            p, n = profile.skill(domain), len(texts)
            assert n >= 240
            assert abs(np.mean(right) - p) <= 4 * math.sqrt(p * (1 - p) / n) + 0.01, (profile.name, domain)


def test_whole_two_hop_questions_follow_the_specialty_rule(world):
    by_name = {p.name: p for p in world.config.candidates}
    rows = world.questions("train") + world.questions("test")
    person_country = [q for q in rows if q["template"] == "person_country"]
    geo_only = [q for q in rows if q["template"] == "city_currency"]
    # Geo-Expert cannot answer a people->geo chain whole, only a geo->geo one
    assert success_probability(by_name["Geo-Expert"], world.lookup(person_country[0]["question"])) == 0.0
    said = [extract_reply_answer(answer_query(world, by_name["Geo-Expert"], q["question"]))
            for q in person_country]
    assert not any(exact_match(a, q["golden_answers"]) for a, q in zip(said, person_country))
    geo_whole = success_probability(by_name["Geo-Expert"], world.lookup(geo_only[0]["question"]))
    assert geo_whole == pytest.approx(0.8 * 0.92**2)
    chain = world.lookup(person_country[0]["question"])
    generalist_whole = success_probability(by_name["Generalist-XL"], chain)
    assert generalist_whole == pytest.approx(0.95 * 0.97**2)


def test_replies_are_deterministic_and_tolerate_case_spacing_and_punctuation(world):
    q = world.questions("test")[0]["question"]  # "In which country is X?"
    messy = "  " + q.upper().replace("?", " ?!").replace(" ", "   ") + " "
    for profile in world.config.candidates:
        assert answer_query(world, profile, q) == answer_query(world, profile, q)
        assert answer_query(world, profile, messy) == answer_query(world, profile, q)
        assert extract_reply_answer(answer_query(world, profile, "Who painted the Mona Lisa?")) == UNKNOWN


def test_wrong_replies_name_another_entity_of_the_right_kind(world):
    tiny = next(p for p in world.config.candidates if p.name == "Tiny-LM")
    wrong = 0
    for q in world.questions("train"):
        said = extract_reply_answer(answer_query(world, tiny, q["hops"][0]["sub_question"]))
        if said not in (UNKNOWN, q["hops"][0]["answer"]):
            assert world.kind_of[said] == RELATIONS[q["hops"][0]["relation"]].answer_kind
            wrong += 1
    assert wrong > 50


def test_the_pool_charges_the_reply_length_times_the_output_price(world, pool):
    q = world.questions("train")[5]
    specs, _ = routeworld_candidates(world)
    assert [s.name for s in specs] == ["Geo-Expert", "People-Expert", "Generalist-XL", "Tiny-LM"]
    records = pool.call_many([(s.name, q["question"], q["question"]) for s in specs])
    for spec, rec in zip(specs, records):
        assert rec.error is None
        assert rec.completion_tokens == reply_tokens(rec.reply)
        assert rec.cost == pytest.approx(rec.completion_tokens * spec.price_per_1m_output)
    generalist, geo = records[2], records[0]
    assert generalist.cost > 100 * geo.cost  # verbose and expensive vs terse and cheap


# --- the oracle plan ------------------------------------------------------------------------------

GOOD = CandidateProfile("Good-Geo", "t/good", 7, 0.2, "good", skills={"geo": 0.9}, unknown_rate=0.5)
BAD = CandidateProfile("Bad-Geo", "t/bad", 7, 0.1, "bad", skills={"geo": 0.2}, unknown_rate=0.5)
PERFECT = CandidateProfile("Perfect-XL", "t/xl", 200, 10.0, "perfect, verbose, expensive",
                           skills={"geo": 1.0},
                           prefix="The answer is ", padding="word " * 20)


def _tiny_world(*profiles):
    return make_world(WorldConfig(n_countries=4, cities_per_country=3, people_per_country=0,
                                  companies_per_country=0, templates=("city_country",), candidates=profiles))


def test_oracle_calls_the_good_cheap_specialist_over_the_bad_one():
    w = _tiny_world(BAD, GOOD)
    budget = make_cost_normalizer("budget", budget=100.0)
    for alpha in (0.0, 0.5, 0.8):
        for q in w.questions("test"):
            plan = oracle_plan(w, q, alpha=alpha, cost_normalizer=budget)
            assert plan.calls == [("Good-Geo", q["question"])]
            cost = reply_tokens(reply_text(GOOD, q["golden_answers"][0])) * 0.2  # the right reply's cost
            assert plan.expected_em == pytest.approx(0.9)
            assert plan.expected_reward == pytest.approx(0.9 * ((1 - alpha) + alpha * (1 - cost / 100.0)))


def test_oracle_pays_for_a_perfect_generalist_only_when_quality_is_all_that_counts():
    w = _tiny_world(BAD, GOOD, PERFECT)
    budget = make_cost_normalizer("budget", budget=DEFAULT_COST_BUDGET)
    q = w.questions("test")[0]
    assert oracle_plan(w, q, alpha=0.0, cost_normalizer=budget).calls == [("Perfect-XL", q["question"])]
    assert oracle_plan(w, q, alpha=0.8, cost_normalizer=budget).calls == [("Good-Geo", q["question"])]
    # restricted to the two specialists, the generalist is never chosen
    assert oracle_plan(w, q, ["Bad-Geo", "Good-Geo"], alpha=0.0).calls == [("Good-Geo", q["question"])]


def test_oracle_two_hop_plans_ask_hop_two_about_hop_ones_answer_or_the_whole_question(world):
    q = next(q for q in world.questions("test") if q["template"] == "person_country")
    hop_plan = oracle_plan(world, q, alpha=0.8)
    assert hop_plan.calls == [("People-Expert", q["hops"][0]["sub_question"]),
                              ("Geo-Expert", q["hops"][1]["sub_question"])]
    assert hop_plan.expected_em == pytest.approx(0.92 * 0.92)
    whole = oracle_plan(world, q, alpha=0.0, max_turns=1)
    assert whole.calls == [("Generalist-XL", q["question"])]
    assert whole.expected_em == pytest.approx(0.95 * 0.97**2)


def test_best_plans_for_alpha_0_and_08_differ_on_at_least_30_percent_of_test_questions(world):
    assert plan_disagreement(world, "test", 0.0, 0.8) >= 0.30
    quality, thrifty = oracle_summary(world, "test", 0.0), oracle_summary(world, "test", 0.8)
    assert quality.em > thrifty.em and quality.cost > 3 * thrifty.cost


# --- the tokenizer --------------------------------------------------------------------------------

ODD_TEXTS = ["", " ", "\n\n", "  two  spaces ", "tabs\tand\r\nCRLF", "émoji 🙂, 北京, Ωμέγα, naïve café",
             "digits 0123456789 and 3.14159, -42, 1e-9",
             "colons: a: b: c; [brackets] {braces} (parens) <angle>",
             "<think></think><search>Geo-Expert:x</search>",
             "Tiny-LMGeo-Expert Generalist-XL-2 people-expert",
             "<|endoftext|> and <|pad|> as text", "\u200b\u00a0zero-width and nbsp", "🤖" * 5]


def test_tokenizer_round_trips_prompts_trajectories_and_unseen_unicode(world, pool, tokenizer):
    texts = list(ODD_TEXTS)
    for policy in ("random", "oracle"):
        texts += [t.text for _, t in _play(world, pool, "test", policy, alpha=0.8)[::3]]
    texts += [q["question"] + "\n" + t for q, t in zip(world.questions("test"), texts)]
    for s in texts:
        ids = tokenizer.encode(s, add_special_tokens=False)
        assert tokenizer.decode(ids) == s, s
    assert tokenizer.encode("abc") == tokenizer.encode("abc", add_special_tokens=False)  # nothing added
    assert tokenizer.chat_template is None


def test_tags_and_candidate_names_are_single_tokens_and_pad_differs_from_eos(world, tokenizer):
    names = [p.name for p in world.config.candidates]
    for s in [open_tag(t) for t in TAGS] + [close_tag(t) for t in TAGS] + names:
        ids = tokenizer.encode(s, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.decode(ids) == s
    ids = tokenizer.encode("<search> Geo-Expert: x </search>", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<search>", "Ġ", "Geo-Expert"]
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert 300 <= len(tokenizer) <= 1100


def test_every_entity_name_is_one_token(world, tokenizer):
    for kind in world.entities:
        for name in world.entities_of(kind):
            ids = tokenizer.encode(f"is {name}?", add_special_tokens=False)
            assert tokenizer.decode(ids) == f"is {name}?" and name in tokenizer.convert_ids_to_tokens(ids)


def test_tokenizer_survives_save_and_load(world, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = world.questions("test")[0]["question"] + " <answer> Geo-Expert 🙂 </answer>"
    assert loaded.encode(s, add_special_tokens=False) == tokenizer.encode(s, add_special_tokens=False)
    assert loaded.decode(loaded.encode(s, add_special_tokens=False)) == s
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


# --- the scripted agents ----------------------------------------------------------------------------

def test_scripted_trajectories_are_well_formed(world, pool):
    for policy in ("random", "oracle"):
        for q, t in _play(world, pool, "test", policy, alpha=0.8):
            assert format_errors(t.text, pool.names) == [], t.text
            assert len(t.records) <= len(q["hops"])
            assert t.chunks[0].startswith("<think> ") and t.chunks[-1].endswith("</answer>")


def _random_policy_em(world, q):
    """Expected EM of the random policy: each hop right with the candidates' mean skill."""
    em = 1.0
    for h in q["hops"]:
        em *= np.mean([p.skill(h["domain"]) for p in world.config.candidates])
    return em


def test_scripted_random_policy_reaches_the_em_its_candidates_allow(world, pool):
    # 3 routings of all 576 questions: the EM's standard deviation is about 0.015
    played = [x for seed in range(3) for split in ("train", "test")
              for x in _play(world, pool, split, "random", seed)]
    em = np.mean([exact_match(t.answer, q["golden_answers"]) for q, t in played])
    expected = np.mean([_random_policy_em(world, q) for q, _ in played])
    assert 0.3 < expected < 0.6
    assert em == pytest.approx(expected, abs=0.05)


def test_scripted_oracle_policy_earns_the_oracle_summarys_reward(world, pool):
    budget = make_cost_normalizer("budget", budget=DEFAULT_COST_BUDGET)
    for alpha in (0.0, 0.8):
        played = _play(world, pool, "train", "oracle", alpha=alpha)
        rewards = [compute_reward(t.text, q["golden_answers"], pool.names, t.cost, alpha,
                                  cost_normalizer=budget).total for q, t in played]
        summary = oracle_summary(world, "train", alpha)
        assert np.mean(rewards) == pytest.approx(summary.reward, abs=0.05)
        assert np.mean([t.cost for _, t in played]) == pytest.approx(summary.cost, rel=0.15)


def test_hop_split_counts_the_two_hop_questions_asked_hop_by_hop(world, pool):
    """The oracle plan's own calls decide it: split where its plan has a call per hop, whole where it
    asks the question whole; one-hop questions do not count."""
    for alpha in (0.0, 0.8):
        played = _play(world, pool, "test", "oracle", alpha=alpha)
        summaries = [{"question": q["question"], "calls": [{"query": r.query} for r in t.records]} for q, t in played]
        for (q, _), s in zip(played, summaries):
            plan = oracle_plan(world, q, alpha=alpha)
            expected = None if len(q["hops"]) == 1 else len(plan.calls) == len(q["hops"])
            assert hop_split(world, s) is expected, (q["question"], plan.calls)
        stats = decomposition_stats(world, summaries)
        two_hop = [q for q, _ in played if len(q["hops"]) == 2]
        assert stats["two_hop"] == pytest.approx(len(two_hop) / len(played))
        split = sum(len(oracle_plan(world, q, alpha=alpha).calls) == 2 for q in two_hop)
        assert stats["hop_split"] == pytest.approx(split / len(played))
    assert decomposition_stats(world, [{"question": "Who knows?", "calls": []}]) == {"two_hop": 0.0, "hop_split": 0.0}


def test_without_candidates_the_answers_cannot_be_guessed(world):
    """Every call answered "unknown": the scripted agent answers "unknown" and scores nothing."""
    specs, _ = routeworld_candidates(world)
    silent = CandidatePool(specs, SimulatedBackend({s.name: (lambda r: "unknown") for s in specs}))
    try:
        played = _play(world, silent, "test", "random")
    finally:
        silent.close()
    assert all(t.answer == UNKNOWN for _, t in played)
    assert np.mean([exact_match(t.answer, q["golden_answers"]) for q, t in played]) == 0.0
    goldens = {a.lower() for s in ("train", "test") for q in world.questions(s) for a in q["golden_answers"]}
    assert UNKNOWN not in goldens


def test_easy_world_is_solved_by_calling_its_specialist():
    easy = make_world(easy_world_config())
    assert [p.name for p in easy.config.candidates] == ["Geo-Expert", "Tiny-LM"]
    for alpha in (0.0, 0.8):
        for q in easy.questions("test"):
            assert oracle_plan(easy, q, alpha=alpha).calls == [("Geo-Expert", q["question"])]
    assert {len(q["hops"]) for q in easy.questions("train")} == {1}
