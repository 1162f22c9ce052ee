"""The ``upi-fast`` command line. Argument checking lives here; computation does not.

Subcommands: ``demo`` (the embedded default, every method side by side), ``compute`` (a UPI on a
local dataset), ``evaluate`` (a saved perturbation against a model: transfer), ``show`` (render a
perturbation file), ``bench`` (the benchmark suite). Any bad input is reported as one line
``upi-fast: error: OPTION: ...`` naming the option concerned, with exit code 2 (running out of
device memory too: the line names ``--batch-size``); ``--debug`` shows the traceback instead.
Warnings are printed as one line each, ``upi-fast: warning: ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import sys
import warnings
from typing import Iterator

__all__ = ["main", "build_parser", "error_line"]


class CLIError(Exception):
    """A user error: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise CLIError(message)


def _positive_float(name):
    def conv(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return v
    return conv


def _positive_int(name):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
        return v
    return conv


def _non_negative_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _norm(text):
    from .projection import parse_norm
    try:
        return parse_norm(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 2 or inf, got {text!r}") from None


def _floats(name):
    def conv(text):
        try:
            vals = tuple(float(t) for t in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {text!r}") from None
        if not vals or not all(math.isfinite(v) for v in vals):
            raise argparse.ArgumentTypeError(f"must be finite numbers, got {text!r}")
        return vals
    return conv


def _device(text):
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text} was requested but CUDA is not available on this machine")
    return text


def _existing_path(name):
    def conv(text):
        if not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
        return text
    return conv


def _add_model_args(p, required=True):
    p.add_argument("--model", required=required,
                   help="torchvision:NAME, digits, or module.path:callable returning an nn.Module")
    p.add_argument("--weights", type=_existing_path("--weights"), help="local weights (.safetensors or .pt)")
    p.add_argument("--num-classes", type=_positive_int("--num-classes"))
    p.add_argument("--mean", type=_floats("--mean"), help="per-channel normalisation mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_floats("--std"), help="per-channel normalisation std, e.g. 0.229,0.224,0.225")
    p.add_argument("--size", type=_positive_int("--size"), help="resize / centre-crop images to this size")


def _add_saliency_args(p):
    p.add_argument("--saliency", choices=("simple", "integrated", "smoothgrad"), default="simple")
    p.add_argument("--target-kind", choices=("prob", "logit"), default="prob")
    from .saliency import DEFAULT_INTEGRATION, INTEGRATION_RULES
    p.add_argument("--integration", choices=INTEGRATION_RULES, default=DEFAULT_INTEGRATION,
                   help="integrated-gradients path rule for --saliency integrated (default %(default)s: weight 1/M "
                        "at k/(M-1), the authors' rule; the others are captum's, same nodes and weights)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .hvp import HVP_MODES
    parser = _Parser(prog="upi-fast", description="Universal perturbations for interpretation (UPI).")
    parser.add_argument("--version", action="version", version=f"upi-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), help="op implementation")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("demo", help="every method and baseline on the embedded digits default")
    p.add_argument("--out", default="upi_out/demo", help="output folder (default upi_out/demo)")
    p.add_argument("--eps-scale", type=_positive_float("--eps-scale"), default=0.1,
                   help="eps as a multiple of the mean L2 norm of the evaluation images")
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=20)
    p.add_argument("--hvp", choices=HVP_MODES, default="double_backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("compute", help="compute a UPI on a local dataset (data-parallel under torchrun)")
    p.add_argument("--data", required=True, type=_existing_path("--data"),
                   help="an ImageFolder or a CIFAR-10 (python format) folder")
    _add_model_args(p)
    eps = p.add_mutually_exclusive_group(required=True)
    eps.add_argument("--eps", type=_positive_float("--eps"), help="radius in model units (pixels in [0, 1])")
    eps.add_argument("--eps-pixels", type=_positive_float("--eps-pixels"),
                     help="per-pixel budget on the 0-255 scale (Linf: the bound; L2: RMS per pixel)")
    p.add_argument("--norm", type=_norm, default=2.0)
    p.add_argument("--method", choices=("grad", "pca", "pca+"), default="grad")
    p.add_argument("--attack-samples", type=_positive_int("--attack-samples"), default=1000)
    p.add_argument("--eval-samples", type=_positive_int("--eval-samples"), default=1000)
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=10)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64)
    p.add_argument("--hvp", choices=HVP_MODES, default="double_backward")
    p.add_argument("--plus-lambda", type=_positive_float("--plus-lambda"), default=1.0)
    p.add_argument("--solver", choices=("auto", "exact", "sketch", "frequent_directions", "subspace", "block_krylov"),
                   default="auto")
    _add_saliency_args(p)
    p.add_argument("--device", type=_device)
    p.add_argument("--workers", type=_non_negative_int, default=0, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="upi_out/compute")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the saliency / HVP passes (fp16: CUDA only; delta and sketches stay fp32)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"),
                   help="write a checkpoint every N solver steps (the last 2 are kept)")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (default OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint (from scratch when there is none)")
    p.add_argument("--oom-retry", action="store_true",
                   help="when a batch does not fit the device's memory, split it into micro-batches of half the size "
                        "(repeatedly; gradients summed, results unchanged) instead of stopping")
    p.add_argument("--fast", choices=("off", "on", "autotune"), default="off",
                   help="attack steps / directions through the prepared step of upi_fast.accel (BatchNorm folded, "
                        "exact piecewise-linear HVP where it applies; autotune: also the fastest layout, timed on the "
                        "first batch)")

    p = sub.add_parser("evaluate", help="evaluate a saved perturbation (e.g. transfer to another model)")
    p.add_argument("perturbation", type=_existing_path("perturbation"))
    p.add_argument("--data", required=True, type=_existing_path("--data"))
    _add_model_args(p)
    p.add_argument("--eval-samples", type=_positive_int("--eval-samples"), default=1000)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=64)
    p.add_argument("--k", type=_positive_int("--k"), help="top-k size (default 10%% of the pixels)")
    _add_saliency_args(p)
    p.add_argument("--device", type=_device)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for evaluation.json")

    p = sub.add_parser("show", help="render a perturbation file (and examples) to PNG")
    p.add_argument("perturbation", type=_existing_path("perturbation"))
    p.add_argument("--out", default="upi_out/show")
    p.add_argument("--data", type=_existing_path("--data"))
    _add_model_args(p, required=False)
    p.add_argument("--n", type=_positive_int("--n"), default=8)

    p = sub.add_parser("bench", help="benchmark suites (see bench/)")
    p.add_argument("suites", nargs="*", help="hvp upi_grad upi_pca ops svd (default: all)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("info", help="versions, CUDA devices and the available op backends")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    return parser


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
        from .pipeline import ComputeConfig, compute
        cfg = ComputeConfig(data=args.data, model=args.model, out=args.out, weights=args.weights,
                            num_classes=args.num_classes, mean=args.mean, std=args.std, size=args.size, eps=args.eps,
                            eps_pixels=args.eps_pixels, norm=args.norm, method=args.method,
                            attack_samples=args.attack_samples, eval_samples=args.eval_samples, epochs=args.epochs,
                            batch_size=args.batch_size, hvp=args.hvp, saliency=args.saliency,
                            target_kind=args.target_kind, plus_lambda=args.plus_lambda, solver=args.solver,
                            device=args.device, seed=args.seed, workers=args.workers,
                            progress=not args.no_progress, checkpoint_dir=args.checkpoint_dir,
                            checkpoint_every=args.checkpoint_every, resume=args.resume, precision=args.precision,
                            oom_retry=args.oom_retry, fast=args.fast, integration=args.integration)
        compute(cfg)
    elif args.command == "evaluate":
        from .pipeline import evaluate_file
        evaluate_file(args.perturbation, args.data, args.model, args.weights, args.num_classes, args.mean, args.std,
                      args.size, args.eval_samples, args.batch_size, args.saliency, args.target_kind, args.k,
                      args.device, args.seed, args.out, integration=args.integration)
    elif args.command == "show":
        from .pipeline import show
        if bool(args.data) != bool(args.model):
            raise CLIError("show needs both --data and --model to render examples (or neither)")
        for path in show(args.perturbation, args.out, args.data, args.model, args.weights, args.num_classes,
                         args.mean, args.std, args.size, args.n):
            print(path)
    elif args.command == "bench":
        try:
            from .bench.__main__ import main as bench_main
        except ImportError as exc:
            raise CLIError(f"the benchmark suite is not installed ({exc})") from None
        argv = list(args.suites) + (["--quick"] if args.quick else []) + ["--device", args.device]
        return bench_main(argv)
    elif args.command == "info":
        import json
        from .info import format_info, info
        print(json.dumps(info(), indent=2, default=str) if args.json else format_info())
    else:
        raise CLIError("a subcommand is required: demo, compute, evaluate, show, bench or info (see upi-fast --help)")
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
