"""Bad input gets a clear error (never a crash); inputs in every accepted form; a ternarized model converts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tflite_models as tm

from ptq_keras import keras
from ptq_keras import tflite as ptq_tflite
from ptq_keras.compat import tf
from ptq_keras.tflite import decode


@pytest.fixture(scope="module")
def mlp_and_int8():
    model = tm.build("mlp")
    x = tm.inputs(model, 24)
    return model, x, ptq_tflite.convert(model, x)


# ----------------------------------------------------------------------------- files that are not .tflite
@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (os.urandom(64), "not a TensorFlow Lite file"),
        (None, "corrupt or truncated"),  # a real file cut in half
    ],
    ids=["empty", "random", "truncated"],
)
def test_inspect_and_verify_reject_files_that_are_not_tflite(tmp_path, mlp_and_int8, content, message):
    model, x, int8 = mlp_and_int8
    if content is None:
        content = int8[: len(int8) // 3]
    path = tmp_path / "bad.tflite"
    path.write_bytes(content)
    with pytest.raises(ptq_tflite.FlatbufferError, match=message):
        ptq_tflite.inspect(path)
    with pytest.raises(ptq_tflite.FlatbufferError, match=message):
        ptq_tflite.verify(model, path, x)
    with pytest.raises(ptq_tflite.FlatbufferError, match=message):
        ptq_tflite.inspect(content)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.tflite"):
        ptq_tflite.inspect(tmp_path / "nothing.tflite")


def test_inspect_lists_tensors(mlp_and_int8):
    table = ptq_tflite.inspect(mlp_and_int8[2])
    assert table.ops == ["FULLY_CONNECTED"] * 3
    weights = [r for r in table.rows if r["name"].endswith("MatMul")]
    assert [r["shape"] for r in weights] == [[6, 16], [16, 24], [24, 20]]
    assert all(r["type"] == "INT8" and r["bytes"] == np.prod(r["shape"]) for r in weights)
    assert "fc1/MatMul" in str(table)


def test_verify_refuses_an_int8_reference_calibrated_on_other_data(mlp_and_int8):
    model, x, _ = mlp_and_int8
    micro = ptq_tflite.convert(model, x, target="micro")
    other = tm.inputs(model, 24, seed=7) * 3
    with pytest.raises(ValueError, match="calibrated on different data.*representative_data="):
        ptq_tflite.verify(model, micro, other)
    report = ptq_tflite.verify(model, micro, other, representative_data=x)
    assert report.steps[-1].ok and report.steps[-1].max_lsb == 0  # inputs out of the calibrated range saturate


# ----------------------------------------------------------------------------- options and data
def test_missing_representative_data_says_what_to_pass():
    with pytest.raises(ValueError, match=r"representative_data is required.*numpy array.*tf.data.Dataset"):
        ptq_tflite.convert(tm.build("mlp"), target="micro")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "int3"}, "unknown target 'int3'"),
        ({"encoding": "zip"}, "unknown encoding 'zip'"),
        ({"num_samples": 0}, "num_samples must be a positive int"),
    ],
)
def test_bad_options_are_rejected_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ptq_tflite.convert(tm.mlp(), np.zeros((2, 20), np.float32), **kwargs)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        ptq_tflite.convert(tm.mlp(), np.zeros((2, 20), np.float32), "micro")


def test_export_rejects_bad_target_lists(tmp_path):
    model, x = tm.mlp(), np.zeros((2, 20), np.float32)
    with pytest.raises(ValueError, match="twice"):
        ptq_tflite.export(model, x, tmp_path, targets=("int8", "int8"))
    with pytest.raises(ValueError, match="c_array=True needs a firmware target"):
        ptq_tflite.export(model, x, tmp_path, targets=("litert",), c_array=True)
    assert not os.listdir(tmp_path)


def test_data_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"shape \(4, 7\) does not fit the model input \(None, 20\)"):
        ptq_tflite.convert(tm.mlp(), np.zeros((4, 7), np.float32))


def test_representative_data_in_every_form_gives_the_same_file(mlp_and_int8):
    model, x, int8 = mlp_and_int8
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(5)
    generator = ([x[i : i + 1]] for i in range(len(x)))
    for data in (dataset, generator, lambda: iter(x), tf.data.Dataset.from_tensor_slices(x)):
        assert ptq_tflite.convert(model, data) == int8


# ----------------------------------------------------------------------------- layers the targets cannot pack
def test_non_ternary_layer_is_named_and_nothing_is_written(tmp_path):
    model = tm.build("cnn")
    kernel = model.get_layer("conv2").kernel
    kernel.assign(kernel.numpy() * np.linspace(0.5, 1.5, kernel.shape[0] * kernel.shape[1]).reshape(3, 3, 1, 1))
    x = tm.inputs(model, 8)
    for target in ("litert", "int4"):
        with pytest.raises(ptq_tflite.ExportError, match=r"layer 'conv2': kernel channel 0 is not ternary"):
            ptq_tflite.convert(model, x, target=target)
    with pytest.raises(ptq_tflite.ExportError, match="conv2"):
        ptq_tflite.export(model, x, tmp_path / "out", targets=("int8", "litert"))
    assert not (tmp_path / "out").exists()
    assert ptq_tflite.convert(model, x, target="int8")[4:8] == b"TFL3"
    # micro keeps a layer that is not ternary as plain int8 (keep_float, precision="mixed"), and says so
    with pytest.warns(UserWarning, match=r"1 layer\(s\) are not ternary and keep plain int8 kernels.*\['conv2'\]"):
        micro = ptq_tflite.convert(model, x, target="micro")
    assert len(decode.describe(micro)) == 2  # conv1 and logits are encoded, conv2 is not
    # ... but a model without any ternary layer is refused (it was not ternarized)
    with pytest.raises(ptq_tflite.ExportError, match="layer 'conv1': kernel channel 0 is not ternary"):
        ptq_tflite.convert(tm.cnn(), x, target="micro")


def test_layer_without_packed_storage_is_named():
    inp = keras.Input((4, 4, 2), name="image")
    y = keras.layers.Conv2DTranspose(2, 3, name="upsample")(inp)
    model = keras.Model(inp, keras.layers.Flatten()(y))
    with pytest.raises(ptq_tflite.ExportError, match=r"layer 'upsample' \(Conv2DTranspose\).*target 'litert'"):
        ptq_tflite.convert(model, np.zeros((2, 4, 4, 2), np.float32), target="litert")


def test_packing_check_names_a_non_ternary_int8_tensor(mlp_and_int8):
    convert_mod = __import__("importlib").import_module("ptq_keras.tflite.convert")
    flatbuffer = convert_mod.flatbuffer
    _, _, int8 = mlp_and_int8
    model = flatbuffer.read(int8)
    graph = model.subgraphs[0]
    weight = next(t for t in graph.tensors if t.name == b"mlp/fc1/MatMul")
    values = flatbuffer.buffer_array(model, weight).copy()
    values[0, values[0] != 0] = 5 * np.sign(values[0, values[0] != 0])
    values[0, 0], values[0, 1] = 127, 64
    model.buffers[weight.buffer].data = np.frombuffer(values.tobytes(), np.uint8)
    edited = flatbuffer.write(model)
    with pytest.raises(convert_mod.ExportError, match=r"'mlp/fc1/MatMul': channel 0 holds .* magnitudes"):
        convert_mod.pack(edited, "litert")
    with pytest.raises(convert_mod.ExportError, match=r"'mlp/fc1/MatMul': channel 0 holds .* magnitudes"):
        convert_mod.check_ternary(edited)  # what target micro runs before encoding


def test_keras_3_models_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="tf_keras"):
        ptq_tflite.convert(object(), np.zeros((1, 2), np.float32))


# ----------------------------------------------------------------------------- the ternarized (QAT) model
def test_ternarized_model_is_stripped_before_conversion():
    import ptq_keras

    model = tm.mlp()
    qmodel = ptq_keras.ternarize(model, sparsity=0.5)
    x = tm.inputs(model, 48)
    assert ptq_keras.is_ternarized(qmodel)
    micro = ptq_tflite.convert(qmodel, x[:24], target="micro")
    report = ptq_tflite.verify(qmodel, micro, x[24:], representative_data=x[:24])
    assert report.ok, str(report)
    assert ptq_tflite.convert(ptq_keras.strip(qmodel), x[:24]) == ptq_tflite.convert(qmodel, x[:24])


def test_the_export_modules_import_each_other_one_way():
    """convert -> verify -> report -> export: no module of ptq_keras.tflite imports one later in that flow."""
    import ast
    import pathlib

    import ptq_keras.tflite as package

    order = ["flatbuffer", "encoders", "decode", "micro", "checks", "pack", "ram", "convert", "verify", "report",
             "export", "cli"]  # fmt: skip
    root = pathlib.Path(package.__file__).parent
    for module in order:
        path = root / module / "__init__.py" if (root / module).is_dir() else root / f"{module}.py"
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {a.name for a in node.names}
        later = [m for m in imported if m in order and order.index(m) >= order.index(module)]
        assert not later, f"{module}.py imports {later}, which come later in the flow"
