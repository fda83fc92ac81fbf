"""Tests the version ranges of setup.cfg: one venv per supported TensorFlow minor version, as a user's stack would be.

For every ``tools/matrix/<name>.txt`` (exact versions of TensorFlow, tf_keras, tfmot and numpy) it

1. creates ``.venv-matrix/<name>`` and installs that stack first, as the user's environment would have it;
2. installs this package into it with plain ``pip install .[test]`` (no constraints), and checks that pip kept the
   stack's TensorFlow, tf_keras and numpy (the ranges admit them);
3. runs a representative subset of the tests (ternarize/fit/strip, save/load, old saved files, every export target
   bit-exact on the TFLM and LiteRT interpreters);
4. prints the matrix and writes it to ``docs/results/matrix.md``.

    .venv/bin/python tools/test_matrix.py                  # every entry (make test-matrix)
    .venv/bin/python tools/test_matrix.py --only=tf2.19    # one entry

A venv whose stack and package requirements did not change is reused, so a second run only runs the tests. The
first run downloads each TensorFlow (about 600 MB per entry).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX_DIR = os.path.join(ROOT, "tools", "matrix")
VENVS = os.path.join(ROOT, ".venv-matrix")
RESULT = os.path.join(ROOT, "docs", "results", "matrix.md")
KEPT = ("tensorflow", "tf-keras", "numpy")
REPORTED = ("tensorflow", "tf-keras", "keras", "tensorflow-model-optimization", "numpy", "tflite-micro",
            "ai-edge-litert", "flatbuffers")  # fmt: skip
SUBSET = (
    "tests/test_quiet.py",
    "tests/api/test_ternarize.py",
    "tests/frontends/test_saved_formats.py",
    "tests/tflite/test_tflite_export.py",
    "tests/tflite/test_tflite_micro.py",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def entries(only: list[str] | None) -> dict[str, str]:
    found = {f[:-4]: os.path.join(MATRIX_DIR, f) for f in sorted(os.listdir(MATRIX_DIR)) if f.endswith(".txt")}
    unknown = sorted(set(only or ()) - set(found))
    if unknown:
        sys.exit(f"test_matrix: no tools/matrix/{unknown[0]}.txt (entries: {', '.join(found)})")
    return {k: v for k, v in found.items() if not only or k in only}


def pinned(path: str) -> list[str]:
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m\n"
            f"names = {list(REPORTED)!r}\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = '-'\n"
            "print(json.dumps(out))")  # fmt: skip
    return json.loads(run([python, "-c", code], capture_output=True).stdout)


def install(name: str, constraints: str) -> tuple[str, bool]:
    """The entry's venv with its stack and this package; whether pip kept the stack's versions."""
    venv = os.path.join(VENVS, name)
    python = os.path.join(venv, "bin", "python")
    with open(constraints, "rb") as f, open(os.path.join(ROOT, "setup.cfg"), "rb") as g:
        digest = hashlib.sha256(f.read() + g.read()).hexdigest()
    stamp = os.path.join(venv, ".matrix-stamp")
    if os.path.exists(stamp):
        with open(stamp) as f:
            state = json.load(f)
        if state["digest"] == digest:
            log(f"{name}: stack up to date ({venv}); reinstalling this package")
            _install_package(python, "--no-deps", "--force-reinstall")
            return python, state["kept"]
    if not os.path.exists(python):
        log(f"{name}: creating {venv}")
        run([sys.executable, "-m", "venv", venv])
        run([python, "-m", "pip", "install", "-q", "--upgrade", "pip>=24", "setuptools>=64", "wheel"])
    log(f"{name}: installing the stack {' '.join(pinned(constraints))} (downloads TensorFlow the first time)")
    run([python, "-m", "pip", "install", "-q", *pinned(constraints)])
    before = versions(python)
    log(f"{name}: pip install .[test] into it")
    _install_package(python)
    after = versions(python)
    kept = all(before[k] == after[k] for k in KEPT)
    if not kept:
        changed = ", ".join(f"{k} {before[k]} -> {after[k]}" for k in KEPT if before[k] != after[k])
        log(f"{name}: pip install . replaced the stack: {changed}")
    with open(stamp, "w") as f:
        json.dump({"digest": digest, "kept": kept}, f)
    return python, kept


def _install_package(python: str, *options: str) -> None:
    """``pip install <this checkout>[test]`` into the venv (a copy, not editable: the installed package is tested)."""
    with tempfile.TemporaryDirectory() as build:  # a fresh build dir: no stale build/ of another entry
        run([python, "-m", "pip", "install", "-q", *options, f"{ROOT}[test]"], env={**os.environ, "TMPDIR": build})


def test(name: str, python: str, args: list[str]) -> tuple[bool, str, float]:
    """Runs the subset outside the source tree's package (the installed one is tested)."""
    log(f"{name}: pytest {' '.join(SUBSET)}")
    start = time.time()
    env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [python, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *SUBSET, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    tail = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = tail[-1].strip("= ") if tail else "no output"
    if proc.returncode:
        print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")
    return proc.returncode == 0, summary, time.time() - start


def table(rows: list[dict]) -> str:
    head = "| entry | " + " | ".join(REPORTED) + " | pip install . kept the stack | subset | time |"
    lines = [head, "|" + "---|" * (len(REPORTED) + 4)]
    for r in rows:
        cells = [r["entry"], *(r["versions"][k] for k in REPORTED), "yes" if r["kept"] else "NO",
                 r["summary"], f"{r['seconds'] / 60:.1f} min"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: list[dict], argv: list[str]) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        "# Tested versions\n\n"
        f"Measured {now} on a {os.cpu_count()}-core {platform.machine()} machine (Python "
        f"{platform.python_version()}) by `python tools/test_matrix.py{' ' + ' '.join(argv) if argv else ''}` "
        "(`make test-matrix`). Each entry is a fresh venv that gets the stack first, then `pip install .[test]` "
        f"without constraints; the subset is {', '.join(f'`{s}`' for s in SUBSET)} (ternarize, fit, strip, "
        "save and load, files saved by older versions, every export target bit-exact on TFLM and LiteRT).\n\n"
        + table(rows) + "\n\n"
        "A skipped test below tf_keras 2.21: the `.h5` file of `tests/data/saved_v0.1` was written by tf_keras 2.21, "
        "and tf_keras files do not load in an older tf_keras (2.21 writes InputLayer options 2.19 and 2.20 "
        "reject); files saved by this package with the tf_keras it runs on load on that version.\n"
    )
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(RESULT), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, RESULT)
    log(f"wrote {os.path.relpath(RESULT, ROOT)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="Comma-separated entries of tools/matrix/ (default: all).")
    parser.add_argument("--no_write", action="store_true", help="Print the matrix without writing docs/results.")
    parser.add_argument("pytest_args", nargs="*", help="Extra pytest arguments (after --).")
    args = parser.parse_args(argv)
    rows = []
    for name, constraints in entries([e for e in args.only.split(",") if e]).items():
        try:
            python, kept = install(name, constraints)
        except subprocess.CalledProcessError as e:
            log(f"{name}: installing failed ({' '.join(e.cmd[:6])} ...: exit {e.returncode})")
            rows.append(dict(entry=name, versions=dict.fromkeys(REPORTED, "-"), kept=False,
                             summary="install failed", seconds=0.0, ok=False))  # fmt: skip
            continue
        ok, summary, seconds = test(name, python, args.pytest_args)
        rows.append(dict(entry=name, versions=versions(python), kept=kept, summary=summary, seconds=seconds,
                         ok=ok and kept))  # fmt: skip
        log(f"{name}: {'passed' if ok else 'FAILED'} ({summary})")
    print("\n" + table(rows) + "\n", flush=True)
    if not args.no_write and not args.only and not args.pytest_args:
        write(rows, argv)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
