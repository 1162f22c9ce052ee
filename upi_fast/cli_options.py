"""The ``upi-fast`` command line's option types and option groups: each converter checks one value
and raises :class:`CLIError` naming the option, so that every bad input is one line (see
:mod:`upi_fast.cli`)."""
from __future__ import annotations

import argparse
import math
import os

__all__ = ["CLIError"]


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

    p = _derived_parser(sub, "transfer", "compute", _NOT_SWEPT + ("model", "weights", "cache"), out="upi_out/transfer",
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
