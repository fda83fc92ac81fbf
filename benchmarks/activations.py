"""Does the int8 file compute what the Keras model computes? Top-1 agreement with and without activations="int8".

For each model (``ds_cnn`` and the residual depthwise ``ds_resnet``) a float model trains on Fashion-MNIST, then
ternarizes with ``activations=None`` and with ``activations="int8"``, fine-tunes, strips (BatchNorm and activation
ranges re-estimated), exports ``int8`` and ``micro``, and ``ptq_keras.tflite.verify`` compares the files with the
Keras model over the whole test set. For ``activations="int8"`` a layer trace follows: for each int8 tensor of the
file, the share of its values that differ from the Keras quantizer's output there (the file run on LiteRT's reference
kernels with every tensor kept; differences carry forward, so the shares add up along the graph).

    .venv/bin/python benchmarks/activations.py                 # about 30 minutes on 2 cores
    .venv/bin/python benchmarks/activations.py --quick         # smoke run, numbers meaningless

Writes ``benchmarks/results/activations.md`` (``--quick``: into ``--work_dir``).
"""

from __future__ import annotations

from ptq_keras import quiet

quiet.for_script(__name__)  # TensorFlow's start-up lines off standard error unless --verbose (before it loads)

import datetime
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from examples import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["ds_cnn", "ds_resnet"], "Models of ptq_keras.models.")
flags.DEFINE_integer("float_epochs", 3, "Epochs of the float model.", lower_bound=1)
flags.DEFINE_integer("epochs", 2, "Fine-tuning epochs.", lower_bound=1)
flags.DEFINE_float("sparsity", 0.7, "Target sparsity.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("quick", False, "Smoke run: 2048 training and test examples, one epoch each.")
flags.DEFINE_string("work_dir", "out/bench/activations", "Where the exported files go.")
flags.DEFINE_string("results_dir", "benchmarks/results", "Where activations.md goes (--quick: --work_dir).")
flags.DEFINE_string("results_name", "activations", "Name of the results file (<name>.md).")


def _trace(plain, tflite_bytes: bytes, x) -> list[tuple[str, float, float]]:
    """``(quantizer, share of values off by more than half an LSB, max LSB)`` per int8 op output of the file, matched
    in graph order with the model's quantizers (each op of these models ends in one)."""
    import numpy as np

    from ptq_keras import activations as act
    from ptq_keras import keras
    from ptq_keras.compat import tf

    quantizers = [layer for layer in plain.layers if act.is_activation_quantizer(layer)][1:]  # the input's is not an op
    keras_out = keras.Model(plain.inputs, [q.output for q in quantizers])(x)
    reference = tf.lite.experimental.OpResolverType.BUILTIN_REF
    it = tf.lite.Interpreter(model_content=tflite_bytes, experimental_op_resolver_type=reference,
                             experimental_preserve_all_tensors=True)  # fmt: skip
    it.allocate_tensors()
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    outputs = [tensors[op["outputs"][0]] for op in it._get_ops_details() if op["op_name"] != "DELEGATE"]
    if len(outputs) != len(quantizers):
        return []
    inp = it.get_input_details()[0]
    scale_in, zero_in = inp["quantization"]
    off, largest = np.zeros(len(outputs)), np.zeros(len(outputs))
    for i in range(len(x)):
        it.set_tensor(inp["index"], np.clip(np.round(x[i : i + 1] / scale_in) + zero_in, -128, 127).astype(np.int8))
        it.invoke()
        for j, (tensor, expected) in enumerate(zip(outputs, keras_out)):
            scale, zero = tensor["quantization"]
            got = (it.get_tensor(tensor["index"]).astype(np.float32) - zero) * scale
            lsb = np.abs(got - np.asarray(expected[i : i + 1]).reshape(got.shape)) / scale
            off[j] += np.mean(lsb > 0.5) / len(x)
            largest[j] = max(largest[j], float(lsb.max()))
    return [(q.name, float(o), float(m)) for q, o, m in zip(quantizers, off, largest)]


def _run(name, x, y, x_test, y_test, work):
    import ptq_keras
    from ptq_keras import keras, models
    from ptq_keras import tflite as ptq_tflite

    def compile_(model):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.Adam(), loss, ["accuracy"])

    keras.utils.set_random_seed(FLAGS.seed)
    base = models.build(name, x.shape[1:], 10)
    compile_(base)
    epochs = 1 if FLAGS.quick else FLAGS.float_epochs
    base.fit(x, y, epochs=epochs, batch_size=128, verbose=2)
    float_acc = base.evaluate(x_test, y_test, verbose=0)[1]
    rows = []
    for activations in (None, "int8"):
        keras.utils.set_random_seed(FLAGS.seed + 1)
        q = ptq_keras.ternarize(base, sparsity=FLAGS.sparsity, activations=activations)
        compile_(q)
        q.fit(x, y, epochs=1 if FLAGS.quick else FLAGS.epochs, batch_size=128, verbose=2)
        plain = ptq_keras.strip(q, batchnorm_data=x)
        compile_(plain)
        acc = plain.evaluate(x_test, y_test, verbose=0)[1]
        out = os.path.join(work, f"{name}_{activations or 'float'}")
        result = ptq_tflite.export(plain, x[:500], out, targets=("int8", "micro"), measure=False)
        parity = ptq_tflite.verify(plain, result.files["int8"], x_test, num_samples=len(x_test), min_top1=0.995)
        print(parity, flush=True)
        keras_rung = parity.steps[0]
        micro = ptq_tflite.verify(plain, result.files["micro"], x_test, num_samples=len(x_test), min_top1=0.995)
        rows.append(
            {
                "model": name,
                "activations": activations or "None (float, calibrated at export)",
                "float": float_acc,
                "keras": acc,
                "top1": keras_rung.top1_agreement,
                "max_lsb": keras_rung.max_lsb,
                "mean_lsb": keras_rung.mean_lsb,
                "micro_bit_exact": micro.steps[-1].max_lsb == 0,
                "ok": parity.ok,
                "trace": _trace(plain, open(result.files["int8"], "rb").read(), x_test[:500]) if activations else [],
            }
        )
    return rows


def main(argv):
    del argv
    from ptq_keras import data

    limit = 2048 if FLAGS.quick else None
    x, y = data.load_numpy("fashion_mnist", "train", limit=limit)
    x_test, y_test = data.load_numpy("fashion_mnist", "test", limit=limit)
    x, x_test = (x / 255.0).astype("float32"), (x_test / 255.0).astype("float32")
    work = FLAGS.work_dir
    os.makedirs(work, exist_ok=True)
    start = time.time()
    rows = []
    for name in FLAGS.models:
        rows += _run(name, x, y, x_test, y_test, work)
    lines = [
        "# int8 file against the Keras model: activations=None vs activations=\"int8\"",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} on {platform.node()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs; {int(time.time() - start)} s) by "
        f"`{common.command_line('benchmarks/activations.py', sys.argv[1:])}`"
        + (" (**--quick smoke run: not meaningful**)" if FLAGS.quick else "")
        + ".",
        "",
        f"Fashion-MNIST, {len(x)} training images; float {FLAGS.float_epochs} epochs, then ternarize(sparsity="
        f"{FLAGS.sparsity:g}) and {FLAGS.epochs} epochs of `fit` (Adam 1e-3), `strip(q, batchnorm_data=x)`, export "
        f"`int8` and `micro`, `verify` over the {len(x_test)} test images (LiteRT reference kernels).",
        "",
        "| model | activations in training | float acc | ternary Keras acc | int8 file top-1 agreement with Keras | "
        "max / mean error (output LSB) | micro bit-exact with int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['activations']} | {100 * r['float']:.2f}% | {100 * r['keras']:.2f}% "
            f"| {100 * r['top1']:.2f}% | {r['max_lsb']:.2f} / {r['mean_lsb']:.3f} | {r['micro_bit_exact']} |"
        )
    for r in (r for r in rows if r["trace"]):
        lines += [
            "",
            f"Layer trace, {r['model']} with int8 activations (first 500 test images): share of each int8 tensor's "
            "values more than half an LSB from the Keras quantizer's output, and the largest difference.",
            "",
            "| quantizer (op output) | values off | max LSB |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {100 * share:.3f}% | {largest:.0f} |" for name, share, largest in r["trace"]]
    out_dir = work if FLAGS.quick else FLAGS.results_dir
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{FLAGS.results_name}.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
