"""The RouteWorld generator: a seeded fictional world of countries, cities, people and companies, its
facts, and its one-hop and two-hop questions with their canonical sub-questions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.routeworld.config import WorldConfig
from rewards.answer import normalize_answer

DATASET = "routeworld"
SPLITS = ("train", "val", "test")

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
    """The facts of one generated world, its entities by kind, and its questions split by facts.

    `hidden` holds the held-out facts as (relation, subject). A question is a training question when
    none of its hops is hidden; otherwise it is held out (val or test), unless it asks for the country
    of an entity that training places (that answer follows from training facts, so the question is
    asked in neither split). `floating` holds the entities whose country no training fact reveals."""

    def __init__(self, config: WorldConfig, entities: dict[str, list[str]], facts: dict[str, dict[str, str]],
                 hidden: set[tuple[str, str]], floating: set[str]):
        self.config = config
        self.entities = entities  # kind -> names, in generation order
        self.facts = facts  # relation -> {subject: answer}
        self.hidden = hidden
        self.floating = floating
        self.kind_of = {e: k for k, names in entities.items() for e in names}
        self._index = self._build_index()
        self._questions = self._build_questions()

    @property
    def seed(self) -> int:
        return self.config.seed

    def entities_of(self, kind: str) -> list[str]:
        """Names of one kind, in generation order."""
        return list(self.entities.get(kind, []))

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

    def _split_of(self, hops: list[dict]) -> str | None:
        """train, held (val or test) or None (asked in neither split); see the class docstring."""
        if not any((h["relation"], h["subject"]) in self.hidden for h in hops):
            return "train"
        asks_country = RELATIONS[hops[-1]["relation"]].answer_kind == "country"
        return None if asks_country and hops[0]["subject"] not in self.floating else "held"

    def _build_questions(self) -> dict[str, list[dict]]:
        rng = np.random.default_rng((self.config.seed, 1))  # the val/test draw, apart from the world's
        rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for template in self.config.templates:
            if template in CHAINS:
                relations, ask = CHAINS[template]
            else:
                relations, ask = (template,), RELATIONS[template].ask
            held = []
            for subject in self.facts[relations[0]]:
                hops, entity = [], subject
                for r in relations:
                    answer = self.facts[r][entity]
                    hops.append({"relation": r, "domain": RELATIONS[r].domain, "subject": entity,
                                 "sub_question": RELATIONS[r].ask.format(entity), "answer": answer})
                    entity = answer
                row = {"question": ask.format(subject), "golden_answers": [entity], "dataset": DATASET,
                       "template": template, "hops": hops, "domains": [h["domain"] for h in hops]}
                split = self._split_of(hops)
                if split == "train":
                    rows["train"].append(row)
                elif split == "held":
                    held.append(row)
            n_val = round(self.config.val_fraction * len(held))
            order = rng.permutation(len(held))
            rows["val"] += [held[i] for i in sorted(order[:n_val])]
            rows["test"] += [held[i] for i in sorted(order[n_val:])]
        return {s: [{"id": f"{DATASET}-{s}-{i:04d}", **row, "split": s} for i, row in enumerate(rs)]
                for s, rs in rows.items()}


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
    """Generate the world of `cfg` deterministically from `cfg.seed`, and choose its held-out facts.

    Each country has cities (one is its capital), people born in its cities and companies
    headquartered in its cities and founded by its people, so every fact chain stays inside one
    country; `currency_union` countries share a currency. The last city of each country is floating:
    the first person is born there, and the first company is headquartered there and founded by that
    person. Training names these three only in facts among themselves, so their country stays unknown.

    Held-out facts, each chosen for half of the countries by a random permutation unless it says
    otherwise: the floating city's country (every country); the capital; one currency per union (its
    other members' stay in training, so the name is seen); the birth city of the second company's
    founder, or else (the other half) that company's founder; the third company's headquarters city.
    Every held-out answer is so named in training by other facts, and each held-out question has many
    answers consistent with everything training shows (`tests/test_routeworld.py` checks both).
    """
    rng = np.random.default_rng(cfg.seed)
    new_place, new_person = _name_maker(rng)
    entities: dict[str, list[str]] = {k: [] for k in ("country", "city", "currency", "person", "company")}
    facts: dict[str, dict[str, str]] = {r: {} for r in ("city_country", "capital", "currency")}
    if cfg.people_per_country:
        facts["birth_city"] = {}
    if cfg.companies_per_country:
        facts["founder"], facts["hq_city"] = {}, {}
    hidden: set[tuple[str, str]] = set()
    floating: set[str] = set()
    n = cfg.n_countries
    half = [set(rng.permutation(n)[: n // 2].tolist()) for _ in range(3)]  # capital, founder role, hq role
    order = rng.permutation(n).tolist()
    unions = [order[i:i + cfg.currency_union] for i in range(0, n, cfg.currency_union)]
    countries = []

    def add(kind: str, name: str) -> str:
        entities[kind].append(name)
        return name

    for c in range(n):
        country = add("country", new_place(COUNTRY_ENDINGS))
        countries.append(country)
        cities = [add("city", new_place()) for _ in range(cfg.cities_per_country)]
        placed, floating_city = cities[:-1], cities[-1]
        for city in cities:
            facts["city_country"][city] = country
        hidden.add(("city_country", floating_city))
        floating.add(floating_city)
        facts["capital"][country] = placed[rng.integers(len(placed))]
        if c in half[0]:
            hidden.add(("capital", country))
        people = [add("person", new_person()) for _ in range(cfg.people_per_country)]
        for i, person in enumerate(people):
            facts["birth_city"][person] = floating_city if i == 0 else placed[rng.integers(len(placed))]
        for i in range(cfg.companies_per_country):
            company_word = COMPANY_WORDS[rng.integers(len(COMPANY_WORDS))]
            company = add("company", f"{new_place()} {company_word}")
            facts["founder"][company] = people[i]
            facts["hq_city"][company] = floating_city if i == 0 else placed[rng.integers(len(placed))]
            if i == 0:
                floating.add(company)
            if i == 1:
                hidden.add(("founder", company) if c in half[1] else ("birth_city", people[i]))
            if i == 2 and c in half[2]:
                hidden.add(("hq_city", company))
        floating.update(people[:1])
    for members in unions:
        currency_word = CURRENCY_WORDS[rng.integers(len(CURRENCY_WORDS))]
        currency = add("currency", f"{new_place()} {currency_word}")
        for m in members:
            facts["currency"][countries[m]] = currency
        if len(members) > 1:
            hidden.add(("currency", countries[members[0]]))
    facts["currency"] = {country: facts["currency"][country] for country in countries}  # country order
    return World(cfg, entities, facts, hidden, floating)
