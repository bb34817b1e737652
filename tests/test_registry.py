"""The registry of models by name: create, hf:DIR checkpoint folders, and every failure in one
line that says what to fix."""

import json

import pytest
import torch

import eventful
from eventful.models import MODEL_NAMES, create
from eventful.zoo import load_model
from tests.test_hf import randomized

transformers = pytest.importorskip("transformers")


def tiny_vitdet_config() -> "transformers.VitDetConfig":
    return transformers.VitDetConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        pretrain_image_size=64,
        patch_size=8,
        window_size=4,
        window_block_indices=[0],
        use_relative_position_embeddings=True,
    )


def test_every_registered_name_is_known_to_the_command_line_too():
    assert {"vit-s16", "vit-b16", "dinov2-saliency", "dinov2-s14-vitdet", "vitdet-b"} <= set(
        MODEL_NAMES
    )
    assert load_model("vit-s16", 64).name == "vit-s16"


def test_a_saved_hugging_face_folder_loads_and_converts(tmp_path):
    torch.manual_seed(0)
    original = randomized(transformers.VitDetBackbone(tiny_vitdet_config()))
    original.save_pretrained(tmp_path)
    loaded = create(f"hf:{tmp_path}")
    assert type(loaded) is type(original)
    frames = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = original(frames).feature_maps[-1]
        assert torch.equal(loaded(frames).feature_maps[-1], want)
        converted = eventful.convert(loaded, policy=eventful.TopK(64), level="exact")
        got = converted.stream()(frames).feature_maps[-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    zoo_model = load_model(f"hf:{tmp_path}", 64)
    assert zoo_model.patch_size == 8 and zoo_model.num_prefix_tokens == 0


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vit-x'; known models: vit-s16, "):
        create("vit-x")


def test_a_windowed_model_below_one_window_is_refused():
    with pytest.raises(ValueError, match="vitdet-b needs inputs of at least 224 pixels, got 160"):
        create("vitdet-b", 160)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no Hugging Face checkpoint folder at .*absent"):
        create(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json"):
        create(f"hf:{tmp_path}")


def test_a_corrupt_config_or_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        create(f"hf:{tmp_path}")
    transformers.VitDetBackbone(tiny_vitdet_config()).save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load the VitDetBackbone checkpoint in"):
        create(f"hf:{tmp_path}")


def test_an_unsupported_family_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="holds a BertModel; supported families: ViTModel, "):
        create(f"hf:{tmp_path}")
