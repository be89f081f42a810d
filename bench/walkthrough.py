"""The README's top list, run literally on a fresh clone, then docs/serving.md's tritonclient example
against plain `toolkit serve`; optionally with another training running beside it.

    python bench/walkthrough.py --data-dir ../shared/data --out /tmp/walk [--epochs 1] [--beside]

What it does, in order:
1. `git clone` of this repository's committed HEAD into OUT/clone, and the README's install command
   (`pip install -e '.[train]'`) in a virtual environment made with `--system-site-packages` (so
   nothing is downloaded again; the clone, not this checkout, is what `toolkit` runs).
2. Every command of the README's first code block, in its printed order, in the clone, with
   `TOOLKIT_DATA_DIR` set, as the README says it was run. What a reader must supply is supplied and
   said in the log: `--epochs N` on each `toolkit train` (the README's note: the trainings shortened),
   a `pets.toml` recipe with a small image folder of real MNIST test digits (3 classes, size and
   channels left to be inferred), `runs/<run>` = the latest finished run, and `digits/` and
   `photo.jpg` for the guides' `toolkit predict` lines (the README's uses docs/examples/).
3. `toolkit serve` in the background until it prints "ready", then the tritonclient example of
   docs/serving.md as printed (it loads its digit from docs/examples/ in the clone: nothing supplied),
   then SIGTERM: the server must stop cleanly (exit 0).
4. `--beside`: right after the trainings before the first export, a 20-epoch `toolkit train recipes/fine4.toml` starts
   in the same runs/ folder and keeps running (the newest run, unfinished: the defaults must pass it over).

Writes OUT/walkthrough.json and OUT/walkthrough.md (each command, exit status, seconds, first and
last output line); exits 1 if any command failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands(readme: str) -> list[str]:
    """The first code block's commands, comments and continuation-comment lines removed."""
    block = readme.split("```", 2)[1]
    commands = []
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if command.startswith("toolkit "):
            commands.append(command)
    return commands


def code_blocks(doc: str, language: str) -> list[str]:
    """The doc's fenced code blocks of ``language``, as printed (the indentation of a list item removed)."""
    found = []
    for indent, body in re.findall(rf"^([ \t]*)```{language}\n(.*?)^[ \t]*```", doc, re.S | re.M):
        found.append("\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip() for line in body.splitlines()))
    return found


def serving_example(doc: str) -> str:
    """docs/serving.md's tritonclient code block, as printed."""
    blocks = [b for b in code_blocks(doc, "python") if "tritonclient" in b]
    if not blocks:
        raise SystemExit("docs/serving.md has no tritonclient example")
    return blocks[0]


def make_inputs(clone: Path, data_dir: Path) -> None:
    """What a reader supplies: an image folder with its recipe, digit files for predict and the example."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from tests.helpers import mnist_test_set

    images, labels = mnist_test_set(data_dir)
    for split, start, count in (("train", 0, 60), ("test", 5000, 20)):
        for cls in (0, 1, 7):
            folder = clone / "photos" / split / f"digit{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            picked = np.flatnonzero(labels[start:] == cls)[:count] + start
            for i in picked:
                Image.fromarray(255 - images[i]).convert("RGB").save(folder / f"{i}.png")  # dark on light, colour files
    (clone / "pets.toml").write_text('# pets.toml: docs/training.md\'s example, size and channels inferred\nepochs = 30\n[model]\nname = "resnet20"\n'
                                     '[data]\ndataset = "folder"\nroot = "photos"\nbatch_size = 128\n[optimizer]\nlr = 0.05\nmomentum = 0.9\n')
    (clone / "digits").mkdir(exist_ok=True)
    for i in range(5):
        Image.fromarray(images[i]).save(clone / "digits" / f"{i}-label{labels[i]}.png")
    Image.fromarray(images[5]).convert("RGB").save(clone / "photo.jpg")


def latest_finished_run(runs: Path) -> Path:
    done = [p.parent for p in runs.glob("*/summary.json")]
    return max(done, key=lambda p: (p / "summary.json").stat().st_mtime)


def run_command(argv: list[str], cwd: Path, env: dict, log, timeout: int = 3600) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    log.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}[exit {proc.returncode}]\n\n")
    log.flush()
    return {"command": shlex.join(argv), "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "first": out[0] if out else "", "last": out[-1] if out else ""}


def serve_and_call(clone: Path, env: dict, example: str, log) -> list[dict]:
    """`toolkit serve` in the background, the example against it, then SIGTERM."""
    t0 = time.perf_counter()
    server = subprocess.Popen(["toolkit", "serve"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while True:
        line = server.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready"):
            break
    ready = {"command": "toolkit serve", "rc": None if server.poll() is None else server.returncode, "seconds": round(time.perf_counter() - t0, 1),
             "first": lines[0].strip() if lines else "", "last": lines[-1].strip() if lines else ""}
    rows = [ready]
    (clone / "example.py").write_text(example)  # as printed: it loads what it uses from the repository
    if ready["rc"] is None:
        rows.append(run_command([sys.executable if not env.get("VIRTUAL_ENV") else str(Path(env["VIRTUAL_ENV"]) / "bin" / "python"), "example.py"],
                                clone, env, log, timeout=300))
        rows[-1]["command"] = "python example.py  (docs/serving.md's tritonclient example, as printed)"
    server.send_signal(signal.SIGTERM)
    t1 = time.perf_counter()
    try:
        rest, _ = server.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        rest, _ = server.communicate()
    log.write("$ toolkit serve\n" + "".join(lines) + rest + f"[exit {server.returncode} after SIGTERM]\n\n")
    rows.append({"command": "SIGTERM to toolkit serve", "rc": server.returncode, "seconds": round(time.perf_counter() - t1, 1),
                 "first": "", "last": rest.strip().splitlines()[-1] if rest.strip() else ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1, help="each `toolkit train` of the list shortened to this many epochs")
    parser.add_argument("--beside", action="store_true", help="a 20-epoch fine4 training running beside the walk, in the same runs/")
    args = parser.parse_args()
    out, data_dir = args.out.resolve(), args.data_dir.resolve()
    clone, venv = out / "clone", out / "venv"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "TOOLKIT_DATA_DIR": str(data_dir)}
    env.pop("PYTHONPATH", None)
    rows, beside = [], None
    with open(out / "walkthrough.log", "w") as log:
        install = run_command(["bash", "-c", "pip install -q -e '.[train]'"], clone, env, log)
        install["command"] = "pip install -e '.[train]'  (the README's install command)"
        rows.append(install)
        make_inputs(clone, data_dir)
        commands = readme_commands((clone / "README.md").read_text())
        first_export = next(i for i, c in enumerate(commands) if c.startswith("toolkit export"))
        trainings = [i for i, c in enumerate(commands[:first_export]) if c.startswith("toolkit train ")]
        for index, command in enumerate(commands):
            argv = shlex.split(command)
            if argv[:2] == ["toolkit", "train"]:
                argv += ["--epochs", str(args.epochs)]
            if "runs/<run>" in argv:
                argv[argv.index("runs/<run>")] = str(latest_finished_run(clone / "runs").relative_to(clone))
            if argv[:2] == ["toolkit", "serve"]:
                rows += serve_and_call(clone, env, serving_example((clone / "docs" / "serving.md").read_text()), log)
                continue
            rows.append(run_command(argv, clone, env, log))
            if args.beside and beside is None and index == trainings[-1]:
                beside = subprocess.Popen(["toolkit", "train", "recipes/fine4.toml", "--epochs", "20"], cwd=clone, env=env,
                                          stdout=open(out / "beside.log", "w"), stderr=subprocess.STDOUT)
                time.sleep(20)  # its run folder and first checkpoint exist before the next verb looks
        if beside is not None:
            rows.append({"command": "the training beside (toolkit train recipes/fine4.toml --epochs 20)",
                         "rc": beside.poll(), "seconds": None, "first": "", "last": "still running: stopped now" if beside.poll() is None else ""})
            beside.send_signal(signal.SIGINT)
            beside.wait(timeout=120)
    failed = [r for r in rows if r["rc"] not in (0, None) or (r["command"] == "toolkit serve" and r["rc"] is not None)]
    (out / "walkthrough.json").write_text(json.dumps({"rows": rows, "failed": len(failed), "epochs": args.epochs, "beside": args.beside}, indent=2) + "\n")
    table = ["| command | exit | s | first line | last line |", "|---|---:|---:|---|---|"]
    table += [f"| `{r['command']}` | {r['rc']} | {r['seconds']} | {r['first'][:120]} | {r['last'][:160]} |".replace("\n", " ") for r in rows]
    (out / "walkthrough.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
