"""TokenLayout against slow per-image loops: gathering, packing, positions across stages, masks and biases."""

import torch

from timm_token_prune.layout import TokenLayout


def _remain(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    remain = torch.rand(batch, tokens, generator=generator) < 0.6
    remain[:, 0] = True  # a class token always stays
    return remain


def test_two_gathers_keep_each_images_tokens_in_order_and_track_original_positions():
    generator = torch.Generator().manual_seed(0)
    batch, tokens, channels = 3, 10, 4
    x0 = torch.randn(batch, tokens, channels, generator=generator)
    layout = TokenLayout()
    first = _remain(batch, tokens, generator)
    x, order = layout.gather(x0, first)
    assert order is not None
    padded = layout.unpack(x, zero_padding=True)
    for b in range(batch):
        want = x0[b, first[b]]
        assert torch.equal(padded[b, : len(want)], want)
        assert torch.equal(padded[b, len(want) :], torch.zeros_like(padded[b, len(want) :]))
        assert layout.positions[b, : len(want)].tolist() == first[b].nonzero().flatten().tolist()
    assert torch.equal(layout.pack(layout.unpack(x)), x)  # packing is the inverse of unpacking

    second = _remain(batch, padded.shape[1], generator) & layout.valid
    x, _ = layout.gather(layout.unpack(x), second)
    stages = layout.kept_positions(tokens, batch, x0.device)
    padded = layout.unpack(x, zero_padding=True)
    for b in range(batch):
        original = first[b].nonzero().flatten()[second[b, : int(first[b].sum())]]
        count = len(original)
        assert stages[1][0][b, :count].tolist() == original.tolist()
        assert torch.equal(padded[b, :count], x0[b, original])


def test_nothing_removed_leaves_the_tokens_alone():
    layout = TokenLayout()
    x = torch.randn(2, 5, 3)
    out, order = layout.gather(x, torch.ones(2, 5, dtype=torch.bool))
    assert out is x and order is None and layout.positions is None
    assert layout.kept == [(None, None)]


def test_masks_and_biases_follow_the_tokens():
    generator = torch.Generator().manual_seed(1)
    batch, tokens = 2, 6
    layout = TokenLayout()
    remain = _remain(batch, tokens, generator)
    _, order = layout.gather(torch.randn(batch, tokens, 1), remain)
    mask = torch.rand(batch, tokens, generator=generator)
    followed = layout.follow(mask, order)
    bias = torch.randn(1, 2, tokens, tokens, generator=generator)
    gathered = layout.gather_bias(bias)
    for b in range(batch):
        kept = remain[b].nonzero().flatten()
        count = len(kept)
        assert torch.equal(followed[b, :count], mask[b, kept])
        assert (followed[b, count:] == 0).all()  # padding is hidden
        assert torch.equal(gathered[b, :, :count, :count], bias[0][:, kept][:, :, kept])
