# SPDX-License-Identifier: Apache-2.0
"""The ``peftreg`` command line: ``compare``, ``methods``, ``inspect``, ``convert``, ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from peftreg.errors import PeftregError


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    """Print installed methods with capabilities and provenance, then plugin failures."""
    from peftreg.registry import default_registry

    registry = default_registry()
    table = Table(title="Installed PEFT methods")
    for col in ("method", "mergeable", "quantized base", "inference latency", "PEFT format",
                "distribution", "version", "description"):
        table.add_column(col)
    for info in registry.infos():
        caps = info.capabilities
        table.add_row(info.name, _yes(caps.mergeable), _yes(caps.quantized_base),
                      _yes(caps.inference_latency), info.peft_type or "-",
                      info.dist + (" (built-in)" if info.builtin else ""),
                      info.version, info.description)
    console.print(table)
    if registry.failures:
        failed = Table(title="Plugins that failed to load", style="red")
        for col in ("distribution", "version", "entry point", "reason"):
            failed.add_column(col)
        for f in registry.failures:
            failed.add_row(f.dist, f.version, f.entry_point, f.reason)
        console.print(failed)
    _print_kernel_footer(console)
    return 0


def _print_kernel_footer(console: Console) -> None:
    from peftreg import ops

    if ops.has_extension():
        compiled = sorted({f"{op} ({dev})" for op, dev, ok in ops.kernel_report() if ok})
        console.print(f"compiled kernels: {', '.join(compiled) or 'none'}")
    else:
        console.print(f"compiled extension: not available ({ops.extension_error()}); "
                      "the plain-PyTorch path is used")


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    """Describe an adapter directory: method, config, tensors, parameters, size on disk."""
    from peftreg.io.adapter_dir import read_adapter_dir

    saved = read_adapter_dir(args.directory)
    if args.json:
        out = {
            "adapter_name": saved.adapter_name,
            "method": saved.config.method,
            "plugin": saved.meta.get("plugin"),
            "config": saved.config.to_dict(),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in sorted(saved.tensors.items())},
            "parameters": saved.parameter_count,
            "size_on_disk": saved.size_on_disk,
        }
        print(json.dumps(out, indent=2))
        return 0
    plugin = saved.meta.get("plugin", {})
    console.print(f"[bold]{saved.path}[/bold]: adapter {saved.adapter_name!r}, method "
                  f"{saved.config.method!r} from {plugin.get('distribution')} "
                  f"{plugin.get('version')}")
    console.print(f"parameters: {saved.parameter_count:,}   tensors: {len(saved.tensors)}   "
                  f"size on disk: {saved.size_on_disk:,} bytes")
    console.print_json(saved.config.to_json())
    table = Table(title="Tensors")
    for col in ("name", "shape", "dtype"):
        table.add_column(col)
    for key, tensor in sorted(saved.tensors.items()):
        table.add_row(key, "x".join(map(str, tensor.shape)), str(tensor.dtype).removeprefix(
            "torch."))
    console.print(table)
    return 0


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    """Report the torch build, the extension, and which ops run compiled on which devices."""
    import torch

    from peftreg import ops

    console.print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
                  f"CUDA device available: {_yes(torch.cuda.is_available())})")
    if not ops.has_extension():
        console.print(f"[yellow]compiled extension not available[/yellow]: {ops.extension_error()}")
        return 0
    table = Table(title="Compiled kernels")
    for col in ("op", "device", "compiled"):
        table.add_column(col)
    for op, device, ok in ops.kernel_report():
        table.add_row(op, device, _yes(ok))
    console.print(table)
    return 0


def cmd_convert(args: argparse.Namespace, console: Console) -> int:
    """Convert an adapter directory between peftreg's and Hugging Face PEFT's formats."""
    from peftreg.io.convert import convert

    written = convert(args.src, args.dst, to=args.to, task_type=args.task_type)
    console.print(f"wrote {written}")
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """Fine-tune one pretrained model with every method and tabulate the results."""
    from peftreg.compare.command import run

    return run(args, console)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="peftreg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list installed methods and plugin failures")
    p = sub.add_parser("inspect", help="describe an adapter directory")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("doctor", help="report the compiled extension and kernels")
    from peftreg.io.convert import convert

    p = sub.add_parser("convert", help="convert an adapter between peftreg and HF PEFT formats",
                       description=convert.__doc__.split("Args:")[0] if convert.__doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["peft", "peftreg"], required=True)
    p.add_argument("--task-type", default=None, help="PEFT task_type (CAUSAL_LM, SEQ_CLS, ...)")
    p = sub.add_parser("compare", help="fine-tune a pretrained model with every installed "
                       "method and compare them")
    from peftreg.compare.command import add_arguments

    add_arguments(p)
    return parser


COMMANDS = {"methods": cmd_methods, "inspect": cmd_inspect, "doctor": cmd_doctor,
            "compare": cmd_compare, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftreg`` console script."""
    args = build_parser().parse_args(argv)
    # Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        return COMMANDS[args.command](args, console)
    except PeftregError as exc:
        # Plain print: errors must not be re-wrapped or styled (paths, grep-able messages).
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
