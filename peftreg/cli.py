# SPDX-License-Identifier: Apache-2.0
"""The ``peftreg`` command line: ``compare``, ``methods``, ``inspect``, ``convert``, ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from peftreg.errors import AdapterError, PeftregError


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

    if args.to.startswith("peft-"):
        return _convert_refitted(args, console)
    if args.rank is not None:
        raise AdapterError("--rank is only used with --to peft-<method> (a refit)")
    if args.original_base:
        return _convert_for_original_base(args, console)
    model = _load_local_model(args.model) if args.model else None
    written = convert(args.src, args.dst, to=args.to, task_type=args.task_type, model=model,
                      method=args.method)
    console.print(f"wrote {written}")
    return 0


def _convert_for_original_base(args: argparse.Namespace, console: Console) -> int:
    from peftreg.model import AdaptedModel

    if args.to != "peft" or args.model is None:
        raise AdapterError("--original-base writes PEFT's format (--to peft) and needs the "
                           "original base model (--model PATH, a local transformers model "
                           "directory): the adapter is loaded onto it, which recomputes the "
                           "initial factors its initialisation took out of the base")
    model = AdaptedModel(_load_local_model(args.model))
    name = model.load_adapter(args.src).name
    written = model.save_adapter(args.dst, name, format="peft", task_type=args.task_type,
                                 original_base=True)
    console.print(f"wrote {written}")
    return 0


def _convert_refitted(args: argparse.Namespace, console: Console) -> int:
    from peftreg.io.refit import save_refitted
    from peftreg.model import AdaptedModel

    method = args.to.removeprefix("peft-")
    if args.rank is None or args.model is None:
        raise AdapterError(f"--to {args.to} refits the adapter's weight updates, which needs "
                           "--rank R and the base model (--model PATH, a local transformers "
                           "model directory)")
    model = AdaptedModel(_load_local_model(args.model))
    name = model.load_adapter(args.src).name
    written, record = save_refitted(model, args.dst, name, method=method, rank=args.rank,
                                    task_type=args.task_type)
    table = Table(title=f"{record['from_method']} as {method} of rank {args.rank}: relative "
                        f"error {record['relative_error']:.3g}")
    for col in ("layer", "relative error"):
        table.add_column(col)
    for path, error in record["layer_relative_errors"].items():
        table.add_row(path, f"{error:.3g}")
    console.print(table)
    console.print(f"wrote {written}")
    return 0


def _load_local_model(path: str) -> Any:
    """A local ``transformers`` model directory, loaded with the class its config names."""
    try:
        import transformers
    except ImportError as exc:
        raise AdapterError("--model needs the transformers package") from exc
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise AdapterError(f"{path}: its config names no transformers model class "
                           f"(architectures: {names})")
    return cls.from_pretrained(path, local_files_only=True)


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """Fine-tune one pretrained model with every method and tabulate the results."""
    from peftreg.compare.command import run

    return run(args, console)


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    """The rank of the update (LoRA paper section 7) on a compare task."""
    from peftreg.compare.rank import run_command

    return run_command(args, console)


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
    p.add_argument("--to", required=True, metavar="{peft,peftreg,peft-METHOD}",
                   help="the format to write; peft-METHOD (peft-lora) refits a mergeable "
                   "adapter as METHOD in PEFT's format, for servers that run only that method")
    p.add_argument("--task-type", default=None, help="PEFT task_type (CAUSAL_LM, SEQ_CLS, ...)")
    p.add_argument("--rank", type=int, default=None, help="rank of the refit (peft-METHOD)")
    p.add_argument("--method", default=None,
                   help="with --to peftreg: read the PEFT directory as this method's adapter "
                   "(qlora for a LORA directory; default: the method that claims it)")
    p.add_argument("--original-base", action="store_true",
                   help="with --to peft and --model: write an adapter whose initialisation "
                   "rewrote the base (LoRA's PiSSA, OLoRA) as a plain LoRA of twice the rank "
                   "for the unmodified base, as PEFT's path_initial_model_for_weight_conversion")
    p.add_argument("--model", default=None,
                   help="local transformers model directory of the base model (needed by "
                   "peft-METHOD and by prefix tuning's export)")
    p = sub.add_parser("compare", help="fine-tune a pretrained model with every installed "
                       "method and compare them")
    from peftreg.compare.command import add_arguments

    add_arguments(p)
    p = sub.add_parser("analyze", help="the rank of fine-tuning updates (LoRA paper section "
                       "7): full fine-tuning's energy spectrum, LoRA subspace similarity and "
                       "amplification")
    from peftreg.compare.rank import add_arguments as add_analyze_arguments

    add_analyze_arguments(p)
    return parser


COMMANDS = {"methods": cmd_methods, "inspect": cmd_inspect, "doctor": cmd_doctor,
            "compare": cmd_compare, "convert": cmd_convert, "analyze": cmd_analyze}


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
