"""What every evaluation command shares: the command line, user errors, the table, the JSON records.

    python -m eval.<name> CKPT [CKPT ...] --data NAME_OR_PATH [--data ...] [--json PATH]

A CKPT is an ssl_vit ``ckpt.pt``, ``timm:MODEL_NAME`` (random init) or a ``.safetensors`` export
(``ssl_vit.checkpoint.load_backbone``); ``--data`` takes the recipes' forms (``ssl_vit.data``).
Each command prints one table (a row per checkpoint and data set) and, with ``--json``, writes a
list of flat records whose accuracies are fractions in 0..1.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional, Sequence

import torch

from ssl_vit.checkpoint import atomic_write_text
from ssl_vit.errors import EvalError, run_cli  # noqa: F401  (run_cli: every command's entry point)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ssl_vit", "features")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def base_parser(description: str, batch_size: Optional[int] = 256,
                batch_help: str = "images per forward pass (default: 256)") -> argparse.ArgumentParser:
    """The flags every evaluation command has; each module adds its protocol's own."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="ckpt.pt, timm:MODEL_NAME (random init) or a .safetensors export")
    parser.add_argument("--data", action="append", default=None, metavar="NAME_OR_PATH",
                        help="data set (repeat for several): default (digits), a folder of *train*/*test* "
                             "Parquet files or image folders, a .parquet file, or a hub name (default: default)")
    parser.add_argument("--image-column", default=None, help="image column (detected when not given)")
    parser.add_argument("--label-column", default=None, help="label column (detected when not given)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records as a JSON list here")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help=batch_help)
    parser.add_argument("--num-workers", type=int, default=2, help="data loader processes (default: 2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    return parser


def data_specs(args: argparse.Namespace) -> list[str]:
    return args.data or ["default"]


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EvalError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def percent(fraction: float) -> str:
    return f"{100.0 * fraction:.2f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    if title:
        print(title)
    print(line(header))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def pivot_table(records: list[dict], column_key: str, cell: Callable[[dict], str], title: str) -> None:
    """One row per (checkpoint, data), one column per value of ``column_key`` (shots, k)."""
    columns = list(dict.fromkeys(r[column_key] for r in records))
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["checkpoint"], r["data"]), {})[r[column_key]] = cell(r)
    body = [[ckpt, data] + [cells.get(c, "") for c in columns] for (ckpt, data), cells in rows.items()]
    print_table(["checkpoint", "data"] + [f"{column_key}={c}" for c in columns], body, title)


def write_json(path: Optional[str], records: list[dict]) -> None:
    if path:
        atomic_write_text(path, json.dumps(records, indent=2) + "\n")
        print(f"wrote {len(records)} records to {path}")
