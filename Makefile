# Two commands that work on a fresh machine: `make demo` (end-to-end on real Fashion-MNIST) and `make test`.
# Both create .venv, install the pinned packages and the Debian data package, and skip what is already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-slow test-matrix bench bench-all fuzz lint setup data clean firmware docs constraints

setup: $(STAMP)

# setup.cfg declares version ranges (what `pip install .` accepts); constraints.txt pins the exact versions
# development and CI use (`make constraints` writes it from the venv).
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=64" wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

constraints: setup
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^ptq.keras'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

# One venv per supported TensorFlow minor version (tools/matrix/*.txt) in .venv-matrix/, each running a
# representative subset of the tests; prints the matrix and writes docs/results/matrix.md (about 10 min per entry
# on 2 cores, most of it the first install).
test-matrix:
	$(PYTHON) tools/test_matrix.py

# The documentation site (MkDocs, Material, mkdocstrings) into out/site; --strict fails on any warning, broken links
# and references included.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

demo: setup data
	$(PY) examples/demo.py

# One pytest process per core (at most 4; pytest-xdist), each test file in one process so that its module
# fixtures are built once.
test: setup data
	$(PY) -m pytest -q -m "not slow" -n auto --maxprocesses=4 --dist loadfile tests

# The end-to-end tests marked slow (a few minutes each); CI runs them after `make test`.
test-slow: setup data
	$(PY) -m pytest -q -m slow tests

# The accuracy-vs-size table and plot over 3 seeds on small_cnn, ds_cnn and ds_resnet, a process per core (at most 4;
# several hours on 2 cores: see docs/results.md; interrupted runs continue where they stopped) and the training
# step-time ratio.
bench: setup data
	$(PY) benchmarks/accuracy_size.py --jobs=$$(n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
	$(PY) benchmarks/step_time.py

# Everything in benchmarks/results/: also the ablation of the options over seeds (ablation.md), the related
# methods at 0.7 and 0.85 on both models (methods.md), int8-file agreement (activations.md), the export targets,
# the TFLM_DECODE encodings, bounded decode memory, the Ethos-U (Vela) figures and the micro file's parts. Many
# hours on 2 cores; every training run is cached in out/bench/.
bench-all: bench
	$(PY) benchmarks/ablation.py
	$(PY) benchmarks/ablation.py --models=small_cnn,ds_cnn --sparsities=0.7,0.85 \
		--variants=defaults,taylor,greg,psg,srfp --results_name=methods
	$(PY) benchmarks/activations.py
	$(PY) benchmarks/export_size.py
	$(PY) benchmarks/encodings.py
	$(PY) benchmarks/decode_memory.py
	$(PY) benchmarks/ethos_u.py
	$(PY) benchmarks/flash_budget.py
	$(PY) benchmarks/fits_in.py
	$(PY) benchmarks/resnet18_size.py
	$(PY) benchmarks/micro_size.py

# The demo's files as firmware on emulated Cortex-M4 (TFLM reference kernels and CMSIS-NN) and Cortex-M55 (CMSIS-NN)
# under QEMU: bit-exactness against the TFLM Python interpreter on 100 test images, flash, RAM, instructions per
# inference (benchmarks/results/firmware.md). Installs the ARM toolchain and QEMU (Debian packages) when missing,
# builds TFLM from ../shared/third_party (or TFLM_ROOT) once per core into out/tflm (tens of minutes on 2 cores the
# first time), and runs a short demo first when out/demo has no files.
DEMO_QUICK := --limit 6000 --float_epochs 2 --ptq_epochs 2 --targets int8,micro
firmware: setup data
	@if ! command -v arm-none-eabi-g++ >/dev/null || ! command -v qemu-system-arm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq gcc-arm-none-eabi libnewlib-arm-none-eabi \
	    libstdc++-arm-none-eabi-newlib qemu-system-arm; \
	fi
	$(PY) -m ptq_keras.tflite.firmware_build
	test -f out/demo/model_int8.tflite -a -f out/demo/ternary_stripped.h5 || $(PY) examples/demo.py $(DEMO_QUICK)
	$(PY) benchmarks/firmware.py

# 10,000 damaged copies of exported files through every reader and, when they parse, the runtimes (in a child
# process, so a crash is reported); a few minutes. `make test` runs 300 cases of the same (tests/tflite/test_fuzz.py).
fuzz: setup
	$(PY) tests/fuzz.py --cases=10000

# ruff, the import contracts of pyproject.toml (import-linter) and the function length rule
lint: setup
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/lint-imports
	$(PY) tools/function_length.py ptq_keras

clean:
	rm -rf $(VENV) out runs *.egg-info
