"""The episode state machine: one question's trajectory, shared by the token-level gym env and the
batched form. Tag scanning, `Name: query` parsing, routing, reply insertion, limits, the cost ledger
and the final reward all happen here and nowhere else."""

from __future__ import annotations

import weakref
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

from tokenizers.decoders import DecodeStream

from envs.candidates.pool import CandidatePool
from envs.candidates.spec import CallRecord
from envs.conditioning import as_cap, check_spec, draw, is_sampled, largest_cap
from envs.prompts import build_prompt, prompt_token_ids
from rewards import RewardBreakdown, compute_reward
from rewards.cost import CostNormalizer
from rewards.tags import ANSWER, SEARCH, Call, TagScanner, escape_info, info_block, parse_call

RewardFn = Callable[..., RewardBreakdown]  # compute_reward's signature

GENERATING, CALLING, DONE = "generating", "calling", "done"
NO_CALLS_LEFT = "no calls remain; answer now"
OVER_BUDGET = "over budget: {left:g} micro-$ left cannot pay {name} for a reply; no call made, answer now"


@dataclass
class EpisodeConfig:
    """Limits and reward settings of an episode. `alpha` and `max_cost` are a number, a set to sample
    from (`{sample: [...]}`) or a range (`{low: .., high: ..}`): a sampled one is drawn per prompt
    (`envs.conditioning.draw`) and stated in the prompt, so one policy learns every trade-off."""

    max_turns: int = 4  # <search> blocks that get a real call; later ones get NO_CALLS_LEFT
    max_response_tokens: int = 512  # policy tokens; reaching it ends the episode (format penalty)
    max_info_tokens: int = 256  # a reply is truncated to about this many tokens before insertion
    alpha: float | dict = 0.0  # quality/cost trade-off of the reward (Router-R1 eq. 6), or its sample set/range
    max_cost: float | dict | None = None  # micro-dollars a question may spend on calls (None: no cap), or its set/range
    min_reply_tokens: int = 4  # under a cap, a call whose budget buys fewer reply tokens is refused
    metric: str = "em"  # outcome metric: "em" or "f1"
    prompt_template: str = "router_r1"  # a name in envs.prompts.TEMPLATES or a format string

    def __post_init__(self) -> None:
        if self.max_turns < 0:
            raise ValueError(f"episode.max_turns must be >= 0, got {self.max_turns}")
        if self.max_response_tokens < 1:
            raise ValueError(f"episode.max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.max_info_tokens < 1:
            raise ValueError(f"episode.max_info_tokens must be >= 1, got {self.max_info_tokens}")
        if self.min_reply_tokens < 1:
            raise ValueError(f"episode.min_reply_tokens must be >= 1, got {self.min_reply_tokens}")
        check_spec("episode.alpha", self.alpha, unit=True)
        if self.max_cost is not None:
            check_spec("episode.max_cost", self.max_cost, unit=False)
        if self.metric not in ("em", "f1"):
            raise ValueError(f"episode.metric must be 'em' or 'f1', got {self.metric!r}")

    @property
    def conditioned(self) -> bool:
        """Alpha is given per question (sampled): the prompt states it."""
        return is_sampled(self.alpha)

    def longest_conditions(self) -> tuple[float | None, float | None]:
        """An alpha and a cap whose statement makes a prompt as long as these settings draw (for bounds
        on a prompt's length): 0.55 (two decimals, the precision a drawn alpha has), and the largest finite
        cap plus 0.55; None where the prompt states none."""
        alpha = 0.55 if self.conditioned else None
        cap = largest_cap(self.max_cost) if self.max_cost is not None else None
        return alpha, None if cap is None else cap + 0.55

    def pinned(self, alpha: float | None = None, max_cost: float | None = None) -> "EpisodeConfig":
        """These settings with alpha (and, when given, the cap) fixed at one value, e.g. to evaluate a
        conditioned policy at one point of its curve. A conditioned alpha stays a one-value sample set,
        so the prompt still states it."""
        out = self
        if alpha is not None:
            out = replace(out, alpha={"sample": [float(alpha)]} if self.conditioned else float(alpha))
        if max_cost is not None:
            out = replace(out, max_cost=float(max_cost))
        return out


def _backend_tokenizer(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"a fast tokenizer (PreTrainedTokenizerFast) is required, got {type(tokenizer).__name__}")
    return backend


def eos_token_ids(tokenizer, extra: Sequence[int] = ()) -> frozenset[int]:
    """Every id that ends an episode: the tokenizer's EOS plus any given (e.g. a generation config's)."""
    ids = set(extra)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and none was given")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id in ids:
        raise ValueError(f"pad token id {tokenizer.pad_token_id} must differ from every EOS id {sorted(ids)}")
    return frozenset(ids)


_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (size, texts, '>' ids)


def _vocab(tokenizer) -> tuple[list[str], frozenset[int]]:
    """Each id's text on its own and the ids whose text holds '>', decoded once per tokenizer and
    its size (so tokens added later are seen)."""
    size, texts, closers = _VOCAB.get(tokenizer, (None, None, None))
    if size != len(tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        closers = frozenset(i for i, text in enumerate(texts) if ">" in text)
        _VOCAB[tokenizer] = (len(tokenizer), texts, closers)
    return texts, closers


def token_texts(tokenizer) -> list[str]:
    """The text of every id of the tokenizer on its own, special tokens included (cached)."""
    return _vocab(tokenizer)[0]


def tag_closing_ids(tokenizer) -> frozenset[int]:
    """The ids whose text holds '>', the only tokens that can complete a tag (cached)."""
    return _vocab(tokenizer)[1]


@dataclass
class Episode:
    """One question's trajectory after the prompt: the policy's tokens and the env's `<info>` tokens.

    Drive it with `push(token)` for each policy token. When a `</search>` closes, the state becomes
    CALLING and `pending` holds the parsed call (or the reason it is invalid); the owner then calls
    `resolve_calls([...], pool)` which makes the calls concurrently and inserts the replies. The
    episode is DONE at `</answer>`, at an EOS token, or at `max_response_tokens` policy tokens.
    """

    question: str
    golden_answers: list[str]
    prompt_ids: list[int]
    tokenizer: object
    candidate_names: list[str]
    cfg: EpisodeConfig
    eos_ids: frozenset[int]
    alpha: float = 0.0  # this episode's cost weight (drawn per prompt when the config samples it)
    max_cost: float | None = None  # micro-dollars this episode may spend on calls (None: no cap)
    response_ids: list[int] = field(default_factory=list)
    inserted: list[bool] = field(default_factory=list)  # per response token: True if the env wrote it
    calls: list[CallRecord] = field(default_factory=list)
    state: str = GENERATING
    pending: Call | str | None = None  # the call to make, or why the search was not a valid call
    turns: int = 0  # closed <search> blocks, valid or not
    end_reason: str = ""
    _policy_tokens: int = field(default=0, init=False, repr=False)  # len(inserted) - sum(inserted), kept by push
    _pieces: list[str] = field(default_factory=list)
    _scanner: TagScanner = field(default_factory=TagScanner)
    _stream: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=False))
    _backend: object = field(default=None, init=False, repr=False)  # the Rust tokenizer `_stream` decodes with

    def __post_init__(self) -> None:
        self._backend = _backend_tokenizer(self.tokenizer)

    @property
    def done(self) -> bool:
        return self.state == DONE

    @property
    def policy_tokens(self) -> int:
        return self._policy_tokens

    @property
    def text(self) -> str:
        """The response text: what the scanner saw of the policy plus the exact inserted blocks."""
        return "".join(self._pieces)

    @property
    def raw_cost(self) -> float:
        return sum(c.cost for c in self.calls)

    @property
    def budget_left(self) -> float | None:
        """What the episode may still spend on calls (None without a cap)."""
        return None if self.max_cost is None else self.max_cost - self.raw_cost

    def push(self, token: int) -> str:
        """Append one policy token and return the new state."""
        if self.state != GENERATING:
            raise RuntimeError(f"push() while the episode is {self.state}")
        token = int(token)
        self.response_ids.append(token)
        self.inserted.append(False)
        self._policy_tokens += 1
        if token in self.eos_ids:
            return self._end("eos")
        self._scan(self._stream.step(self._backend, token))
        if self.state != DONE and self.policy_tokens >= self.cfg.max_response_tokens:
            self.pending = None
            return self._end("limit")
        return self.state

    def push_many(self, tokens: Sequence[int]) -> int:
        """Push tokens until the state leaves GENERATING; return how many were consumed. The same as
        `push` one by one, faster: a run of tokens that can neither end the episode (an EOS id, the
        token that reaches the response limit) nor close a tag (only a token whose text holds '>' can)
        is decoded in one step."""
        closers = tag_closing_ids(self.tokenizer)
        n, total = 0, len(tokens)
        while n < total and self.state == GENERATING:
            end = n
            last = min(total, n + self.cfg.max_response_tokens - self._policy_tokens - 1)  # the limit is pushed alone
            while end < last and tokens[end] not in closers and tokens[end] not in self.eos_ids:
                end += 1
            if end - n < 2:
                self.push(tokens[n])
                n += 1
                continue
            run = [int(t) for t in tokens[n:end]]
            self.response_ids.extend(run)
            self.inserted.extend([False] * len(run))
            self._policy_tokens += len(run)
            self._scan(self._stream.step(self._backend, run))
            n = end
        return n

    def _scan(self, piece: str | None) -> None:
        """Record newly decoded text and act on the tags it closes: `</answer>` ends the episode,
        `</search>` makes it CALLING (text after it in the same piece is kept but not scanned)."""
        if not piece:
            return
        self._pieces.append(piece)
        for event in self._scanner.feed(piece):
            if event.kind == "close" and event.tag == ANSWER:
                self._end("answer")
                return
            if event.kind == "close" and event.tag == SEARCH:
                self.turns += 1
                self.state = CALLING
                self.pending = self._parse(event.content)
                return

    def truncate(self, reason: str) -> None:
        """End the episode now, whatever it was doing (e.g. a decoder has no room left for it); its
        reward is that of the text so far."""
        self.pending = None
        self._end(reason)

    def _parse(self, content: str) -> Call | str:
        if self.turns > self.cfg.max_turns:
            return NO_CALLS_LEFT
        try:
            return parse_call(content, self.candidate_names)
        except ValueError as e:
            return f"invalid call: {e}"

    def _end(self, reason: str) -> str:
        self.state, self.end_reason = DONE, reason
        return DONE

    def score(self, cost_normalizer: CostNormalizer | None = None,
              reward_fn: RewardFn = compute_reward) -> RewardBreakdown:
        """The episode's reward (pure: the normalizer is only read)."""
        if not self.done:
            raise RuntimeError("score() before the episode ended")
        return reward_fn(self.text, self.golden_answers, self.candidate_names, self.raw_cost,
                         self.alpha, self.cfg.metric, cost_normalizer)

    def summary(self, reward: RewardBreakdown) -> dict:
        """What `info` carries at the end of an episode."""
        return {
            "question": self.question,
            "trajectory": self.text,
            "calls": [c.as_dict() for c in self.calls],
            "raw_cost": self.raw_cost,
            "full_cost": sum(c.full_cost for c in self.calls),
            "reward": asdict(reward),
            "turns": self.turns,
            "n_calls": len(self.calls),
            "end_reason": self.end_reason,
            "limit_reached": self.end_reason == "limit",
            "response_tokens": len(self.response_ids),
            "policy_tokens": self.policy_tokens,
            "alpha": self.alpha,
            "max_cost": self.max_cost,
        }


def with_conditions(examples: Sequence[Any], cfg: EpisodeConfig, seed: int, step: int | str,
                    index_offset: int = 0, alpha: Any = None) -> list[Any]:
    """Each example with the alpha and max_cost its episodes play under, where the config samples
    them and the example does not give them: drawn from the stream keyed by (seed, step, prompt
    index). Call it before a prompt is repeated for its GRPO/RLOO group, so the group shares them.
    Fixed values are left to the config. `alpha` (a curriculum stage's spec) stands in for
    `cfg.alpha`: drawn when sampled, set on every example when one number."""
    specs = {"alpha": cfg.alpha if alpha is None else alpha, "max_cost": cfg.max_cost}
    names = [n for n, spec in specs.items() if is_sampled(spec) or (n == "alpha" and alpha is not None)]
    if not names:
        return list(examples)
    out = []
    for i, example in enumerate(examples):
        row = dict(example) if isinstance(example, dict) else dict(vars(example))
        for name in names:
            if row.get(name) is None:
                row[name] = draw(specs[name], seed, step, index_offset + i, name)
        out.append(row)
    return out


_EXAMPLE_KEYS = ("question", "golden_answers", "alpha", "max_cost")


def _condition(example: dict, cfg: EpisodeConfig, key: str, index: int) -> float | None:
    """An example's own alpha or max_cost, else the config's fixed one (a cap of infinity is none); a
    sampled one must be drawn (`with_conditions`) before the episode starts."""
    spec = getattr(cfg, key)
    value = example.get(key)
    if value is None and is_sampled(spec):
        raise ValueError(f"example {index} has no {key!r} but episode.{key}={spec!r} is sampled; draw it per "
                         "prompt with envs.episode.with_conditions")
    if value is None:
        value = spec
    else:
        check_spec(f"example {index}: {key}", value, unit=key == "alpha")
    if key == "max_cost":
        return as_cap(value)  # infinity: no cap
    return None if value is None else float(value)


def make_episodes(examples: Sequence[Any], tokenizer, pool: CandidatePool, cfg: EpisodeConfig,
                  eos_ids: frozenset[int]) -> list[Episode]:
    """Start an episode per example (a mapping or object with `question` and `golden_answers`, and
    `alpha` / `max_cost` where the config samples them); the prompts are tokenized in one batched call."""
    questions, goldens, alphas, caps = [], [], [], []
    for i, example in enumerate(examples):
        row = example if isinstance(example, dict) else {k: getattr(example, k, None) for k in _EXAMPLE_KEYS}
        question, golden = row.get("question"), row.get("golden_answers")
        if isinstance(golden, str):
            golden = [golden]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"example {i} needs a non-empty 'question' string, got {question!r}")
        if not golden or not all(isinstance(g, str) for g in golden):
            raise ValueError(f"example {i} needs a non-empty list of 'golden_answers' strings, got {golden!r}")
        questions.append(question), goldens.append(list(golden))
        alphas.append(_condition(row, cfg, "alpha", i)), caps.append(_condition(row, cfg, "max_cost", i))
    prompts = episode_prompts(questions, tokenizer, pool, cfg, alphas, caps)
    return [Episode(q, g, ids, tokenizer, pool.names, cfg, eos_ids, alpha=a, max_cost=c)
            for q, g, ids, a, c in zip(questions, goldens, prompts, alphas, caps)]


def episode_prompts(questions: Sequence[str], tokenizer, pool: CandidatePool, cfg: EpisodeConfig,
                    alphas: Sequence[float] | None = None, caps: Sequence[float | None] | None = None) -> list[list[int]]:
    """The prompt ids an episode of each question starts from (under its alpha and cap, which the
    prompt states when alpha is conditioned or a cap is set), tokenized in one batched call that sees
    each distinct prompt once (GRPO repeats every question for its group)."""
    alphas = list(alphas) if alphas is not None else [None] * len(questions)
    caps = list(caps) if caps is not None else [None] * len(questions)
    keys = [(q, a if cfg.conditioned else None, c) for q, a, c in zip(questions, alphas, caps)]
    unique = list(dict.fromkeys(keys))
    texts = [build_prompt(q, pool.specs, cfg.prompt_template, cfg.max_turns, alpha=a, max_cost=c) for q, a, c in unique]
    by_key = dict(zip(unique, prompt_token_ids(tokenizer, texts)))
    return [list(by_key[k]) for k in keys]


def insert_replies(episodes: Sequence[Episode], records: Sequence[CallRecord | None]) -> list[list[int]]:
    """Insert `<info> reply </info>` for the pending search of each CALLING episode (the reply escaped
    and truncated; a failed call inserts its error) and return the inserted token ids by episode. The
    episodes share one tokenizer: the replies are tokenized in two batched calls, to truncate them and
    then to write the blocks, rather than two calls each."""
    for e in episodes:
        if e.state != CALLING:
            raise RuntimeError(f"insert_replies() while the episode is {e.state}")
    if not episodes:
        return []
    tokenizer = episodes[0].tokenizer
    if any(e.tokenizer is not tokenizer for e in episodes):
        raise ValueError("insert_replies() needs episodes that share one tokenizer")
    encode = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bodies = []
    for e, record in zip(episodes, records):
        if record is not None:
            e.calls.append(record)
            record.budget_left = e.budget_left  # the ledger shows what is left after every call
            body = f"error: {record.error}" if record.error else record.reply
        else:
            body = str(e.pending)
        bodies.append(escape_info(body).strip())
    texts = []
    for e, body, ids in zip(episodes, bodies, encode(bodies)):
        limit = e.cfg.max_info_tokens
        if len(ids) > limit:  # cut at a token boundary, dropping a split multi-byte character
            body = tokenizer.decode(ids[:limit]).rstrip("\ufffd").rstrip() + " ..."
        texts.append(info_block(body))
    inserted = encode(texts)
    for e, text, ids in zip(episodes, texts, inserted):
        # the incremental decoder goes on with the block's last ids as context (its text is known exactly
        # and ends in whole characters; a SentencePiece word after it keeps its leading space)
        e._stream = DecodeStream(ids=ids[-4:], skip_special_tokens=False)
        e.response_ids.extend(ids)
        e.inserted.extend([True] * len(ids))
        e._pieces.append(text)
        e._scanner.reset()
        e.state, e.pending = GENERATING, None
    return inserted


def reply_limit(e: Episode, pool: CandidatePool) -> int | None:
    """The max_tokens of an episode's pending call under its cap (None without one): what the budget
    left buys from the candidate, priced prompt tokens paid first. Below `min_reply_tokens` the call
    is refused: `pending` becomes the OVER_BUDGET message, inserted with no call and no charge."""
    if e.max_cost is None:
        return None
    call = e.pending
    limit = pool.affordable(call.name, call.query, e.raw_cost, e.max_cost)
    if limit < e.cfg.min_reply_tokens:
        e.pending = OVER_BUDGET.format(left=round(e.budget_left, 2), name=call.name)
    return limit


def submit_calls(episodes: Sequence[Episode], pool: CandidatePool) -> list[Future | None]:
    """Start the pending call of each CALLING episode in the background, concurrently: its future,
    or None where the search is not a valid call or the budget cannot pay it (its message is
    inserted with no call). Under a cap the call's max_tokens is what the budget left buys."""
    limits = [reply_limit(e, pool) if isinstance(e.pending, Call) else None for e in episodes]
    futures = iter(pool.submit([(e.pending.name, e.pending.query, e.question, limit)
                                for e, limit in zip(episodes, limits) if isinstance(e.pending, Call)]))
    return [next(futures) if isinstance(e.pending, Call) else None for e in episodes]


def resolve_calls(episodes: Sequence[Episode], pool: CandidatePool) -> list[list[int]]:
    """Make the pending calls of every CALLING episode concurrently and insert the replies.

    Returns, per episode, the inserted ids (empty for episodes that were not calling). Invalid or
    over-limit searches insert their message with no call; failed calls insert their error.
    """
    calling = [e for e in episodes if e.state == CALLING]
    records = [f.result() if f is not None else None for f in submit_calls(calling, pool)]
    inserted = dict(zip(map(id, calling), insert_replies(calling, records)))
    return [inserted.get(id(e), []) for e in episodes]
