"""Typed training configuration, and the one config loader (`load_dataclass`, also evaluate.py's):
dataclasses filled from YAML (`extends:` a parent file), `dotted.key=value` overrides, and validation
of every key, type and range before any model is loaded."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from agents.advantages import AdvantageConfig, get_advantage
from agents.call_errors import CallFailureConfig
from agents.losses import LOSS_AGGREGATIONS, validate_kl_placement
from envs.conditioning import check_spec, in_range, is_sample_set, is_sampled, spec_values
from envs.episode import EpisodeConfig
from rewards.compose import load_reward_fn
from rewards.cost import make_cost_normalizer


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a pretrained causal LM (folder or hub id); None: random init
    init: dict = field(default_factory=dict)  # Qwen2Config fields for a randomly initialised model
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # auto: flash_attention_2 when importable on GPU, else sdpa; flex_attention (GPU; sdpa on CPU, where
    # it has no backward) skips the cross-sequence blocks of packed micro-batches (rollout.pack_sequences)
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer of the actor, critic and reference (faster: bench/README.md, "Update
    # runs"); skipped under ZeRO-3, where it gained nothing
    compile_layers: bool = False
    critic_init: str = "actor"  # actor: critic trunk starts from the policy's weights (the paper)

    def __post_init__(self):
        if self.init:  # a typo in a field name would otherwise be ignored silently by the config class
            import inspect
            from transformers import Qwen2Config
            known = set(inspect.signature(Qwen2Config.__init__).parameters) | set(Qwen2Config().to_dict())
            unknown = sorted(set(self.init) - known)
            if unknown:
                raise ValueError(f"model.init has unknown key(s) {unknown}; they must be Qwen2Config fields "
                                 "(e.g. hidden_size, num_hidden_layers, num_attention_heads)")
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _one_of("model.attn_implementation", self.attn_implementation,
                ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"))
        _one_of("model.critic_init", self.critic_init, ("actor", "random"))


@dataclass
class TaskConfig:
    name: str = "routeworld"  # routeworld | qa
    world_preset: str = "default"  # routeworld: default | easy (one domain, a good and a bad specialist)
    world: dict = field(default_factory=dict)  # RouteWorld WorldConfig overrides
    train_path: str | None = None  # qa: local jsonl/parquet/csv (FlashRAG columns)
    test_path: str | None = None
    pool: str | None = None  # qa: candidate pool YAML under configs/candidates/
    n_test: int = 200  # held-out questions evaluated

    def __post_init__(self):
        _one_of("task.name", self.name, ("routeworld", "qa"))
        _one_of("task.world_preset", self.world_preset, ("default", "easy"))
        if self.name == "qa" and not (self.train_path and self.pool):
            raise ValueError("task.name=qa needs task.train_path and task.pool")
        _positive("task.n_test", self.n_test)


@dataclass
class RolloutConfig:
    n_prompts: int = 64  # questions per step (global, across ranks)
    n_per_prompt: int = 1  # rollouts per question (GRPO/RLOO groups)
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batch_tokens: int = 16384  # token budget of a forward/backward micro-batch
    # run each micro-batch as one packed sequence without padding (position resets mark the
    # sequences); pays off with model.attn_implementation=flex_attention, whose block mask skips the
    # pairs of different sequences (SDPA gets a dense mask over the whole packed row)
    pack_sequences: bool = False
    # benchmarks and random-weight runs: at these policy-token counts the engine writes a call to the
    # first candidate instead of sampling, and at forced_answer_at an answer (random weights never
    # write tags, so this is how calls, <info> insertion and masking get exercised)
    forced_turns: list = field(default_factory=list)
    forced_answer_at: int = 0
    # auto: agents.fast_decode.FastEngine on a GPU for Qwen2/Llama policies, else the simple path
    engine: str = "auto"  # auto | fast | simple
    engine_slots: int = 0  # episodes decoding at once (0: the whole phase of this rank)
    engine_max_len: int = 0  # cache positions per episode (0: longest prompt + response + replies)
    # tokens decoded per device call (one CUDA graph); the next call runs while the env reads the last,
    # and a row that stops sits out the call in flight (8 beat 16 end to end: bench/README.md, "Rollout runs")
    engine_burst: int = 8
    # the decode step's attention: triton (agents/decode_attention.py, over each row's filled length),
    # matmul (two batched matmuls over the bucketed length), auto (triton on a GPU where it runs)
    engine_attention: str = "auto"
    # calls run in the background while the other rows decode; with no row left to decode the engine
    # waits up to this long for every reply of the calls out (so calls made together come back
    # together), then for the first one
    engine_call_window_s: float = 0.05

    def __post_init__(self):
        if self.engine not in ("auto", "fast", "simple"):
            raise ValueError(f"rollout.engine must be auto, fast or simple, got {self.engine!r}")
        if self.engine_attention not in ("auto", "triton", "matmul"):
            raise ValueError(f"rollout.engine_attention must be auto, triton or matmul, got {self.engine_attention!r}")
        for key in ("engine_slots", "engine_max_len"):
            if getattr(self, key) < 0:
                raise ValueError(f"rollout.{key} must be >= 0, got {getattr(self, key)}")
        _positive("rollout.engine_burst", self.engine_burst)
        _in_range("rollout.engine_call_window_s", self.engine_call_window_s, 0.0, 60.0)
        _positive("rollout.n_prompts", self.n_prompts)
        _positive("rollout.n_per_prompt", self.n_per_prompt)
        _in_range("rollout.temperature", self.temperature, 0.0, 10.0)
        _in_range("rollout.top_p", self.top_p, 1e-6, 1.0)
        _positive("rollout.micro_batch_tokens", self.micro_batch_tokens)
        if any(not isinstance(p, int) or p < 0 for p in self.forced_turns):
            raise ValueError(f"rollout.forced_turns must be a list of token positions >= 0, got {self.forced_turns}")
        if self.forced_turns and self.forced_answer_at <= max(self.forced_turns):
            raise ValueError("rollout.forced_answer_at must come after the last of rollout.forced_turns")


@dataclass
class KLConfig:
    placement: str = "reward"  # reward (per-token penalty, PPO) | loss (GRPO) | none
    estimator: str = "k1"  # k1 | k2 | k3
    coef: float = 0.001
    adaptive: bool = False  # Ziegler et al. (2019) adaptive coefficient
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self):
        _in_range("algorithm.kl.coef", self.coef, 0.0, 1e3)


@dataclass
class AlgorithmConfig:
    advantage: str = "gae"  # any name registered in agents.advantages
    advantage_options: AdvantageConfig = field(default_factory=AdvantageConfig)  # gamma, lam, whiten, ...
    kl: KLConfig = field(default_factory=KLConfig)
    clip_eps: float = 0.2
    dual_clip: float | None = None
    value_clip: float | None = 0.5
    vf_coef: float = 1.0
    entropy_coef: float = 0.001
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    minibatch_size: int = 32  # episodes per optimizer step (global)
    critic_warmup_steps: int = 0  # steps that train only the critic
    # a conditioned run also trains each episode restated at every other weight of episode.alpha's
    # sample set, whatever a curriculum stage draws (agents.relabel); each optimizer step then takes
    # that many times more episodes
    relabel_alpha: bool = False

    def __post_init__(self):
        get_advantage(self.advantage)  # unknown name: error listing the registered ones
        _in_range("algorithm.clip_eps", self.clip_eps, 0.0, 1.0)
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"algorithm.dual_clip must be > 1 (or null), got {self.dual_clip}")
        _one_of("algorithm.loss_agg", self.loss_agg, tuple(LOSS_AGGREGATIONS))
        _positive("algorithm.ppo_epochs", self.ppo_epochs)
        _positive("algorithm.minibatch_size", self.minibatch_size)
        validate_kl_placement(self.kl.placement, self.kl.estimator, self.advantage)


@dataclass
class OptimConfig:
    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self):
        _in_range("optim.actor_lr", self.actor_lr, 0.0, 1.0)
        _in_range("optim.critic_lr", self.critic_lr, 0.0, 1.0)
        _in_range("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        if not self.grad_clip > 0:  # a negative norm flips the gradients' sign, 0 zeroes them
            raise ValueError(f"optim.grad_clip={self.grad_clip!r} must be > 0 (a large number turns clipping off)")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")


@dataclass
class SFTConfig:
    enabled: bool = False  # supervised warm start on scripted trajectories before RL
    source: str = "scripted"  # scripted (the task's random-routing script) | a jsonl of trajectories
    n_examples: int = 2000
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 32

    def __post_init__(self):
        _positive("sft.n_examples", self.n_examples)
        _positive("sft.epochs", self.epochs)
        _positive("sft.batch_size", self.batch_size)
        _in_range("sft.lr", self.lr, 0.0, 1.0)


@dataclass
class CostConfig:
    normalizer: str = "router_r1"  # router_r1 | budget | none (rewards.make_cost_normalizer)
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        try:  # an unknown name or option fails here, not after the warm start
            make_cost_normalizer(self.normalizer, **self.options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"cost.normalizer={self.normalizer!r} with cost.options={self.options!r}: {e}") from None


@dataclass
class TrainConfig:
    seed: int = 0
    run_dir: str = "runs/default"
    total_steps: int = 100
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    # the alphas at which the final table reports a conditioned policy (episode.alpha sampled): one
    # block of rows per alpha, each played with that alpha stated in the prompt
    report_alphas: list = field(default_factory=list)
    # stages before episode.alpha applies, each [until_step, alpha spec], e.g. [[80, 0.8]]: the cost
    # weight where routing by topic pays most comes first (a conditioned policy's stages draw from its
    # trained values; a fixed-alpha run's stages are numbers its reward uses, unstated in the prompt)
    alpha_curriculum: list = field(default_factory=list)
    cost: CostConfig = field(default_factory=CostConfig)
    reward_fn: str | None = None  # "module:function" with rewards.compute_reward's signature
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    calls: CallFailureConfig = field(default_factory=CallFailureConfig)  # when failing calls stop a run
    eval_every: int = 10  # steps between held-out evaluations (0: only at the end)
    save_every: int = 10  # steps between checkpoints (0: only at the end)
    save_final: bool = True  # write a checkpoint when the run ends
    keep_checkpoints: int = 2
    log_every: int = 1
    n_samples_logged: int = 2  # sample trajectories written per logging step
    wandb: bool = False
    deepspeed: str | None = None  # zero2 | zero3 | zero3_offload (configs/deepspeed/<name>.json) | a .json path
    device: str = "auto"  # auto | cpu | cuda

    def alpha_at(self, step: int) -> Any:
        """The alpha spec RL step `step` draws its prompts' cost weights from: that of the first
        `alpha_curriculum` stage whose `until_step` lies above `step`, else None (episode.alpha)."""
        return next((alpha for until_step, alpha in self.alpha_curriculum if step < until_step), None)

    def __post_init__(self):
        _positive("total_steps", self.total_steps)
        _positive("log_every", self.log_every)
        for key in ("eval_every", "save_every", "n_samples_logged"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be >= 0")
        _positive("keep_checkpoints", self.keep_checkpoints)
        if self.episode.conditioned and not self.report_alphas:
            raise ValueError("episode.alpha is sampled, so report_alphas must list the alphas the final table "
                             "reports the policy at, e.g. [0, 0.5, 0.8]")
        if self.report_alphas and not self.episode.conditioned:
            raise ValueError(f"report_alphas={self.report_alphas} needs a conditioned policy: give episode.alpha "
                             "as {sample: [...]} or {low: .., high: ..}")
        for i, a in enumerate(self.report_alphas):
            check_spec(f"report_alphas[{i}]", a, unit=True)
        check_curriculum(self.alpha_curriculum, self.episode.alpha)
        if self.algorithm.relabel_alpha and not is_sample_set(self.episode.alpha):
            raise ValueError(f"algorithm.relabel_alpha restates episodes at the other weights of a sample set, "
                             f"but episode.alpha={self.episode.alpha!r}; give it as {{sample: [...]}}")
        if self.reward_fn:
            load_reward_fn(self.reward_fn)  # a bad module:function fails before any model loads
        if get_advantage(self.algorithm.advantage).groups and self.rollout.n_per_prompt < 2:
            raise ValueError(f"algorithm.advantage={self.algorithm.advantage} needs rollout.n_per_prompt >= 2, "
                             f"got {self.rollout.n_per_prompt}")
        if (self.rollout.n_prompts * self.rollout.n_per_prompt) % self.algorithm.minibatch_size:
            raise ValueError(f"rollout.n_prompts * rollout.n_per_prompt = "
                             f"{self.rollout.n_prompts * self.rollout.n_per_prompt} episodes must be a multiple "
                             f"of algorithm.minibatch_size={self.algorithm.minibatch_size}")
        if self.deepspeed is not None and self.deepspeed.endswith(".json"):
            if not Path(self.deepspeed).is_file():
                raise ValueError(f"deepspeed={self.deepspeed!r}: no such file")
        elif self.deepspeed is not None:
            _one_of("deepspeed", self.deepspeed, ("zero2", "zero3", "zero3_offload"))
        _one_of("device", self.device, ("auto", "cpu", "cuda"))


# ---------------------------------------------------------------- loading

def check_curriculum(stages: list, trained: Any) -> None:
    """Each stage is [until_step, alpha spec], `until_step` rising. A conditioned policy's stage gives
    only alphas where its trained spec `episode.alpha` gives values (so the prompt's words are known);
    a fixed-alpha run's stage is one number in [0, 1]."""
    last = 0
    for i, stage in enumerate(stages):
        key = f"alpha_curriculum[{i}]"
        if not isinstance(stage, (list, tuple)) or len(stage) != 2 or isinstance(stage[0], bool) \
                or not isinstance(stage[0], int) or stage[0] <= last:
            raise ValueError(f"{key}={stage!r} must be [until_step, alpha spec] with until_step an integer "
                             f"above {last}")
        check_spec(f"{key}[1]", stage[1], unit=True)
        if not is_sampled(trained) and is_sampled(stage[1]):
            raise ValueError(f"{key}[1]={stage[1]!r}: a fixed-alpha run's stage is one number (the prompt "
                             f"states no cost weight); sample alphas with a conditioned episode.alpha")
        outside = [v for v in spec_values(stage[1]) if is_sampled(trained) and not in_range(trained, v)]
        if outside:
            shown = ", ".join(f"{v:g}" for v in outside[:4]) + (", ..." if len(outside) > 4 else "")
            raise ValueError(f"{key}[1]={stage[1]!r} gives {shown}, outside episode.alpha={trained!r}")
        last = stage[0]


def _one_of(key: str, value: Any, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")


def _in_range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{key}={value} is out of range; allowed: [{lo}, {hi}]")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type hint `hint`, building nested dataclasses from mappings."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except (TypeError, ValueError):
                pass
        raise TypeError(f"{key}={value!r} should be {hint}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{key} should be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    base = origin or hint
    if base is typing.Any:
        return value
    if base is bool and not isinstance(value, bool):
        raise TypeError(f"{key}={value!r} should be true or false")
    if base in (int, float) and isinstance(value, bool):
        raise TypeError(f"{key}={value!r} should be a number")
    if not isinstance(value, base):
        raise TypeError(f"{key}={value!r} should be of type {getattr(base, '__name__', base)}")
    return value


# Keys that moved: using the old place is an error naming the new one.
MOVED_KEYS = {f"algorithm.{k}": f"algorithm.advantage_options.{k}" for k in ("gamma", "lam", "whiten", "grpo_norm_std")}


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from `data`; unknown keys and wrong types are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if prefix + key in MOVED_KEYS:
            raise ValueError(f"config key {prefix + key} moved to {MOVED_KEYS[prefix + key]}")
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"allowed under '{prefix or '<top>'}': {sorted(names)}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e}") from None


def apply_override(data: dict, override: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so 1e-6, true, null work)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like dotted.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {p!r} is not a section")
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    node[parts[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML config as a dict; `extends: other.yaml` (relative to this file) is read first and
    this file's keys are merged over it."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    parent = data.pop("extends", None)
    if parent is not None:
        data = _deep_merge(read_yaml(Path(path).parent / parent), data)
    return data


def load_dataclass(cls, path: str | Path | None, overrides: Sequence[str] = ()):
    """The one config loader (train.py's TrainConfig, evaluate.py's EvalConfig): read YAML (if given,
    `extends:` first), apply `dotted.key=value` overrides, and build dataclass `cls` with every key,
    type and range checked; an error names the file and the key."""
    data: dict = read_yaml(path) if path is not None else {}
    for o in overrides:
        apply_override(data, o)
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as e:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}{e}") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The training config: `load_dataclass(TrainConfig, ...)`."""
    return load_dataclass(TrainConfig, path, overrides)


SECRET_HINTS = ("key", "token", "secret", "password")


def redact(data: Any) -> Any:
    """A copy of nested dicts/lists with every secret-looking string value replaced; keys ending in
    `_env` hold the NAME of an environment variable and are kept."""
    if isinstance(data, dict):
        return {k: ("<redacted>" if isinstance(v, str) and any(h in k.lower() for h in SECRET_HINTS)
                    and not k.endswith("_env") else redact(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def redacted(cfg: TrainConfig) -> dict:
    """The config as a dict, secrets redacted (what is saved in run directories and checkpoints)."""
    return redact(dataclasses.asdict(cfg))
