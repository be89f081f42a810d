"""The demo from a checkout: `python demo/app.py [EXPORT_DIR ...]` does what `toolkit serve [EXPORT_DIR ...]`
does. Its layout is ``toolkit/serve/demo.py``, part of the package, so every install has it."""

import sys
from pathlib import Path

if __name__ == "__main__":
    from toolkit.serve.server import serve

    serve([Path(p) for p in sys.argv[1:]] or [Path("exports")])
