"""Regenerate every sample model by running each make_*.py in this folder.

Run from the repo root:  .venv/bin/python sample_models/make_all.py
(each script is run with the same interpreter, from the repo root).
Exits non-zero if any script fails.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    scripts = sorted(p for p in HERE.glob("make_*.py") if p.name != Path(__file__).name)
    failed = []
    for script in scripts:
        print(f"==> {script.relative_to(ROOT)}", flush=True)
        rc = subprocess.run([sys.executable, str(script)], cwd=ROOT).returncode
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"regenerated {len(scripts)} scripts' outputs in {HERE.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
