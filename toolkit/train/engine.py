"""The step engine: a training step that is one unit, run many steps per launch on a GPU.

One step takes its batch from the epoch's plan on the device (``toolkit.data.fast.EpochPlan``: the order
and every image's augmentation parameters, drawn ahead for the whole epoch), augments it there,
runs forward, loss, backward and the fused SGD step with the learning rate read from a device
tensor (the epoch's schedule laid out per step ahead of time), and adds to the metric sums, all
on the device: nothing in an epoch waits for the host.

- On a GPU the step is captured in CUDA graphs, ``chunk`` steps per graph, and an epoch is a few
  dozen graph launches (progress moves per chunk). The first steps of a run are run uncaptured
  to warm up (cuDNN's algorithm search, the optimizer's momentum buffers); they are real steps.
  The last, smaller batch of an epoch runs uncaptured.
- On the CPU the same step function runs uncaptured, so every semantic of the step is tested in
  CI: it gives the weights and metrics of the eager loop exactly (tests/train/test_engine.py).

``choose`` says which engine a run uses and why, in one line; the eager loop (``toolkit.train.loop``)
remains the reference and the fallback.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
import torch.nn.functional as F

from toolkit.core.errors import ToolkitError
from toolkit.data.fast import EpochPlan, TensorLoader

ENGINES = ("auto", "eager", "graph")
CHUNK = 32  # steps per CUDA graph launch
WARM_UP = 3  # uncaptured steps before the first capture


def choose(requested: str, *, loader, world: int, compile: str, dev: torch.device) -> tuple[str, str]:
    """(engine, one line saying which and why). ``auto`` is the graph engine where the run allows it."""
    if requested not in ENGINES:
        raise ToolkitError(f"--engine must be one of {', '.join(ENGINES)}, not {requested!r}")
    if requested == "eager":
        return "eager", "engine: eager (asked for)"
    blocker = None
    if not isinstance(loader, TensorLoader):
        blocker = "the dataloader pipeline's per-sample transforms run on the host, batch by batch"
    elif world > 1:
        blocker = "several processes (DDP) train with the eager loop"
    elif compile != "none":
        blocker = f"--compile {compile} compiles the eager loop's step"
    if blocker:
        if requested == "graph":
            raise ToolkitError(f"--engine graph cannot run here: {blocker} (use --engine eager or auto)")
        return "eager", f"engine: eager, because {blocker}"
    if dev.type == "cuda":
        return "graph", f"engine: graph (the step captured in CUDA graphs, {CHUNK} steps per launch)"
    return "graph", "engine: graph (the one-unit step, run uncaptured on the CPU)"


BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # CPUs whose bf16 matrix arithmetic is native


def settings(dev: torch.device, engine: str, compile: str, memory_kept: bool = False) -> dict:
    """What the run's step does on this device, recorded in the run's summary and said on its engine
    line: memory format, bf16 autocast (and why not), compilation, compute threads, and whether freed
    memory is kept by the allocator (``environment.keep_freed_memory``)."""
    if dev.type == "cuda":
        return {"engine": engine, "channels_last": True, "bf16": True, "compile": compile, "threads": None, "memory_kept": memory_kept}
    from toolkit.core.environment import cpu_info

    native = [f for f in BF16_FEATURES if f in cpu_info()["features"]]
    why = f"{' and '.join(native).upper()} here, but measured no faster than fp32" if native else "the CPU has no AVX512-BF16 or AMX"
    return {"engine": engine, "channels_last": False, "bf16": False, "bf16_why": why, "compile": compile,
            "threads": torch.get_num_threads(), "memory_kept": memory_kept}


def settings_line(s: dict) -> str:
    """e.g. "channels-last: no, bf16: no (the CPU has no AVX512-BF16 or AMX), compile: none, 2 threads,
    freed memory kept"."""
    return (f"channels-last: {'yes' if s['channels_last'] else 'no'}, bf16: " + ("yes" if s["bf16"] else f"no ({s['bf16_why']})")
            + f", compile: {s['compile']}" + (f", {s['threads']} thread{'s' if s['threads'] != 1 else ''}" if s["threads"] else "")
            + (", freed memory kept" if s.get("memory_kept") else ", freed memory returned (not glibc)"))


def lr_per_step(optimizer, scheduler, sched_when: str, steps: int) -> list[float]:
    """The learning rate of each of the epoch's ``steps``, laid out ahead: a per-step scheduler is
    stepped here exactly as the eager loop steps it, so it ends the epoch in the same state."""
    group = optimizer.param_groups[0]
    lrs = []
    with warnings.catch_warnings():  # stepping ahead of the optimizer is the point here
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"))
        for _ in range(steps):
            lrs.append(float(group["lr"]))
            if sched_when == "step":
                scheduler.step()
    return lrs


class StepEngine:
    """Trains one epoch at a time through the one-unit step (see the module's docstring)."""

    def __init__(self, net: torch.nn.Module, model: torch.nn.Module, optimizer, loader: TensorLoader, dev: torch.device, *,
                 autocast: bool, channels_last: bool, after_step=None, chunk: int = CHUNK, capture: bool | None = None):
        if len(optimizer.param_groups) != 1 or not isinstance(optimizer, torch.optim.SGD):
            raise ToolkitError("the step engine needs the SGD optimizer with one parameter group")
        # fused: one kernel, and a learning rate read from a device tensor (foreach SGD reads it on the
        # host); a checkpoint from before the optimizer was fused restores fused=None
        optimizer.param_groups[0]["fused"] = True
        self.net, self.model, self.optimizer, self.loader, self.dev = net, model, optimizer, loader, dev
        self.autocast, self.channels_last, self.after_step, self.chunk = autocast, channels_last, after_step, chunk
        self.capture = dev.type == "cuda" if capture is None else capture
        self.lr = torch.zeros((), device=dev)  # the running step's learning rate, read by the fused optimizer
        self.counter = torch.zeros((), dtype=torch.long, device=dev)  # the step within the epoch
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), dtype=torch.long, device=dev)
        self.plan: EpochPlan | None = None
        self.lr_table: torch.Tensor | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.steps_run = 0  # over the engine's life: the first WARM_UP run uncaptured
        self.fell_back: str | None = None  # why capture was given up, when it was
        self._reported = False
        self._rows: dict[int, torch.Tensor] = {}

    def news(self) -> str | None:
        """Why the step stopped being captured, once (None otherwise)."""
        if self.fell_back and not self._reported:
            self._reported = True
            return f"{self.fell_back}: the step runs uncaptured from here on"
        return None

    def _offsets(self, size: int) -> torch.Tensor:
        if size not in self._rows:
            self._rows[size] = torch.arange(size, device=self.dev)
        return self._rows[size]

    def step(self, size: int) -> None:
        """One training step on the plan's next ``size`` images: no host synchronisation."""
        rows = self.counter * self.loader.batch_size + self._offsets(size)
        x, y = self.loader.batch(self.plan, rows)
        self.lr.copy_(self.lr_table.index_select(0, self.counter.view(1)).squeeze(0))  # no host read of the counter
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # no autocast weight cache: a captured step must cast the weights it is replayed with
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            out = self.net(x)
            loss = F.cross_entropy(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.model)
        self.loss_sum += loss.detach() * size
        self.correct += (out.argmax(1) == y).sum()
        self.counter += 1

    def _uncaptured(self, size: int) -> None:
        self.step(size)
        self.steps_run += 1

    def _graph(self, steps: int):
        """The CUDA graph of ``steps`` consecutive full steps, captured on first use (None if
        capture failed: the engine then runs the step uncaptured and says why)."""
        if steps not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    for _ in range(steps):
                        self.step(self.loader.batch_size)
            except Exception as exc:  # an op that cannot be captured: the same step, uncaptured
                self.fell_back = f"CUDA graph capture failed ({type(exc).__name__}: {(str(exc).splitlines() or ['?'])[0][:160]})"
                self.capture = False
                torch.cuda.synchronize(self.dev)
                return None
            self.graphs[steps] = graph
        return self.graphs[steps]

    def _set_plan(self, plan: EpochPlan, lrs: list[float]) -> None:
        table = torch.tensor(lrs, dtype=torch.float32)
        if self.plan is None or not self.graphs:
            self.plan, self.lr_table = plan, table.to(self.dev)
        else:  # captured graphs read these tensors by address: refill them
            self.plan.copy_(plan)
            self.lr_table.copy_(table, non_blocking=False)

    def train_epoch(self, lrs: list[float], progress=None, task=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One epoch; ``lrs``: each step's learning rate (``lr_per_step``). Returns the device sums
        of loss and correct predictions and the number of images seen."""
        plan = self.loader.plan()
        n, bs = len(plan.order), self.loader.batch_size
        full, tail = divmod(n, bs)
        self._set_plan(plan, lrs)
        self.counter.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()
        group = self.optimizer.param_groups[0]
        after = group["lr"]  # the scheduler's value for the next epoch (lr_per_step already stepped it)
        group["lr"] = self.lr
        self.model.train()
        try:
            done = 0
            side = None
            if self.capture and self.steps_run < WARM_UP:
                # warm-up steps on a side stream, as CUDA graph capture asks
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                while done < full and self.steps_run < WARM_UP:
                    self._uncaptured(bs)
                    done += 1
                    _advance(progress, task, 1)
            if side is not None:
                torch.cuda.current_stream(self.dev).wait_stream(side)
            while done < full:
                steps = self.chunk if full - done >= self.chunk else 1
                graph = self._graph(steps) if self.capture else None
                if graph is None:
                    self._uncaptured(bs)
                    steps = 1
                else:
                    graph.replay()
                    self.steps_run += steps
                done += steps
                _advance(progress, task, steps)
            if tail:
                self._uncaptured(tail)
                _advance(progress, task, 1)
        finally:
            group["lr"] = after
        return self.loss_sum, self.correct, n


def _advance(progress, task, steps: int) -> None:
    if progress is not None and task is not None:
        progress.advance(task, steps)
