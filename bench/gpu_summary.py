"""summary.json of a bench/gpu_runbook.sh log folder: the machine, torch, and for each of issue
#29's targets the measured seconds and accuracy beside the target (null where a step did not
produce it; its exit code says why: 124 = stopped at its time limit).

    python bench/gpu_summary.py LOG_DIR > LOG_DIR/summary.json
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _json_line(path: Path) -> dict | None:
    """The last line of a step's log that is a JSON object (the command's --json output)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(log: Path) -> dict:
    steps = {row["step"]: {"rc": int(row["rc"]), "seconds": float(row["seconds"])}
             for row in csv.DictReader((log / "summary.tsv").open(), delimiter="\t")} if (log / "summary.tsv").is_file() else {}
    out: dict = {"machine": (log / "machine.txt").read_text().strip().splitlines() if (log / "machine.txt").is_file() else None,
                 "steps": steps, "targets": {}}
    t = out["targets"]
    fine4 = _json_line(log / "fine4.log")
    t["fine4_full_recipe"] = {
        "target": "<= 15 s whole process, <= 10 s of training, best >= 99.4%",
        "whole_process_s": steps["fine4"]["seconds"] if steps.get("fine4", {}).get("rc") == 0 else None,
        "training_s": fine4 and fine4["seconds"], "best_test_acc": fine4 and fine4["best_test_acc"],
        "final_test_acc": fine4 and fine4["final_test_acc"], "epochs": fine4 and fine4["epochs"]}
    seeds = _load(log / "fine4-seeds.json")
    ok = lambda name: steps.get(name, {}).get("rc") == 0  # noqa: E731
    one = steps["fine4"]["seconds"] if ok("fine4") else None
    many = steps["fine4-seeds"]["seconds"] if ok("fine4-seeds") else None
    t["fine4_three_seeds"] = {
        "target": "<= 2x one seed's time; mean final within 0.1 pp of 99.53%",
        "whole_process_s": many, "times_one_seed": many / one if many and one else None,
        "final_test_acc": seeds and seeds["final_test_acc"], "best_test_acc": seeds and seeds["best_test_acc"],
        "mean_final_minus_seed_pp": seeds and seeds["final_test_acc"]["mean"] - 99.53}
    for name, key, target in (("resnet20_ratio", "resnet20-ratio.json", ">= 10x the seeds' pipeline (1 epoch, whole process)"),
                              ("fine4_ratio", "fine4-ratio.json", ">= 10x the seeds' pipeline (1 epoch, whole process)"),
                              ("resnet20_epochs", "resnet20-epochs.json", "<= 1.5 s of training per epoch"),
                              ("ft6_epochs", "ft6-epochs.json", "<= 1.5 s of training per epoch")):
        r = _load(log / key)
        each = r and r.get("toolkit_seconds_each_epoch")
        t[name] = None if r is None else {
            "target": target, "seconds_each_epoch": each, "steady_epoch_s": min(each[1:]) if each and len(each) > 1 else None,
            "toolkit_whole_process_s": r["toolkit_seconds"], "seeds_whole_process_s": r.get("seeds_seconds"),
            "speedup_over_seeds": r.get("speedup_over_seeds"), "toolkit_final_test_acc": r["toolkit_final_test_acc"]}
    test = log / "test-gpu-training.log"
    t["gpu_training_test"] = {"rc": steps.get("test-gpu-training", {}).get("rc"),
                              "last_line": test.read_text(errors="replace").strip().splitlines()[-1] if test.is_file() else None}
    for key in ("gpu-step", "gpu-step-compiled"):
        step = _load(log / f"{key}.json")
        if step:
            out["torch"], out["device"] = step["torch"], step["device"]
            out.setdefault("ms_per_step", []).extend(
                {k: r.get(k) for k in ("model", "capture", "autocast", "channels_last", "compile", "ms_per_step", "first_epoch_s", "train_acc",
                                       "fell_back")} for r in step["rows"])
    return out


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1])), indent=1))
