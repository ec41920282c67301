"""Check the peers' sign and scale against the product's convention on tiny models with an exact answer.

The product's convention: ``I(z, z_test) = ∇ℓ(z_test)ᵀ (H + λI)⁻¹ ∇ℓ(z)``, ``ℓ`` the per-sample loss, ``H``
the mean training Hessian, positive = helpful. The reference here is computed exactly with torch.func
(per-sample gradients, dense Hessian, dense solve); each peer is called the way its runner calls it and
multiplied by the runner's ``sign_factor`` (+1 for both). Prints one line per check with the relative error
‖peer − exact‖/‖exact‖; exits non-zero when a convention check exceeds ``TOLERANCE``. Lines marked
``info`` document a pitfall the runners avoid and are expected to be far off.

    python benchmarks/check_peer_conventions.py      # any python; re-runs itself inside each peer venv

What it established (pyDVL 0.10.0, Kronfluence 1.0.1): both already use the product's sign and per-sample
scale (pyDVL: mean-reduced loss, ``regularization`` = λ; Kronfluence: summed loss, curvature averaged over
examples, ``damping_factor`` = λ, no 1/n); pyDVL's CG over-weights an uneven last batch; pyDVL's
``influences_from_factors`` needs the ``InfluenceMode.Up`` enum, not the string "up".
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

TOLERANCE = 1e-3
LAM = 0.1


def exact_influence(model, loss: Callable, x, y, x_test, y_test, lam: float):
    """Exact quantities for a tiny model, ``loss(out, y)`` per sample: per-sample gradients (n, p) and
    (m, p), the (m, n) influence matrix and the (n,) self-influence."""
    import torch
    from torch.func import functional_call, grad, hessian, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = {k: v.shape for k, v in params.items()}
    flat0 = torch.cat([v.reshape(-1) for v in params.values()])

    def unflatten(flat):
        out, i = {}, 0
        for k, shape in shapes.items():
            out[k] = flat[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def sample_loss(flat, xi, yi):
        return loss(functional_call(model, unflatten(flat), (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(sample_loss), (None, 0, 0))
    g_train, g_test = per_sample(flat0, x, y), per_sample(flat0, x_test, y_test)
    h = hessian(lambda f: vmap(sample_loss, (None, 0, 0))(f, x, y).mean())(flat0)
    inv_g = torch.linalg.solve(h + lam * torch.eye(len(flat0), dtype=h.dtype), g_train.T)  # (p, n)
    return g_train, g_test, g_test @ inv_g, (g_train * inv_g.T).sum(1)


def rel_err(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def report(name: str, err: float, info: bool = False) -> bool:
    ok = info or err <= TOLERANCE
    print(f"  {'info' if info else ('ok  ' if ok else 'FAIL')}  {name:<62} rel.err {err:.2e}", flush=True)
    return ok


def ce_per_sample(out, target):
    import torch.nn.functional as F

    return F.cross_entropy(out, target, reduction="none")


def softmax_problem(n: int = 40, d: int = 5, k: int = 3, m: int = 4):
    """Softmax regression Linear(d, k) with CE: x (n, d), y (n,), x_test (m, d), y_test (m,)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, k))
    return model, torch.randn(n, d), torch.randint(0, k, (n,)), torch.randn(m, d), torch.randint(0, k, (m,))


def check_pydvl() -> bool:
    import torch.nn.functional as F
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import CgInfluence, DirectInfluence
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y, xt, yt = softmax_problem()
    _, _, ref, ref_self = exact_influence(model, ce_per_sample, x, y, xt, yt, LAM)
    up = InfluenceMode.Up

    def fitted(cls, batch_size, **kw):
        return cls(model, F.cross_entropy, regularization=LAM, **kw).fit(
            DataLoader(TensorDataset(x, y), batch_size=batch_size)
        )

    cg = dict(rtol=1e-10, atol=0.0, maxiter=100, warn_on_max_iteration=False)
    direct, cg_even, cg_uneven = (
        fitted(DirectInfluence, 20),
        fitted(CgInfluence, 20, **cg),
        fitted(CgInfluence, 16, **cg),
    )
    ok = report("DirectInfluence.influences(mode=Up)", rel_err(direct.influences(xt, yt, x, y, mode=up), ref))
    ok &= report(
        "CgInfluence.influences(mode=Up), batches 20+20", rel_err(cg_even.influences(xt, yt, x, y, mode=up), ref)
    )
    factors = cg_even.influence_factors(xt, yt)
    ok &= report(
        "CgInfluence.influences_from_factors(mode=Up)",
        rel_err(cg_even.influences_from_factors(factors, x, y, mode=up), ref),
    )
    self_inf = direct.influences_from_factors(direct.influence_factors(x, y), x, y, mode=up).diagonal()
    ok &= report("DirectInfluence self-influence (diagonal)", rel_err(self_inf, ref_self))
    report(
        "CgInfluence, batches 16+16+8 (uneven last batch)",
        rel_err(cg_uneven.influences(xt, yt, x, y, mode=up), ref),
        info=True,
    )
    wrong = cg_even.influences_from_factors(factors, x, y, mode="up")
    print(
        f"  info  influences_from_factors(mode='up' string) shape {tuple(wrong.shape)}, expected {tuple(ref.shape)}",
        flush=True,
    )
    return ok


def check_kronfluence() -> bool:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from peer_kronfluence import ClassificationTask
    from torch.utils.data import TensorDataset

    class LinearRegressionTask(Task):
        """½(f(x) − y)² summed. ``sample=True`` returns Σ f(x), whose per-sample gradient is the augmented
        input ã = (x, 1): Kronfluence then fits EKFAC to E[ã ãᵀ], exactly the mean Hessian of the
        squared loss, so its scores must equal the exact influence."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            pred = model(x).squeeze(-1)
            return pred.sum() if sample else 0.5 * ((pred - y) ** 2).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    def scores(model, task, strategy, train, test, out_dir):
        analyzer = Analyzer("check", prepare_model(model, task), task, cpu=True, disable_tqdm=True, output_dir=out_dir)
        analyzer.fit_all_factors(
            strategy,
            train,
            per_device_batch_size=16,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        score_args = ScoreArguments(damping_factor=LAM)
        analyzer.compute_pairwise_scores(
            "pairwise",
            strategy,
            test,
            train,
            per_device_query_batch_size=len(test),
            per_device_train_batch_size=16,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_self_scores(
            "self", strategy, train, per_device_train_batch_size=16, score_args=score_args, overwrite_output_dir=True
        )
        return (
            analyzer.load_pairwise_scores("pairwise")["all_modules"],
            analyzer.load_self_scores("self")["all_modules"],
        )

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model, x, y, xt, yt = softmax_problem()
        g_train, g_test, _, _ = exact_influence(model, ce_per_sample, x, y, xt, yt, LAM)
        pair, self_inf = scores(
            model, ClassificationTask(["0"]), "identity", TensorDataset(x, y), TensorDataset(xt, yt), tmp
        )
        ok &= report("identity, runner's CE task: pairwise = ∇ℓ_test·∇ℓ", rel_err(pair, g_test @ g_train.T))
        ok &= report("identity, runner's CE task: self = ‖∇ℓ‖²", rel_err(self_inf, (g_train**2).sum(1)))

        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 1))
        x, xt = torch.randn(40, 5) * torch.arange(1, 6), torch.randn(4, 5)
        y, yt = torch.randn(40), torch.randn(4)
        _, _, ref, ref_self = exact_influence(model, lambda o, t: 0.5 * (o.squeeze(-1) - t) ** 2, x, y, xt, yt, LAM)
        pair, self_inf = scores(model, LinearRegressionTask(), "ekfac", TensorDataset(x, y), TensorDataset(xt, yt), tmp)
        ok &= report("ekfac where exact: pairwise = ∇ℓ_testᵀ(H+λI)⁻¹∇ℓ", rel_err(pair, ref))
        ok &= report("ekfac where exact: self-influence", rel_err(self_inf, ref_self))
    return ok


CHECKS = {"pydvl": check_pydvl, "kronfluence": check_kronfluence}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        return 0 if CHECKS[sys.argv[2]]() else 1
    from peers import ensure_venv

    failed = []
    for peer in CHECKS:
        print(f"{peer}:", flush=True)
        rc = subprocess.run([str(ensure_venv(peer)), "-W", "ignore", __file__, "--inside", peer]).returncode
        if rc:
            failed.append(peer)
    print("all convention checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
