import torch

import eventful
from tests.helpers import tiny_vit


def test_vit_returns_final_norm_tokens_with_class_token_first():
    vit = eventful.ViT(image_size=32, patch_size=16, dim=64, depth=2, heads=4).eval()
    tokens = vit(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 4, 64)
    # The final LayerNorm (unit weight, zero bias at init) leaves each token zero-mean.
    assert torch.allclose(tokens.mean(dim=-1), torch.zeros(2, 5), atol=1e-5)


def test_registers_sit_between_class_token_and_patches():
    vit = tiny_vit(num_registers=3)
    tokens = vit.embedding(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 1 + 3 + 64, 48)
    assert torch.equal(tokens[0, 1:4], vit.embedding.registers[0])


def test_without_a_class_token_the_tokens_are_registers_then_patches():
    vit = tiny_vit(class_token=False, num_registers=2)
    assert vit.embedding.num_prefix_tokens == 2
    assert vit.embedding.position.shape == (1, 64, 48)  # patches only
    tokens = vit.embedding(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 2 + 64, 48)
    assert torch.equal(tokens[0, :2], vit.embedding.registers[0])
    resized = vit(torch.randn(1, 3, 40, 96))  # interpolation has no class position to keep
    assert resized.shape == (1, 2 + 5 * 12, 48)


def test_position_embedding_is_interpolated_for_other_input_sizes():
    vit = tiny_vit()
    assert vit.embedding.position_for_grid(8, 8) is vit.embedding.position
    resized = vit.embedding.position_for_grid(5, 12)
    assert resized.shape == (1, 1 + 5 * 12, 48)
    assert torch.equal(resized[:, 0], vit.embedding.position[:, 0])
    assert vit(torch.randn(1, 3, 40, 96)).shape == (1, 1 + 5 * 12, 48)


def test_the_interpolated_position_embedding_is_kept_for_its_grid_until_the_weights_change():
    embedding = tiny_vit().embedding
    with torch.no_grad():
        first = embedding.position_for_grid(5, 12)
        assert embedding.position_for_grid(5, 12) is first  # kept: not interpolated again
        assert torch.equal(first, embedding._interpolate(5, 12))
        other = embedding.position_for_grid(6, 6)  # a new grid: computed for it
        assert other.shape == (1, 1 + 6 * 6, 48)
        assert torch.equal(other, embedding._interpolate(6, 6))
        again = embedding.position_for_grid(5, 12)
        assert again is not first and torch.equal(again, first)
        embedding.position.mul_(2.0)  # new weights in place (load_state_dict copies the same way)
        assert torch.allclose(embedding.position_for_grid(5, 12), 2.0 * first, atol=1e-6)
    with torch.enable_grad():  # training: a fresh graph every call, nothing kept
        assert embedding.position_for_grid(5, 12).grad_fn is not None


def test_a_model_with_a_kept_position_embedding_computes_what_it_computed_before():
    vit = tiny_vit().eval()
    frames = torch.randn(2, 3, 40, 96)
    with torch.no_grad():
        first = vit(frames)  # interpolates and keeps
        kept = vit(frames)  # reuses
        vit.embedding._interpolated = None
        fresh = vit(frames)
    assert torch.equal(first, kept) and torch.equal(kept, fresh)


def test_layer_scale_multiplies_residual_branches():
    plain = tiny_vit(seed=3)
    scaled = tiny_vit(seed=3, layer_scale_init=1.0)
    frames = torch.randn(1, 3, 64, 64)
    assert torch.allclose(plain(frames), scaled(frames), atol=1e-6)
    for block in scaled.blocks:
        block.ls1.gamma.data.fill_(0.0)
        block.ls2.gamma.data.fill_(0.0)
    embedded = scaled.embedding(frames)
    assert torch.allclose(scaled(frames), scaled.norm(embedded), atol=1e-6)
