"""CLI conventions: --version, and help that shows a value type only for options that take a value."""

import re
import pytest

from tests.helpers import run_cli


def test_version_prints_the_package_version():
    from toolkit import __version__

    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"toolkit {__version__}"


def test_help_shows_no_value_type_for_flags():
    done = run_cli("export", "--help", env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    lines = {m.group(1): m.group(2) for m in re.finditer(r"(--[a-z-]+)\s+(\S+)", done.stdout)}
    # flags: the help text follows the name directly
    assert lines["--json"] == "Print", lines["--json"]
    assert lines["--auto-fallback"] != "<bool>"
    assert "<bool>" not in done.stdout
    # options that take a value still say which
    assert lines["--calib-size"].startswith("<int"), lines["--calib-size"]


def test_once_a_command_has_ended_a_signal_cannot_turn_it_into_a_traceback(monkeypatch, capsys):
    """SIGTERM arriving while the process exits (after the command's work and status) used to raise
    Interrupted inside threading's shutdown: 'Exception ignored in: <module 'threading'>', exit 0.
    When main() is done, SIGINT and SIGTERM are ignored, so the finished command's status stands."""
    import signal
    import sys

    from toolkit.cli import main

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(sys, "argv", ["toolkit", "recipes", "--json"])
        try:
            main()
        except SystemExit as stop:
            assert stop.code in (None, 0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGTERM)  # nothing happens: no exception, the process goes on
        assert '"fine4"' in capsys.readouterr().out
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_the_latest_run_is_the_latest_finished_one(tmp_path):
    """#31: `toolkit export` (eval, prune) with no run passed over a run still training and picked its
    epoch-2 checkpoint. Now: runs still training (lock held) or stopped (no summary.json) are passed
    over, each named in one line, and the line says which run was picked."""
    import json
    import os
    import time

    from toolkit.core.errors import ToolkitError
    from toolkit.core.files import locked
    from toolkit.models.checkpoint import SUMMARY, latest_run

    runs = tmp_path / "runs"
    for i, name in enumerate(("old-finished", "legacy-finished", "stopped", "training")):
        (runs / name).mkdir(parents=True)
        (runs / name / "best.pt").write_bytes(b"x")
        os.utime(runs / name / "best.pt", (time.time() - 100 + i, time.time() - 100 + i))
    (runs / "old-finished" / SUMMARY).write_text(json.dumps({"epochs": 1}))
    (runs / "legacy-finished" / "curves.png").write_bytes(b"png")  # a run from before summary.json
    lines: list[str] = []
    with locked(runs / "training"):
        assert latest_run(runs, say=lines.append) == runs / "legacy-finished"
    assert [line.split(":")[0] for line in lines] == [f"passed over {runs / 'training'}", f"passed over {runs / 'stopped'}",
                                                      "the latest finished run"]
    assert "still training" in lines[0] and "stopped before its last epoch" in lines[1] and "--resume" in lines[1]
    (runs / "legacy-finished" / "curves.png").unlink()
    (runs / "old-finished" / SUMMARY).unlink()
    with pytest.raises(ToolkitError, match="no finished run under .*: the newest, .*training, is stopped before its last epoch"):
        latest_run(runs)


def test_the_latest_export_is_the_runs_main_export_not_a_variant(tmp_path):
    """#33: after `export --input uint8` (and NHWC), plain verify/bench/predict meant the float export;
    they picked the newest variant. And a v2 name <recipe>_fp32 always means the float-input model."""
    import os
    import time

    from toolkit.core.manifest import Artifact, InputSpec, latest_export, triton_model_name
    from tests.helpers import manifest_for

    exports = tmp_path / "exports"
    for i, (name, dtype, layout) in enumerate((("run", "float32", "NCHW"), ("run-uint8", "uint8", "NCHW"), ("run-uint8-nhwc", "uint8", "NHWC"))):
        (exports / name).mkdir(parents=True)
        manifest_for(dtype=dtype, layout=layout).save(exports / name)
        os.utime(exports / name / "manifest.json", (time.time() - 100 + i, time.time() - 100 + i))
    lines: list[str] = []
    assert latest_export(exports, say=lines.append) == exports / "run"
    assert lines == [f"the latest main export: {exports / 'run'} (2 input variant(s) beside it: pass one to use it)"]
    import shutil

    shutil.rmtree(exports / "run")
    assert latest_export(exports) == exports / "run-uint8-nhwc"  # no main export: the newest of any
    art = Artifact.model_construct(file="model.fp32.onnx", format="onnx", precision="fp32")
    float_input = InputSpec(name="input", shape=["batch", 1, 28, 28], dtype="float32", layout="NCHW")
    raw_input = InputSpec(name="input", shape=["batch", 28, 28, 1], dtype="uint8", layout="NHWC")
    assert triton_model_name("fine4", art, float_input) == "fine4_fp32"
    assert triton_model_name("fine4", art, raw_input) == "fine4_fp32_uint8_nhwc"
