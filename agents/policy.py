"""The actor (a transformers causal LM), the critic (its trunk plus a scalar value head) and the
frozen reference model, with memory-lean per-token log-probabilities and entropies."""

from __future__ import annotations

import copy
import importlib.util

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Qwen2Config

from agents.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attn_implementation(requested: str, device: torch.device) -> str:
    """flash_attention_2 when asked for (or `auto`) on a GPU where flash-attn imports; flex_attention
    on a GPU (it has no backward on CPU); else SDPA."""
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        return "sdpa"
    if requested == "flex_attention" and device.type != "cuda":
        return "sdpa"
    return requested


def build_actor(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, device: torch.device) -> nn.Module:
    """Load `cfg.name_or_path`, or build a random Qwen2-shaped model from `cfg.init` fields."""
    attn = attn_implementation(cfg.attn_implementation, device)
    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, attn_implementation=attn)
    else:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256, max_position_embeddings=2048, tie_word_embeddings=True)
        shape.update(cfg.init)
        config = Qwen2Config(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id,
                             bos_token_id=eos_id, **shape)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    n_old = model.get_input_embeddings().num_embeddings
    if n_old < vocab_size:  # tokens the tokenizer added (a pad, agents/pad_token.py) start at the mean row
        model.resize_token_embeddings(vocab_size)
        with torch.no_grad():
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e}.values():
                emb.weight[n_old:] = emb.weight[:n_old].mean(dim=0)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.to(device)


def compile_layers(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder layer of `model` (a causal LM or a Critic) in place, with symbolic
    sizes (micro-batch shapes vary): the norms, rotary embedding and SwiGLU fuse into few kernels.
    One compiled code object serves all layers; parameters and state-dict keys are unchanged."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=True, backend=backend)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or a Critic."""
    return (model.trunk if isinstance(model, Critic) else model.get_decoder()).layers


class Critic(nn.Module):
    """V(s_t): the causal LM's transformer trunk (no LM head) and a zero-initialised scalar head."""

    def __init__(self, config, trunk: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.trunk = trunk if trunk is not None else AutoModel.from_config(config)
        self.value_head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False).last_hidden_state
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


def build_critic(actor: nn.Module, init: str = "actor") -> Critic:
    """The critic's trunk is a copy of the actor's (the paper) or randomly initialised."""
    trunk = copy.deepcopy(actor.get_decoder()) if init == "actor" else None
    critic = Critic(actor.config, trunk)
    return critic.to(next(actor.parameters()).device, dtype=next(actor.parameters()).dtype)


def build_reference(actor: nn.Module) -> nn.Module:
    """A frozen copy of the actor used for the KL term."""
    ref = copy.deepcopy(actor).eval()
    ref.requires_grad_(False)
    return ref


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[label] and the entropy of that distribution, per position.

    logits (B, T, V), labels (B, T). Computed over chunks of rows in float32 so that a full
    (tokens x vocab) float32 tensor is never materialised at once.
    """
    B, T, V = logits.shape
    flat, flat_labels = logits.reshape(B * T, V), labels.reshape(B * T)
    logps, ents = [], []
    for start in range(0, B * T, chunk):
        logp, ent = token_logprobs(flat[start:start + chunk], flat_labels[start:start + chunk], temperature,
                                   with_entropy)
        logps.append(logp)
        ents.append(ent)
    logp = torch.cat(logps).view(B, T)
    return logp, (torch.cat(ents).view(B, T) if with_entropy else None)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one log-softmax/entropy kernel: rows of logits (N, V) and labels (N,) -> log
    softmax(logits / T)[label] (N,) and, with `with_entropy`, the entropy (N,), in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, labels[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    return logp, logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = log Z - E_p[logit]


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real tokens of right-padded rows (B, T) as one row (1, N): (ids, positions, their flat
    indices in B * T). Called with these positions and no attention mask, a transformers model
    reads each reset of the positions to 0 as a new sequence and keeps attention within it."""
    index = attention_mask.reshape(-1).nonzero().squeeze(1)
    return input_ids.reshape(-1)[index][None], position_ids.reshape(-1)[index][None], index


def unpack_next(x: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Packed per-token outputs x (N - 1,), the k-th computed at packed token k about token k + 1,
    back in the (B, T) layout of `pack_rows`: at token k + 1's place, 0 at each row's first token
    (a sequence start: nothing precedes it) and on padding."""
    out = x.new_zeros(shape[0] * shape[1]).index_put((index[1:],), x).view(shape)
    return torch.cat([torch.zeros_like(out[:, :1]), out[:, 1:]], 1)


def packed_block_mask(positions: torch.Tensor, block: int = 128):
    """The FlexAttention BlockMask of one packed row whose sequences start where `positions` (N,)
    is 0: causal within each sequence, nothing across. Built from per-block sequence ids, so no
    (N x N) mask and no compiled kernel (transformers compiles `create_block_mask` for each new
    length; one such kernel took ptxas minutes). A key block is full for a query block when one
    sequence spans both and lies wholly before it, partial (the mask is applied) when they share a
    sequence otherwise (or the query block runs past N), and skipped when they share none."""
    from torch.nn.attention.flex_attention import BlockMask
    N = positions.shape[0]
    nb = -(-N // block)
    seq = torch.cumsum(positions == 0, 0) - 1  # each token's sequence
    seq = torch.cat([seq, seq.new_full((nb * block - N,), -1)])  # padding keys match no real query
    first = seq[::block]
    last = seq[torch.clamp(torch.arange(1, nb + 1, device=seq.device) * block, max=N) - 1]
    q, k = torch.arange(nb, device=seq.device)[:, None], torch.arange(nb, device=seq.device)[None]
    shared = (k <= q) & (last[k] >= first[q])
    full = (k < q) & (first[k] == last[q]) & (q < N // block)  # a query block past N is partial
    partial = shared & ~full

    def blocks(mask):  # counts and indices (first the set ones, in order), as BlockMask wants them
        order = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True)
        return mask.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (seq[q_idx] == seq[kv_idx]) & (kv_idx <= q_idx)
    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


def _uses_flex_attention(model: nn.Module) -> bool:
    """Whether `model` (or the module a DeepSpeed engine wraps: the engine's own `config` is
    DeepSpeed's) attends with FlexAttention."""
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == "flex_attention"


def _model_inputs(model, input_ids, attention_mask, position_ids, pack: bool):
    """(ids, mask, positions, index) to run a model on: the padded rows as given (index None), or
    with `pack` the rows packed into one sequence (`pack_rows`), with our `packed_block_mask` under
    FlexAttention and otherwise no mask (the model reads the position resets)."""
    if not pack:
        return input_ids, attention_mask, position_ids, None
    ids, positions, index = pack_rows(input_ids, attention_mask, position_ids)
    mask = packed_block_mask(positions[0]) if _uses_flex_attention(model) else None
    return ids, mask, positions, index


def _align_next(x: torch.Tensor, index: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Outputs x about each next token, (B, T - 1) from padded rows or (1, N - 1) from packed ones
    (`index` from `pack_rows`), aligned with the tokens they are about: (B, T), 0 where nothing
    precedes a token."""
    if index is not None:
        return unpack_next(x[0], index, shape)
    return torch.cat([torch.zeros_like(x[:, :1]), x], 1)


def sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = False, pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(x_t | x_<t), (B, T) aligned with `input_ids` (position 0 is 0). `pack` runs
    the rows as one packed sequence without padding (`pack_rows`)."""
    ids, mask, positions, index = _model_inputs(model, input_ids, attention_mask, position_ids, pack)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    logp, ent = logprobs_and_entropy(logits[:, :-1], ids[:, 1:], temperature, with_entropy=with_entropy)
    return (_align_next(logp, index, input_ids.shape),
            _align_next(ent, index, input_ids.shape) if ent is not None else None)


def sequence_values(critic: Critic, input_ids, attention_mask, position_ids, pack: bool = False) -> torch.Tensor:
    """V of the state before each token, (B, T) aligned with `input_ids` (position 0 is 0)."""
    ids, mask, positions, index = _model_inputs(critic, input_ids, attention_mask, position_ids, pack)
    return _align_next(critic(ids, mask, positions)[:, :-1], index, input_ids.shape)


def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of one chunk of hidden states (N, D) through the LM head `weight` (V, D); the
    entropy is zeros without `with_entropy` (checkpointed functions return tensors)."""
    logp, ent = token_logprobs(F.linear(hidden, weight), labels, temperature, with_entropy)
    return logp, (ent if ent is not None else torch.zeros_like(logp))


def chunked_sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = False, chunk: int = 2048, pack: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sequence_logprobs` without (tokens x vocab) logits: the trunk's hidden states go through the
    LM head `chunk` positions at a time, and under autograd each chunk's logits are recomputed in the
    backward pass instead of kept, so peak memory holds one chunk's float32 logits."""
    ids, mask, positions, index = _model_inputs(model, input_ids, attention_mask, position_ids, pack)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=False).last_hidden_state
    B, T, D = hidden.shape
    flat, labels = hidden[:, :-1].reshape(-1, D), ids[:, 1:].reshape(-1)
    weight = model.get_output_embeddings().weight
    logps, ents = [], []
    for start in range(0, flat.shape[0], chunk):
        args = (flat[start:start + chunk], weight, labels[start:start + chunk], temperature, with_entropy)
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(_head_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _head_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    align = lambda parts: _align_next(torch.cat(parts).view(B, T - 1), index, input_ids.shape)
    return align(logps), (align(ents) if with_entropy else None)
