"""The parity ladder: stripped Keras model -> int8 on LiteRT -> each packed target on its own runtime.

1. Keras (float) vs ``int8`` on LiteRT: top-1 agreement and the largest difference in output LSBs.
2. ``int8`` vs the packed file on each runtime that runs it, same runtime for both: ``micro`` on TFLM
   (bit-exact); ``litert`` on LiteRT XNNPACK and reference kernels; ``int4`` on LiteRT (both) and TFLM;
   ``int8`` itself: TFLM vs LiteRT reference kernels (``DEFAULT_MAX_LSB["int8"]``).
``ethos-u`` (compiled by Vela; its ``ethos-u`` op runs only on the NPU): rung 1 for the int8 file Vela compiled,
that file on TFLM vs LiteRT's reference kernels as for ``int8``, and a check that the compiled file keeps the int8
file's input and output quantization (a note in the report says that no host runtime runs the NPU part).
3. ``litert`` / ``int4`` only: the file's int8 twin (``convert.unpack``: the same ``±L`` values stored as INT8)
   vs the file: bit-exact on the reference kernels and TFLM. This checks the bit packing exactly.

Why rung 2 allows ``DEFAULT_MAX_LSB["packed"]`` = 2 LSB: packing ``±127`` to ``±L`` requantizes each int32 bias
to ``round(b * L / 127)``, an error of up to half of ``127 / L`` accumulator units (INT2: up to 0.2 output LSB
per layer on small layers). One flipped rounding per layer can reach 2 LSB at the output of a 3-layer MLP; the
twin rung shows that nothing else differs. XNNPACK's INT4/INT2 convolution kernels also round differently from
its int8 ones (up to 2 LSB even against the twin), so the twin rung allows that much on XNNPACK.

``predict`` runs a .tflite on one runtime with float inputs (quantized with the file's input parameters) and
returns the raw int8 outputs, so parity checks are one-liners.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import flatbuffer, micro
from .convert import convert, plain_model, samples, unpack

__all__ = [
    "RUNTIMES",
    "ParityStep",
    "ParityReport",
    "predict",
    "detect_target",
    "runtimes_for",
    "invoke_ratio",
    "verify",
]

DEFAULT_MAX_LSB = {"int8": 1.0, "packed": 2.0, "twin_xnnpack": 2.0}
# runtime name -> what it is
RUNTIMES = {
    "litert": "LiteRT, default (XNNPACK) kernels",
    "litert_ref": "LiteRT, reference kernels",
    "tflm": "TensorFlow Lite Micro interpreter",
}
S = flatbuffer.schema


def detect_target(tflite: bytes) -> str:
    """Which export target a file is: ``ethos-u`` (Vela's custom op), ``micro`` (TFLM_DECODE), ``litert`` (INT2),
    ``int4`` or ``int8``."""
    model = flatbuffer.read(tflite, "tflite")
    types = {int(t.type) for g in model.subgraphs for t in g.tensors}
    ops = {flatbuffer.builtin_name(model, op.opcodeIndex) for g in model.subgraphs for op in g.operators or []}
    if "ethos-u" in ops:
        return "ethos-u"
    if "TFLM_DECODE" in ops:
        return "micro"
    if S.TensorType.INT2 in types:
        return "litert"
    if S.TensorType.INT4 in types:
        return "int4" if micro.tflm_supported(tflite)[0] else "litert"
    if S.TensorType.FLOAT32 in types and S.TensorType.INT8 not in types:
        return "float"
    return "int8"


def runtimes_for(tflite: bytes) -> tuple[str, ...]:
    """The runtimes that load ``tflite``: LiteRT lacks TFLM_DECODE, TFLM lacks INT2 (and per-channel INT4 FC);
    none runs an ``ethos-u`` file on a host (its op needs the NPU and its driver)."""
    target = detect_target(tflite)
    if target == "ethos-u":
        return ()
    out = [] if target == "micro" else ["litert", "litert_ref"]
    if micro.tflm_supported(tflite)[0] and target != "float":
        out.append("tflm")
    return tuple(out)


class _Runner:
    """One interpreter on one runtime; ``__call__(x_float_batch) -> int8 outputs``."""

    def __init__(self, tflite: bytes, runtime: str):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}.")
        self.runtime = runtime
        if runtime == "tflm":
            self._tflm = micro.interpreter(tflite)
            self.input = self._tflm.get_input_details(0)
            self.output = self._tflm.get_output_details(0)
        else:
            from ai_edge_litert import interpreter as litert

            resolver = litert.OpResolverType.AUTO if runtime == "litert" else litert.OpResolverType.BUILTIN_REF
            self._litert = litert.Interpreter(model_content=bytes(tflite), experimental_op_resolver_type=resolver)
            self._litert.allocate_tensors()
            self.input = self._litert.get_input_details()[0]
            self.output = self._litert.get_output_details()[0]

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return x.astype(np.float32)
        params = self.input.get("quantization_parameters", {})
        scale = float(np.asarray(params.get("scales", [self.input.get("quantization", (1.0, 0))[0]]))[0])
        zero = int(np.asarray(params.get("zero_points", [self.input.get("quantization", (1.0, 0))[1]]))[0])
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)

    def invoke_one(self, q: np.ndarray) -> np.ndarray:
        if self.runtime == "tflm":
            self._tflm.set_input(q, 0)
            self._tflm.invoke()
            return np.array(self._tflm.get_output(0))
        self._litert.set_tensor(self.input["index"], q)
        self._litert.invoke()
        return np.array(self._litert.get_tensor(self.output["index"]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from tqdm.auto import tqdm

        shape = tuple(int(d) for d in self.input["shape"])
        samples = np.asarray(x, np.float32)
        # A progress bar on a terminal for long runs (a test set); none when standard error is not a terminal.
        bar = tqdm(samples, desc=f"{self.runtime} inference", unit="sample", leave=False, disable=None,
                   delay=2.0, mininterval=0.5)  # fmt: skip
        out = [self.invoke_one(self._quantize(sample[None]).reshape(shape)) for sample in bar]
        return np.concatenate(out)

    def timed_invoke(self) -> float:
        """Seconds of one invoke on a zero input."""
        shape = tuple(int(d) for d in self.input["shape"])
        q = np.zeros(shape, dtype=self.input["dtype"])
        start = time.perf_counter()
        self.invoke_one(q)
        return time.perf_counter() - start

    def output_params(self) -> tuple[float, int]:
        params = self.output.get("quantization_parameters", {})
        scales, zeros = params.get("scales", []), params.get("zero_points", [])
        if len(scales) == 0:
            scale, zero = self.output.get("quantization", (0.0, 0))
            return float(scale), int(zero)
        return float(scales[0]), int(zeros[0])


def invoke_ratio(tflite: bytes, reference: bytes, runtime: str, repeats: int = 25) -> float:
    """Best invoke time of ``tflite`` / that of ``reference`` on ``runtime``, the two invoked in turns (after a
    warm-up) so that a busy machine slows both alike."""
    runners = (_Runner(tflite, runtime), _Runner(reference, runtime))
    best = [float("inf"), float("inf")]
    for r in runners:
        r.timed_invoke()
    for _ in range(repeats):
        for i, r in enumerate(runners):
            best[i] = min(best[i], r.timed_invoke())
    return best[0] / best[1]


def predict(tflite, x: np.ndarray, runtime: str = "litert") -> np.ndarray:
    """Raw outputs of ``tflite`` (bytes or path) for float inputs ``x`` (batch axis first) on ``runtime``."""
    return _Runner(flatbuffer.load(tflite), runtime)(x)


@dataclass
class ParityStep:
    """One rung: ``reference`` vs ``candidate`` on ``runtime`` over ``samples`` inputs."""

    reference: str
    candidate: str
    runtime: str
    samples: int
    top1_agreement: float
    max_lsb: float
    mean_lsb: float
    max_lsb_allowed: float | None
    min_top1: float | None
    ok: bool

    def line(self) -> str:
        limit = []
        if self.max_lsb_allowed is not None:
            limit.append("bit-exact" if self.max_lsb_allowed == 0 else f"<= {self.max_lsb_allowed:g} LSB")
        if self.min_top1 is not None:
            limit.append(f"top-1 >= {self.min_top1:.1%}")
        return (
            f"{'ok  ' if self.ok else 'FAIL'} {self.reference:>8} vs {self.candidate:<8} on {self.runtime:<10} "
            f"top-1 {self.top1_agreement:7.2%}  max {self.max_lsb:6.2f} LSB  mean {self.mean_lsb:6.3f} LSB  "
            f"[{', '.join(limit)}] n={self.samples}"
        )


@dataclass
class ParityReport:
    """The ladder for one file; ``ok`` is True when every step passed. ``str(report)`` is a readable table."""

    file: str
    target: str
    int8_reference: str
    steps: list[ParityStep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = f"parity of {self.file} (target {self.target}; int8 reference: {self.int8_reference}): "
        head += "OK" if self.ok else "FAILED"
        return "\n".join([head, *("  " + step.line() for step in self.steps), *("  note: " + n for n in self.notes)])

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "target": self.target,
            "int8_reference": self.int8_reference,
            "ok": self.ok,
            "steps": [vars(step) for step in self.steps],
            "notes": list(self.notes),
        }


def _compare(ref, cand, names, runtime, max_lsb, min_top1=None) -> ParityStep:
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    n = len(ref)
    diff = np.abs(ref - cand).reshape(n, -1)
    top1 = float(np.mean(ref.reshape(n, -1).argmax(1) == cand.reshape(n, -1).argmax(1)))
    worst = float(diff.max()) if diff.size else 0.0
    ok = (max_lsb is None or worst <= max_lsb) and (min_top1 is None or top1 >= min_top1)
    return ParityStep(names[0], names[1], runtime, n, top1, worst, float(diff.mean()), max_lsb, min_top1, ok)


def _int8_reference(tflite, target: str, int8, model, data, representative_data):
    """The int8 file the packed one came from: ``int8`` if given, else the sibling ``*_int8.tflite`` of an
    exported file, else a fresh conversion of ``model``."""
    if target == "int8":
        return None, "the file itself"
    if int8 is not None:
        return flatbuffer.load(int8, "int8"), "given" if not isinstance(int8, (str, os.PathLike)) else os.fspath(int8)
    if isinstance(tflite, (str, os.PathLike)):
        path = os.fspath(tflite)
        stem, _ = os.path.splitext(path)
        if stem.endswith(f"_{target}"):
            sibling = stem[: -len(target)] + "int8.tflite"
            if os.path.isfile(sibling):
                return flatbuffer.load(sibling, sibling), sibling

    data_for_calibration = data if representative_data is None else representative_data
    buf = convert(model, data_for_calibration, target="int8")
    return buf, "converted from the model (calibrated on " + (
        "representative_data)" if representative_data is not None else "the verification data)"
    )


def _io_quantization(tflite: bytes) -> list:
    """(scale, zero point) of each input and output tensor of the first subgraph."""
    graph = flatbuffer.read(tflite, "tflite").subgraphs[0]
    out = []
    for index in [*graph.inputs, *graph.outputs]:
        q = graph.tensors[int(index)].quantization
        out.append(None if q is None or q.scale is None else (float(q.scale[0]), int(q.zeroPoint[0])))
    return out


def verify(
    model,
    tflite,
    data,
    *,
    int8=None,
    representative_data=None,
    num_samples: int = 100,
    min_top1: float = 0.9,
    max_lsb: float | None = None,
) -> ParityReport:
    """Run the parity ladder for the exported ``tflite`` (path or bytes) of ``model`` on inputs ``data``.

    ``int8``: the int8 file the packed target came from (default: the exported sibling ``<name>_int8.tflite``,
    else a fresh conversion calibrated on ``representative_data`` or ``data``, first 100 samples as in ``convert``;
    a reference calibrated on other data than the file is refused). ``min_top1``: the least
    top-1 agreement of the int8 file with the Keras model; ``max_lsb``: tolerance of rung 2 (default
    ``DEFAULT_MAX_LSB``; ``micro`` is always bit-exact).
    ``model`` may be None to skip the Keras rung when ``int8`` is given.
    """

    _check_limits(min_top1, max_lsb)
    buf = flatbuffer.load(tflite)
    target = detect_target(buf)
    if target == "float":
        raise ValueError("verify takes an integer export (int8, micro, litert, int4); this file is float32.")
    plain = None if model is None else plain_model(model)
    if plain is None and int8 is None and target != "int8":
        raise ValueError("verify needs the Keras model, or int8= (the int8 file the packed one came from).")
    x = samples(data, plain, num_samples, what="data") if plain is not None else np.asarray(data, np.float32)
    reference, reference_name = _int8_reference(tflite, target, int8, plain, x, representative_data)
    name = os.fspath(tflite) if isinstance(tflite, (str, os.PathLike)) else f"<{len(buf)} bytes>"
    if reference is not None and _io_quantization(reference) != _io_quantization(buf):
        raise ValueError(
            f"the int8 reference ({reference_name}) has other input/output quantization than {name}: the two were "
            "calibrated on different data. Pass int8= (the int8 file exported with it) or representative_data= "
            "(the calibration data used for the export)."
        )
    report = ParityReport(name, target, reference_name)
    int8_buf = buf if target == "int8" else reference
    int8_litert = _Runner(int8_buf, "litert_ref")
    if plain is not None:
        keras_out = np.asarray(plain(x, training=False))
        scale, zero = int8_litert.output_params()
        keras_lsb = keras_out / scale + zero
        report.steps.append(_compare(keras_lsb, int8_litert(x), ("keras", "int8"), "litert_ref", None, min_top1))
    if target in ("int8", "ethos-u"):
        _int8_rungs(report, int8_buf, int8_litert, x, max_lsb)
    else:
        _packed_rungs(report, buf, int8_buf, int8_litert, x, max_lsb)
    return report


def _check_limits(min_top1: float, max_lsb: float | None) -> None:
    if not 0.0 <= float(min_top1) <= 1.0:
        raise ValueError(f"min_top1 must be in [0, 1], got {min_top1!r}.")
    if max_lsb is not None and float(max_lsb) < 0:
        raise ValueError(f"max_lsb must be >= 0, got {max_lsb!r}.")


def _int8_rungs(report: ParityReport, int8_buf: bytes, int8_litert: _Runner, x, max_lsb: float | None) -> None:
    """Targets ``int8`` and ``ethos-u``: the int8 file on TFLM vs LiteRT's reference kernels."""
    tolerance = DEFAULT_MAX_LSB["int8"] if max_lsb is None else float(max_lsb)
    tflm = _Runner(int8_buf, "tflm")(x)
    report.steps.append(_compare(int8_litert(x), tflm, ("litert", "tflm"), "litert_ref/tflm", tolerance))
    if report.target == "ethos-u":
        report.notes.append(
            "the ethos-u op runs only on the NPU: the int8 file Vela compiled was checked on LiteRT and TFLM, "
            "and the compiled file keeps its input/output quantization (Vela compiles it without loss)"
        )


def _packed_rungs(report: ParityReport, buf: bytes, int8_buf: bytes, int8_litert: _Runner, x,
                  max_lsb: float | None) -> None:  # fmt: skip
    """The packed targets: the int8 file vs the packed one on each runtime that runs it; ``litert`` / ``int4``
    also the file's int8 twin vs the file."""
    target = report.target
    tolerance = 0.0 if target == "micro" else DEFAULT_MAX_LSB["packed"] if max_lsb is None else float(max_lsb)
    outputs = {}
    for runtime in runtimes_for(buf):
        ref = int8_litert(x) if runtime == "litert_ref" else _Runner(int8_buf, runtime)(x)
        outputs[runtime] = _Runner(buf, runtime)(x)
        report.steps.append(_compare(ref, outputs[runtime], ("int8", target), runtime, tolerance))
    if target in ("litert", "int4"):
        twin = unpack(buf)
        for runtime, out in outputs.items():
            exact = 0.0 if runtime != "litert" else DEFAULT_MAX_LSB["twin_xnnpack"]
            report.steps.append(_compare(_Runner(twin, runtime)(x), out, ("twin", target), runtime, exact))
