"""The RouteWorld generator: a seeded fictional world of countries, cities, people and companies, its
facts, and its one-hop and two-hop questions with their canonical sub-questions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.routeworld.config import WorldConfig
from rewards.answer import normalize_answer

DATASET = "routeworld"
SPLITS = ("train", "test")

# Every name is built from these syllables joined by hyphens ("Kor-van", "Tes-mar-is Del-ka-son").
# A byte-level tokenizer splits words at a hyphen, so each syllable is tokenized the same way in every
# name: a test name is a new combination of pieces training names also use, which a tiny model can
# copy though it never saw the name whole.
SYLLABLES = ("kor", "van", "tes", "lin", "mar", "dor", "bel", "sil", "ven", "tor", "bra", "nel",
             "ka", "ri", "mos", "del", "fen", "gar", "lu", "zan", "per", "quel", "thi", "wyn")
COUNTRY_ENDINGS = ("ia", "land", "or")
# People's names end in these, so no person's name word equals a place's name.
FIRST_NAME_ENDINGS = ("o", "is", "a")
SURNAME_ENDINGS = ("son", "ard", "ez")
COMPANY_WORDS = ("Corp", "Works", "Labs", "Group")
CURRENCY_WORDS = ("Crown", "Mark", "Florin")


@dataclass(frozen=True)
class Relation:
    """A one-hop fact `subject -> answer`: its domain, the canonical sub-question asking it (`ask`,
    with `{}` for the subject) and the phrase a scripted thought uses for it."""

    name: str
    domain: str
    subject_kind: str
    answer_kind: str
    ask: str
    phrase: str


RELATIONS = {r.name: r for r in (
    Relation("city_country", "geo", "city", "country", "In which country is {}?", "the country of {}"),
    Relation("capital", "geo", "country", "city", "What is the capital of {}?", "the capital of {}"),
    Relation("currency", "geo", "country", "currency", "What is the currency of {}?", "the currency of {}"),
    Relation("birth_city", "people", "person", "city", "In which city was {} born?", "the birth city of {}"),
    Relation("founder", "business", "company", "person", "Who founded {}?", "the founder of {}"),
    Relation("hq_city", "business", "company", "city", "In which city is {} headquartered?",
             "the headquarters city of {}"),
)}

# A two-hop question follows two relations; its wording, with `{}` for the first subject.
CHAINS = {
    "person_country": (("birth_city", "city_country"), "In which country was {} born?"),
    "founder_birth_city": (("founder", "birth_city"), "In which city was the founder of {} born?"),
    "company_country": (("hq_city", "city_country"), "In which country is {} headquartered?"),
    "city_currency": (("city_country", "currency"), "What is the currency used in {}?"),
}


@dataclass(frozen=True)
class Query:
    """What a question (one-hop or whole two-hop) asks: the relations followed from `subject`, the
    answer they lead to, and its kind. Candidates answer by looking their query up as one of these."""

    relations: tuple[str, ...]
    subject: str
    answer: str
    answer_kind: str

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(RELATIONS[r].domain for r in self.relations)


def query_key(text: str) -> str:
    """The lookup key of a question: SQuAD-normalized (case, punctuation, articles, spaces ignored)."""
    return normalize_answer(text)


class World:
    """The facts of one generated world, its entities by kind and split, and its questions."""

    def __init__(self, config: WorldConfig, entities: dict[str, list[str]], split_of: dict[str, str],
                 facts: dict[str, dict[str, str]]):
        self.config = config
        self.entities = entities  # kind -> names, in generation order
        self.split_of = split_of  # entity name -> "train" | "test"
        self.facts = facts  # relation -> {subject: answer}
        self.kind_of = {e: k for k, names in entities.items() for e in names}
        self._index = self._build_index()
        self._questions = {s: self._build_questions(s) for s in SPLITS}

    @property
    def seed(self) -> int:
        return self.config.seed

    def entities_of(self, kind: str, split: str | None = None) -> list[str]:
        """Names of one kind, optionally only those of one split."""
        return [e for e in self.entities.get(kind, []) if split is None or self.split_of[e] == split]

    def follow(self, relations: tuple[str, ...], subject: str) -> str:
        """The answer reached by following `relations` from `subject` (KeyError if a fact is missing)."""
        entity = subject
        for r in relations:
            entity = self.facts[r][entity]
        return entity

    def lookup(self, text: str) -> Query | None:
        """The query a question text asks, if it is one of the world's canonical questions (any
        relation about any entity, or any two-hop chain), up to case, punctuation and spacing."""
        return self._index.get(query_key(text))

    def questions(self, split: str) -> list[dict]:
        """The questions of a split, as rows: `id`, `question`, `golden_answers`, `dataset`, `split`,
        `template`, `hops` (per hop: relation, domain, subject, canonical sub_question, answer) and
        `domains`. A hop's sub-question names the previous hop's answer."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
        return [dict(q, hops=[dict(h) for h in q["hops"]]) for q in self._questions[split]]

    def _queries(self):
        for name, rel in RELATIONS.items():
            for subject, answer in self.facts.get(name, {}).items():
                yield rel.ask.format(subject), Query((name,), subject, answer, rel.answer_kind)
        for relations, ask in CHAINS.values():
            if all(r in self.facts for r in relations):
                for subject in self.facts[relations[0]]:
                    answer = self.follow(relations, subject)
                    kind = RELATIONS[relations[-1]].answer_kind
                    yield ask.format(subject), Query(relations, subject, answer, kind)

    def _build_index(self) -> dict[str, Query]:
        index: dict[str, Query] = {}
        for text, query in self._queries():
            key = query_key(text)
            if key in index and index[key] != query:
                raise RuntimeError(f"two facts share the question {text!r}; change the seed or the syllables")
            index[key] = query
        return index

    def _build_questions(self, split: str) -> list[dict]:
        rows = []
        for template in self.config.templates:
            if template in CHAINS:
                relations, ask = CHAINS[template]
            else:
                relations, ask = (template,), RELATIONS[template].ask
            for subject in self.facts[relations[0]]:
                if self.split_of[subject] != split:
                    continue
                hops, entity = [], subject
                for r in relations:
                    answer = self.facts[r][entity]
                    hops.append({"relation": r, "domain": RELATIONS[r].domain, "subject": entity,
                                 "sub_question": RELATIONS[r].ask.format(entity), "answer": answer})
                    entity = answer
                rows.append({"id": f"{DATASET}-{split}-{len(rows):04d}", "question": ask.format(subject),
                             "golden_answers": [entity], "dataset": DATASET, "split": split,
                             "template": template, "hops": hops, "domains": [h["domain"] for h in hops]})
        return rows


def _name_maker(rng: np.random.Generator):
    """Returns `new_place(endings)` and `new_person()`, makers of fresh hyphenated names. Places never
    share their two syllables ("Kor-van" and "Kor-van-ia" cannot both exist); people may share a first
    name or a surname, never both."""
    bases: set[str] = set()
    people: set[str] = set()

    def word(endings: tuple[str, ...] = ("",)) -> tuple[str, str]:
        """(two random syllables, the same with a random ending), hyphenated and capitalised."""
        base = "-".join(SYLLABLES[i] for i in rng.integers(len(SYLLABLES), size=2)).capitalize()
        ending = endings[rng.integers(len(endings))]
        return base, f"{base}-{ending}" if ending else base

    def new_place(endings: tuple[str, ...] = ("",)) -> str:
        for _ in range(10_000):
            base, name = word(endings)
            if base not in bases:
                bases.add(base)
                return name
        raise RuntimeError("ran out of syllable combinations for places; lower the entity counts")

    def new_person() -> str:
        for _ in range(10_000):
            name = f"{word(FIRST_NAME_ENDINGS)[1]} {word(SURNAME_ENDINGS)[1]}"
            if name not in people:
                people.add(name)
                return name
        raise RuntimeError("ran out of syllable combinations for people; lower the entity counts")
    return new_place, new_person


def make_world(cfg: WorldConfig) -> World:
    """Generate the world of `cfg` deterministically from `cfg.seed`.

    Each country has `cities_per_country` cities (one is its capital), a currency, people born in
    its cities and companies headquartered in its cities and founded by its people; so every fact
    chain stays inside one country. A random `test_fraction` of the countries (at least one, at
    most all but one) and everything in them form the test split.
    """
    rng = np.random.default_rng(cfg.seed)
    new_place, new_person = _name_maker(rng)
    entities: dict[str, list[str]] = {k: [] for k in ("country", "city", "currency", "person", "company")}
    split_of: dict[str, str] = {}
    facts: dict[str, dict[str, str]] = {r: {} for r in ("city_country", "capital", "currency")}
    if cfg.people_per_country:
        facts["birth_city"] = {}
    if cfg.companies_per_country:
        facts["founder"], facts["hq_city"] = {}, {}
    n_test = min(max(1, round(cfg.test_fraction * cfg.n_countries)), cfg.n_countries - 1)
    test_countries = set(rng.choice(cfg.n_countries, size=n_test, replace=False).tolist())

    def add(kind: str, name: str, split: str) -> str:
        entities[kind].append(name)
        split_of[name] = split
        return name

    for c in range(cfg.n_countries):
        split = "test" if c in test_countries else "train"
        country = add("country", new_place(COUNTRY_ENDINGS), split)
        currency_word = CURRENCY_WORDS[rng.integers(len(CURRENCY_WORDS))]
        currency = add("currency", f"{new_place()} {currency_word}", split)
        facts["currency"][country] = currency
        cities = [add("city", new_place(), split) for _ in range(cfg.cities_per_country)]
        for city in cities:
            facts["city_country"][city] = country
        facts["capital"][country] = cities[rng.integers(len(cities))]
        people = [add("person", new_person(), split) for _ in range(cfg.people_per_country)]
        for person in people:
            facts["birth_city"][person] = cities[rng.integers(len(cities))]
        for _ in range(cfg.companies_per_country):
            company_word = COMPANY_WORDS[rng.integers(len(COMPANY_WORDS))]
            company = add("company", f"{new_place()} {company_word}", split)
            facts["founder"][company] = people[rng.integers(len(people))]
            facts["hq_city"][company] = cities[rng.integers(len(cities))]
    return World(cfg, entities, split_of, facts)
