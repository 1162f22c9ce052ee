"""The ``upi-fast`` command line. Argument checking lives here; computation does not.

Subcommands: ``demo`` (the embedded default, every method side by side), ``compute`` (a UPI on a
local dataset), ``sweep`` (every method at several budgets), ``transfer`` (every model's UPI on
every model), ``evaluate`` (a saved perturbation against a model: transfer), ``show`` (render a
perturbation file), ``bench`` (the benchmark suite). Any bad input is reported as one line
``upi-fast: error: OPTION: ...`` naming the option concerned, with exit code 2 (running out of
device memory too: the line names ``--batch-size``); ``--debug`` shows the traceback instead.
Warnings are printed as one line each, ``upi-fast: warning: ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import warnings
from typing import Iterator

__all__ = ["main", "build_parser", "error_line"]

from .cli_options import (CLIError, _add_model_args, _add_saliency_args, _add_sweep_transfer, _device,
                          _existing_path, _non_negative_int, _norm, _Parser, _positive_float, _positive_int)


def _config_from_args(args, **overrides):
    """A :class:`~upi_fast.pipeline.ComputeConfig` from parsed options (every field whose name is an
    option's dest; ``progress`` from ``--no-progress``), with ``overrides``."""
    import dataclasses
    from .pipeline import ComputeConfig
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ComputeConfig) if hasattr(args, f.name)}
    kw["progress"] = not args.no_progress
    kw.update(overrides)
    return ComputeConfig(**kw)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .hvp import HVP_MODES
    parser = _Parser(prog="upi-fast", description="Universal perturbations for interpretation (UPI).")
    parser.add_argument("--version", action="version", version=f"upi-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"),
                        help="op implementation (default: auto, the fastest available per op; see upi-fast info)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("demo", help="every method and baseline on the embedded digits default")
    p.add_argument("--out", default="upi_out/demo", help="output folder (default upi_out/demo)")
    p.add_argument("--eps-scale", type=_positive_float("--eps-scale"), default=0.1,
                   help="eps as a multiple of the mean L2 norm of the evaluation images")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=20, help="UPI-Grad passes over the attack set")
    p.add_argument("--hvp", choices=HVP_MODES, default="double_backward",
                   help="how Hessian-vector products are computed")
    p.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation, noise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("compute", help="compute a UPI on a local dataset (data-parallel under torchrun)")
    p.add_argument("--data", required=True, type=_existing_path("--data"),
                   help="an ImageFolder (one sub-folder of images per class) or a CIFAR-10 (python format) folder")
    _add_model_args(p)
    eps = p.add_mutually_exclusive_group(required=True)
    eps.add_argument("--eps", type=_positive_float("--eps"),
                     help="radius in model units (pixels in [0, 1]), in the --norm (required: this or --eps-pixels)")
    eps.add_argument("--eps-pixels", type=_positive_float("--eps-pixels"),
                     help="per-pixel budget on the 0-255 scale (Linf: the bound; L2: RMS per pixel) "
                          "(required: this or --eps)")
    p.add_argument("--norm", type=_norm, default=2.0, help="norm bounding the perturbation: 2 or inf (default: 2)")
    p.add_argument("--method", choices=("grad", "pca", "pca+"), default="grad",
                   help="UPI-Grad (gradient steps), UPI-PCA (top direction) or PCA+ (PCA with the --plus-lambda term)")
    p.add_argument("--attack-samples", type=_positive_int("--attack-samples"), default=1000,
                   help="images the perturbation is computed on")
    p.add_argument("--eval-samples", type=_positive_int("--eval-samples"), default=1000,
                   help="held-out images it is evaluated on (disjoint from the attack images)")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=10, help="UPI-Grad passes over the attack set")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64, help="images per batch")
    p.add_argument("--hvp", choices=HVP_MODES, default="double_backward",
                   help="how Hessian-vector products are computed")
    p.add_argument("--plus-lambda", type=_positive_float("--plus-lambda"), default=1.0,
                   help="weight of the extra term of --method pca+")
    p.add_argument("--solver", choices=("auto", "exact", "sketch", "frequent_directions", "subspace", "block_krylov"),
                   default="auto", help="top-direction solver of --method pca / pca+")
    _add_saliency_args(p)
    p.add_argument("--device", type=_device, help="cpu or cuda[:N] (default: cuda:LOCAL_RANK under torchrun with CUDA, else cpu)")
    p.add_argument("--workers", type=_non_negative_int, default=0,
                   help="data loader worker processes (0: load in the main process)")
    p.add_argument("--cache", metavar="DIR",
                   help="decode the images once into a uint8 cache under DIR (memory-mapped, checksummed, one "
                        "entry per data files + size + transform) and read later epochs and runs from it "
                        "(default: off, every epoch decodes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation, noise)")
    p.add_argument("--out", default="upi_out/compute", help="output folder (upi.safetensors, upi.png, report.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the saliency / HVP passes (fp16: CUDA only; delta and sketches stay fp32)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"),
                   help="write a checkpoint every N solver steps (the last 2 are kept) (default: no checkpoints)")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint (from scratch when there is none)")
    p.add_argument("--oom-retry", action="store_true",
                   help="when a batch does not fit the device's memory, split it into micro-batches of half the size "
                        "(repeatedly; gradients summed, results unchanged) instead of stopping")
    p.add_argument("--fast", choices=("off", "on", "autotune"), default="on",
                   help="attack steps / directions through the prepared step of upi_fast.accel (BatchNorm folded, "
                        "exact piecewise-linear HVP where it proves it applies, double backward otherwise: the same "
                        "gradient to float32 rounding; off: the reference code; autotune: also the fastest layout, "
                        "timed on the first batch)")

    p = sub.add_parser("evaluate", help="evaluate a saved perturbation (e.g. transfer to another model)")
    p.add_argument("perturbation", type=_existing_path("perturbation"),
                   help="a perturbation file written by upi-fast compute (.safetensors)")
    p.add_argument("--data", required=True, type=_existing_path("--data"),
                   help="an ImageFolder or a CIFAR-10 (python format) folder")
    _add_model_args(p, from_file=True)
    p.add_argument("--eval-samples", type=_positive_int("--eval-samples"), default=1000,
                   help="images evaluated (drawn with --seed)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64, help="images per batch")
    p.add_argument("--k", type=_positive_int("--k"), help="top-k size (default: 10%% of the pixels)")
    _add_saliency_args(p, from_file=True)
    p.add_argument("--device", type=_device, help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (sample draw, random baseline, noise)")
    p.add_argument("--out", help="folder for evaluation.json (default: none, the table is printed only)")

    p = sub.add_parser("show", help="render a perturbation file (and examples) to PNG")
    p.add_argument("perturbation", type=_existing_path("perturbation"),
                   help="a perturbation file written by upi-fast compute (.safetensors)")
    p.add_argument("--out", default="upi_out/show", help="output folder for the PNG files")
    p.add_argument("--data", type=_existing_path("--data"),
                   help="images to show with their saliency maps before / after (needs --model) (default: none)")
    _add_model_args(p, required=False, from_file=True)
    p.add_argument("--n", type=_positive_int("--n"), default=8, help="examples shown with --data")
    _add_saliency_args(p, from_file=True)

    _add_sweep_transfer(sub)

    p = sub.add_parser("bench", help="benchmark suites (see bench/)")
    p.add_argument("suites", nargs="*", help="any of upi_grad hvp upi_pca ops svd (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 3 min on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the suites run")
    p.add_argument("--threads", type=_positive_int("--threads"), help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=os.path.join("upi_out", "bench"),
                   help="results root, relative to the current folder: a DATE-DEVICE folder is made in it")

    p = sub.add_parser("info", help="versions, CUDA devices and the available op backends")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    return parser


def _saliency_extras(args) -> dict:
    return {"steps": args.steps, "smoothgrad_std": args.smoothgrad_std, "smoothgrad_samples": args.smoothgrad_samples}


def _run(args) -> int:
    if args.backend:
        from .ops import set_backend
        with _option("--backend"):
            set_backend(args.backend)
    if args.command == "demo":
        from .demo import run_demo
        run_demo(args.out, eps_scale=args.eps_scale, seed=args.seed, epochs=args.epochs, hvp=args.hvp,
                 progress=not args.no_progress)
        print(f"report: {os.path.join(args.out, 'report.md')}")
    elif args.command == "compute":
        from .pipeline import compute
        compute(_config_from_args(args))
    elif args.command == "evaluate":
        from .saved import evaluate_file
        evaluate_file(args.perturbation, args.data, args.model, args.weights, args.num_classes, args.mean, args.std,
                      args.size, args.eval_samples, args.batch_size, args.saliency, args.target_kind, args.k,
                      args.device, args.seed, args.out, integration=args.integration, **_saliency_extras(args))
    elif args.command == "show":
        from .saved import show
        if bool(args.data) != bool(args.model):
            raise CLIError("show needs both --data and --model to render examples (or neither)")
        for path in show(args.perturbation, args.out, args.data, args.model, args.weights, args.num_classes,
                         args.mean, args.std, args.size, args.n, saliency=args.saliency, target_kind=args.target_kind,
                         integration=args.integration, **_saliency_extras(args)):
            print(path)
    elif args.command == "sweep":
        from .sweep import sweep, write_sweep
        budget = "eps_pixels" if args.eps_pixels is not None else "eps"
        cfg = _config_from_args(args, eps=None, eps_pixels=None, method="grad")
        result = sweep(cfg, args.eps_pixels or args.eps, args.methods, budget=budget, random_draws=args.random_draws,
                       per_image_steps=args.per_image_steps)
        with _option("--out"):
            for path in write_sweep(result, args.out):
                print(f"wrote {path}")
    elif args.command == "transfer":
        from .transfer import transfer, write_transfer
        cfg = _config_from_args(args, model=args.models[0][0], weights=args.models[0][1])
        result = transfer(cfg, args.models)
        with _option("--out"):
            for path in write_transfer(result, args.out):
                print(f"wrote {path}")
    elif args.command == "bench":
        try:
            from .bench.__main__ import main as bench_main
        except ImportError as exc:
            raise CLIError(f"the benchmark suite is not installed ({exc})") from None
        from .bench.__main__ import SUITES
        unknown = [s for s in args.suites if s not in SUITES]
        if unknown:
            raise CLIError(f"suites: unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)} (default: all)")
        if args.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise CLIError("--device: cuda was requested but CUDA is not available on this machine")
        argv = list(args.suites) + (["--quick"] if args.quick else []) + ["--device", args.device, "--out", args.out]
        if args.threads is not None:
            argv += ["--threads", str(args.threads)]
        return bench_main(argv)
    elif args.command == "info":
        import json
        from .info import format_info, info
        print(json.dumps(info(), indent=2, default=str) if args.json else format_info())
    else:
        raise CLIError("a subcommand is required: demo, compute, sweep, transfer, evaluate, show, bench or info "
                       "(see upi-fast --help)")
    return 0


@contextlib.contextmanager
def _option(name: str) -> Iterator[None]:
    """Blame errors raised inside on the option ``name`` (unless already blamed)."""
    try:
        yield
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        if getattr(exc, "option", None) is None:
            with contextlib.suppress(AttributeError):
                exc.option = name
        raise


_USER_ERRORS = (CLIError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, pickle.UnpicklingError)


def error_line(exc: BaseException) -> str:
    """The one line ``upi-fast: error: ...`` that reports ``exc``: its message's first line, behind
    the option it concerns when known and not already named."""
    from .solvers._microbatch import is_out_of_memory
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    opt = getattr(exc, "option", None)
    if is_out_of_memory(exc):
        opt = "--batch-size"
        if "lower batch_size" not in msg and "micro-batch" not in msg:
            msg = f"out of device memory: lower --batch-size (or pass --oom-retry to compute) ({msg})"
    if opt and opt not in msg:
        msg = f"{opt}: {msg}"
    return f"upi-fast: error: {msg}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip()
    print(f"upi-fast: warning: {text.splitlines()[0] if text else category.__name__}",
          file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``upi-fast``; returns the exit code (0, or 2 for a user error, 130 when interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    show_warning = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except _USER_ERRORS as exc:
        if debug:
            raise
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upi-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":
    sys.exit(main())
