"""The fast rollout engine computes what the simple path computes: same greedy episodes and
log-probs (with calls, inserted replies and refilled slots), and the chunked log-prob path
equal to the plain one."""

import pytest
import torch
from tiny import tiny_tokenizer
from transformers import AutoModelForCausalLM, Qwen2Config

from agents import decode_attention
from agents.fast_decode import FastEngine, Slot
from agents.fast_model import FastModel
from agents.policy import (
    _model_inputs,
    build_critic,
    chunked_sequence_logprobs,
    compile_layers,
    packed_block_mask,
    sequence_logprobs,
    sequence_values,
)
from agents.rollout import ForcedSchedule, run_rollouts
from envs.candidates import CandidatePool, CandidateSpec
from envs.candidates.simulated import SimulatedBackend
from envs.episode import EpisodeConfig
from envs.vector import MultiRouteVectorEnv

QUESTIONS = ("Where is Korvan?", "Who is he?", "A much longer question about the north?", "Why?", "When is it?")
EXAMPLES = [{"question": q, "golden_answers": ["x"]} for q in QUESTIONS]


def tiny_model(vocab: int, hidden: int = 32):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, initializer_range=0.5)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def make_env(tok, max_tokens, latency_s=0.0):
    pool = CandidatePool([CandidateSpec("Geo-Expert", "geo", 1, 0.2)],
                         SimulatedBackend({"Geo-Expert": lambda r: "Tessaly, in the north"}, latency_s))
    return MultiRouteVectorEnv(tok, pool, EpisodeConfig(max_response_tokens=max_tokens, prompt_template="compact"))


def both_paths(forced, temperature=0.0, max_tokens=40, slots=2, hidden=32, attention="auto", latency_s=0.0):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), hidden)
    env = make_env(tok, max_tokens, latency_s)
    ref_lp, _ = run_rollouts(model, env, EXAMPLES, temperature, 1.0, 0, 0, tok.pad_token_id, forced=forced)
    ref = [(e.response_ids, e.inserted, e.end_reason, len(e.calls)) for e in env.episodes]
    engine = FastEngine(model, tok, slots=slots, max_len=256, burst=4, bucket=32, attention=attention)
    assert engine.net.fused_attention == (attention == "triton")
    lp, _ = run_rollouts(model, env, EXAMPLES, temperature, 1.0, 0, 0, tok.pad_token_id, forced=forced, engine=engine)
    got = [(e.response_ids, e.inserted, e.end_reason, len(e.calls)) for e in env.episodes]
    return ref, got, ref_lp, lp, tok, model, env


def test_greedy_episodes_and_logprobs_equal_the_simple_path():
    ref, got, ref_lp, lp, *_ = both_paths(None)
    assert got == ref
    for a, b in zip(ref_lp, lp):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


@pytest.fixture
def interpreted_triton():
    """agents.decode_attention, its Triton kernel run by Triton's CPU interpreter (conftest.py)."""
    pytest.importorskip("triton")
    if not decode_attention.available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported")
    return decode_attention


def test_a_prefill_from_position_zero_attends_to_its_own_keys_as_the_cache_path_does():
    net = FastModel(tiny_model(64), slots=4, max_len=32)
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (4, 8))
    lengths = torch.tensor([8, 5, 3, 0])  # the last row pads the group (as `_prefill` does)
    positions = torch.where(torch.arange(8)[None] < lengths[:, None], torch.arange(8)[None], net.scratch)
    rows = torch.tensor([2, 0, 3, 2])
    runs = []
    for from_start in (False, True):
        for cache in net.k_cache + net.v_cache:
            cache.zero_()
        hidden = net.forward(ids, positions, rows, 16, from_start=from_start)
        runs.append((hidden, [c[:, :, :net.scratch].clone() for c in net.k_cache + net.v_cache]))
    (masked, masked_cache), (causal, causal_cache) = runs
    real = torch.arange(8)[None] < lengths[:, None]
    torch.testing.assert_close(causal[real], masked[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(causal_cache, masked_cache):
        torch.testing.assert_close(a, b)


def test_the_prefill_compiles_once_for_all_row_counts_and_widths():
    """A training run meets prefills of many (rows, width, cache length) shapes: after the first of
    each kind (from position 0 or not), none compiles anew."""
    net = FastModel(tiny_model(64), slots=8, max_len=64)
    graphs = []
    net.compile(backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
    net.compiled_layer = None  # decode is not under test

    def prefill(n, width, start, kv_len):
        positions = (start + torch.arange(width))[None].expand(n, width)
        net.forward(torch.randint(3, 64, (n, width)), positions, torch.arange(n), kv_len, from_start=start == 0)

    torch._dynamo.reset()
    with torch.no_grad():
        prefill(2, 16, 0, 32)
        prefill(4, 16, 16, 32)
    first = len(graphs)
    with torch.no_grad():
        for n, width, start, kv_len in [(4, 32, 0, 32), (8, 48, 0, 64), (8, 16, 32, 64), (2, 32, 16, 64), (4, 16, 8, 32),
                                        (2, 16, 48, 64)]:
            prefill(n, width, start, kv_len)
    assert len(graphs) == first


def test_a_lone_rows_prefill_is_padded_to_two_rows():
    """A size of 1 gets a compiled graph of its own: one row's prompt is written with a padding row."""
    tok = tiny_tokenizer()
    engine = FastEngine(tiny_model(len(tok)), tok, slots=4, max_len=64, bucket=32)
    shapes, forward = [], engine.net.forward
    engine.net.forward = lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or forward(ids, *a, **k)
    engine._prefill([(1, Slot(), list(range(3, 12)), 0)])
    assert shapes == [(2, 16)]


def test_multi_turn_with_inserted_replies_and_refilled_slots_equals_the_simple_path():
    tok = tiny_tokenizer()
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45)
    ref, got, ref_lp, lp, *_ = both_paths(forced, max_tokens=70, slots=2)  # 5 episodes through 2 slots
    assert got == ref
    assert sum(r[3] for r in got) >= 5 and all(any(r[1]) for r in got)  # calls made, replies inserted
    for a, b in zip(ref_lp, lp):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_rows_decode_while_a_slow_call_is_out_and_the_episodes_do_not_change():
    """One episode's calls take 0.3 s: the other rows decode meanwhile (counted in `steps_during_calls`)
    and its reply is inserted when it arrives. Sampled episodes and log-probs equal those of a run with
    instant calls (sampling is keyed by episode and count, not by when a row decodes), and greedy ones
    equal the simple path's."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45)
    slow = lambda request: 0.3 if request.question == "Why?" else 0.0
    runs = []
    for latency in (0.0, slow):
        env = make_env(tok, 70, latency)
        engine = FastEngine(model, tok, slots=5, max_len=256, burst=4, bucket=32)
        lp, _ = run_rollouts(model, env, EXAMPLES, 1.0, 1.0, 0, 0, tok.pad_token_id, forced=forced, engine=engine)
        runs.append(([(e.response_ids, e.inserted, len(e.calls)) for e in env.episodes], lp,
                     engine.timings["steps_during_calls"]))
        assert env.calls_out == 0
    (instant, instant_lp, instant_steps), (delayed, delayed_lp, delayed_steps) = runs
    assert delayed == instant and delayed_lp == instant_lp and sum(r[2] for r in delayed) == 10
    assert instant_steps == 0 < delayed_steps  # instant calls made together come back together
    ref, got, *_ = both_paths(forced, max_tokens=70, slots=5, latency_s=slow)
    assert got == ref


@pytest.mark.parametrize("slots", [2, 5])
def test_no_burst_is_launched_while_every_row_is_frozen_at_a_call(slots):
    """Forced calls freeze the rows at known counts: the host launches no burst behind the one in
    flight that could not decode a token (5 slots: every row calls at once)."""
    tok = tiny_tokenizer()
    model, env = tiny_model(len(tok)), make_env(tok, 70)
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45)
    engine = FastEngine(model, tok, slots=slots, max_len=256, burst=4, bucket=32)
    run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced, engine=engine)
    assert sum(len(e.calls) for e in env.episodes) == 10
    assert engine.timings["idle_bursts"] == 0


def test_the_triton_attention_kernel_gives_the_simple_paths_episodes(interpreted_triton):
    tok = tiny_tokenizer()
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 12], 20)
    ref, got, ref_lp, lp, *_ = both_paths(forced, max_tokens=30, slots=2, hidden=64, attention="triton")
    assert got == ref
    assert sum(r[3] for r in got) >= 5 and all(any(r[1]) for r in got)  # calls made, replies inserted
    for a, b in zip(ref_lp, lp):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


@pytest.mark.parametrize("pieces, stop_at", [
    (["<", "search", ">", " x ", "</", "search", ">"], 6),
    (["</search>"], 0),
    (["<think>", " a ", "</think>", "<answer>", " 4 ", "</ans", "wer>\n"], 6),
    (["</sea", "rch", ">"], 2),
    (["<search>", " B: q ", "</search", ">"], 3),
    (["</think>", "search>", "\">", "<answer>"], None),
])
def test_the_device_finds_stop_strings_however_tokens_split_them(pieces, stop_at):
    from agents.fast_decode import extend_tails
    from rewards.tags import STOP_STRINGS
    W = 18
    codes = torch.zeros(len(pieces), W, dtype=torch.int32)
    lengths = torch.tensor([len(p[-W:]) for p in pieces])
    for i, p in enumerate(pieces):
        codes[i, W - len(p):] = torch.tensor([ord(c) for c in p], dtype=torch.int32)
    stops = [torch.tensor([ord(c) for c in t], dtype=torch.int32) for t in STOP_STRINGS]
    tails, hits = torch.zeros(1, W, dtype=torch.int32), []
    for i in range(len(pieces)):
        tails, hit = extend_tails(tails, codes[i:i + 1], lengths[i:i + 1], stops)
        hits.append(bool(hit))
    assert hits == [i == stop_at for i in range(len(pieces))]


def test_device_stops_are_only_a_speed_hint():
    """With no stop string for the device to find, rows decode past their episode's end; those
    tokens are dropped and the episodes still equal the simple path's."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    env = make_env(tok, 70)
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45)
    run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced)
    ref = [(e.response_ids, e.end_reason) for e in env.episodes]
    engine = FastEngine(model, tok, slots=2, max_len=256, burst=8, bucket=32)
    engine.stops = []
    run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced, engine=engine)
    assert [(e.response_ids, e.end_reason) for e in env.episodes] == ref


@pytest.mark.parametrize("max_len", [45, 60, 135])
def test_an_episode_past_the_cache_ends_there_and_the_phase_goes_on(max_len, caplog):
    """Prompts of 22-41 tokens and 102 response tokens: decoding (45) and replies (60) that run past
    the cache. Those episodes end (reason "context") with what they had so far; the others (135: all
    but the longest prompt's) are unchanged. A prompt longer than the cache is a setting to fix."""
    tok = tiny_tokenizer()
    model, env = tiny_model(len(tok)), make_env(tok, 70)
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45)
    run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced)
    ref = [e.response_ids for e in env.episodes]
    engine = FastEngine(model, tok, slots=2, max_len=max_len, burst=4, bucket=32)
    with caplog.at_level("WARNING", logger="routerl"):
        run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced, engine=engine)
    ended = [e.end_reason == "context" for e in env.episodes]
    assert any(ended) and sum(ended) == engine.timings["out_of_room"] and (max_len < 100 or not all(ended))
    assert "raise rollout.engine_max_len" in caplog.text
    for e, r, cut in zip(env.episodes, ref, ended):
        assert e.response_ids == (r[:len(e.response_ids)] if cut else r) and e.policy_tokens > 0
    with pytest.raises(ValueError, match="a prompt of 41 tokens does not fit the engine's max_len=40"):
        run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced,
                     engine=FastEngine(model, tok, slots=2, max_len=40, burst=4, bucket=32))


def test_each_phase_loads_its_forced_schedule_into_the_same_buffer():
    """CUDA graphs record addresses: the forced-id table is rewritten in place, and a phase with
    another schedule still equals the simple path's."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    env = make_env(tok, 70)
    engine = FastEngine(model, tok, slots=2, max_len=256, burst=4, bucket=32)
    run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, engine=engine,
                 forced=ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45))
    address = engine.forced_ids.data_ptr()
    other = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [9], 30)
    results = []
    for use in (None, engine):
        run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 1, tok.pad_token_id, forced=other, engine=use)
        results.append([(e.response_ids, e.inserted, e.end_reason) for e in env.episodes])
    assert results[0] == results[1] and engine.forced_ids.data_ptr() == address
    assert all(len(e.calls) == 1 for e in env.episodes)


def test_a_reused_engine_starts_each_phase_afresh():
    """The pipeline uploads only rows the host changed, so a phase first uploads every row: rows it
    leaves idle must not decode on from whatever state other code left (the benchmark's pure-decode
    timing sets every row active). A second, smaller phase on the same engine equals the simple path's."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    env = make_env(tok, 70)
    forced = ForcedSchedule.calls_then_answer(tok, "Geo-Expert", [3, 25], 45)
    engine = FastEngine(model, tok, slots=4, max_len=256, burst=4, bucket=32)
    run_rollouts(model, env, EXAMPLES, 0.0, 1.0, 0, 0, tok.pad_token_id, forced=forced, engine=engine)
    engine.active.fill_(True)
    results = []
    for use in (None, engine):
        run_rollouts(model, env, EXAMPLES[:2], 0.0, 1.0, 0, 1, tok.pad_token_id, forced=forced, engine=use)
        results.append([(e.response_ids, e.inserted, e.end_reason) for e in env.episodes])
    assert results[0] == results[1]


def test_sampled_logprobs_match_a_teacher_forced_forward_and_do_not_depend_on_slots():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    env = make_env(tok, 30)
    runs = []
    for slots in (1, 3, 5):
        engine = FastEngine(model, tok, slots=slots, max_len=256, burst=3, bucket=32)
        lp, _ = run_rollouts(model, env, EXAMPLES, 1.0, 1.0, 7, 2, tok.pad_token_id, engine=engine)
        runs.append([e.response_ids for e in env.episodes])
    assert runs[0] == runs[1] == runs[2]
    for ep, row in zip(env.episodes, lp):
        ids = torch.tensor([ep.prompt_ids + ep.response_ids])
        tf, _ = sequence_logprobs(model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        assert torch.allclose(torch.tensor(row), tf[0, len(ep.prompt_ids):], atol=1e-4)


def test_triton_attention_is_refused_where_the_kernel_cannot_run(interpreted_triton):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))  # head size 8: below the kernel's 16
    with pytest.raises(ValueError, match="head size"):
        FastEngine(model, tok, slots=2, max_len=64, attention="triton")
    assert not FastEngine(model, tok, slots=2, max_len=64).net.fused_attention  # auto: the matmul path


@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (16, 2, 128), (4, 4, 16)])
def test_split_kv_attention_kernel_equals_softmax_attention_over_each_rows_length(interpreted_triton, heads,
                                                                                  kv_heads, dim):
    g = torch.Generator().manual_seed(heads)
    q = torch.randn(5, heads, dim, generator=g)
    k_cache, v_cache = (torch.randn(5, kv_heads, 300, dim, generator=g) for _ in range(2))
    positions = torch.tensor([0, 17, 63, 64, 290])  # the last row is cut at kv_len
    group = heads // kv_heads
    for kv_len, splits in [(256, 1), (256, 3), (300, None), (128, 2)]:
        got = interpreted_triton.decode_attention(q, k_cache, v_cache, positions, kv_len, splits=splits)
        for n in range(5):
            length = min(int(positions[n]) + 1, kv_len)
            k = k_cache[n, :, :length].repeat_interleave(group, 0)  # query head j reads KV head j // group
            v = v_cache[n, :, :length].repeat_interleave(group, 0)
            expected = torch.softmax(q[n, :, None] @ k.transpose(-1, -2) * dim ** -0.5, -1) @ v
            torch.testing.assert_close(got[n], expected[:, 0], atol=1e-5, rtol=1e-5)


def _rope_case(heads, kv_heads, dim, dtype, positions=(0, 16, 31, 43, 46, 63), T=64):
    """One decode step's inputs: unrotated q, k and v as slices of one fused QKV output (strided
    views), random caches, RoPE rows of each position (in `dtype`) and the rotation in float32."""
    g = torch.Generator().manual_seed(heads + dim)
    N, positions = len(positions), torch.tensor(positions)
    qkv = torch.randn(N, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q, k, v = (t.unflatten(-1, (-1, dim)) for t in qkv.split([heads * dim] + [kv_heads * dim] * 2, -1))
    k_cache, v_cache = (torch.randn(N, kv_heads, T, dim, generator=g).to(dtype) for _ in range(2))
    angles = positions[:, None] / 10000 ** (torch.arange(0, dim, 2) / dim)
    cos, sin = torch.cat([angles] * 2, -1).cos().to(dtype), torch.cat([angles] * 2, -1).sin().to(dtype)

    def rope(x):
        x, half = x.float(), dim // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), -1)
        return (x * cos[:, None].float() + rotated_half * sin[:, None].float()).to(dtype)

    return q, k, v, k_cache, v_cache, positions, cos, sin, rope


@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 16), (16, 2, 32), (4, 4, 16)])
def test_split_kv_attention_with_rope_equals_rope_then_cache_write_then_attention(interpreted_triton, heads,
                                                                                  kv_heads, dim):
    """kv_len 44 in 3 splits of 16 keys (or one of 48): the new key at 0 (no cached key), 16 (alone
    in its split), 31, 43 (the last attended); 46 and 63 >= kv_len are written but not attended,
    46 though inside a split's range."""
    q, k, v, k_cache, v_cache, positions, cos, sin, rope = _rope_case(heads, kv_heads, dim, torch.float32)
    rows = torch.arange(len(positions))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[rows, :, positions], v_ref[rows, :, positions] = rope(k), v
    for splits in (1, 3):
        k_got, v_got = k_cache.clone(), v_cache.clone()
        got = interpreted_triton.decode_attention(q, k_got, v_got, positions, 44, splits=splits, block=16,
                                                  k_new=k, v_new=v, cos=cos, sin=sin)
        expected = interpreted_triton.decode_attention(rope(q).contiguous(), k_ref, v_ref, positions, 44,
                                                       splits=splits, block=16)
        assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_split_kv_attention_with_rope_writes_bf16_caches_to_rounding(interpreted_triton):
    """bf16 q, k, v and RoPE rows: the rotated key is written to within one bf16 step (the CPU
    interpreter truncates where the GPU rounds to nearest). The outputs are not compared: the
    interpreter's tl.dot multiplies bf16 bit patterns as integers."""
    q, k, v, k_cache, v_cache, positions, cos, sin, rope = _rope_case(14, 2, 16, torch.bfloat16)
    rows = torch.arange(len(positions))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[rows, :, positions], v_ref[rows, :, positions] = rope(k), v
    interpreted_triton.decode_attention(q, k_cache, v_cache, positions, 44, splits=3, block=16,
                                        k_new=k, v_new=v, cos=cos, sin=sin)
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=2 ** -7)
    assert torch.equal(v_cache, v_ref)


def test_split_kv_attention_takes_the_new_key_value_and_rope_rows_all_or_none(interpreted_triton):
    q, k, v, k_cache, v_cache, positions, cos, sin, _ = _rope_case(4, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="all or none"):
        interpreted_triton.decode_attention(q, k_cache, v_cache, positions, 44, k_new=k, v_new=v, cos=cos)
    with pytest.raises(ValueError, match="contiguous"):
        interpreted_triton.decode_attention(q, k_cache, v_cache, positions, 44, k_new=k, v_new=v, cos=cos,
                                            sin=torch.cat([sin] * 2, -1)[:, ::2])


def test_chunked_logprobs_and_gradients_equal_the_plain_path():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).train()
    ids = torch.randint(2, len(tok), (3, 17))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ref, ref_ent = sequence_logprobs(model, ids, mask, pos, temperature=0.7, with_entropy=True)
    (ref * mask).sum().add((ref_ent * mask).sum()).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got, ent = chunked_sequence_logprobs(model, ids, mask, pos, temperature=0.7, with_entropy=True, chunk=5)
    (got * mask).sum().add((ent * mask).sum()).backward()
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    for a, p in zip(ref_grads, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-4), float((a - p.grad).abs().max() / a.abs().max())


@pytest.mark.parametrize("logprobs", [sequence_logprobs, chunked_sequence_logprobs])
def test_packed_rows_give_the_padded_rows_logprobs_values_and_gradients(logprobs):
    """Rows packed into one sequence (no padding) compute what the padded rows compute, gradients too."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).train()
    critic = build_critic(model).train()
    ids = torch.randint(2, len(tok), (4, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:], mask[2, 1:] = 0, 0  # a short row and a one-token row
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    results = []
    for pack in (False, True):
        model.zero_grad(), critic.zero_grad()
        lp, ent = logprobs(model, ids, mask, pos, temperature=0.7, with_entropy=True, pack=pack)
        v = sequence_values(critic, ids, mask, pos, pack=pack)
        (lp * mask).sum().add((ent * mask).sum()).add((v * mask).sum()).backward()
        grads = [p.grad.clone() for p in list(model.parameters()) + list(critic.parameters()) if p.grad is not None]
        results.append(([t * mask for t in (lp, ent, v)], grads))
    (ref, ref_grads), (got, grads) = results
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert len(grads) == len(ref_grads)
    for a, b in zip(ref_grads, grads):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()) + 1e-7


@pytest.mark.parametrize("lengths, block", [([5, 130, 1, 300, 77], 128), ([40, 3, 3, 60, 1, 25], 16),
                                            ([16, 16, 32], 16), ([7], 16), ([256], 128)])
def test_packed_block_mask_equals_flex_attentions_own(lengths, block):
    """Our BlockMask of a packed row has the blocks `create_block_mask` finds from the full mask (skipped,
    partial, full; a last query block past the row is partial), and its mask is causal within sequences."""
    from torch.nn.attention.flex_attention import create_block_mask
    positions = torch.cat([torch.arange(n) for n in lengths])
    N, seq = len(positions), torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    dense = lambda b, h, q, k: (seq[q] == seq[k]) & (k <= q)
    ref = create_block_mask(dense, 1, None, N, N, device="cpu", BLOCK_SIZE=block, _compile=False)
    ours = packed_block_mask(positions, block)

    def kv_blocks(bm):
        return [[sorted(idx[0, 0, i, :num[0, 0, i]].tolist()) for i in range(num.shape[-1])]
                for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices))]
    assert kv_blocks(ours) == kv_blocks(ref)
    q, k = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    assert torch.equal(ours.mask_mod(0, 0, q, k), dense(0, 0, q, k))


def test_packed_rows_under_flex_attention_get_our_block_mask():
    """A model using FlexAttention gets `packed_block_mask` for packed rows (transformers would compile
    `create_block_mask` for every new length); padded rows keep their 2D mask."""
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flex_attention")
    ids = torch.randint(2, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    _, block_mask, positions, _ = _model_inputs(model, ids, mask, pos, pack=True)
    assert block_mask.seq_lengths == (22, 22) and positions.tolist() == [list(range(9)) + list(range(4)) + list(range(9))]
    assert _model_inputs(model, ids, mask, pos, pack=False)[1] is mask
    assert _model_inputs(build_critic(model), ids, mask, pos, pack=True)[1] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention runs on a GPU here")
def test_packed_rows_under_flex_attention_give_the_padded_rows_numbers_on_gpu():
    """On a GPU, packed rows through FlexAttention and `packed_block_mask` compute the padded SDPA rows'
    log-probs, values and gradients (rows longer than a block, and a one-token row)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, initializer_range=0.5)
    sdpa = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda().train()
    flex = AutoModelForCausalLM.from_config(cfg, attn_implementation="flex_attention").cuda().train()
    flex.load_state_dict(sdpa.state_dict())
    lengths = [300, 5, 129, 1, 64]
    ids = torch.randint(2, 96, (len(lengths), max(lengths)), device="cuda")
    mask = (torch.arange(max(lengths), device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    results = []
    for model, pack in ((sdpa, False), (flex, True)):
        critic = build_critic(model).train()
        lp, _ = sequence_logprobs(model, ids, mask, pos, pack=pack)
        v = sequence_values(critic, ids, mask, pos, pack=pack)
        (lp * mask).sum().add((v * mask).sum()).backward()
        results.append(([lp * mask, v * mask], [p.grad for p in model.parameters()]))
    (ref, ref_grads), (got, grads) = results
    for a, b in zip(ref + ref_grads, got + grads):
        assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()) + 1e-6


def test_compiled_layers_give_the_same_logprobs_values_and_gradients():
    """compile_layers (traced by dynamo; here with the eager backend) changes no number, packed or padded,
    and keeps the state-dict keys a checkpoint is written under."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).train()
    critic = build_critic(model).train()
    keys = list(model.state_dict()) + list(critic.state_dict())
    ids = torch.randint(2, len(tok), (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)

    def run(pack):
        model.zero_grad(), critic.zero_grad()
        lp, _ = chunked_sequence_logprobs(model, ids, mask, pos, pack=pack)
        v = sequence_values(critic, ids, mask, pos, pack=pack)
        (lp * mask).sum().add((v * mask).sum()).backward()
        return [lp * mask, v * mask] + [p.grad.clone() for p in list(model.parameters()) + list(critic.parameters())]
    ref = [run(pack) for pack in (False, True)]
    for m in (model, critic):
        compile_layers(m, backend="eager")
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers + critic.trunk.layers)
    got = [run(pack) for pack in (False, True)]
    for a, b in zip(sum(ref, []), sum(got, [])):
        assert torch.allclose(a, b, atol=1e-6), float((a - b).abs().max())
    assert list(model.state_dict()) + list(critic.state_dict()) == keys
