"""Both samplers are exact for temperature and top-p and share one nucleus rule: the simple path's
Gumbel-max (`sample_tokens`) and the engine's keyed inverse CDF (`choose_tokens`)."""

import numpy as np
import pytest
import torch

from agents.sampling import choose_tokens, in_nucleus, keyed_uniform, sample_scores, sample_tokens


def test_greedy_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(3, 11)
    tokens, logp = sample_tokens(logits, 0.0, 1.0, [torch.Generator() for _ in range(3)])
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logp, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))


def test_sampling_frequencies_match_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(4)
    for _ in range(4000):
        t, _ = sample_tokens(logits, 0.7, 1.0, [g])
        counts[int(t)] += 1
    expected = torch.softmax(logits[0] / 0.7, -1).numpy()
    assert np.abs(counts / counts.sum() - expected).max() < 0.03


def test_top_p_never_samples_outside_the_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(500):
        t, logp = sample_tokens(logits, 1.0, 0.8, [g])
        seen.add(int(t))
        expected = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[int(t)]  # nucleus {0, 1}: 0.5 + 0.3 reaches 0.8
        assert float(logp.exp()) == pytest.approx(expected, rel=1e-5)
    assert seen == {0, 1}


def _choose(logits, temperature, top_p, key, count):
    one = torch.ones(logits.shape[0], dtype=torch.long)
    return choose_tokens(logits, temperature, top_p, key * one, count, torch.full((1,), -1))


def test_keyed_sampler_frequencies_match_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    tokens, logp = _choose(logits, 0.7, 1.0, 12345, torch.arange(4000))
    expected = torch.softmax(logits[0] / 0.7, -1)
    counts = np.bincount(tokens.numpy(), minlength=4) / 4000
    assert np.abs(counts - expected.numpy()).max() < 0.03
    assert torch.allclose(logp, expected.log()[tokens], atol=1e-6)


def test_keyed_sampler_top_p_keeps_the_nucleus_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)
    tokens, logp = _choose(logits, 1.0, 0.8, 3, torch.arange(500))
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.tensor([0.5 / 0.8, 0.3 / 0.8])[tokens]
    assert torch.allclose(logp.exp(), expected, rtol=1e-5)


@pytest.mark.parametrize("vocab,block", [(1000, 64), (1024, 64), (7, 1024)])
def test_blockwise_cdf_inversion_equals_one_cumsum_over_the_row(vocab, block):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.rand(50, vocab, generator=g) * (torch.rand(50, vocab, generator=g) > 0.3)  # zeros too
    probs[0, block:] = 0  # whole blocks without mass
    u = torch.rand(50, generator=g, dtype=torch.float64)
    cum = probs.cumsum(-1, dtype=torch.float64)
    expected = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).squeeze(-1)
    scores = probs.log() + 3.0  # log-probabilities up to a constant
    got, log_z = sample_scores(scores, u, block)
    assert torch.equal(got, expected)
    assert bool((probs.gather(-1, expected[:, None]) > 0).all())
    assert torch.allclose(log_z, torch.logsumexp(scores, -1), atol=1e-5)


def test_keyed_uniform_is_uniform_and_keyed():
    u = keyed_uniform(torch.full((20000,), 99), torch.arange(20000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert np.abs(np.histogram(u.numpy(), bins=10, range=(0, 1))[0] / 20000 - 0.1).max() < 0.01
    assert not torch.equal(u[:100], keyed_uniform(torch.full((100,), 98), torch.arange(100)))


def test_forced_ids_override_only_their_counts():
    logits = torch.randn(3, 9)
    keys, counts = torch.zeros(3, dtype=torch.long), torch.tensor([4, 5, 9])
    forced_ids = torch.tensor([-1] * 5 + [7, 8, -1])  # counts 5 and 6 forced; count 9 is past the table
    free, free_lp = choose_tokens(logits, 0.5, 1.0, keys, counts, torch.full((8,), -1))
    tokens, logp = choose_tokens(logits, 0.5, 1.0, keys, counts, forced_ids)
    assert tokens.tolist() == [int(free[0]), 7, int(free[2])]
    assert float(logp[1]) == pytest.approx(float(torch.log_softmax(logits[1] / 0.5, -1)[7]), abs=1e-6)
    assert logp[0] == free_lp[0] and logp[2] == free_lp[2]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_both_samplers_draw_from_the_same_distribution(temperature, top_p):
    """Over many draws of one row, the two samplers' token frequencies agree, and each token gets the
    same log-probability from both."""
    logits = torch.tensor([[1.5, 1.2, 0.4, 0.0, -0.3, -2.0]])
    n = 6000
    keyed, keyed_lp = _choose(logits.repeat(n, 1), temperature, top_p, 7, torch.arange(n))
    g = torch.Generator().manual_seed(7)
    draws = [sample_tokens(logits, temperature, top_p, [g]) for _ in range(n)]
    gumbel = torch.cat([t for t, _ in draws])
    gumbel_lp = torch.cat([lp for _, lp in draws])
    freq = [np.bincount(t.numpy(), minlength=6) / n for t in (keyed, gumbel)]
    assert np.abs(freq[0] - freq[1]).max() < 0.03
    assert set(keyed.tolist()) == set(gumbel.tolist())
    for token in set(keyed.tolist()):
        assert float(keyed_lp[keyed == token][0]) == pytest.approx(float(gumbel_lp[gumbel == token][0]), abs=1e-5)


def test_the_nucleus_keeps_the_token_that_crosses_top_p():
    sorted_p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert in_nucleus(sorted_p, 0.6).tolist() == [True, True, False, False]
    assert in_nucleus(sorted_p, 0.5).tolist() == [True, False, False, False]
    assert in_nucleus(sorted_p, 1.0).tolist() == [True, True, True, True]
