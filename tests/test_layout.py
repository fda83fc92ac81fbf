"""The layout's rules hold: the import contracts of pyproject.toml, no function over 60 lines of code, and Keras 3
on JAX without tf_keras or tfmot (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python, with the environment of a user's shell (without the ``TF_USE_LEGACY_KERAS``
    that importing ptq_keras for tf_keras put into this process's)."""
    clean = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**clean, **env}, cwd=ROOT)  # fmt: skip


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(lint_imports):
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([lint_imports, "--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 5


def test_no_function_is_over_sixty_lines_of_code(tmp_path):
    spec = importlib.util.spec_from_file_location("function_length", os.path.join(ROOT, "tools", "function_length.py"))
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    assert checker.long_functions([os.path.join(ROOT, "ptq_keras")]) == []
    (tmp_path / "long.py").write_text("def f():\n    '''doc\n\n    more doc'''\n" + "    x = 1\n" * 60)
    assert [line.split(" ", 1)[1] for line in checker.long_functions([tmp_path])] == ["f (61 lines)"]  # doc not counted
    (tmp_path / "long.py").write_text("def f():\n    '''doc'''\n" + "    x = 1\n" * 59)
    assert checker.long_functions([tmp_path]) == []


def test_import_ptq_keras_on_jax_imports_neither_tf_keras_nor_tfmot():
    result = _run("import sys, ptq_keras; print(sorted(m for m in ('tf_keras', 'tensorflow_model_optimization', "
                  "'tensorflow') if m in sys.modules))", KERAS_BACKEND="jax")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_keras3_on_jax_trains_strips_and_saves_without_tf_keras_or_tfmot(tmp_path):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed (pip install 'ptq_keras[jax]')")
    code = f"""
import sys, numpy as np, keras, ptq_keras
inp = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(4, 3)(inp)
x = keras.layers.DepthwiseConv2D(3)(x)
x = keras.layers.SeparableConv2D(4, 1)(x)
model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
q = ptq_keras.ternarize(model, sparsity=0.5, soft_decay=0.9, precision="mixed", activations="int8")
q.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
q.fit(x, np.zeros(16, "int64"), epochs=2, batch_size=8, verbose=0)
plain = ptq_keras.strip(q, batchnorm_data=x)
ptq_keras.summary(q, print_fn=None)
q.save({str(tmp_path / "q.keras")!r})
ptq_keras.load_model({str(tmp_path / "q.keras")!r})
print(sorted(m for m in ("tf_keras", "tensorflow_model_optimization") if m in sys.modules))
"""
    result = _run(code, KERAS_BACKEND="jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_library_messages_go_through_the_ptq_keras_logger_and_can_be_silenced(capsys):
    import logging

    import ptq_keras
    from ptq_keras import keras

    model = keras.Sequential([keras.Input((3, 3, 1)), keras.layers.Conv2D(2, 3, name="stem"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="head")])  # fmt: skip
    ptq_keras.ternarize(model, sparsity=0.9)  # the stem's fan-in of 9 caps it: a message says so
    assert "ptq_keras: 2 kernel(s) with few weights per output channel" in capsys.readouterr().out
    logger = logging.getLogger("ptq_keras")
    level = logger.level
    try:
        logger.setLevel(logging.WARNING)
        ptq_keras.ternarize(model, sparsity=0.9)
        assert capsys.readouterr().out == ""
    finally:
        logger.setLevel(level)


def test_every_package_is_installed():
    """``setup.cfg`` lists each package (a wheel has only those): every folder of ``ptq_keras/`` with an
    ``__init__.py``."""
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    listed = {name.strip() for name in config["options"]["packages"].split(",")}
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "ptq_keras")):
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert listed == found
