"""Where one training epoch's time goes on a CPU: the toolkit's own step, phase by phase, then per operator.

    python bench/train_profile.py --recipe fine4 --data-dir ../shared/data [--threads 1] [--channels-last] [--json out.json]
    [--torch-dropout] [--memory-returned] [--eval-whole-batches]   (the toolkit's CPU choices undone, one at a time)

Builds the run as `toolkit train` does (the recipe's data through toolkit.data.build, its model and
fused SGD, the step engine's epoch plan) and times one training epoch phase by phase, each phase ended
by the wall clock (the CPU runs every op synchronously): data (the plan's batch: gather, augment,
normalize), forward (model and loss), backward, optimizer (zero_grad and the fused SGD step), metrics
(the loss and accuracy sums), then the evaluation pass over the test split. What the phases do not
cover (the loop's Python, timers) is the rest. Then PyTorch's profiler over ``--profile-steps`` steps
gives the operators with the most self CPU time. Prints the machine (CPU model and features), the
threads and both tables; ``--json`` writes them as a record. The step's page faults and kernel
(system) CPU time are counted too: a fresh mapping per freed-and-reallocated activation shows there.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build(recipe_name: str, data_dir, channels_last: bool, compile_mode: str | None = None, bf16: bool = False, plain_dropout: bool = False):
    import torch

    from toolkit.data.build import build_loaders
    from toolkit.models.blocks import with_torch_dropout
    from toolkit.data.sources import source_for
    from toolkit.models.recipes import load_recipe
    from toolkit.train.engine import StepEngine, lr_per_step
    from toolkit.train.optim import build_optimizer, build_scheduler

    recipe = load_recipe(recipe_name)
    source = source_for(recipe, data_dir)
    recipe = source.recipe
    torch.manual_seed(recipe.seed)
    dev = torch.device("cpu")
    data = build_loaders(source, dev, torch.Generator().manual_seed(recipe.seed))
    model = recipe.build_model(data.spec.num_classes)
    if plain_dropout:
        with_torch_dropout(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe, model)
    scheduler, when = build_scheduler(recipe, optimizer)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model  # Inductor's CPU backend; the weights stay the model's
    engine = StepEngine(net, model, optimizer, data.train, dev, autocast=bf16, channels_last=channels_last)
    lrs = lr_per_step(optimizer, scheduler, when, len(data.train))
    return recipe, data, net, optimizer, engine, lrs


def timed_epoch(data, model, optimizer, engine, lrs, steps: int | None) -> dict:
    """One epoch through the engine's step, split into its phases (seconds)."""
    import torch
    import torch.nn.functional as F

    from toolkit.train.loop import evaluate

    plan = data.train.plan()
    engine._set_plan(plan, lrs)
    group = optimizer.param_groups[0]
    group["lr"] = engine.lr
    bs = data.train.batch_size
    full = len(plan.order) // bs if steps is None else min(steps, len(plan.order) // bs)
    phases = dict.fromkeys(["data", "forward", "backward", "optimizer", "metrics"], 0.0)
    model.train()
    clock = time.perf_counter
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t_start = clock()
    for _ in range(full):
        t0 = clock()
        rows = engine.counter * bs + engine._offsets(bs)
        x, y = data.train.batch(engine.plan, rows)
        engine.lr.copy_(engine.lr_table.index_select(0, engine.counter.view(1)).squeeze(0))
        if engine.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t1 = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=engine.autocast):
            out = model(x)
            loss = F.cross_entropy(out, y)
        t2 = clock()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = clock()
        optimizer.step()
        t4 = clock()
        engine.loss_sum += loss.detach() * bs
        engine.correct += (out.argmax(1) == y).sum()
        engine.counter += 1
        t5 = clock()
        for name, a, b in (("data", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4), ("metrics", t4, t5)):
            phases[name] += b - a
    train_s = clock() - t_start
    after = resource.getrusage(resource.RUSAGE_SELF)
    t0 = clock()
    _, accuracy, _, _ = evaluate(model, data.test, torch.device("cpu"))
    phases["evaluation"] = clock() - t0
    phases["rest (loop, timers)"] = train_s - sum(v for k, v in phases.items() if k != "evaluation")
    return {"steps": full, "images": full * bs, "train_seconds": train_s, "seconds": train_s + phases["evaluation"], "phases": phases,
            "test_accuracy_after": accuracy, "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / max(1, full),
            "system_cpu_seconds": after.ru_stime - usage.ru_stime}


def operators(data, model, optimizer, engine, lrs, steps: int, top: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    plan = data.train.plan()
    engine._set_plan(plan, lrs)
    engine.counter.zero_()
    bs = data.train.batch_size
    model.train()  # the evaluation before left it in eval mode (no dropout)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            rows = engine.counter * bs + engine._offsets(bs)
            x, y = data.train.batch(engine.plan, rows)
            if engine.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            engine.counter += 1
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"operator": e.key, "calls": e.count, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fine4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: its own, one per core)")
    parser.add_argument("--channels-last", action="store_true", help="the model and batches in channels-last memory format")
    parser.add_argument("--compile", default=None, help="torch.compile the model in this mode (e.g. default, max-autotune-no-cudagraphs)")
    parser.add_argument("--steps", type=int, default=None, help="training steps timed (default: the whole epoch)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in the step, as the engine runs it on a GPU")
    parser.add_argument("--warmup-steps", type=int, default=0, help="steps run before the timed epoch (a compiled model compiles there)")
    parser.add_argument("--torch-dropout", action="store_true", help="torch's nn.Dropout (a Mersenne Twister mask) instead of the toolkit's CPU dropout")
    parser.add_argument("--memory-returned", action="store_true", help="leave glibc's malloc as it is: freed activations unmapped, new ones faulted in")
    parser.add_argument("--eval-whole-batches", action="store_true", help="evaluate the test split's 1,000-image batches whole, not in cache-sized chunks")
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from toolkit.core.environment import cpu_line, keep_freed_memory
    from toolkit.train import loop

    memory_kept = False if args.memory_returned else keep_freed_memory()  # as toolkit train does
    if args.eval_whole_batches:
        loop.EVAL_CHUNK_BYTES = 1 << 62
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe, data, model, optimizer, engine, lrs = build(args.recipe, args.data_dir, args.channels_last, args.compile, args.bf16, args.torch_dropout)
    warmup_s = 0.0
    if args.warmup_steps:
        t0 = time.perf_counter()
        timed_epoch(data, model, optimizer, engine, lrs, args.warmup_steps)
        warmup_s = time.perf_counter() - t0
    epoch = timed_epoch(data, model, optimizer, engine, lrs, args.steps)
    ops = operators(data, model, optimizer, engine, lrs, args.profile_steps, args.top)
    machine = cpu_line()
    print(f"{recipe.name}: one epoch on the CPU, {epoch['steps']} steps of {data.train.batch_size} ({epoch['images']:,} images), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, channels-last: {'yes' if args.channels_last else 'no'}, "
          f"compile: {args.compile or 'no'}, bf16: {'yes' if args.bf16 else 'no'}, dropout: {'torch' if args.torch_dropout else 'toolkit (PCG64)'}, "
          f"freed memory {'kept' if memory_kept else 'returned'}, evaluation {'in whole batches' if args.eval_whole_batches else 'in cache-sized chunks'}")
    print(f"machine: {machine}" + (f"; {args.warmup_steps} warm-up steps first ({warmup_s:.1f} s, a compilation included)" if args.warmup_steps else ""))
    print(f"{'phase':<22} {'seconds':>8} {'share':>7} {'µs per image':>13}")
    for name, seconds in epoch["phases"].items():
        print(f"{name:<22} {seconds:8.2f} {seconds / epoch['seconds']:7.1%} {seconds * 1e6 / epoch['images']:13.1f}")
    print(f"{'epoch (train + eval)':<22} {epoch['seconds']:8.2f}   (train {epoch['images'] / epoch['train_seconds']:,.0f} images/s)")
    print(f"training: {epoch['page_faults_per_step']:,.0f} page faults per step, {epoch['system_cpu_seconds']:.2f} s of kernel CPU time")
    print(f"\noperators by self CPU time, {args.profile_steps} training steps (torch.profiler):")
    for op in ops:
        print(f"  {op['operator']:<44} {op['calls']:>6} calls {op['self_ms_per_step']:8.3f} ms/step {op['share']:7.1%}")
    if args.json:
        args.json.write_text(json.dumps({"recipe": recipe.name, "threads": torch.get_num_threads(), "channels_last": args.channels_last,
                                         "compile": args.compile, "bf16": args.bf16, "torch_dropout": args.torch_dropout,
                                         "memory_kept": memory_kept, "eval_whole_batches": args.eval_whole_batches,
                                         "warmup_steps": args.warmup_steps, "warmup_seconds": warmup_s,
                                         "torch": torch.__version__, "machine": machine, "python": platform.python_version(),
                                         "date": time.strftime("%Y-%m-%d"), "epoch": epoch, "operators": ops}, indent=1) + "\n")


if __name__ == "__main__":
    main()
