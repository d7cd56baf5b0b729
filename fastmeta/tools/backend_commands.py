"""``fastmeta build`` and ``fastmeta info``."""

from __future__ import annotations

import argparse
import sys

from fastmeta.tools.command import Subcommand


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")


def _run_build(args: argparse.Namespace) -> int:
    from fastmeta.backends import extension

    ok, detail = extension.build(verbose=args.verbose)
    info = extension.build_info()
    if not ok:
        print(f"fastmeta build: {detail}", file=sys.stderr)
        return 1
    kind = "CPU and CUDA kernels" if info["with_cuda"] else "CPU kernels only"
    print(f"built the C++ extension ({kind}): {detail}")
    return 0


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-build", action="store_true", help="do not build the extension to check it")


def _run_info(args: argparse.Namespace) -> int:
    import torch

    import fastmeta
    from fastmeta.backends import AUTO_PREFERENCE, current_backend, extension

    print(f"fastmeta {fastmeta.__version__}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}", end="")
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"\nGPU: {gpu}\nchosen backend: {current_backend()} (FASTMETA_BACKEND or fm.use_backend)")
    print(f"auto tries, per op: {', '.join(AUTO_PREFERENCE['default'])} (verified ones only)")
    print("\nbackends:")
    for row in fastmeta.backends() if not args.no_build else []:
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"  {row['name']:<7} {status}")
        print(f"          {row['description']}")
        for device_type, kernels in sorted(row["verified"].items()):
            print(f"          verified on {device_type}: {', '.join(kernels)}")
    info = extension.build_info()
    print("\nC++/CUDA extension:")
    for key in ("ok", "with_cuda", "path", "csrc", "reason"):
        print(f"  {key}: {info[key]}")
    return 0


BUILD = Subcommand(help="build the C++/CUDA extension ahead of time", add_arguments=_build_arguments, run=_run_build)
INFO = Subcommand(help="show the backends, their availability and what was verified where", add_arguments=_info_arguments, run=_run_info)
