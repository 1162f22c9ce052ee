"""Time to a strong perturbation (issue 17): how many seconds each solver needs to reach 95% of the
best universal dissimilarity found.

Solvers: UPI-PCA; UPI-Grad with the UPI-PCA start (``init="pca"``, the default) and with a random
start (``init="random"``), each without and with early stop (``patience=PATIENCE``, ``min_delta=0``).
Every run fits on the attack split (the early stop watches the attack objective the solver tracks);
the score is the mean relative L2 dissimilarity on the evaluation split.

Clock: ``time.perf_counter`` from just before ``fit`` (the clean maps, the UPI-PCA start and the
final choice of ``init="pca"`` included). The iterate after every epoch is copied (microseconds) at
the end of that epoch, with its time, and evaluated after the fit, so evaluation never runs on the
clock. A UPI-Grad curve's points: the start (when the ascent begins), the iterate after every epoch,
and the returned ``delta_`` at ``fit_time_``; UPI-PCA has one point, its ``delta_`` at ``fit_time_``.
(The copies come from wrapping the private ``_GradState.__init__`` / ``end_epoch`` of
``upi_fast.solvers.upi_grad`` for the duration of a fit; the arithmetic is unchanged.)

Reference level: 95% of the best evaluation dissimilarity of any point of any solver and seed on that
problem. ``t95``: the first time a run's curve reaches it (None: never); mean and spread over seeds
(of the seeds that reach it; how many do is reported). ``t99`` likewise for 99% of the best (a
stricter level, reported beside it).

Problems:

* ``digits``: the embedded default, as ``upi-fast demo`` runs it (``upi_fast.data.digits()`` splits,
  ``upi_fast.models.digits_cnn()``, eps = 0.1 x mean evaluation image L2 norm, UPI-Grad 20 epochs in
  batches of 32).
* ``resnet18``: torchvision ResNet-18 (4 classes) at 3 x 64 x 64 on a generated data set: 4 smooth
  random class templates (8 x 8 Gaussian fields upsampled bilinearly) plus a smooth nuisance field
  (0.7 x) and pixel noise (0.2 x). With random weights (torch seed 0) the network puts 89 of 96 of
  these images in one class (accuracy 0.28, chance 0.25; the softmax varies by about 0.015 across
  images), so only the few images that land in the right class by chance would be attacked, and
  through the saliency of a network that computes nothing about them; it is therefore trained
  briefly (Adam, lr 1e-3, TRAIN_STEPS steps of 32 on 512 images of the same generator, a few
  seconds, not on the clock; accuracy 1.0 on the attack and evaluation images). Attack 48 /
  evaluation 48 images, eps = 0.1 x mean evaluation image L2 norm, UPI-Grad 8 epochs in batches of 16.

Outputs (``--out``, default ``bench/results/<date>-cpu/``): ``time_to_strong.json`` (setup, machine,
every curve, per-solver summaries), ``time_to_strong.png`` (one panel per problem: eval dissimilarity
against fit seconds, one line per solver = mean over seeds of the step-interpolated curves, drawn
where every seed has a point, band = min-max over seeds; UPI-PCA, one point per run, as a star at
the mean with min-max bars; the 95% level as a horizontal line) and ``time_to_strong.md`` (the tables).

    python -m bench.time_to_strong [--seeds 0 1 2] [--problems digits resnet18] [--threads 2] [--out DIR]
    python -m bench.time_to_strong --replot bench/results/<date>-cpu/time_to_strong.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

# before torch loads (as ``import upi_fast`` does): spinning OpenMP threads make every fit 10-100x slower
# whenever another process competes for the cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PATIENCE = 2
TRAIN_STEPS = 15
LEVEL = 0.95
SOLVERS = ("UPI-PCA", "UPI-Grad pca", "UPI-Grad pca + early stop", "UPI-Grad random",
           "UPI-Grad random + early stop")


# ------------------------------------------------------------------------------------------ problems
def digits_problem(progress: bool = False) -> dict:
    from upi_fast.data import digits
    from upi_fast.models import digits_cnn
    splits, model = digits(), digits_cnn(progress=progress)
    Xe = splits.eval[0]
    eps = float(0.1 * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    return dict(name="digits", model=model, attack=splits.attack, eval=splits.eval, eps=eps,
                grad=dict(epochs=20, batch_size=32), pca={},
                setup=f"scikit-learn digits (1, 16, 16), attack {len(splits.attack[1])} / eval {len(splits.eval[1])}, "
                      f"digits_cnn, eps {eps:.4f} (L2, 0.1 x mean eval norm), UPI-Grad 20 epochs x batch 32")


def _generate(n: int, templates: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.randint(0, templates.shape[0], (n,), generator=g)
    low = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=64, mode="bilinear", align_corners=False)
    return templates[c] + 0.7 * low + 0.2 * torch.randn(n, 3, 64, 64, generator=g), c


def resnet18_problem(classes: int = 4, n_attack: int = 48, n_eval: int = 48) -> dict:
    import torchvision
    g = torch.Generator().manual_seed(0)
    templates = F.interpolate(torch.randn(classes, 3, 8, 8, generator=g), size=64, mode="bilinear",
                              align_corners=False)
    Xt, yt = _generate(512, templates, g)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=classes)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.perf_counter()
    model.train()
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, Xt.shape[0], (32,), generator=g)
        loss = F.cross_entropy(model(Xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    train_s = time.perf_counter() - t0
    X, y = _generate(n_attack + n_eval, templates, g)
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).float().mean())
    Xa, ya, Xe, ye = X[:n_attack], y[:n_attack], X[n_attack:], y[n_attack:]
    eps = float(0.1 * Xe.reshape(n_eval, -1).norm(dim=1).mean())
    return dict(name="resnet18", model=model, attack=(Xa, ya), eval=(Xe, ye), eps=eps,
                grad=dict(epochs=8, batch_size=16), pca={},
                setup=f"torchvision ResNet-18 ({classes} classes, trained {TRAIN_STEPS} Adam steps in {train_s:.0f} s, "
                      f"final loss {float(loss):.2g}, accuracy {acc:.3f} on attack+eval), generated (3, 64, 64), "
                      f"attack {n_attack} / eval {n_eval}, eps {eps:.3f} (L2, 0.1 x mean eval norm), "
                      "UPI-Grad 8 epochs x batch 16")


PROBLEMS = {"digits": digits_problem, "resnet18": resnet18_problem}


# ------------------------------------------------------------------------------------------ tracing
@contextlib.contextmanager
def traced(points: list, t0: list):
    """While active, every UPI-Grad run appends ``(seconds since t0[0], epoch, delta copy)`` when its
    ascent starts and after every epoch."""
    from upi_fast.solvers import upi_grad as G
    init, end = G._GradState.__init__, G._GradState.end_epoch

    def new_init(self, delta, *a, **kw):
        init(self, delta, *a, **kw)
        points.append((time.perf_counter() - t0[0], 0, delta.detach().float().cpu().clone()))

    def new_end(self):
        end(self)
        points.append((time.perf_counter() - t0[0], self.epoch, self.delta.detach().float().cpu().clone()))

    G._GradState.__init__, G._GradState.end_epoch = new_init, new_end
    try:
        yield
    finally:
        G._GradState.__init__, G._GradState.end_epoch = init, end


def make_solver(name: str, P: dict, seed: int):
    from upi_fast.solvers import UPIGrad, UPIPCA
    if name == "UPI-PCA":
        return UPIPCA(P["model"], P["eps"], seed=seed, progress=False, **P["pca"])
    init = "pca" if " pca" in name else "random"
    es = dict(patience=PATIENCE) if name.endswith("early stop") else {}
    return UPIGrad(P["model"], P["eps"], init=init, seed=seed, progress=False, **P["grad"], **es)


def run_one(name: str, P: dict, seed: int) -> dict:
    from upi_fast import evaluate
    points, t0 = [], [0.0]
    solver = make_solver(name, P, seed)
    with traced(points, t0):
        t0[0] = time.perf_counter()
        solver.fit(P["attack"])
        wall = time.perf_counter() - t0[0]
    points.append((wall, None, solver.delta_.detach().float().cpu()))  # the returned perturbation
    score = lambda d: float(evaluate(P["model"], d, P["eval"], metrics=("dissimilarity",))["dissimilarity"])
    curve = [[round(t, 4), ep, score(d)] for t, ep, d in points]
    return {"seed": seed, "curve": curve, "fit_s": wall, "final": curve[-1][2],
            "stopped_epoch": getattr(solver, "stopped_epoch_", None),
            "epochs_run": len(getattr(solver, "epoch_history_", [])) or None,
            "refined": getattr(solver, "refined_", None)}


def warm_up(P: dict) -> None:
    """One untimed short fit of each solver (first-call costs: lazy imports, the fast step's checks)."""
    from upi_fast import evaluate
    from upi_fast.solvers import UPIGrad, UPIPCA
    UPIPCA(P["model"], P["eps"], progress=False, **P["pca"]).fit(P["attack"])
    g = UPIGrad(P["model"], P["eps"], progress=False, **{**P["grad"], "epochs": 1}).fit(P["attack"])
    evaluate(P["model"], g.delta_, P["eval"], metrics=("dissimilarity",))


def t_reach(curve: list, level: float) -> float | None:
    return next((t for t, _, v in curve if v >= level), None)


def _stats(vals: list) -> dict:
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals)}


def summarise(runs: dict) -> tuple[float, dict]:
    best = max(v for rs in runs.values() for r in rs for _, _, v in r["curve"])
    level = LEVEL * best
    out = {}
    for name, rs in runs.items():
        for r in rs:
            r["t95"] = t_reach(r["curve"], level)
            r["t99"] = t_reach(r["curve"], 0.99 * best)
        out[name] = {"t95": _stats([r["t95"] for r in rs]), "t99": _stats([r["t99"] for r in rs]),
                     "final": _stats([r["final"] for r in rs]),
                     "fit_s": _stats([r["fit_s"] for r in rs]), "seeds": len(rs),
                     "stopped_epochs": [r["stopped_epoch"] for r in rs]}
    return best, out


# ------------------------------------------------------------------------------------------ outputs
def _fmt(s: dict, digits: int = 2) -> str:
    if s["mean"] is None:
        return "never"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def table(problem: str, best: float, summary: dict, n_seeds: int) -> str:
    lines = [f"**{problem}**: best eval dissimilarity {best:.4f}, 95% level {LEVEL * best:.4f}", "",
             "| solver | seeds reaching 95% | seconds to 95% (mean ± sd, min–max) | seconds to 99% (seeds) | "
             "final eval dissim. | fit seconds | early-stop epoch per seed |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        stops = ", ".join("-" if e is None else str(e) for e in s["stopped_epochs"])
        t99 = _fmt(s["t99"]) + f" ({s['t99']['n']}/{n_seeds})"
        lines.append(f"| {name} | {s['t95']['n']}/{n_seeds} | {_fmt(s['t95'])} | {t99} | {_fmt(s['final'], 4)} | "
                     f"{_fmt(s['fit_s'])} | {stops} |")
    return "\n".join(lines)


def _mean_curve(rs: list, grid: list) -> tuple[list, list, list]:
    """Step-interpolated curves on ``grid``, mean, min and max over the runs, where every run has a
    value: from the last run's first point to the last run's end (a run that ended holds its result)."""
    mean, lo, hi = [], [], []
    end = max(r["fit_s"] for r in rs)
    for t in grid:
        vals = []
        if t > end:
            mean.append(math.nan), lo.append(math.nan), hi.append(math.nan)
            continue
        for r in rs:
            have = [v for tt, _, v in r["curve"] if tt <= t]
            if have:
                vals.append(have[-1])
        ok = len(vals) == len(rs)
        mean.append(statistics.fmean(vals) if ok else math.nan)
        lo.append(min(vals) if ok else math.nan)
        hi.append(max(vals) if ok else math.nan)
    return mean, lo, hi


def plot(results: dict, path: str, n_seeds: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    probs = list(results)
    fig, axes = plt.subplots(1, len(probs), figsize=(6.5 * len(probs), 4.8), squeeze=False)
    for ax, p in zip(axes[0], probs):
        R = results[p]
        ts = [t for rs in R["runs"].values() for r in rs for t, _, _ in r["curve"]]
        lo_t, hi_t = max(min(ts), 1e-3), max(ts)
        grid = [lo_t * (hi_t / lo_t) ** (i / 299) for i in range(300)]
        for name, rs in R["runs"].items():
            if all(len(r["curve"]) == 1 for r in rs):  # one point per run (UPI-PCA): mean, bars = min-max
                t = [r["curve"][0][0] for r in rs]
                v = [r["curve"][0][2] for r in rs]
                tm, vm = statistics.fmean(t), statistics.fmean(v)
                ax.errorbar([tm], [vm], xerr=[[tm - min(t)], [max(t) - tm]], yerr=[[vm - min(v)], [max(v) - vm]],
                            fmt="*", ms=10, capsize=3, label=f"{name} (one point per run)")
                continue
            mean, lo, hi = _mean_curve(rs, grid)
            style = "--" if name.endswith("early stop") else "-"
            line, = ax.plot(grid, mean, style, label=name, lw=1.8)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.12)
            ends = statistics.fmean(r["fit_s"] for r in rs)
            ax.plot([ends], [statistics.fmean(r["final"] for r in rs)], "o" if style == "-" else "s",
                    color=line.get_color(), ms=4, mfc="none" if style == "-" else None)
        ax.axhline(R["level"], color="k", lw=1, ls=":", label=f"95% of best ({R['level']:.3f})")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, 2, 5 s
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short decade
        ax.set_xlabel("fit wall time [s] (evaluation excluded; log scale)")
        ax.set_ylabel("eval rel. L2 dissimilarity [dimensionless]")
        ax.set_title(p, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Time to a strong perturbation: mean over {n_seeds} seeds "
                 "(band min-max, marker = mean end and final value)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--replot", metavar="JSON", help="only redraw the figure of an earlier run's JSON (beside it)")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            saved = json.load(fh)
        plot(saved["problems"], os.path.join(os.path.dirname(os.path.abspath(args.replot)), "time_to_strong.png"),
             len(saved["machine"]["seeds"]))
        return 0
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.harness import machine_info, results_dir, write_json
    out = args.out or results_dir("cpu")
    os.makedirs(out, exist_ok=True)
    t_all = time.perf_counter()
    results, texts = {}, []
    for pname in args.problems:
        P = PROBLEMS[pname]()
        print(f"{pname}: {P['setup']}", flush=True)
        warm_up(P)
        runs = {name: [] for name in SOLVERS}
        for seed in args.seeds:
            for name in SOLVERS:
                r = run_one(name, P, seed)
                runs[name].append(r)
                print(f"  seed {seed} {name:<30} fit {r['fit_s']:6.2f} s  final {r['final']:.4f}  "
                      f"stopped {r['stopped_epoch']}", flush=True)
        best, summary = summarise(runs)
        results[pname] = {"setup": P["setup"], "eps": P["eps"], "best": best, "level": LEVEL * best,
                          "summary": summary, "runs": runs}
        texts.append(table(pname, best, summary, len(args.seeds)))
        print("\n" + texts[-1] + "\n", flush=True)
    load = os.getloadavg()[0]
    info = {**machine_info("cpu"), "load_avg_1min_end": load, "total_s": time.perf_counter() - t_all,
            "command": "python -m bench.time_to_strong " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": args.seeds, "patience": PATIENCE, "level": LEVEL}
    write_json(os.path.join(out, "time_to_strong.json"), {"machine": info, "problems": results})
    plot(results, os.path.join(out, "time_to_strong.png"), len(args.seeds))
    with open(os.path.join(out, "time_to_strong.md"), "w") as fh:
        fh.write(f"`{info['command']}` on {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
                 f"{info['date']}; total {info['total_s']:.0f} s, 1-minute load average at the end {load:.2f} "
                 "(shared machine: seconds are indicative).\n\n" + "\n\n".join(texts) + "\n")
    print(f"wrote {out}/time_to_strong.{{json,png,md}} in {info['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
