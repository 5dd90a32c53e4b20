"""Speed of sam-overparam's SAM step and Hessian tools against SGD and the installable peers.

Peers (installed outside the dev environment so they never become a dependency):

    pip install --no-deps --target /tmp/sam_peers pytorch-optimizer hessian-eigenthings
    PYTHONPATH=/tmp/sam_peers python tools/bench/sam_overhead.py

Writes docs/benchmarks/sam-overparam.md (or --output). Measures, in one process:

* seconds per training step (clean + perturbed pass + base SGD update) for SGD, our SAM and
  pytorch-optimizer's SAM, on an MLP (mnist1d shape) and a small CIFAR-style ResNet; the
  parameters after the timed steps are compared between the two SAM implementations;
* a Lanczos top eigenvalue (30 iterations) with our HVP operator and hessian-eigenthings'.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from sam_overparam import SAM, hessian, models
from shin_common import provenance


def _median_seconds(steppers: dict, steps: int, repeats: int = 5, warmup: int = 3) -> dict:
    """Median over ``repeats`` of the mean step time, the implementations interleaved so that
    background load affects all of them alike."""
    for step in steppers.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def source_state(git: dict | None) -> str:
    """``git <commit>`` plus whether the measured code differs from that commit.

    ``provenance()``'s dirty flag ignores untracked files, so an uncommitted copy of this script
    or of the package would go unnoticed; they are checked here as well.
    """
    if not git:
        return "git unknown"
    own = subprocess.run(
        ["git", "status", "--porcelain", "--", "tools/bench/sam_overhead.py", "packages/sam-overparam"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = git.get("dirty") or bool(own.stdout.strip()) or own.returncode != 0
    return f"git {git['commit'][:10]}" + (" plus uncommitted changes (dirty)" if dirty else " (clean)")


def bench_training(name: str, build, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    def loss_of(model):
        return F.cross_entropy(model(x), y)

    steppers = {}
    sgd_model = build()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step():
        sgd.zero_grad()
        loss_of(sgd_model).backward()
        sgd.step()

    steppers["SGD"] = sgd_step

    ours_model = build()
    ours = SAM(ours_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, model=ours_model)

    def ours_closure():
        loss = loss_of(ours_model)
        loss.backward()
        return loss

    steppers["sam-overparam SAM"] = lambda: ours.step(ours_closure)

    peer_model = None
    try:
        from pytorch_optimizer import SAM as PeerSAM
    except ImportError:
        pass
    else:
        peer_model = build()
        peer = PeerSAM(peer_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)

        def peer_closure():
            peer.zero_grad()
            loss = loss_of(peer_model)
            loss.backward()
            return loss

        def peer_step():
            peer_closure()  # the peer expects the clean gradient before step()
            peer.step(peer_closure)

        steppers["pytorch-optimizer SAM"] = peer_step
    rows = _median_seconds(steppers, steps)
    rows.setdefault("pytorch-optimizer SAM", None)
    agreement = None
    if peer_model is not None:
        agreement = max(
            float((p.detach() - q.detach()).abs().max())
            for p, q in zip(ours_model.parameters(), peer_model.parameters(), strict=True)
        )
    return {"name": name, "seconds": rows, "max_param_diff": agreement, "params": models.count_parameters(ours_model)}


def bench_lanczos(steps: int = 30) -> dict:
    torch.manual_seed(0)
    model = models.MLP(40, [256, 85], 10)
    x, y = torch.randn(512, 40), torch.randint(0, 10, (512,))
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    op = hessian.HessianOperator(model, loss_fn, batches)
    op.matvec(torch.ones(op.dim))  # warm-up: the first double-backward pays one-off costs
    start = time.perf_counter()
    ours = float(hessian.top_eigenvalue_lanczos(op.matvec, op.dim, steps=steps)[0])
    result = {"ours_s": time.perf_counter() - start, "ours": ours, "dim": op.dim}
    try:
        import hessian_eigenthings as he
    except ImportError:
        return result
    peer_op = he.HessianOperator(model, batches, loss_fn)
    peer_op.matvec(torch.ones(peer_op.size))
    start = time.perf_counter()
    peer = he.lanczos(peer_op, k=1, max_iter=steps, which="LA", seed=0)
    result.update(peer_s=time.perf_counter() - start, peer=float(torch.as_tensor(peer.eigenvalues).reshape(-1)[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks/sam-overparam.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    mlp_x, mlp_y = torch.randn(128, 40), torch.randint(0, 10, (128,))
    img_x, img_y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def build_mlp():
        torch.manual_seed(1)
        return models.MLP(40, [1024, 341], 10)

    def build_resnet():
        torch.manual_seed(1)
        return models.CifarResNet(8, blocks=(1, 1, 1, 1))

    results = [
        bench_training("MLP [1024, 341], batch 128", build_mlp, mlp_x, mlp_y, args.steps),
        bench_training("ResNet k=8 (1,1,1,1), 32x32, batch 64", build_resnet, img_x, img_y, max(5, args.steps // 3)),
    ]
    lanczos = bench_lanczos()
    prov = provenance(packages=("torch", "sam-overparam", "pytorch-optimizer", "hessian-eigenthings"))
    lines = [
        "# sam-overparam benchmarks",
        "",
        f"Produced by `PYTHONPATH=/tmp/sam_peers python tools/bench/sam_overhead.py` on {prov['host']['cpu_count']} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {prov['versions']['torch']}, "
        f"pytorch-optimizer {prov['versions']['pytorch-optimizer']}, hessian-eigenthings "
        f"{prov['versions']['hessian-eigenthings']}, {source_state(prov['git'])}, {prov['created']}.",
        "All numbers come from the same process; per-step times are medians of 5 interleaved repeats (after 3 warm-up steps).",
        "",
        "## Seconds per training step",
        "",
        "| workload | params | SGD | sam-overparam SAM | pytorch-optimizer SAM | ours / SGD | ours / peer | max abs param diff ours vs peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["seconds"]
        peer = s["pytorch-optimizer SAM"]
        diff = f"{r['max_param_diff']:.1e}" if r["max_param_diff"] is not None else "-"
        peer_cell = f"{peer * 1e3:.2f} ms" if peer else "not installed"
        ratio_peer = f"{s['sam-overparam SAM'] / peer:.2f}x" if peer else "-"
        lines.append(
            f"| {r['name']} | {r['params']} | {s['SGD'] * 1e3:.2f} ms | {s['sam-overparam SAM'] * 1e3:.2f} ms | "
            f"{peer_cell} | {s['sam-overparam SAM'] / s['SGD']:.2f}x | {ratio_peer} | {diff} |"
        )
    lines += [
        "",
        "SAM costs two forward and two backward passes; the spec's reference is 1.8-2.3x SGD on CPU.",
        "Both SAM implementations compute the same update (normalised SAM, eps 1e-12, restore by copy);",
        "the last column is the largest parameter difference after the same 3 + 5 x N steps. It is",
        "float32 rounding growing over the steps (BatchNorm amplifies it in the ResNet): in float64 the",
        "two agree to 1e-10 after 13 ResNet steps (checked separately). Our SAM also keeps BatchNorm",
        "statistics from the clean pass (`model=`), which the peer does not; training-mode outputs and",
        "hence the updates do not depend on the running statistics.",
        "",
        "## Top Hessian eigenvalue, 30 Lanczos iterations (MLP [256, 85], 4 x 128 examples)",
        "",
        "| implementation | seconds | eigenvalue |",
        "|---|---:|---:|",
        f"| sam-overparam `top_eigenvalue_lanczos` | {lanczos['ours_s']:.2f} | {lanczos['ours']:.5g} |",
    ]
    if "peer" in lanczos:
        lines.append(f"| hessian-eigenthings `lanczos(which='LA')` | {lanczos['peer_s']:.2f} | {lanczos['peer']:.5g} |")
        lines.append("")
        lines.append(
            f"Ratio (ours / peer time): {lanczos['ours_s'] / lanczos['peer_s']:.2f}x, dimension {lanczos['dim']}."
        )
    else:
        lines.append("| hessian-eigenthings | not installed | - |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
