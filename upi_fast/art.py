"""UPI-Grad and UPI-PCA as attacks of the Adversarial Robustness Toolbox (ART).

ART is an optional dependency (``pip install adversarial-robustness-toolbox``): ``import upi_fast``
never imports it, and this module raises an ImportError saying how to install it when it is missing.

* :class:`UPIGradAttack` -- :class:`upi_fast.UPIGrad` as an ``art.attacks.EvasionAttack``.
* :class:`UPIPCAAttack` -- :class:`upi_fast.UPIPCA` as an ``art.attacks.EvasionAttack``.
* :func:`art_model` -- an ART ``PyTorchClassifier`` as a plain ``nn.Module`` of ART inputs (its
  preprocessing followed by its model), the network the attacks differentiate.

Both are universal attacks in the style of ART's ``UniversalPerturbation``: ``generate(x, y)``
computes ONE perturbation ``delta`` from all of ``x`` (and the labels ``y``, default: the
classifier's predictions) and returns ``clip(x + delta)``; the perturbation is kept as ``noise``
(shape ``(1, *x.shape[1:])``, ART's convention) and ``delta_`` (``x.shape[1:]``), and
``perturb(x_new)`` applies it to other images without fitting again.

Units. Everything is in ART's input units, the units of ``x``, ``clip_values`` and the classifier's
``preprocessing`` input (as for every ART attack): ``eps`` bounds ``||delta||_2`` or
``||delta||_inf`` in those units, and ``noise_std``, ``lr`` and an integrated-gradients
``baseline`` are in them too. The attack differentiates the classifier *through* its
preprocessing: with ``preprocessing=(mean, std)`` the network is ``model((x - mean) / std)``, so the
saliency maps are ``d p_y / d x`` of ART inputs, as ART's own ``class_gradient`` returns them. With
a scalar ``std`` this is ``std`` times the UPI of the bare model on the preprocessed images with
``eps / std`` in model units (the saliency maps are L1-normalised, so their scale drops out): exactly
so in float32 when ``std`` is a power of two and ``noise_std=0`` (tests/test_art.py), otherwise up
to the rounding of the preprocessing and of the smoothing noise (which, the maps of ReLU networks
being piecewise, can move single samples' directions across a kink). Preprocessing defences must be
PyTorch ones (``PreprocessorPyTorch``, differentiable by autograd); postprocessing defences act on
predictions only and are ignored by the fit (``predict`` still applies them). The model must return
logits (upi_fast applies the softmax itself for ``target_kind="prob"``). ``channels_first=False``
classifiers are handled by a transpose: the solver sees (N, C, H, W) images, ``noise`` and the
returned images are in ``x``'s (N, H, W, C) layout.

The solver uses only the samples that the classifier assigns to ``y`` (with the default ``y``,
all of them), as :class:`upi_fast.UPIGrad` and :class:`upi_fast.UPIPCA` do; ``clip_values`` are
applied to the result, not during the fit.

Example::

    from art.estimators.classification import PyTorchClassifier
    from upi_fast.art import UPIPCAAttack

    clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                            nb_classes=10, clip_values=(0.0, 1.0), preprocessing=(mean, std))
    attack = UPIPCAAttack(clf, eps=2.0)
    x_adv = attack.generate(x)            # (N, 3, 32, 32) float32, clip(x + attack.noise)
    attack.dissimilarity_, attack.fooling_rate   # saliency change, label flips on x
    x_new_adv = attack.perturb(x_new)     # the same perturbation on other images
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from art.attacks.attack import EvasionAttack
    from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
    from art.estimators.classification.pytorch import PyTorchClassifier
except ImportError as _e:  # pragma: no cover - exercised in a subprocess by tests/test_art.py
    raise ImportError("upi_fast.art needs the Adversarial Robustness Toolbox: "
                      "pip install adversarial-robustness-toolbox (or pip install upi_fast[art])") from _e

from .evaluate import evaluate
from .saliency import METHODS
from .solvers import UPIPCA, UPIGrad

__all__ = ["UPIGradAttack", "UPIPCAAttack", "ARTModel", "art_model"]

#: Norms the attacks accept (ART's spellings): 2 or infinity.
NORMS = (2, "2", np.inf, "inf")


# --------------------------------------------------------------------------------------------- the network
class ARTModel(nn.Module):
    """An ART ``PyTorchClassifier`` as a function of ART inputs: ``model(preprocess(x))``.

    ``preprocess`` chains the classifier's preprocessing operations that apply at prediction
    (preprocessing defences, then the ``preprocessing=(mean, std)`` standardisation), each by its
    differentiable PyTorch ``forward``, exactly as ART chains them in ``class_gradient``. For a
    ``channels_first=False`` classifier the input is (B, C, H, W) and is transposed to
    (B, H, W, C) first, so that upi_fast's (B, C, H, W) convention holds on both sides.

    Args:
        estimator: the ART classifier (its ``model`` returns logits (B, K)).

    The module holds ``estimator.model`` as a submodule (same parameters, same device); the
    preprocessing operations are read from the estimator at construction.
    """

    def __init__(self, estimator: PyTorchClassifier) -> None:
        super().__init__()
        if not isinstance(estimator, PyTorchClassifier):
            raise TypeError(f"estimator must be an art.estimators.classification.PyTorchClassifier, "
                            f"got {type(estimator).__name__}")
        ops = list(estimator.preprocessing_operations or [])
        bad = [type(p).__name__ for p in ops if not isinstance(p, PreprocessorPyTorch)]
        if bad:
            raise ValueError(f"estimator has preprocessing that is not differentiable in PyTorch ({bad}); the UPI "
                             "attacks differentiate through the preprocessing: use PyTorch preprocessors "
                             "(art.defences.preprocessor.*PyTorch) or preprocessing=(mean, std)")
        self.model = estimator.model
        self._ops = [p for p in ops if p.apply_predict]
        self.channels_last = not estimator.channels_first
        self.training = False  # this wrapper only; the solvers run the model in eval mode and restore its mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of images ``x`` (B, C, H, W) in ART input units."""
        if self.channels_last:
            if x.dim() != 4:
                raise ValueError(f"a channels_first=False classifier needs images (B, C, H, W) here, "
                                 f"got {tuple(x.shape)}")
            x = x.permute(0, 2, 3, 1)
        for p in self._ops:
            x, _ = p.forward(x, None)
        return self.model(x)

    def extra_repr(self) -> str:
        """The preprocessing chain and layout, for ``repr(module)``."""
        return f"preprocessing={[type(p).__name__ for p in self._ops]}, channels_last={self.channels_last}"


def art_model(estimator: PyTorchClassifier) -> ARTModel:
    """The classifier ``estimator`` as an ``nn.Module`` of ART inputs (see :class:`ARTModel`):
    ``upi_fast.evaluate(art_model(clf), delta, (X, y))`` evaluates a perturbation in ART units."""
    return ARTModel(estimator)


# --------------------------------------------------------------------------------------------- checks
def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive_int(name: str, v: Any) -> None:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"The argument `{name}` must be a positive integer, got {v!r}.")


def _positive_number(name: str, v: Any, allow_zero: bool = False, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not _is_number(v) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"The argument `{name}` must be a {'non-negative' if allow_zero else 'positive'} finite "
                         f"number{' or None' if allow_none else ''}, got {v!r}.")


def _labels(y: Any, n: int, nb_classes: int) -> np.ndarray:
    """Class indices (n,) int64 from ART labels: indices (n,) or (n, 1), or one-hot / scores (n, K)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == nb_classes and nb_classes > 1:
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
            raise ValueError("y (one-hot labels) must hold finite numbers")
        idx = np.argmax(y, axis=1)
    elif y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        idx = y.reshape(-1)
        whole_floats = (np.issubdtype(idx.dtype, np.floating) and bool(np.all(np.isfinite(idx)))
                        and bool(np.all(idx == np.round(idx))))
        if not (np.issubdtype(idx.dtype, np.integer) or whole_floats):
            raise ValueError(f"y (index labels) must hold integers, got dtype {y.dtype}")
    else:
        raise ValueError(f"y must be class indices (N,) or (N, 1), or one-hot labels (N, {nb_classes}); "
                         f"got shape {y.shape}")
    if idx.shape[0] != n:
        raise ValueError(f"y has {idx.shape[0]} labels but x has {n} samples")
    idx = idx.astype(np.int64)
    if n and (idx.min() < 0 or idx.max() >= nb_classes):
        raise ValueError(f"y has labels outside [0, {nb_classes - 1}] (min {idx.min()}, max {idx.max()})")
    return idx


# --------------------------------------------------------------------------------------------- the attacks
class _UPIAttack(EvasionAttack):
    """What both UPI attacks share: parameters, label handling, units, clipping and the results."""

    attack_params = EvasionAttack.attack_params + [
        "eps", "norm", "saliency", "target_kind", "dissimilarity", "saliency_kwargs", "noise_std", "hvp",
        "batch_size", "seed", "verbose", "solver_kwargs",
    ]
    _estimator_requirements = (PyTorchClassifier,)
    _solver_cls: type = UPIPCA
    _own_params: tuple[str, ...] = ()

    def __init__(self, classifier: PyTorchClassifier, eps: float, norm: int | float | str = 2,
                 saliency: str = "simple", target_kind: str = "prob", dissimilarity: str = "l2",
                 saliency_kwargs: dict | None = None, noise_std: float | None = None, hvp: str = "double_backward",
                 batch_size: int = 128, seed: int = 0, verbose: bool = False,
                 solver_kwargs: dict | None = None) -> None:
        super().__init__(estimator=classifier)
        self.eps, self.norm, self.saliency, self.target_kind = eps, norm, saliency, target_kind
        self.dissimilarity, self.saliency_kwargs = dissimilarity, saliency_kwargs
        self.noise_std, self.hvp = noise_std, hvp
        self.batch_size, self.seed, self.verbose, self.solver_kwargs = batch_size, seed, verbose, solver_kwargs
        self._noise: np.ndarray | None = None
        self._fooling_rate: float | None = None
        self._dissimilarity: float | None = None
        self.delta_: torch.Tensor | None = None
        self.solver_: UPIGrad | UPIPCA | None = None
        self.model_: ARTModel | None = None

    # -- results ----------------------------------------------------------------------------------
    @property
    def noise(self) -> np.ndarray | None:
        """The universal perturbation of the last :meth:`generate`: float32 (1, *x.shape[1:]) in ART
        input units and ``x``'s layout (None before)."""
        return self._noise

    @property
    def fooling_rate(self) -> float | None:
        """Fraction of the last ``generate``'s samples whose predicted class on the returned
        (clipped) images differs from ``y`` (ART's definition; a UPI is not meant to change labels)."""
        return self._fooling_rate

    @property
    def dissimilarity_(self) -> float | None:
        """Mean relative L2 change ``||I(x_adv) - I(x)|| / ||I(x)||`` of the saliency maps on the last
        ``generate``'s samples that the classifier assigns to ``y``, as :func:`upi_fast.evaluate`
        measures it (dimensionless; with the clipping applied)."""
        return self._dissimilarity

    # -- parameters -------------------------------------------------------------------------------
    def _solver_args(self) -> dict:
        common = dict(eps=float(self.eps), norm=self.norm, saliency=self.saliency, target_kind=self.target_kind,
                      dissimilarity=self.dissimilarity, saliency_kwargs=self.saliency_kwargs,
                      noise_std=None if self.noise_std is None else float(self.noise_std), hvp=self.hvp,
                      batch_size=int(self.batch_size), seed=int(self.seed), progress=bool(self.verbose))
        common.update({k: getattr(self, k) for k in self._own_params})
        common.update(self.solver_kwargs or {})
        return common

    def _make_solver(self, model: nn.Module) -> UPIGrad | UPIPCA:
        try:
            return self._solver_cls(model, **self._solver_args())
        except (TypeError, ValueError) as e:
            raise ValueError(f"{type(self).__name__}: {e}") from e

    def _check_params(self) -> None:
        super()._check_params()
        _positive_number("eps", self.eps)
        if not any(self.norm == n and type(self.norm) is not bool for n in NORMS):
            raise ValueError(f"The argument `norm` must be 2 or np.inf (or '2', 'inf'), got {self.norm!r}.")
        _positive_number("noise_std", self.noise_std, allow_zero=True, allow_none=True)
        _positive_int("batch_size", self.batch_size)
        if not _is_int(self.seed):
            raise ValueError(f"The argument `seed` must be an integer, got {self.seed!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError(f"The argument `verbose` must be a bool, got {self.verbose!r}.")
        if self.saliency not in METHODS:
            raise ValueError(f"The argument `saliency` must be one of {METHODS}, got {self.saliency!r}.")
        if self.saliency_kwargs is not None and not isinstance(self.saliency_kwargs, dict):
            raise ValueError(f"The argument `saliency_kwargs` must be a dict or None, got {self.saliency_kwargs!r}.")
        if self.solver_kwargs is not None:
            if not isinstance(self.solver_kwargs, dict):
                raise ValueError(f"The argument `solver_kwargs` must be a dict or None, got {self.solver_kwargs!r}.")
            clash = sorted(k for k in self.solver_kwargs
                           if k in self.attack_params or k in ("model", "progress"))
            if clash:
                raise ValueError(f"The argument `solver_kwargs` repeats {clash}: set them as attack parameters "
                                 f"(`verbose` for progress; the model is the classifier's).")
            known = set(inspect.signature(self._solver_cls).parameters)
            unknown = sorted(set(self.solver_kwargs) - known)
            if unknown:
                raise ValueError(f"The argument `solver_kwargs` has keys {unknown} that "
                                 f"{self._solver_cls.__name__} does not take; it takes {sorted(known)}.")
        # every remaining option (saliency, target_kind, dissimilarity, hvp, the method's own, solver_kwargs)
        # is checked by the solver itself; its error names the argument
        self._make_solver(ARTModel(self.estimator))

    # -- the attack -------------------------------------------------------------------------------
    def _check_x(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise ValueError(f"x must be a real-valued array, got dtype {x.dtype}")
        shape = tuple(self.estimator.input_shape)
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, shape))}) (the classifier's input_shape), "
                             f"got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("x is empty (0 samples)")
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or Inf values")
        return x.astype(np.float32, copy=False)

    def _to_nchw(self, a: np.ndarray) -> np.ndarray:
        """(N, H, W, C) -> (N, C, H, W) for a channels-last classifier (identity otherwise)."""
        return np.moveaxis(a, -1, 1) if not self.estimator.channels_first else a

    def _clip(self, x: np.ndarray) -> np.ndarray:
        clip = self.estimator.clip_values
        if clip is None:
            return x
        return np.clip(x, np.asarray(clip[0], dtype=np.float32), np.asarray(clip[1], dtype=np.float32))

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
        """Fit one universal perturbation on ``x`` and return ``clip(x + noise)``.

        Args:
            x: images (N, *input_shape) in ART input units (the classifier's layout).
            y: labels: class indices (N,) / (N, 1) or one-hot (N, K); default the classifier's
                predictions. Samples the classifier does not assign to ``y`` take no part in the fit.
            kwargs: none are accepted (ValueError).

        Returns:
            float32 array of ``x``'s shape: ``x + noise`` clipped to the classifier's ``clip_values``.
            Afterwards ``noise``, ``delta_``, ``fooling_rate``, ``dissimilarity_``, ``solver_`` (the
            fitted :class:`upi_fast.UPIGrad` / :class:`upi_fast.UPIPCA`, whose ``delta_`` is in
            ART units, (C, H, W) layout) and ``model_`` (the :class:`ARTModel` it attacked) are set.
        """
        if kwargs:
            raise ValueError(f"{type(self).__name__}.generate accepts no keyword arguments besides y, "
                             f"got {sorted(kwargs)}")
        x = self._check_x(x)
        if y is None:
            y_idx = np.argmax(self.estimator.predict(x, batch_size=int(self.batch_size)), axis=1).astype(np.int64)
        else:
            y_idx = _labels(y, x.shape[0], int(self.estimator.nb_classes))
        model = ARTModel(self.estimator)
        solver = self._make_solver(model)
        X = torch.from_numpy(np.ascontiguousarray(self._to_nchw(x)))
        Y = torch.from_numpy(y_idx)
        solver.fit((X, Y))
        delta = solver.delta_.detach().float().cpu()  # (C, H, W), ART units
        noise = delta.numpy()[None]
        if not self.estimator.channels_first:
            noise = np.moveaxis(noise, 1, -1)
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        x_adv = self._clip(x + noise).astype(np.float32, copy=False)

        preds = np.argmax(self.estimator.predict(x_adv, batch_size=int(self.batch_size)), axis=1)
        self._fooling_rate = float(np.mean(preds != y_idx))
        self._dissimilarity = self._measure(model, X, Y, delta)
        self._noise, self.delta_ = noise, torch.from_numpy(noise[0].copy())
        self.solver_, self.model_ = solver, model
        return x_adv

    def _clip_nchw(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``clip_values`` as float32 tensors of the solver's per-sample (C, H, W) ``shape`` (None: no clipping)."""
        clip = self.estimator.clip_values
        if clip is None:
            return None
        lay = tuple(self.estimator.input_shape)
        out = []
        for v in clip:
            a = np.broadcast_to(np.asarray(v, dtype=np.float32), lay)
            a = np.moveaxis(a, -1, 0) if not self.estimator.channels_first else a
            out.append(torch.from_numpy(np.ascontiguousarray(a)).reshape(shape))
        return out[0], out[1]

    def _measure(self, model: ARTModel, X: torch.Tensor, Y: torch.Tensor, delta: torch.Tensor) -> float:
        """Mean relative L2 saliency change of ``clip(X + delta)`` against ``X`` ((N, C, H, W), ART units) over
        the samples the classifier assigns to ``Y`` (:func:`upi_fast.evaluate`)."""
        clip = self._clip_nchw(tuple(delta.shape))

        def perturbation(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            d = delta.to(xb.device, xb.dtype)
            if clip is None:
                return d.expand_as(xb)
            lo, hi = (c.to(xb.device, xb.dtype) for c in clip)
            return torch.minimum(torch.maximum(xb + d, lo), hi) - xb

        res = evaluate(model, perturbation, (X, Y), saliency=self.saliency, target_kind=self.target_kind,
                       metrics=("dissimilarity",), batch_size=int(self.batch_size),
                       saliency_kwargs=self.saliency_kwargs, seed=int(self.seed))
        return float(res["dissimilarity"])

    def perturb(self, x: np.ndarray) -> np.ndarray:
        """``clip(x + noise)`` for new images ``x`` (N, *input_shape) with the perturbation of the last
        :meth:`generate` (no new fit): float32 of ``x``'s shape."""
        if self._noise is None:
            raise ValueError(f"{type(self).__name__}.perturb: call generate first (there is no perturbation yet)")
        x = self._check_x(x)
        return self._clip(x + self._noise).astype(np.float32, copy=False)


class UPIPCAAttack(_UPIAttack):
    """UPI-PCA (:class:`upi_fast.UPIPCA`) as an ART evasion attack: one universal perturbation that
    changes the classifier's gradient saliency maps, from the top singular vector of the per-sample
    attack directions of ``x``.

    Args:
        classifier: an ART ``PyTorchClassifier`` whose model returns logits.
        eps: radius of the norm ball, in ART input units (> 0).
        norm: 2 (the paper's) or ``np.inf`` (``"2"`` / ``"inf"`` too).
        saliency: ``"simple"``, ``"integrated"``, ``"smoothgrad"`` or ``"grad_x_input"``
            (:data:`upi_fast.saliency.METHODS`).
        target_kind: ``"prob"`` or ``"logit"`` (the latter needs a smooth network, see
            :class:`upi_fast.UPIGrad`'s ``surrogate``, settable through ``solver_kwargs``).
        dissimilarity: the attack loss, ``"l2"``, ``"rel_l2"``, ``"cosine"`` or ``"topk"``.
        saliency_kwargs: extra saliency options (``steps``, ``baseline`` in ART units, ...).
        noise_std: smoothing noise std in ART units (default ``||Z||_2 ~ 0.1 eps``); 0 disables it.
        hvp: Hessian-vector product mode (:data:`upi_fast.HVP_MODES`).
        batch_size: samples per direction batch (and per ``predict`` call).
        seed: seeds the noise, sketches and random starts: same seed, same ``noise``.
        verbose: show progress bars.
        plus_lambda: PCA+ weight (None: plain UPI-PCA).
        rounds: rounds of direction collection (>= 1).
        normalize_rows: scale every direction to unit norm before the SVD.
        solver: how the top singular vector is found (:class:`upi_fast.UPIPCA`'s ``solver``).
        solver_kwargs: any other :class:`upi_fast.UPIPCA` argument (e.g. ``fast``, ``precision``,
            ``device``).

    Attributes (after ``generate``): ``noise`` (1, *input_shape) float32, ``delta_`` (input_shape)
    float32 tensor, ``fooling_rate``, ``dissimilarity_``, ``solver_``, ``model_``.
    """

    attack_params = _UPIAttack.attack_params + ["plus_lambda", "rounds", "normalize_rows", "solver"]
    _solver_cls = UPIPCA
    _own_params = ("plus_lambda", "rounds", "normalize_rows", "solver")

    def __init__(self, classifier: PyTorchClassifier, eps: float, norm: int | float | str = 2,
                 saliency: str = "simple", target_kind: str = "prob", dissimilarity: str = "l2",
                 saliency_kwargs: dict | None = None, noise_std: float | None = None, hvp: str = "double_backward",
                 batch_size: int = 128, seed: int = 0, verbose: bool = False, plus_lambda: float | None = None,
                 rounds: int = 1, normalize_rows: bool = True, solver: str = "auto",
                 solver_kwargs: dict | None = None) -> None:
        super().__init__(classifier, eps, norm, saliency, target_kind, dissimilarity, saliency_kwargs, noise_std, hvp,
                         batch_size, seed, verbose, solver_kwargs)
        self.plus_lambda, self.rounds, self.normalize_rows, self.solver = plus_lambda, rounds, normalize_rows, solver
        self._check_params()

    def _check_params(self) -> None:
        _positive_int("rounds", self.rounds)
        _positive_number("plus_lambda", self.plus_lambda, allow_zero=True, allow_none=True)
        if not isinstance(self.normalize_rows, bool):
            raise ValueError(f"The argument `normalize_rows` must be a bool, got {self.normalize_rows!r}.")
        super()._check_params()


class UPIGradAttack(_UPIAttack):
    """UPI-Grad (:class:`upi_fast.UPIGrad`) as an ART evasion attack: one universal perturbation that
    changes the classifier's gradient saliency maps, by projected stochastic gradient ascent over ``x``
    (started, by default, from the UPI-PCA perturbation of ``x``).

    Args:
        classifier, eps, norm, saliency, target_kind, dissimilarity, saliency_kwargs, noise_std, hvp,
            batch_size, seed, verbose: as :class:`UPIPCAAttack` (``batch_size``: samples per step).
        epochs: passes over ``x``.
        lr: initial step size in ART units (default: :class:`upi_fast.UPIGrad`'s rule, a fraction of eps).
        optimizer: ``"normalized"``, ``"sign"`` or ``"adam"``.
        init: ``"pca"`` (start from UPI-PCA, keep the better of start and result on ``x``) or ``"random"``.
        solver_kwargs: any other :class:`upi_fast.UPIGrad` argument (e.g. ``lr_schedule``,
            ``preserve_labels``, ``surrogate``, ``fast``, ``device``).

    Attributes (after ``generate``): as :class:`UPIPCAAttack`.
    """

    attack_params = _UPIAttack.attack_params + ["epochs", "lr", "optimizer", "init"]
    _solver_cls = UPIGrad
    _own_params = ("epochs", "lr", "optimizer", "init")

    def __init__(self, classifier: PyTorchClassifier, eps: float, norm: int | float | str = 2,
                 saliency: str = "simple", target_kind: str = "prob", dissimilarity: str = "l2",
                 saliency_kwargs: dict | None = None, noise_std: float | None = None, hvp: str = "double_backward",
                 batch_size: int = 128, seed: int = 0, verbose: bool = False, epochs: int = 10,
                 lr: float | None = None, optimizer: str = "normalized", init: str = "pca",
                 solver_kwargs: dict | None = None) -> None:
        super().__init__(classifier, eps, norm, saliency, target_kind, dissimilarity, saliency_kwargs, noise_std, hvp,
                         batch_size, seed, verbose, solver_kwargs)
        self.epochs, self.lr, self.optimizer, self.init = epochs, lr, optimizer, init
        self._check_params()

    def _check_params(self) -> None:
        _positive_int("epochs", self.epochs)
        _positive_number("lr", self.lr, allow_none=True)
        super()._check_params()
