"""Slowdown sweep: minibatches to a validation-loss target against P, asynchronous 1F1B emulated.

For each setting (model shape, batch, lr, warm-up, steps), optimizer, P and seed, trains the decoder
with the exact staleness emulator (tau_s = P-1-s) on the standard-library bytes and evaluates the
validation loss every ``--eval-every`` minibatches. The target of a setting is the P = 1 AdamW
validation loss (mean over seeds) at ``--target-fraction`` of the steps; the slowdown of a run is
its minibatches to the target (linearly interpolated between evaluations) over the same
optimizer's at P = 1 (arXiv 2602.03515, Table 1's metric).

Every finished run is one line of a JsonlStore, so a killed sweep reruns only the missing runs;
``--budget`` stops before starting a run once that many seconds have passed (one run per call
keeps each call short).

    OMP_NUM_THREADS=2 python tools/bench/br_slowdown_sweep.py --setting small --optimizers adamw \
        --stages 1 2 4 8 --seeds 0 1 2 --budget 300
    python tools/bench/br_slowdown_sweep.py --setting small --report docs/results/br_slowdown_small.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from basisrot_pipeline.emulator import build_emulator
from basisrot_pipeline.train import TrainConfig, evaluate, make_batches
from shin_common import JsonlStore, import_pyplot, load_config

# name -> TrainConfig overrides; every setting is P <= n_layer and one layer or more per stage
SETTINGS = {
    "small": [
        "model.n_layer=8",
        "model.n_embd=64",
        "model.n_head=4",
        "model.block_size=64",
        "batch_size=16",
        "steps=600",
        "optim.lr=3e-3",
        "optim.warmup_steps=30",
    ],
    "small-lr1e-2": [
        "model.n_layer=8",
        "model.n_embd=64",
        "model.n_head=4",
        "model.block_size=64",
        "batch_size=16",
        "steps=600",
        "optim.lr=1e-2",
        "optim.warmup_steps=30",
    ],
    "small-lr1e-3": [
        "model.n_layer=8",
        "model.n_embd=64",
        "model.n_head=4",
        "model.block_size=64",
        "batch_size=16",
        "steps=600",
        "optim.lr=1e-3",
        "optim.warmup_steps=30",
    ],
}


def config_for(setting: str, optimizer: str, stages: int, seed: int, threads: int) -> TrainConfig:
    overrides = [*SETTINGS[setting], f"optim.name={optimizer}", f"stages={stages}", f"seed={seed}"]
    return load_config(TrainConfig, overrides=[*overrides, "checkpoint_every=0", f"threads={threads}"])


def run(config: TrainConfig, eval_every: int) -> dict:
    """One training: train losses every minibatch, validation losses every ``eval_every``."""
    train_batches, val_batches, _ = make_batches(config)
    model, emulator = build_emulator(
        config.model, config.optim, config.delays(), total_steps=config.steps, seed=config.seed
    )
    caller = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        start = time.perf_counter()
        losses, val_steps, val_losses = [], [], []
        for m in range(config.steps):
            losses.append(emulator.step(*train_batches.batch(m)))
            if (m + 1) % eval_every == 0 or m + 1 == config.steps:
                model.eval()
                with torch.no_grad():
                    val_losses.append(evaluate(model, val_batches, config.eval_batches))
                model.train()
                val_steps.append(m + 1)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(caller)
    return {"losses": losses, "val_steps": val_steps, "val_losses": val_losses, "seconds": seconds}


def steps_to(val_steps: list[int], val_losses: list[float], target: float) -> float | None:
    """The first minibatch at which the validation loss reaches ``target``, interpolated linearly."""
    previous_step, previous = 0, None
    for step, loss in zip(val_steps, val_losses, strict=True):
        if loss <= target:
            if previous is None or previous <= target:
                return float(step)
            return previous_step + (step - previous_step) * (previous - target) / (previous - loss)
        previous_step, previous = step, loss
    return None


def key_for(args: argparse.Namespace, optimizer: str, stages: int, seed: int) -> dict:
    return {
        "setting": args.setting,
        "overrides": SETTINGS[args.setting],
        "optimizer": optimizer,
        "stages": stages,
        "seed": seed,
        "eval_every": args.eval_every,
        "threads": args.threads,
    }


def report(args: argparse.Namespace, store: JsonlStore) -> None:
    records = {}
    for optimizer in args.optimizers:
        for stages in args.stages:
            for seed in args.seeds:
                record = store.get(key_for(args, optimizer, stages, seed))
                if record is not None:
                    records[(optimizer, stages, seed)] = record
    base = [records[("adamw", 1, s)] for s in args.seeds if ("adamw", 1, s) in records]
    if not base:
        print("no AdamW P=1 run yet: no target")
        return
    index = max(0, round(args.target_fraction * len(base[0]["val_losses"])) - 1)
    target = sum(r["val_losses"][index] for r in base) / len(base)
    print(
        f"setting {args.setting}: target val loss {target:.4f} (AdamW P=1 at minibatch {base[0]['val_steps'][index]})"
    )
    rows = []
    for optimizer in args.optimizers:
        reference = [
            steps_to(records[(optimizer, 1, s)]["val_steps"], records[(optimizer, 1, s)]["val_losses"], target)
            for s in args.seeds
            if (optimizer, 1, s) in records
        ]
        reference = [r for r in reference if r is not None]
        ref_mean = sum(reference) / len(reference) if reference else None
        for stages in args.stages:
            reached = [
                steps_to(records[k]["val_steps"], records[k]["val_losses"], target)
                for k in ((optimizer, stages, s) for s in args.seeds)
                if k in records
            ]
            finals = [
                records[(optimizer, stages, s)]["val_losses"][-1]
                for s in args.seeds
                if (optimizer, stages, s) in records
            ]
            if not reached:
                continue
            done = [r for r in reached if r is not None]
            mean = sum(done) / len(done) if len(done) == len(reached) else None
            slowdown = mean / ref_mean if mean and ref_mean else None
            rows.append((optimizer, stages, len(reached), reached, mean, slowdown, sum(finals) / len(finals)))
            cells = ", ".join("-" if r is None else f"{r:.0f}" for r in reached)
            shown = f"{slowdown:.2f}x" if slowdown else "not reached by every seed"
            print(
                f"{optimizer:>15} P={stages:<2} seeds {len(reached)}: to target [{cells}] slowdown {shown} "
                f"final val {sum(finals) / len(finals):.4f}"
            )
    if args.plot:
        plt = import_pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        styles = ["-", "--", ":", "-."]
        for i, optimizer in enumerate(args.optimizers):
            for j, stages in enumerate(args.stages):
                runs = [records[(optimizer, stages, s)] for s in args.seeds if (optimizer, stages, s) in records]
                if not runs:
                    continue
                mean = [sum(v) / len(runs) for v in zip(*(r["val_losses"] for r in runs), strict=True)]
                left.plot(runs[0]["val_steps"], mean, styles[i % 4], color=f"C{j}", label=f"{optimizer} P={stages}")
            points = [(r[1], r[5]) for r in rows if r[0] == optimizer and r[5]]
            if points:
                right.plot(*zip(*points, strict=True), styles[i % 4] + "o", label=optimizer)
        left.axhline(target, color="grey", lw=0.8)
        left.set_xlabel("minibatch")
        left.set_ylabel(f"validation loss (mean of {len(args.seeds)} seeds)")
        left.set_title(f"setting {args.setting}: validation loss")
        left.legend(fontsize=7)
        right.set_xscale("log", base=2)
        right.set_xlabel("pipeline stages P")
        right.set_ylabel("minibatches to target / P=1")
        right.set_title("slowdown against P (target: grey line)")
        right.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--optimizers", nargs="+", default=["adamw"])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--target-fraction", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; no new run starts after this")
    parser.add_argument("--report", action="store_true", help="only print the table (and --plot) of finished runs")
    parser.add_argument("--plot", help="PNG path for the curves and slowdowns (with --report)")
    parser.add_argument("--store", default="outputs/bench/br_slowdown_sweep.jsonl")
    args = parser.parse_args()
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = JsonlStore(args.store)
    if not args.report:
        start = time.perf_counter()
        for stages in args.stages:
            for seed in args.seeds:
                for optimizer in args.optimizers:
                    key = key_for(args, optimizer, stages, seed)
                    if store.is_complete(key):
                        continue
                    if time.perf_counter() - start > args.budget:
                        print("budget spent; rerun to continue")
                        return
                    print(f"running {optimizer} P={stages} seed {seed}", flush=True)
                    store.append(
                        key, run(config_for(args.setting, optimizer, stages, seed, args.threads), args.eval_every)
                    )
        print("all runs finished")
    report(args, store)


if __name__ == "__main__":
    main()
