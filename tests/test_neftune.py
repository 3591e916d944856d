"""ftcourse.neftune against transformers' NEFTune hook (what TRL's neftune_noise_alpha switches on)."""

from __future__ import annotations

import pytest
import torch
from adapter_fixtures import tiny_llama
from torch import nn

from ftcourse import neftune

ALPHA = 5.0


def test_same_seed_same_noise_as_transformers():
    from transformers.integrations.neftune import neftune_post_forward_hook

    embedding = nn.Embedding(50, 16).train()
    tokens = torch.randint(0, 50, (2, 7))
    embedding.neftune_noise_alpha = ALPHA
    handle = embedding.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(11)
    theirs = embedding(tokens)
    handle.remove()
    torch.manual_seed(11)
    ours = neftune.add_noise(embedding(tokens), ALPHA)
    assert torch.equal(ours, theirs)  # same arithmetic, same generator draws: bit for bit


def test_whole_model_matches_transformers_activate_neftune():
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    model = tiny_llama().train()
    input_ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    handle = activate_neftune(model, ALPHA)
    torch.manual_seed(5)
    theirs = model(input_ids=input_ids).logits
    deactivate_neftune(model, handle)
    with neftune.neftune(model, ALPHA):
        torch.manual_seed(5)
        ours = model(input_ids=input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    clean = model(input_ids=input_ids).logits  # hook removed: no noise
    assert not torch.allclose(clean, ours, atol=1e-4)


def test_noise_scale_and_distribution():
    embeddings = torch.zeros(64, 32, 48)  # (B, L, d)
    noise = neftune.add_noise(embeddings, ALPHA)
    scale = ALPHA / (32 * 48) ** 0.5
    # float32: L·d converted (exact), a square root and a division, each within eps/2 of the float64 value
    eps = torch.finfo(torch.float32).eps
    assert neftune.noise_scale(ALPHA, 32, 48).item() == pytest.approx(scale, rel=2 * eps)
    assert noise.abs().max() <= scale and noise.abs().max() > 0.99 * scale
    # U(-a, a) has mean 0 and variance a²/3; 98k draws pin both to within a few percent
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01 * scale)
    assert noise.var().item() == pytest.approx(scale**2 / 3, rel=0.03)


def test_off_in_eval_mode_and_after_detach():
    model = tiny_llama()
    input_ids = torch.randint(0, 64, (2, 9))
    clean = model(input_ids=input_ids).logits
    handle = neftune.attach_neftune(model, ALPHA)
    model.eval()
    torch.testing.assert_close(model(input_ids=input_ids).logits, clean, atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(input_ids=input_ids).logits, clean, atol=1e-4)
    neftune.detach_neftune(handle)
    torch.testing.assert_close(model(input_ids=input_ids).logits, clean, atol=0, rtol=0)


def test_context_manager_removes_hook_on_error():
    model = tiny_llama().train()
    input_ids = torch.randint(0, 64, (1, 5))
    clean = model(input_ids=input_ids).logits
    with pytest.raises(RuntimeError, match="boom"), neftune.neftune(model, ALPHA):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(input_ids=input_ids).logits, clean, atol=0, rtol=0)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        neftune.attach_neftune(tiny_llama(), -1)
    with pytest.raises(ValueError, match=r"shape \(batch, length, dim\)"):
        neftune.add_noise(torch.zeros(4, 8), ALPHA)
