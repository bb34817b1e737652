"""The engine runs from block descriptions alone: it imports no model code, runs a block of a
family it has never seen (RMSNorm, ReLU, no class token), and refuses descriptions whose parts
do not fit."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import eventful
from eventful.core.description import AttentionDescription, BlockDescription, EncoderDescription
from eventful.core.model import EventfulViT
from eventful.models.vit import TokenEmbedding
from tests.helpers import LEVELS

CORE = Path(eventful.__file__).parent / "core"
NOT_IN_CORE = ("eventful.models", "eventful.video", "eventful.viz", "eventful.cli", "transformers")
DIM, HEADS = 32, 4


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_engine_imports_no_model_code():
    for path in sorted(CORE.glob("*.py")):
        offending = {name for name in imported_modules(path) if name.startswith(NOT_IN_CORE)}
        assert not offending, f"{path.name} imports {sorted(offending)}"


def foreign_block(seed: int, layer_scale: bool) -> BlockDescription:
    """A block unlike our ViT's: RMSNorm, ReLU, a scale other than 1 / sqrt(head dim)."""
    torch.manual_seed(seed)
    return BlockDescription(
        norm1=nn.RMSNorm(DIM, eps=1e-6),
        qkv=nn.Linear(DIM, 3 * DIM, bias=False),
        proj=nn.Linear(DIM, DIM),
        norm2=nn.RMSNorm(DIM, eps=1e-6),
        fc1=nn.Linear(DIM, 2 * DIM),
        activation=nn.ReLU(),
        fc2=nn.Linear(2 * DIM, DIM),
        attention=AttentionDescription(heads=HEADS, scale=0.2),
        layer_scale1=torch.rand(DIM) if layer_scale else None,
        layer_scale2=torch.rand(DIM) if layer_scale else None,
    )


def foreign_encoder() -> EncoderDescription:
    torch.manual_seed(0)
    embedding = TokenEmbedding(32, 8, DIM, class_token=False).eval()
    blocks = (foreign_block(1, True), foreign_block(2, False))
    return EncoderDescription(embedding, blocks, nn.RMSNorm(DIM, eps=1e-6))


def described_forward(description: EncoderDescription, frames: torch.Tensor) -> torch.Tensor:
    """The dense computation a description stands for, written out independently."""
    x = description.embedding(frames)
    batch, tokens, _ = x.shape
    for block in description.blocks:
        q, k, v = block.qkv(block.norm1(x)).view(batch, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        weights = (block.attention.scale * q @ k.transpose(-1, -2)).softmax(-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, DIM)
        one = torch.ones(DIM)
        ls1 = one if block.layer_scale1 is None else block.layer_scale1
        ls2 = one if block.layer_scale2 is None else block.layer_scale2
        x = x + ls1 * block.proj(attended)
        x = x + ls2 * block.fc2(block.activation(block.fc1(block.norm2(x))))
    return description.norm(x)


@pytest.mark.parametrize("level", LEVELS)
def test_a_described_block_of_another_family_reduces_to_its_dense_computation(level):
    description = foreign_encoder()
    model = EventfulViT(description, eventful.Threshold(0.0), level)
    stream = model.stream(batch_size=2, drift=None)
    frames = torch.randn(5, 2, 3, 32, 32).cumsum(0) * 0.3
    with torch.no_grad():
        for frame in frames:
            expected = described_forward(description, frame)
            torch.testing.assert_close(stream(frame), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qkv": nn.Linear(DIM, 2 * DIM)}, "qkv maps 32 -> 64 features, expected 32 -> 96"),
        ({"fc2": nn.Linear(3 * DIM, DIM)}, "fc2 maps 96 -> 32 features, expected 64 -> 32"),
        ({"attention": AttentionDescription(heads=5, scale=0.2)}, "5 heads do not split width 32"),
        ({"layer_scale1": torch.ones(7)}, "layer_scale1 has shape (7,), expected (32,)"),
    ],
)
def test_a_description_whose_parts_do_not_fit_is_refused(change, message):
    description = foreign_encoder()
    broken = dataclasses.replace(description.blocks[0], **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EventfulViT(
            dataclasses.replace(description, blocks=(broken, description.blocks[1])),
            eventful.TopK(4),
        )


def test_an_encoder_without_blocks_is_refused():
    description = dataclasses.replace(foreign_encoder(), blocks=())
    with pytest.raises(ValueError, match="at least one block"):
        EventfulViT(description, eventful.TopK(4))
