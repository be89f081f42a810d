"""How far a reader walks through toolkit's files from `toolkit train RECIPE` to the first training step.

A move is a call from a function in one toolkit file into a function in another, or the return from it
back to the caller's file (a climb); each call edge (caller function -> callee function) counts once,
however often it runs. The walk starts in the CLI's train command and stops at the first backward pass
(torch.autograd.backward): everything before it is what builds the model, the data and the optimizer
from the recipe. The run itself is a short one (one epoch on a few hundred images, CPU), so the walk is
the recipe's, not the data's size.

    python bench/training_walk.py recipes/fine4.toml --data-dir ../shared/data [--list]

Run it in another checkout (PYTHONPATH=that checkout) to compare two versions of the code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


class Stop(Exception):
    pass


def walk(argv: list[str]) -> list[tuple[str, str, str]]:
    """The moves, in order: (kind, from "file:function", to "file:function"), kind "call" or "climb"."""
    import toolkit

    root = str(Path(toolkit.__file__).resolve().parent) + "/"
    moves: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    counted: dict[int, tuple[str, str]] = {}  # id(frame) -> (callee, caller) whose return is a climb

    def where(frame) -> str:
        return f"{frame.f_code.co_filename[len(root):]}:{frame.f_code.co_name}"

    def caller_in_toolkit(frame):
        back = frame.f_back
        while back is not None and not back.f_code.co_filename.startswith(root):
            back = back.f_back
        return back

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.endswith("torch/autograd/__init__.py") and frame.f_code.co_name == "backward":
            raise Stop
        if not name.startswith(root) or event not in ("call", "return"):
            return
        if event == "call":
            caller = caller_in_toolkit(frame)
            if caller is None or caller.f_code.co_filename == name:
                return
            edge = (where(caller), where(frame))
            if edge not in seen:
                seen.add(edge)
                moves.append(("call", *edge))
                counted[id(frame)] = edge
        elif id(frame) in counted:
            caller, callee = counted.pop(id(frame))
            moves.append(("climb", callee, caller))

    from toolkit.cli import main

    sys.argv = ["toolkit", *argv]
    sys.setprofile(profile)
    try:
        main()
    except (Stop, SystemExit):
        pass
    finally:
        sys.setprofile(None)
    return moves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a recipe file or name, as `toolkit train` takes it")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--list", action="store_true", help="print every move")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        argv = ["train", args.recipe, "--epochs", "1", "--train-limit", "256", "--device", "cpu", "--out", out]
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        moves = walk(argv)
    if args.list:
        for kind, a, b in moves:
            print(f"{kind:5}  {a}  ->  {b}")
    files = {m.split(":")[0] for _, a, b in moves for m in (a, b)}
    climbs = sum(kind == "climb" for kind, _, _ in moves)
    by_file = {(kind, a.split(":")[0], b.split(":")[0]) for kind, a, b in moves}
    file_climbs = sum(kind == "climb" for kind, _, _ in by_file)
    rooms = [(kind, a, b) for kind, a, b in moves if a.split("/")[0] != b.split("/")[0] and "<module>" not in a + b]
    stages = [(k, a, b) for k, a, b in rooms if not {a.split("/")[0], b.split("/")[0]} & {"core", "cli.py"}]
    print(f"between the stages' folders (train, data, models; core's helpers and the CLI not counted): {len(stages)} moves "
          f"({sum(k == 'climb' for k, _, _ in stages)} climbs)")
    print(f"between role folders, calls only (no imports): {len(rooms)} moves ({sum(k == 'climb' for k, _, _ in rooms)} climbs)")
    if args.list:
        for kind, a, b in rooms:
            print(f"  {kind:5}  {a}  ->  {b}")
    print(f"the training walk: {len(by_file)} moves between files ({file_climbs} climbs) across {len(files)} files; "
          f"{len(moves)} between functions ({climbs} climbs)")


if __name__ == "__main__":
    main()
