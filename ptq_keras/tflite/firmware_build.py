"""Build TensorFlow Lite Micro for Cortex-M from source, offline, once per (core, kernels).

The TFLM tree is either the user's (``TFLM_ROOT``: a tflite-micro checkout whose Makefile has downloaded its
dependencies) or extracted once from the source bundles in ``../shared/third_party/`` (relative to the repository)
into ``out/tflm/tflite-micro`` with the dependencies where TFLM's download scripts look for them, so those scripts
find every folder present and never reach the network. Each library is built by TFLM's own Makefile
(``TARGET=cortex_m_generic``) and cached: a second call returns at once. Next to each library goes ``flags.mk``:
the compile flags TFLM used for it (read from ``make -n``), which a generated firmware project includes so that
the application and the library agree.

    python -m ptq_keras.tflite.firmware_build            # the three libraries below
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CORES",
    "LIBRARIES",
    "Library",
    "FirmwareBuild",
    "ToolchainMissing",
    "build",
    "build_library",
    "build_seconds",
    "check_toolchain",
    "flash_parts",
    "make_firmware",
    "run_firmware",
    "section_sizes",
    "default_third_party",
    "repo_root",
    "tflm_root",
]

# core -> (TFLM TARGET_ARCH, QEMU machine)
CORES = {"cortex-m4": ("cortex-m4", "mps2-an386"), "cortex-m55": ("cortex-m55", "mps3-an547")}
KERNELS = ("reference", "cmsis_nn")
LIBRARIES = (("cortex-m4", "reference"), ("cortex-m4", "cmsis_nn"), ("cortex-m55", "cmsis_nn"))
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-g++", "arm-none-eabi-size", "qemu-system-arm")
DEBIAN_PACKAGES = ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "libstdc++-arm-none-eabi-newlib", "qemu-system-arm")

_MAKEFILE = "tensorflow/lite/micro/tools/make/Makefile"
_DOWNLOADS = "tensorflow/lite/micro/tools/make/downloads"
# archive -> (folder inside the archive, folder under downloads/)
_BUNDLES = {
    "flatbuffers.tar.gz": ("flatbuffers", "flatbuffers"),
    "gemmlowp.tar.gz": ("gemmlowp", "gemmlowp"),
    "ruy.tar.gz": ("ruy", "ruy"),
    "kissfft.tar.gz": ("kissfft", "kissfft"),
    "cmsis6.tar.gz": ("CMSIS_6", "cmsis"),
    "cortex-dfp.tar.gz": ("Cortex_DFP", "cmsis/Cortex_DFP"),
    "cmsis-nn.tar.gz": ("CMSIS-NN", "cmsis_nn"),
}
_PATCHES = {
    "flatbuffers": "tensorflow/lite/micro/tools/make/flatbuffers.patch",
    "kissfft": "third_party/kissfft/kissfft.patch",
}


class ToolchainMissing(RuntimeError):
    """The ARM GCC toolchain or qemu-system-arm is not on PATH."""


@dataclass
class Library:
    """A built ``libtensorflow-microlite.a``: its path, the flags file next to it and the TFLM tree."""

    core: str
    kernels: str
    path: Path
    flags_mk: Path
    tflm_root: Path
    seconds: float = 0.0  # how long TFLM's make took when the library was built
    cached: bool = False  # True when this call found it built


def repo_root() -> Path:
    """The repository this module belongs to (where ``setup.cfg`` is), else the current directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "setup.cfg").is_file() else Path.cwd()


def default_third_party() -> Path:
    return repo_root().parent / "shared" / "third_party"


def check_toolchain(tools=TOOLS) -> None:
    """Raise :class:`ToolchainMissing` naming the missing programs and the packages that provide them."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ToolchainMissing(
            f"{', '.join(missing)} not found on PATH. Install the Debian packages: "
            f"sudo apt-get install -y {' '.join(DEBIAN_PACKAGES)} (or run `make firmware`, which does)."
        )


def tflm_root(third_party: str | os.PathLike | None = None, out: str | os.PathLike | None = None, log=print) -> Path:
    """The TFLM tree to build: ``$TFLM_ROOT`` when set, else the bundles extracted once into ``out``
    (default ``out/tflm`` in the repository). Extraction goes to a temporary folder renamed when complete."""
    env = os.environ.get("TFLM_ROOT")
    if env:
        root = Path(env).resolve()
        if not (root / _MAKEFILE).is_file():
            raise FileNotFoundError(
                f"TFLM_ROOT={env} is not a tflite-micro checkout (no {_MAKEFILE}); "
                "git clone https://github.com/tensorflow/tflite-micro and point TFLM_ROOT at it."
            )
        return root
    out = Path(out) if out is not None else repo_root() / "out" / "tflm"
    root = out / "tflite-micro"
    if (root / _MAKEFILE).is_file():
        return root.resolve()
    third_party = Path(third_party) if third_party is not None else default_third_party()
    archives = ["tflite-micro.tar.gz", *_BUNDLES]
    absent = [a for a in archives if not (third_party / a).is_file()]
    if absent:
        raise FileNotFoundError(
            f"no TFLM tree: {', '.join(absent)} missing from {third_party}. Set TFLM_ROOT to a tflite-micro "
            "checkout (git clone https://github.com/tensorflow/tflite-micro; its Makefile downloads the rest)."
        )
    out.mkdir(parents=True, exist_ok=True)
    log(f"extracting TFLM and its dependencies from {third_party} into {root} ...")
    tmp = Path(tempfile.mkdtemp(prefix=".tflm-", dir=out))
    try:
        _extract(third_party / "tflite-micro.tar.gz", tmp, "tflite-micro", tmp / "tflite-micro")
        downloads = tmp / "tflite-micro" / _DOWNLOADS
        downloads.mkdir(parents=True, exist_ok=True)
        for archive, (inner, dest) in _BUNDLES.items():
            _extract(third_party / archive, downloads, inner, downloads / dest)
        (downloads / "pigweed").mkdir(exist_ok=True)
        for folder, patch in _PATCHES.items():
            subprocess.run(
                ["patch", "-s", "-p1", "-i", str(tmp / "tflite-micro" / patch)], cwd=downloads / folder, check=True
            )
        (tmp / "tflite-micro").rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root.resolve()


def _extract(archive: Path, into: Path, inner: str, dest: Path) -> None:
    """Extract ``archive`` (one top folder ``inner``) so that its contents end up in ``dest``."""
    with tempfile.TemporaryDirectory(dir=into) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="tar")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # cmsis/ holds Cortex_DFP/ too
            for item in (Path(tmp) / inner).iterdir():
                item.rename(dest / item.name)
        else:
            (Path(tmp) / inner).rename(dest)


def _make_args(core: str, kernels: str) -> list[str]:
    if core not in CORES:
        raise ValueError(f"core {core!r} is not supported; choose from {sorted(CORES)}.")
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} unknown; choose from {list(KERNELS)}.")
    args = [
        "-f",
        _MAKEFILE,
        "TARGET=cortex_m_generic",
        f"TARGET_ARCH={CORES[core][0]}",
        "TARGET_TOOLCHAIN_ROOT=/usr/bin/",
    ]
    if kernels != "reference":
        args.append(f"OPTIMIZED_KERNEL_DIR={kernels}")
    return args


def build_seconds(root: Path) -> dict:
    """(core, kernels) -> seconds TFLM's make took, for every library of ``LIBRARIES`` built in ``root``."""
    found = {}
    for core, kernels in LIBRARIES:
        timing = Path(root) / _gen_dir(core, kernels) / "lib" / "build_seconds.txt"
        if timing.is_file():
            found[(core, kernels)] = float(timing.read_text())
    return found


def _gen_dir(core: str, kernels: str) -> str:
    suffix = "" if kernels == "reference" else f"_{kernels}"
    return f"gen/cortex_m_generic_{CORES[core][0]}_default{suffix}_gcc"


def _env() -> dict:
    """TFLM's Makefile runs ``python3`` helpers: put this interpreter's folder first on PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path}


def build_library(core: str, kernels: str, root: Path | None = None, *, jobs: int = 2, log=print) -> Library:
    """``libtensorflow-microlite.a`` for ``core`` with ``kernels`` ('reference' or 'cmsis_nn'), built once."""
    make_args = _make_args(core, kernels)
    root = Path(root) if root is not None else tflm_root(log=log)
    lib = root / _gen_dir(core, kernels) / "lib" / "libtensorflow-microlite.a"
    lock_path = root / "gen" / f".{lib.parent.parent.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same library: wait for it, then reuse it
        return _build_locked(core, kernels, root, lib, make_args, jobs, log)


def _build_locked(core: str, kernels: str, root: Path, lib: Path, make_args: list, jobs: int, log) -> Library:
    flags_mk = lib.parent / "flags.mk"
    timing = lib.parent / "build_seconds.txt"
    if lib.is_file() and flags_mk.is_file():
        seconds = float(timing.read_text()) if timing.is_file() else 0.0
        log(f"{core} {kernels}: cached {lib}")
        return Library(core, kernels, lib, flags_mk, root, seconds, cached=True)
    check_toolchain(TOOLS[:3])
    log(f"{core} {kernels}: building TFLM (make -j{jobs}, several minutes on 2 cores) ...")
    started = time.perf_counter()
    logfile = lib.parent.parent / "build.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        done = subprocess.run(
            ["make", f"-j{jobs}", *make_args, "microlite"], cwd=root, env=_env(), stdout=f, stderr=subprocess.STDOUT
        )
    if done.returncode != 0 or not lib.is_file():
        tail = "".join(open(logfile, errors="replace").readlines()[-20:])
        raise RuntimeError(f"TFLM build for {core} {kernels} failed (log: {logfile}):\n{tail}")
    _write_flags(root, core, kernels, flags_mk)
    seconds = time.perf_counter() - started
    timing.write_text(f"{seconds:.1f}\n")
    log(f"{core} {kernels}: built {lib} in {seconds:.0f} s")
    return Library(core, kernels, lib, flags_mk, root, seconds)


def _write_flags(root: Path, core: str, kernels: str, flags_mk: Path) -> None:
    """Write ``flags.mk``: the C++ flags TFLM compiles ``micro_interpreter.cc`` with for this library (from
    ``make -n -B``), include folders relative to ``$(TFLM_ROOT)``."""
    obj = f"{_gen_dir(core, kernels)}/obj/core/tensorflow/lite/micro/micro_interpreter.o"
    dry = subprocess.run(
        ["make", "-n", "-B", *_make_args(core, kernels), obj], cwd=root, env=_env(), capture_output=True, text=True
    )
    line = next((ln for ln in dry.stdout.splitlines() if "micro_interpreter.cc" in ln and " -c " in ln), None)
    if line is None:
        raise RuntimeError(
            f"could not read TFLM's compile flags with make -n:\n{dry.stdout[-2000:]}{dry.stderr[-2000:]}"
        )
    flags = _app_flags(shlex.split(line), root)
    text = (
        f"# Compile flags of TFLM's {core} {kernels} library (from its Makefile with -n); written by the build.\n"
        f"TFLM_CXXFLAGS := {' '.join(flags)}\n"
    )
    tmp = flags_mk.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, flags_mk)


def _app_flags(tokens: list[str], root: Path) -> list[str]:
    """The flags of one compile command an application must share: defines, CPU/ABI, code generation,
    language and include folders (made relative to ``$(TFLM_ROOT)``); not the compiler, sources, outputs or
    warnings."""
    keep, i = [], 1
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("-o", "-MF", "-MT", "-MQ"):
            i += 2
            continue
        if tok in ("-I", "-isystem"):
            tok, i = tok + tokens[i + 1], i + 1
        if tok.startswith(("-I", "-isystem")):
            flag = "-isystem" if tok.startswith("-isystem") else "-I"
            path = tok[len(flag) :]
            if not os.path.isabs(path):
                path = "$(TFLM_ROOT)" if path in (".", "") else f"$(TFLM_ROOT)/{path}"
            elif path.startswith(str(root)):
                path = "$(TFLM_ROOT)" + path[len(str(root)) :]
            keep.append(f"{flag}{path}" if flag == "-I" else f"{flag} {path}")
        elif tok.startswith(("-D", "-m", "-f", "-O", "-std=", "-g")) and not tok.startswith("-MD"):
            keep.append(shlex.quote(tok).replace("$", "$$"))
        i += 1
    return keep


@dataclass
class FirmwareBuild:
    """A firmware project built for one library: the ELF and its section sizes (bytes)."""

    elf: Path
    flash: int  # text + data, without the embedded test inputs
    ram: int  # .data + .bss (the tensor arena is in .bss); the stack is not counted
    test_inputs: int  # flash taken by the embedded test inputs
    flash_parts: dict = field(default_factory=dict)  # model / kernels / runtime / other, adding up to ``flash``
    arena: int = 0  # bytes of RAM that are the tensor arena (the rest of ``ram`` is static data)


def _make_vars(lib: Library) -> list[str]:
    return [f"TFLM_ROOT={lib.tflm_root}", f"CORE={lib.core}", f"KERNELS={lib.kernels}", f"TFLM_LIB={lib.path}"]


def make_firmware(project: str | os.PathLike, lib: Library) -> FirmwareBuild:
    """Build the firmware project (``firmware.firmware``) in ``project`` against ``lib``."""
    check_toolchain(TOOLS[:3])
    done = subprocess.run(["make", "-s", *_make_vars(lib)], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the firmware in {project} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    elf = Path(project) / "build" / f"{lib.core}_{lib.kernels}" / "firmware.elf"
    sections = section_sizes(elf)
    inputs = sections.get(".test_inputs", 0)
    flash = sum(v for k, v in sections.items() if k not in (".bss", ".test_inputs"))
    ram = sections.get(".data", 0) + sections.get(".bss", 0)
    parts = flash_parts(elf.with_name("firmware.map"), lib.tflm_root)
    parts.pop("test_inputs")
    parts["other"] = flash - parts["model"] - parts["kernels"] - parts["runtime"]
    return FirmwareBuild(elf, flash, ram, inputs, parts, _symbol_size(elf, "tensor_arena"))


def _symbol_size(elf: Path, name: str) -> int:
    """Size of the first symbol whose (demangled) name contains ``name``; 0 when there is none."""
    out = subprocess.run(["arm-none-eabi-nm", "-S", "-C", str(elf)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and name in parts[3]:
            return int(parts[1], 16)
    return 0


# Output sections of the generated linker scripts that end up in flash (.data's initial values included).
_FLASH_SECTIONS = (".vectors", ".text", ".rodata", ".ARM.exidx", ".ARM.extab", ".data", ".init_array", ".fini_array")


def _kernel_objects(tflm_root: Path) -> set:
    """Object names (``conv.o``) of TFLM's kernels and the math they use: every source under
    tensorflow/lite/micro/kernels/ and tensorflow/lite/kernels/; CMSIS-NN's ``arm_*.o`` are matched by name."""
    names = set()
    for folder in ("tensorflow/lite/micro/kernels", "tensorflow/lite/kernels"):
        for path in (Path(tflm_root) / folder).rglob("*.c*"):
            if path.suffix in (".cc", ".c", ".cpp"):
                names.add(path.stem + ".o")
    return names


# Objects of a generated firmware project (firmware.firmware) besides the model's C array, and where they are built.
_PROJECT_OBJECTS = ("main.o", "startup.o", "test_inputs.o", "ptq_kernels.o")
_PROJECT_BUILD = "build/"


def flash_parts(map_file: str | os.PathLike, tflm_root: str | os.PathLike) -> dict:
    """Flash bytes of a firmware by origin, from its GNU ld map: ``model`` (the C array), ``kernels`` (TFLM's op
    kernels, CMSIS-NN and ptq_kernels.cc), ``runtime`` (the rest of TFLM: interpreter, allocator, flatbuffer
    reader), ``other`` (the test program, libc, libm, libgcc, libstdc++) and ``test_inputs`` (not counted as flash
    by ``make_firmware``). Approximate to a few hundred bytes: the map lists merged string constants at their
    sizes before merging, and alignment fill is not attributed (``make_firmware`` puts the difference in
    ``other``)."""
    kernels = _kernel_objects(Path(tflm_root))
    parts = dict.fromkeys(("model", "kernels", "runtime", "other", "test_inputs"), 0)

    def add(size: int, obj: str) -> None:
        archived = obj.endswith(")")
        member = obj[obj.rfind("(") + 1 : -1] if archived else os.path.basename(obj)
        if not archived and member not in _PROJECT_OBJECTS and obj.startswith(_PROJECT_BUILD):
            parts["model"] += size  # the project's one other source: <symbol>.cc, the C array
        elif member == "test_inputs.o":
            parts["test_inputs"] += size
        elif (
            member == "ptq_kernels.o"
            or "libtensorflow-microlite.a(" in obj
            and (member in kernels or member.startswith("arm_"))
        ):
            parts["kernels"] += size
        elif "libtensorflow-microlite.a(" in obj:
            parts["runtime"] += size
        else:
            parts["other"] += size

    with open(map_file) as f:
        lines = f.read().split("Linker script and memory map", 1)[-1].splitlines()
    section, pending = None, False
    for line in lines:
        if line and not line[0].isspace():
            section, pending = line.split()[0], False
            continue
        if section not in _FLASH_SECTIONS:
            continue
        tokens = line.split()
        if line.startswith(" .") or line.startswith(" COMMON"):
            if len(tokens) >= 4 and tokens[2].startswith("0x"):
                add(int(tokens[2], 16), tokens[3])
                pending = False
            else:
                pending = len(tokens) == 1
        elif pending and len(tokens) >= 3 and tokens[0].startswith("0x") and tokens[1].startswith("0x"):
            add(int(tokens[1], 16), tokens[2])
            pending = False
    return parts


def section_sizes(elf: str | os.PathLike) -> dict:
    """Allocated sections of ``elf`` (name -> bytes), from ``arm-none-eabi-objdump -h``."""
    out = subprocess.run(["arm-none-eabi-objdump", "-h", str(elf)], capture_output=True, text=True, check=True).stdout
    sizes, lines = {}, out.splitlines()
    for head, flags in zip(lines, lines[1:]):
        parts = head.split()
        if len(parts) >= 3 and parts[0].isdigit() and "ALLOC" in flags:
            sizes[parts[1]] = int(parts[2], 16)
    return sizes


def run_firmware(project: str | os.PathLike, lib: Library, timeout: float = 1800) -> str:
    """Build and run the firmware under QEMU (``make run``); what it printed. ``RuntimeError`` with the tail of
    the output when it exits non-zero (a TFLM error, a fault, the time limit)."""
    check_toolchain()
    done = subprocess.run(
        ["make", "-s", "run", *_make_vars(lib), f"QEMU_TIMEOUT={int(timeout)}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout + 600,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the firmware in {project} ({lib.core}, {lib.kernels}) exited with {done.returncode}:\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return done.stdout


def build(libraries=LIBRARIES, *, jobs: int = 2, log=print) -> list[Library]:
    """Every library of ``libraries`` ((core, kernels) pairs), each built once."""
    root = tflm_root(log=log)
    return [build_library(core, kernels, root, jobs=jobs, log=log) for core, kernels in libraries]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="make -j (default 2)")
    parser.add_argument(
        "--only", default="", help="comma-separated core:kernels, e.g. cortex-m4:cmsis_nn (default: all three)"
    )
    args = parser.parse_args(argv)
    libs = LIBRARIES
    if args.only:
        libs = tuple(tuple(item.split(":", 1)) for item in args.only.split(","))
    try:
        for lib in build(libs, jobs=args.jobs, log=lambda line: print(line, flush=True)):
            print(f"{lib.core} {lib.kernels}: {lib.path}")
    except (ToolchainMissing, FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
