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
import math
import os
import pickle
import sys
import warnings
from typing import Iterator

__all__ = ["main", "build_parser", "error_line"]


class CLIError(Exception):
    """A user error: reported as one line, exit code 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` with every option's default: ``(default: X)`` is appended to a help text that does
    not state its default already (as argparse's ArgumentDefaultsHelpFormatter, but never for
    flags or ``None``: those options say in words what happens when they are not given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

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


def _add_model_args(p, required=True, from_file=False):
    """--model, --weights, --num-classes, --mean, --std, --size; ``from_file``: the last three
    default to what the perturbation file records (evaluate, show)."""
    from .data import DEFAULT_IMAGE_FOLDER_SIZE
    p.add_argument("--model", required=required,
                   help="torchvision:NAME (random initialisation, nothing downloaded), digits, or "
                        "module.path:callable returning an nn.Module" + ("" if required else
                                                                         " (default: none, no examples)"))
    p.add_argument("--weights", type=_existing_path("--weights"),
                   help="local weights (.safetensors, or .pt read with weights_only=True) (default: none)")
    p.add_argument("--num-classes", type=_positive_int("--num-classes"),
                   help="classes of a torchvision model's head (default: read from --weights' final layer, e.g. "
                        "fc.weight (3, 512): 3; without --weights: the data's class count); checked against --data")
    src = "the perturbation file's" if from_file else None
    p.add_argument("--mean", type=_floats("--mean"),
                   help="per-channel normalisation mean in front of the model, pixels in [0, 1], e.g. "
                        f"0.485,0.456,0.406 (default: {src or 'none, the model sees pixels in [0, 1]'})")
    p.add_argument("--std", type=_floats("--std"),
                   help="per-channel normalisation std, e.g. 0.229,0.224,0.225 "
                        f"(default: {src or 'none, the model sees pixels in [0, 1]'})")
    p.add_argument("--size", type=_positive_int("--size"),
                   help="resize (shorter side) and centre-crop the images to SIZE x SIZE pixels (default: "
                        + (f"{src}" if from_file else
                           f"{DEFAULT_IMAGE_FOLDER_SIZE} for an ImageFolder, 32 (unchanged) for CIFAR-10") + ")")


def _add_saliency_args(p, from_file=False):
    """The attacked saliency map's settings; ``from_file``: defaults from the perturbation file."""
    from .saliency import DEFAULT_INTEGRATION, INTEGRATION_RULES, METHODS

    def default(value):
        return None if from_file else value

    def say(value):
        return f"default: the perturbation file's, else {value}" if from_file else "default: %(default)s"

    p.add_argument("--saliency", choices=METHODS, default=default("simple"),
                   help=f"gradient saliency map: plain gradient, integrated gradients or SmoothGrad ({say('simple')})")
    p.add_argument("--target-kind", choices=("prob", "logit"), default=default("prob"),
                   help=f"differentiate the softmax probability or the logit of the label ({say('prob')})")
    p.add_argument("--integration", choices=INTEGRATION_RULES, default=default(DEFAULT_INTEGRATION),
                   help=f"integrated-gradients path rule for --saliency integrated ({say(DEFAULT_INTEGRATION)}: "
                        "weight 1/M at k/(M-1), the authors' rule; the others are captum's, same nodes and weights)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=default(10),
                   help=f"integrated-gradients path points M, for --saliency integrated ({say(10)})")
    p.add_argument("--smoothgrad-std", type=_positive_float("--smoothgrad-std"), default=default(0.15),
                   help=f"SmoothGrad noise standard deviation in pixel units [0, 1], for --saliency smoothgrad "
                        f"({say(0.15)})")
    p.add_argument("--smoothgrad-samples", type=_positive_int("--smoothgrad-samples"), default=default(10),
                   help=f"SmoothGrad noise draws per image, for --saliency smoothgrad ({say(10)})")


def _positive_floats(name):
    def conv(text):
        vals = _floats(name)(text)
        bad = [v for v in vals if v <= 0]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be > 0, got {bad[0]:g}")
        if len(set(vals)) != len(vals):
            raise argparse.ArgumentTypeError(f"a value is given twice in {text!r}")
        return tuple(sorted(vals))
    return conv


def _methods(text):
    from .sweep import parse_methods
    try:
        return parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_list(text):
    """``SPEC[=WEIGHTS],SPEC[=WEIGHTS],...`` -> [(spec, weights or None), ...]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        spec, sep, weights = (s.strip() for s in item.partition("="))
        if not spec or (sep and not weights):
            raise argparse.ArgumentTypeError(f"each model must be SPEC or SPEC=WEIGHTS, got {item!r}")
        if weights and not os.path.isfile(weights):
            raise argparse.ArgumentTypeError(f"no such weights file: {weights} (for {spec})")
        out.append((spec, weights or None))
    if not out:
        raise argparse.ArgumentTypeError(f"must name at least one model, got {text!r}")
    return out


def _derived_parser(sub, name: str, base: str, drop: tuple, help: str, out: str) -> argparse.ArgumentParser:
    """A subcommand with the options of the subcommand ``base`` (copies of its argparse actions, so
    defaults, types and help stay in one place) less those whose dest is in ``drop``, ``--out``
    defaulting to ``out``. Options in a mutually exclusive group of ``base`` come over as plain ones."""
    import copy
    p = sub.add_parser(name, help=help)
    for action in sub.choices[base]._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in drop:
            continue
        action = copy.copy(action)
        if action.dest == "out":
            action.default = out
            action.help = f"output folder (default {out})"
        p._add_action(action)
    return p


_NOT_SWEPT = ("eps", "eps_pixels", "method", "checkpoint_every", "checkpoint_dir", "resume")


def _add_sweep_transfer(sub) -> None:
    """``sweep`` and ``transfer``: ``compute``'s options plus their own (see upi_fast.sweep / upi_fast.transfer)."""
    from .sweep import DEFAULT_METHODS, METHODS
    p = _derived_parser(sub, "sweep", "compute", _NOT_SWEPT, out="upi_out/sweep",
                        help="every method at several budgets: sweep.json, sweep.png (attack strength vs eps)")
    eps = p.add_mutually_exclusive_group(required=True)
    eps.add_argument("--eps-pixels", type=_positive_floats("--eps-pixels"),
                     help="comma list of per-pixel budgets on the 0-255 scale, e.g. 1,2,4,8 (Linf: the bound; "
                          "L2: RMS per pixel)")
    eps.add_argument("--eps", type=_positive_floats("--eps"), help="comma list of radii in model units (pixels in [0, 1])")
    p.add_argument("--methods", type=_methods, default=DEFAULT_METHODS,
                   help=f"comma list from {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)}; per-image: "
                        "the per-image attack, the ceiling; random: universal noise of the same norm, mean of draws)")
    p.add_argument("--random-draws", type=_positive_int("--random-draws"), default=3,
                   help="random noise draws averaged per budget (default 3)")
    p.add_argument("--per-image-steps", type=_positive_int("--per-image-steps"), default=20,
                   help="PGD steps of the per-image attack (default 20)")

    p = _derived_parser(sub, "transfer", "compute", _NOT_SWEPT + ("model", "weights"), out="upi_out/transfer",
                        help="each model's UPI evaluated on every model: transfer.json, transfer.png")
    p.add_argument("--models", required=True, action="extend", type=_model_list,
                   help="comma list of SPEC=WEIGHTS (or SPEC alone), e.g. torchvision:resnet18=r18.safetensors,"
                        "torchvision:mobilenet_v2=mnv2.safetensors; may be repeated. --num-classes, --mean, --std "
                        "and --size apply to every model")
    eps = p.add_mutually_exclusive_group(required=True)
    eps.add_argument("--eps", type=_positive_float("--eps"), help="radius in model units (pixels in [0, 1])")
    eps.add_argument("--eps-pixels", type=_positive_float("--eps-pixels"),
                     help="per-pixel budget on the 0-255 scale (Linf: the bound; L2: RMS per pixel)")
    p.add_argument("--method", choices=("grad", "pca", "pca+"), default="grad", help="the UPI of every source model")


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
    p.add_argument("--fast", choices=("off", "on", "autotune"), default="off",
                   help="attack steps / directions through the prepared step of upi_fast.accel (BatchNorm folded, "
                        "exact piecewise-linear HVP where it applies; autotune: also the fastest layout, timed on the "
                        "first batch)")

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
        from .pipeline import evaluate_file
        evaluate_file(args.perturbation, args.data, args.model, args.weights, args.num_classes, args.mean, args.std,
                      args.size, args.eval_samples, args.batch_size, args.saliency, args.target_kind, args.k,
                      args.device, args.seed, args.out, integration=args.integration, **_saliency_extras(args))
    elif args.command == "show":
        from .pipeline import show
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
