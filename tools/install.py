"""Install slipstream with every extra into a virtual environment, fast, from the same sources pip would use.

``make install`` runs ``python tools/install.py VENV``. It installs uv (pinned in constraints.txt) with the
venv's pip, then has uv install ``-e '.[all,dev]'`` under constraints.txt. uv installs the ~215 packages in
parallel: about 1.5 minutes (most of it compiling bytecode) against about 5 minutes for pip on this 2-core
machine.

uv does not read pip's configuration, so this passes it on: the index URL, extra index URLs, find-links and
constraint files set in pip.conf or PIP_* variables (``pip config list``) become uv's options, and uv picks
the best version across indexes as pip does (``--index-strategy unsafe-best-match``). If uv cannot be
installed or fails, it says why and installs with pip instead, so the result is the same, only slower.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
TARGET = "-e", ".[all,dev]"
# pip setting → uv option; values may hold several entries separated by whitespace.
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(python: Path) -> list[str]:
    """uv options for the index settings pip would use here (from ``pip config list``: files and PIP_*)."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    args: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = OPTIONS.get(key.rsplit(".", 1)[-1])
        if option is None:
            continue
        for item in " ".join(shlex.split(value)).split():
            if (option, item) not in seen:
                seen.add((option, item))
                args += [option, item]
    return args


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def main(venv: str) -> int:
    python = Path(venv) / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
    if run([*pip, "uv"]) == 0:
        # Bytecode is compiled here, in parallel: pip does it too, and where PYTHONDONTWRITEBYTECODE is set
        # (as on this machine) Python never caches it, so every process would compile torch & co. again.
        uv = [str(Path(venv) / "bin" / "uv"), "pip", "install", "--quiet", "--compile-bytecode"]
        uv += ["--python", str(python)]
        sources = ["--index-strategy", "unsafe-best-match", *pip_settings(python)]
        if run([*uv, *sources, "-c", str(CONSTRAINTS), *TARGET]) == 0:
            return 0
        print("uv could not install the environment (above); installing with pip instead.", file=sys.stderr)
    else:
        print("uv could not be installed (above); installing with pip instead (about 5 minutes).", file=sys.stderr)
    return run([*pip, *TARGET])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/install.py VENV")
    sys.exit(main(sys.argv[1]))
