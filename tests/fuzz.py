"""The long fuzz run (``make fuzz``): damaged copies of real exported files of every target and encoding go
through every reader; the ones that parse then run on the runtimes (TFLM, and LiteRT for the files it takes) in
a child process, so that a runtime crash is caught and reported instead of killing the run.

    .venv/bin/python tests/fuzz.py --cases=10000 --seed=0

Exit status 1 when a reader raised anything but ``FlatbufferError`` or a runtime process died; each such case
is reported with its source file and edits (``fuzz_support.mutate`` replays it) and written to ``--out_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import os, sys, numpy as np
from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import flatbuffer
def inputs(buf):
    graph = flatbuffer.read(buf).subgraphs[0]
    shape = [min(max(int(d), 1), 4096) for d in graph.tensors[int(graph.inputs[0])].shape][1:]
    return np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype(np.float32)
for line in sys.stdin:
    path, runtimes = line.split()
    buf = open(path, "rb").read()
    for runtime in runtimes.split(","):
        try:
            ptq_tflite.predict(buf, inputs(buf), runtime)
        except Exception:
            pass  # a clean error (from the runtime or the inputs) is fine; only a dead process is a crash
    print("done", flush=True)
"""


class Runtimes:
    """A child process that runs files on the runtimes; restarted after a crash."""

    def __init__(self, env):
        self.env, self.proc = env, None

    def run(self, path: str, runtimes: str) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         env=self.env)  # fmt: skip
        try:
            self.proc.stdin.write(f"{path} {runtimes}\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip() == "done"
        except BrokenPipeError:
            return False

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_runtimes", action="store_true", help="only the readers")
    parser.add_argument("--out_dir", default="out/fuzz")
    args = parser.parse_args()

    import fuzz_support
    import numpy as np

    from ptq_keras.tflite import flatbuffer

    sources = fuzz_support.exported_files()
    rng = np.random.default_rng(args.seed)
    runtimes = Runtimes(dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    counts = {"parsed": 0, "FlatbufferError": 0, "escaped": 0, "runtime crash": 0}
    failures = []
    os.makedirs(args.out_dir, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ptq_fuzz_") as tmp:
        for case in range(args.cases):
            index = int(rng.integers(0, len(sources)))
            label, buf = sources[index]
            edits = fuzz_support.random_edits(rng, len(buf))
            damaged = fuzz_support.mutate(buf, edits)
            try:
                fuzz_support.read_all(damaged)
            except flatbuffer.FlatbufferError:
                counts["FlatbufferError"] += 1
                continue
            except Exception:  # noqa: BLE001 - that is what the fuzzer looks for
                counts["escaped"] += 1
                failures.append({"case": case, "source": label, "edits": edits, "error": traceback.format_exc()})
                continue
            counts["parsed"] += 1
            if args.no_runtimes:
                continue
            target = label.split("/")[1]
            names = "tflm" if target == "micro" else "tflm,litert_ref" if target in ("int8", "int4") else "litert_ref"
            path = os.path.join(tmp, "case.tflite")
            with open(path, "wb") as f:
                f.write(damaged)
            if not runtimes.run(path, names):
                counts["runtime crash"] += 1
                failures.append({"case": case, "source": label, "edits": edits, "error": f"{names} process died"})
            if (case + 1) % 500 == 0:
                print(f"{case + 1}/{args.cases} cases, {time.time() - started:.0f} s: {counts}", flush=True)
    runtimes.close()
    report = {"cases": args.cases, "seed": args.seed, "counts": counts, "failures": failures}
    with open(os.path.join(args.out_dir, "fuzz_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{args.cases} cases in {time.time() - started:.0f} s: {counts}")
    for failure in failures[:20]:
        print(f"case {failure['case']} ({failure['source']}, edits {failure['edits']}):\n{failure['error']}")
    return 1 if counts["escaped"] or counts["runtime crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
