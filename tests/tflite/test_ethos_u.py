"""Target ``ethos-u``: ternary models compiled by Arm's Vela (every op on the NPU, encoded weights against the plain
int8 model of the same architecture), the report, the C array, verify, options and errors."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import tensorflow as tf

import ptq_keras
from ptq_keras import keras, models
from ptq_keras import tflite as ptq_tflite
from ptq_keras.tflite import ethosu, report

convert_mod = importlib.import_module("ptq_keras.tflite.convert")
verify_mod = importlib.import_module("ptq_keras.tflite.verify")

MODELS = ("small_cnn", "ds_cnn", "ds_resnet")  # a Sequential CNN, a depthwise model, a residual model


def _ternary(name: str, sparsity: float = 0.7):
    """(float model, ternarized model trained one short epoch, samples): real ptq_keras training, random data."""
    keras.utils.set_random_seed(0)
    float_model = models.MODELS[name]()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, *float_model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, 64)
    q = ptq_keras.ternarize(float_model, sparsity=sparsity)
    q.compile("adam", "sparse_categorical_crossentropy")
    q.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return float_model, q, x


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            float_model, q, x = _ternary(name)
            out = tmp_path_factory.mktemp(name)
            result = ptq_tflite.export(
                q, x[:32], out, targets=("int8", "ethos-u"), float_model=float_model, c_array="ethos-u", measure=False
            )
            cache[name] = (q, x, result)
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_ternary_models_run_wholly_on_the_npu_with_small_encoded_weights(compiled, name):
    _, _, result = compiled(name)
    target = result.report.targets["ethos-u"]
    figures, plain = target.ethos_u, result.report.ethos_u_plain_int8
    assert figures["cpu_ops"] == 0 and figures["cpu_op_names"] == [] and figures["npu_ops"] > 0
    assert plain["cpu_ops"] == 0 and plain["npu_ops"] == figures["npu_ops"]
    assert figures["accelerator"] == "ethos-u55-128"
    assert (figures["system_config"], figures["memory_mode"]) == ("Ethos_U55_High_End_Embedded", "Shared_Sram")
    # the same architecture: the same weight count; ternary weights encode to at most 0.3x the plain int8 ones
    int8_weights = report.weight_payload(open(result.files["int8"], "rb").read())["weights"]
    assert figures["weights"] == plain["weights"] == int8_weights == target.weights
    assert figures["encoded_weight_bytes"] <= 0.3 * plain["encoded_weight_bytes"], (figures, plain)
    assert target.bits_per_weight == pytest.approx(8 * figures["encoded_weight_bytes"] / int8_weights)
    assert target.weight_payload_bytes == figures["encoded_weight_bytes"]
    assert figures["flash_bytes"] > figures["encoded_weight_bytes"] and figures["sram_bytes"] > 0
    assert figures["cycles"] > 0 and figures["inference_time_s"] > 0 and figures["macs"] > 0
    # the file: Vela's custom op, which no host runtime runs
    buf = open(result.files["ethos-u"], "rb").read()
    assert target.file_bytes == len(buf)
    assert ptq_tflite.inspect(buf).ops == ["ethos-u"]
    assert verify_mod.detect_target(buf) == "ethos-u" and verify_mod.runtimes_for(buf) == ()
    saved = json.loads(open(result.files["report"]).read())
    assert saved["targets"]["ethos-u"]["ethos_u"]["encoded_weight_bytes"] == figures["encoded_weight_bytes"]
    assert saved["ethos_u_plain_int8"]["encoded_weight_bytes"] == plain["encoded_weight_bytes"]


def test_summary_c_array_and_verify(compiled):
    q, x, result = compiled("small_cnn")
    figures = result.report.targets["ethos-u"].ethos_u
    text = result.summary()
    assert "ethos-u: ethos-u55-128 (Ethos_U55_High_End_Embedded, Shared_Sram)" in text
    assert f"-> {figures['encoded_weight_bytes']:,} B" in text
    assert "plain int8 model of the same architecture" in text and "ternary encoded weights 0." in text
    header = open(result.files["c_header"]).read()
    assert f"model_data_npu_scratch_size = {figures['sram_bytes']};" in header
    assert "model_data_arena_size" not in header  # TFLM cannot measure an arena without the NPU
    assert f"model_data_len = {result.report.targets['ethos-u'].file_bytes};" in header
    source = open(result.files["c_source"]).read()
    assert source.count("0x") == result.report.targets["ethos-u"].file_bytes
    parity = ptq_tflite.verify(q, result.files["ethos-u"], x[32:])
    assert parity.ok, str(parity)
    assert [(s.reference, s.candidate) for s in parity.steps] == [("keras", "int8"), ("litert", "tflm")]
    assert parity.target == "ethos-u" and "runs only on the NPU" in str(parity)


def test_cpu_fallback_ops_are_named():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    h = keras.layers.Lambda(lambda t: tf.math.top_k(t, 4).values, name="topk")(h)
    model = keras.Model(inp, keras.layers.Dense(4)(h))
    int8 = ptq_tflite.convert(model, np.random.default_rng(0).uniform(0, 1, (32, 16)).astype(np.float32))
    _, figures = ethosu.compile(int8)
    assert figures.cpu_ops == 1 and figures.npu_ops >= 2
    assert len(figures.cpu_op_names) == 1 and figures.cpu_op_names[0].startswith("TOPK_V2 ")
    assert "Unsupported" in figures.cpu_op_names[0]
    assert "1 CPU (TOPK_V2" in figures.line()


def test_options_pass_through_to_vela(compiled):
    _, _, result = compiled("ds_resnet")
    int8 = result.int8
    data, u65 = ethosu.compile(int8, ethosu.VelaOptions("ethos-u65-256"))
    assert (u65.system_config, u65.memory_mode) == ("Ethos_U65_High_End", "Dedicated_Sram")
    assert u65.dram_bytes > 0 and u65.flash_bytes == 0 and u65.weights_storage == "DRAM"
    _, u85 = ethosu.compile(int8, ethosu.VelaOptions("ethos-u85-256", optimise="Size"))
    assert (u85.accelerator, u85.system_config, u85.optimise) == ("ethos-u85-256", "Ethos_U85_SYS_Flash_High", "Size")
    _, sram_only = ethosu.compile(int8, ethosu.VelaOptions(system_config="Ethos_U55_High_End_Embedded",
                                                           memory_mode="Sram_Only"))  # fmt: skip
    assert sram_only.memory_mode == "Sram_Only"
    assert ptq_tflite.inspect(data).ops == ["ethos-u"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(accelerator="ethos-u99-1"), "unknown Ethos-U accelerator 'ethos-u99-1'"),
        (dict(optimise="Fast"), "optimise must be one of"),
        (dict(system_config="No such"), "system_config must be a section name"),
        (dict(system_config="Nope"), "Section System_Config.Nope not found"),
    ],
)
def test_bad_vela_options_are_clear_errors(compiled, tmp_path, options, message):
    q, x, _ = compiled("ds_resnet")
    with pytest.raises(ptq_tflite.ExportError, match=message):
        ptq_tflite.export(q, x[:16], tmp_path / "out", targets=("int8", "ethos-u"), measure=False, **options)
    assert not (tmp_path / "out" / "model_int8.tflite").exists()  # nothing half-written


def test_missing_vela_names_the_install_command(compiled, monkeypatch, tmp_path):
    q, x, _ = compiled("ds_resnet")
    monkeypatch.setattr(ethosu, "available", lambda: False)
    with pytest.raises(ptq_tflite.ExportError, match=r"pip install 'ptq_keras\[ethos-u\]'"):
        ptq_tflite.export(q, x[:16], tmp_path / "out", targets=("int8", "ethos-u"), measure=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ptq_tflite.ExportError, match="ethos-u-vela=="):
        ptq_tflite.convert(q, x[:16], target="ethos-u")


def test_vela_failure_carries_its_reason(compiled):
    """The micro file (TFLM_DECODE feeding the convolutions) is no Vela input: the error has Vela's reason."""
    q, x, _ = compiled("ds_resnet")
    micro = ptq_tflite.convert(q, x[:16], target="micro", encoding="huffman")
    with pytest.raises(ethosu.VelaError, match=r"Vela failed for ethos-u55-128 .*could not run on NPU"):
        ethosu.compile(micro)
