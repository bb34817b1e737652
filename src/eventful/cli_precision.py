"""The --precision option of `eventful run`, `eventful demo` and `eventful serve`."""

from __future__ import annotations

import argparse

from eventful.core.precision import PRECISIONS


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="arithmetic of the encoder's linear layers: fp32; bf16 (needs native bfloat16: "
        "AVX512-BF16, AMX or CUDA); int8 (int8 weights per output channel, float32 "
        "arithmetic, any CPU); auto (bf16 where native, else fp32). Caches stay float32",
    )
