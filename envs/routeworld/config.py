"""RouteWorld's knobs: the world's size and question templates, and the skill table of its candidates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

DOMAINS = ("geo", "people", "business")

# Question templates: the six one-hop relations and the four two-hop chains (see `world.py`).
ONE_HOP = ("city_country", "capital", "currency", "birth_city", "founder", "hq_city")
TWO_HOP = ("person_country", "founder_birth_city", "company_country", "city_currency")


@dataclass(frozen=True)
class CandidateProfile:
    """One simulated candidate: what the policy is told (name, model, size, price, description) and
    the hidden truth of how it answers.

    A one-hop sub-question in domain d is answered right with probability `skills[d]` (0 for a
    missing domain). A whole two-hop question is answered right with probability
    `whole_factor * skills[d1] * skills[d2]` when both hop domains are in `specialties` (None = every
    domain), else never. A reply that is not right says "unknown" with probability `unknown_rate`,
    else names a wrong entity of the right kind. A reply is `prefix + answer + "." + padding`.
    """

    name: str
    model: str
    params_b: float
    price_per_1m_output: float  # dollars per 1M completion tokens
    description: str
    skills: Mapping[str, float]
    specialties: tuple[str, ...] | None = None
    whole_factor: float = 0.0
    unknown_rate: float = 0.5
    prefix: str = ""  # words before the answer, e.g. "The answer is "
    padding: str = ""  # words after the answer sentence (verbose models cost more)

    def __post_init__(self) -> None:
        for d, p in self.skills.items():
            if d not in DOMAINS:
                raise ValueError(f"candidate {self.name!r}: unknown domain {d!r} in skills; known: {DOMAINS}")
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"candidate {self.name!r}: skills[{d!r}]={p} must lie in [0, 1]")
        for d in self.specialties or ():
            if d not in DOMAINS:
                raise ValueError(f"candidate {self.name!r}: unknown specialty {d!r}; known: {DOMAINS}")
        for key in ("whole_factor", "unknown_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"candidate {self.name!r}: {key}={getattr(self, key)} must lie in [0, 1]")
        if "." in self.prefix:
            raise ValueError(f"candidate {self.name!r}: prefix must not contain '.' (it ends the answer)")

    def skill(self, domain: str) -> float:
        return float(self.skills.get(domain, 0.0))


GEO_EXPERT = CandidateProfile(
    "Geo-Expert", "routeworld/geo-7b", 7.0, 0.20,
    "small and cheap; knows geography: countries, cities, capitals and currencies",
    skills={"geo": 0.92, "people": 0.15, "business": 0.10}, specialties=("geo",), whole_factor=0.8)
PEOPLE_EXPERT = CandidateProfile(
    "People-Expert", "routeworld/people-8b", 8.0, 0.25,
    "small and cheap; knows people: where they were born; fair on company founders",
    skills={"geo": 0.15, "people": 0.92, "business": 0.55}, specialties=("people",), whole_factor=0.8)
GENERALIST_XL = CandidateProfile(
    "Generalist-XL", "routeworld/generalist-180b", 180.0, 3.00,
    "large and expensive; knows every topic well and can answer two-step questions whole",
    skills={"geo": 0.97, "people": 0.97, "business": 0.97}, specialties=None, whole_factor=0.95,
    unknown_rate=0.3, prefix="The answer is ",
    padding="I checked this against what I know about the region, its people and its companies, "
            "so I am confident in it.")
TINY_LM = CandidateProfile(
    "Tiny-LM", "routeworld/tiny-1b", 1.0, 0.05,
    "tiny and very cheap; often guesses",
    skills={"geo": 0.30, "people": 0.30, "business": 0.30}, specialties=None, whole_factor=0.3,
    unknown_rate=0.2)

DEFAULT_CANDIDATES = (GEO_EXPERT, PEOPLE_EXPERT, GENERALIST_XL, TINY_LM)


@dataclass(frozen=True)
class WorldConfig:
    """A RouteWorld: `n_countries` countries, each with its own cities, people and companies, and the
    question templates asked about them. The split is by facts, not by entities: every entity is named
    in training questions, and the held-out questions ask facts that no training question, inverse or
    rule of the world reveals (see `world.make_world`)."""

    seed: int = 0  # seeds the world and every candidate's replies
    n_countries: int = 32
    cities_per_country: int = 3  # one is its capital; one (the last) is its "floating" city
    people_per_country: int = 4  # one born in the floating city, the others in the other cities
    companies_per_country: int = 3  # one headquartered in the floating city; each founded by a compatriot
    currency_union: int = 2  # countries sharing one currency
    val_fraction: float = 0.25  # share of each template's held-out questions kept for model selection
    templates: tuple[str, ...] = ONE_HOP + TWO_HOP  # the question templates generated (ONE_HOP, TWO_HOP)
    candidates: tuple[CandidateProfile, ...] = field(default=DEFAULT_CANDIDATES)  # the skill table

    def __post_init__(self) -> None:
        if self.n_countries < 2:
            raise ValueError(f"n_countries must be >= 2, got {self.n_countries}")
        if self.cities_per_country < 2:
            raise ValueError(f"cities_per_country must be >= 2 (a capital and a floating city), "
                             f"got {self.cities_per_country}")
        if self.people_per_country < 0 or self.companies_per_country < 0:
            raise ValueError("people_per_country and companies_per_country must be >= 0")
        if self.companies_per_country and self.people_per_country < self.companies_per_country:
            raise ValueError("each company needs a founder of its own: set people_per_country >= "
                             f"companies_per_country ({self.companies_per_country})")
        if not 1 <= self.currency_union <= self.n_countries:
            raise ValueError(f"currency_union must lie in [1, n_countries], got {self.currency_union}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        unknown = [t for t in self.templates if t not in ONE_HOP + TWO_HOP]
        if unknown or not self.templates:
            raise ValueError(f"unknown or no templates {unknown}; known: {ONE_HOP + TWO_HOP}")
        needs = {"person": self.people_per_country, "company": self.companies_per_country}
        for t in self.templates:
            for kind, count in needs.items():
                if kind in _TEMPLATE_KINDS[t] and count == 0:
                    raise ValueError(f"template {t!r} asks about {kind}s but {kind} count per country is 0")
        if not self.candidates:
            raise ValueError("a world needs at least one candidate")
        names = [c.name.casefold() for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names collide: {[c.name for c in self.candidates]}")


# Entity kinds each template touches (checked against the per-country counts).
_TEMPLATE_KINDS = {
    "city_country": {"city"}, "capital": {"city"}, "currency": set(), "birth_city": {"person"},
    "founder": {"company", "person"}, "hq_city": {"company"}, "person_country": {"person"},
    "founder_birth_city": {"company", "person"}, "company_country": {"company"}, "city_currency": set(),
}


def easy_world_config(seed: int = 0) -> WorldConfig:
    """A deliberately easy world for short training tests: geography only, one-hop questions, one
    good cheap specialist and one bad cheap model; the best plan always calls Geo-Expert."""
    bad = CandidateProfile("Tiny-LM", "routeworld/tiny-1b", 1.0, 0.05, "tiny and very cheap; often guesses",
                           skills={"geo": 0.1}, unknown_rate=0.2)
    return WorldConfig(seed=seed, n_countries=32, cities_per_country=3, people_per_country=0,
                       companies_per_country=0, templates=("city_country", "capital"),
                       candidates=(GEO_EXPERT, bad))
