"""Drafter beam search (docs/design.md §3.1-3.2): the torch module against the numpy reference, and
the drafter traps of docs/design.md §7."""

import numpy as np
import pytest
import torch

from redrafter.config import LOG_0, BeamShape
from redrafter.decoding.beam_search import beam_search, draft_log_probs
from redrafter.models.drafter import warp_log_probs

from conftest import tiny_base, tiny_drafter


def _numpy_weights(drafter) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in drafter.state_dict().items()}


@pytest.mark.parametrize("exit_dim,layers", [(None, 1), (24, 2), (None, 0)])
@pytest.mark.parametrize("W,L", [(1, 2), (1, 5), (4, 4), (3, 5)])  # W=1: the greedy chain
def test_torch_beam_search_matches_numpy_reference(exit_dim, layers, W, L) -> None:
    base = tiny_base(vocab_size=97)
    drafter = tiny_drafter(base, exit_dim=exit_dim, layers=layers)
    context = torch.randn(2, base.config.hidden_size)
    g0 = torch.tensor([3, 50])
    with torch.no_grad():
        beams, logp = drafter.beam_search(context, g0, base.embed_weight, BeamShape(W, L))
    ref_beams, ref_logp = beam_search(
        _numpy_weights(drafter),
        base.embed_weight.detach().double().numpy(),
        context.double().numpy(),
        g0.numpy(),
        BeamShape(W, L),
    )
    assert beams.shape == (2, W, L) and logp.shape == (2, W, L - 1, 97)
    np.testing.assert_array_equal(beams.numpy(), ref_beams)
    finite = ref_logp > LOG_0 / 2
    np.testing.assert_allclose(logp.numpy()[finite], ref_logp[finite], atol=1e-4)
    np.testing.assert_array_equal(beams[:, :, 0].numpy(), np.repeat(g0.numpy()[:, None], W, 1))


def test_step_one_state_uses_silu_and_the_rnn_u_bias() -> None:
    """s_1 = SiLU(rnn_w·E(g0) + rnn_u·0 + b_u): with rnn_w = 0 the state is SiLU(b_u), not 0
    and not b_u (no SiLU) — the two classic porting mistakes."""
    base = tiny_base()
    drafter = tiny_drafter(base)
    with torch.no_grad():
        drafter.rnn_w.weight.zero_()
        drafter.rnn_u.bias.copy_(torch.linspace(-2, 2, base.config.hidden_size))
        state = drafter.next_state(torch.zeros(1, base.config.hidden_size), base.embed_weight[:1])
    bias = drafter.rnn_u.bias.detach()
    torch.testing.assert_close(state[0], bias * torch.sigmoid(bias))
    assert not torch.allclose(state[0], bias)


def test_drafter_log_probs_are_top50_warped_and_normalised() -> None:
    base = tiny_base(vocab_size=120)
    drafter = tiny_drafter(base)
    E = base.config.hidden_size
    with torch.no_grad():
        logp = drafter.log_probs(torch.randn(5, E), torch.randn(5, E))
    assert torch.all((logp > LOG_0 / 2).sum(-1) == 50)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(5))
    ref = draft_log_probs(_numpy_weights(drafter), np.zeros((1, E)), np.zeros((1, E)))
    np.testing.assert_allclose(np.exp(ref).sum(-1), 1.0, rtol=1e-9)


def test_warp_log_probs_hand_example() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    logp = warp_log_probs(logits, top_k=2)
    # Max-subtracted: [0, -2, -1, -1]. The top-2 threshold is -1 and ties with it are kept,
    # so 0, -1, -1 survive and -2 becomes LOG_0.
    expected = torch.log_softmax(torch.tensor([[0.0, LOG_0, -1.0, -1.0]]), -1)
    torch.testing.assert_close(logp, expected)


def test_step_one_expands_only_beam_zero() -> None:
    """All W beams start as g0; the initial scores [0, LOG_0, ...] make the first step's W
    children distinct tokens of beam 0 instead of W copies of the best one."""
    base = tiny_base()
    drafter = tiny_drafter(base)
    with torch.no_grad():
        beams, _ = drafter.beam_search(
            torch.randn(1, base.config.hidden_size),
            torch.tensor([4]),
            base.embed_weight,
            BeamShape(5, 2),
        )
    assert len(set(beams[0, :, 1].tolist())) == 5
