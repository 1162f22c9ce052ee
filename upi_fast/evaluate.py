"""The evaluation protocol: how much a perturbation changes interpretations, on held-out data.

On the evaluation split, correctly classified samples only (and only those with a nonzero clean
map: a sample whose input gradient vanishes has no interpretation to change), with the real network:
``dissimilarity`` = mean relative L2 ``||I - I'||_2 / ||I||_2``, ``topk_intersection`` (mean),
``spearman`` (mean rank correlation), ``center_of_mass_shift`` (mean, pixels) and
``fooling_rate`` (fraction of those samples whose predicted label changes under the
perturbation: lower is better, the goal is the explanation, not the label).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from . import metrics as M
from ._checks import DeviceLike, ModelLike, check_model, eval_mode
from .data import as_batches
from .hvp import SaliencySpec
from .saliency import postprocess_maps, raw_gradient
from .solvers._common import model_check, resolve_device

__all__ = ["evaluate", "METRICS", "SaliencyFn", "AttributionMethod", "PerturbationFn"]

#: Names of the metrics :func:`evaluate` can compute.
METRICS = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate", "center_of_mass_shift")

#: ``fn(x (B, C, H, W), y (B,)) -> maps (B, N)``: a saliency method as :func:`evaluate` uses it.
SaliencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``fn(x (B, C, H, W), y (B,)) -> delta (B, C, H, W)``: per-sample perturbations.
PerturbationFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class AttributionMethod(Protocol):
    """Anything with captum's calling convention: ``attribute(inputs, target=...)``.

    ``inputs`` is a (B, C, H, W) tensor (with ``requires_grad``), ``target`` a (B,) int64 tensor of
    class indices; the result must be the raw attributions, a tensor of the same shape as
    ``inputs``. A ``captum.attr`` object (``Saliency(model)``, ``IntegratedGradients(model)``, ...)
    qualifies; captum itself is not needed by upi_fast.
    """

    def attribute(self, inputs: torch.Tensor, target: Any = None) -> torch.Tensor:
        """Raw attributions of ``inputs`` (B, C, H, W) for the classes ``target`` (B,), same shape."""
        ...


@contextlib.contextmanager
def _seeded_global_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with the global RNG of the CPU (and of ``device`` when it is a GPU) seeded with
    ``seed``, and restore their states afterwards; no other device's RNG is touched."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:  # other accelerators: their own fork_rng, every generator seeded
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(seed)
            yield


def _saliency_fn(model: ModelLike, saliency: str | AttributionMethod, target_kind: str,
                 saliency_kwargs: dict | None) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``fn(x, y, seed) -> maps (B, N)``: a method name, or any object with ``attribute(inputs,
    target=...)`` (a captum attribution, duck-typed), whose raw attributions are post-processed
    like ours.

    Sampling attributions draw the same noise for the same ``seed`` and input shape (common random
    numbers), so that the clean and the perturbed maps of a batch differ by the perturbation only:
    the built-in smoothgrad draws from its own generator (on the input's device) seeded with
    ``seed``; an attribution object is called with the global torch RNG seeded with ``seed``
    (captum's ``NoiseTunnel`` draws from it), inside ``torch.random.fork_rng`` so that the
    caller's global RNG state is restored."""
    kw = dict(saliency_kwargs or {})
    post = kw.pop("postprocess", "abs_sum_l1")
    if hasattr(saliency, "attribute") and callable(saliency.attribute):
        def fn(x, y, seed):
            with _seeded_global_rng(x.device, seed), torch.enable_grad():
                attr = saliency.attribute(x.detach().clone().requires_grad_(True), target=y, **kw)
            if not isinstance(attr, torch.Tensor) or attr.shape != x.shape:
                raise ValueError(f"saliency.attribute returned {type(attr).__name__} "
                                 f"{tuple(getattr(attr, 'shape', ()))}, expected a tensor of shape {tuple(x.shape)}")
            return postprocess_maps(attr.detach(), post)
        return fn
    spec = SaliencySpec(method=saliency, target_kind=target_kind, postprocess=post,
                        **{k: v for k, v in kw.items() if k != "k"})
    gens: dict[torch.device, torch.Generator] = {}

    def fn(x, y, seed):
        gen = None
        if spec.stochastic:
            gen = gens.get(x.device)
            if gen is None:
                gen = gens[x.device] = torch.Generator(device=x.device)
            gen.manual_seed(seed)
        g = raw_gradient(model, x, y, spec.method, spec.target_kind, False, spec.steps, spec.baseline,
                         spec.multiply_by_input, spec.smoothgrad_std, spec.n_samples, gen,
                         integration=spec.integration)
        return postprocess_maps(g, spec.postprocess).detach()
    return fn


def evaluate(model: ModelLike, delta: torch.Tensor | PerturbationFn,
             data: Iterable[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor],
             saliency: str | AttributionMethod = "simple", target_kind: str = "prob", k: int | None = None,
             metrics: Sequence[str] = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate"),
             batch_size: int = 256, device: DeviceLike | None = None, saliency_kwargs: dict | None = None,
             return_per_sample: bool = False, seed: int = 0) -> dict[str, Any]:
    """Evaluate ``delta`` on ``data`` against ``model``'s clean interpretations.

    Args:
        model: classifier returning logits (B, K) (the real network; eval mode).
        delta: (C, H, W) perturbation in model units, or a function ``fn(x, y) -> (B, C, H, W)``
            (per-sample perturbations, e.g. :func:`upi_fast.baselines.per_sample_random`).
        data: a DataLoader of ``(x, y)`` or a tuple ``(X, y)`` (the evaluation split); images
            (N, C, H, W) in model units, labels (N,) int64.
        saliency: ``"simple"``, ``"integrated"``, ``"smoothgrad"``, or an object with
            ``attribute(inputs, target=...)`` (:class:`AttributionMethod`, e.g. a captum
            attribution such as ``captum.attr.Saliency(model)``); its raw (B, C, H, W)
            attributions are post-processed like the built-in methods' (``abs_sum_l1`` unless
            ``saliency_kwargs["postprocess"]`` says otherwise), and ``target_kind`` does not apply
            (the object decides what it differentiates).
        target_kind: ``"prob"`` or ``"logit"``.
        k: top-k size for ``topk_intersection`` (default 10% of the pixels).
        metrics: any of :data:`METRICS`.
        batch_size: samples per batch when ``data`` is a tuple.
        device: where to compute (default: the model's device).
        saliency_kwargs: ``steps``, ``baseline``, ``multiply_by_input``, ``smoothgrad_std``,
            ``n_samples``, ``postprocess``, ``integration``. With an attribution object:
            ``postprocess``, and any other key is passed to its ``attribute`` as a keyword argument
            (e.g. captum ``NoiseTunnel``'s ``nt_samples`` / ``stdevs``).
        return_per_sample: also return the per-sample values under ``"per_sample"``.
        seed: seed of the noise of a sampling saliency method (``"smoothgrad"``, or an attribution
            object that draws from the global torch RNG, such as captum's ``NoiseTunnel``). The
            clean and the perturbed maps of a batch use the same draws (common random numbers:
            batch ``i`` is computed twice from the RNG seeded with ``seed + i``), so a zero
            perturbation scores 0 and the metrics measure the perturbation, not the sampling
            noise. The caller's global RNG state is left as it was.

    Returns:
        ``{metric: mean value, ..., "n": correctly classified samples used, "n_total": samples seen}``
        (and ``"per_sample": {metric: (n,) float64 tensor}`` with ``return_per_sample``). Units:
        ``dissimilarity``, ``topk_intersection``, ``spearman`` and ``fooling_rate`` are
        dimensionless fractions / correlations; ``center_of_mass_shift`` is in pixels.
    """
    check_model(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics has unknown names {unknown}; choose from {METRICS}")
    dev = resolve_device(device, model)
    sal = _saliency_fn(model, saliency, target_kind, saliency_kwargs)
    if not callable(delta):
        if not isinstance(delta, torch.Tensor) or delta.dim() != 3:
            raise ValueError(f"delta must be a (C, H, W) tensor or a function, got "
                             f"{tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__}")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("delta contains NaN or Inf values")
        delta = delta.to(dev)
    per: dict[str, list] = {m: [] for m in metrics}
    n_total = 0
    any_correct = False
    with eval_mode(model):
        for batch, (x, y) in enumerate(as_batches(data, batch_size)):
            x, y = x.to(dev), y.to(dev)
            n_total += x.shape[0]
            if not callable(delta) and tuple(delta.shape) != tuple(x.shape[1:]):
                raise ValueError(f"delta has shape {tuple(delta.shape)} but the images have shape {tuple(x.shape[1:])}")
            logits = model_check(model, x, y)  # clear errors: images that do not fit, NaN logits, bad labels
            keep = logits.argmax(1) == y
            if not bool(keep.any()):
                continue
            x, y = x[keep], y[keep]
            d = delta(x, y) if callable(delta) else delta
            x_adv = x + d.to(x.dtype)
            I, I_adv = sal(x, y, seed + batch), sal(x_adv, y, seed + batch)  # the same noise draws
            any_correct = True
            nz = (I != 0).any(1)  # a zero clean map (vanishing input gradient): nothing to compare, left out
            if not bool(nz.any()):
                continue
            if not bool(nz.all()):
                x, y, x_adv, I, I_adv = x[nz], y[nz], x_adv[nz], I[nz], I_adv[nz]
            for m in metrics:
                if m == "dissimilarity":
                    per[m].append(M.relative_l2(I_adv, I).double())
                elif m == "topk_intersection":
                    per[m].append(M.topk_intersection(I_adv, I, k))
                elif m == "spearman":
                    per[m].append(M.spearman(I_adv, I))
                elif m == "center_of_mass_shift":
                    per[m].append(M.center_of_mass_shift(I_adv, I, shape=tuple(x.shape[2:])))
                else:
                    with torch.no_grad():
                        per[m].append((model(x_adv).argmax(1) != y).double())
    if n_total == 0:
        raise ValueError("data is empty")
    values = {m: torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.float64) for m, v in per.items()}
    n = int(next(iter(values.values())).numel()) if values else 0
    if n == 0 and any_correct:
        raise ValueError("every clean saliency map is zero: the model's output does not depend on its input in a "
                         "differentiable way (rounding, argmax or quantisation inside?)")
    if n == 0:
        raise ValueError(f"the model classifies none of the samples in data correctly ({n_total} seen), so there is no "
                         "saliency map of the true class to compare (metrics use only correctly classified "
                         "samples): untrained weights, wrong normalisation, or classes in another order than the "
                         "model's?")
    out = {m: float(v.mean()) for m, v in values.items()}
    out["n"], out["n_total"] = n, n_total
    if return_per_sample:
        out["per_sample"] = values
    return out
