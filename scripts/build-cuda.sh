#!/usr/bin/env bash
# Builds `pfstorer` with the `cuda` feature on a Linux machine that has neither a GPU nor a
# system CUDA toolkit. The CUDA 13.0 compiler and headers come from NVIDIA's Python wheels
# (PyPI), unpacked into a local folder; nothing is installed system-wide.
#
#   scripts/build-cuda.sh                       # sm_90 (H100/H200): target/cuda/pfstorer
#   scripts/build-cuda.sh --cudnn               # with cuDNN 9: target/cuda/pfstorer-cudnn
#   scripts/build-cuda.sh --nccl                # also the NCCL build for multi-GPU train-base:
#       target/cuda/pfstorer-nccl
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # another GPU generation (A100: 80, L4/4090: 89)
#   scripts/build-cuda.sh --bundle DIR          # both builds and the GPU-check bundle (see
#       scripts/GPU.md): DIR/pfstorer, DIR/pfstorer-cudnn, DIR/tests/<parity test executables>,
#       DIR/tests-cudnn/<the same, built with cuDNN>, DIR/fixtures, DIR/gpu-check.sh,
#       DIR/gpu_reference.py; add --with-libs to put the CUDA 13 runtime libraries (cuBLAS,
#       cuRAND, NVRTC, cudart, cuDNN wheels, ~2 GB) in DIR/lib for machines without them.
#   scripts/build-cuda.sh --pack FILE.tar.xz   # the bundle without fixtures, compressed (the
#       executables are mostly the same PTX text, which one large xz dictionary stores once), for
#       a GPU machine that has the repository (run: tar -xJf FILE -C /tmp &&
#       bash /tmp/gpu-bundle/gpu-check.sh --fixtures tests/fixtures).
#
# --cudnn: candle's forward convolutions and pfstorer's frozen-convolution input gradient run on
# cuDNN 9 (cargo feature `cudnn`). The cuDNN headers and its front-end library libcudnn.so.9 come
# from NVIDIA's nvidia-cudnn-cu13 wheel (pinned; only those files are unpacked); the linker gets
# the unversioned libcudnn.so as a link to it. At run time the dynamic loader must find
# libcudnn.so.9 and the libcudnn_*.so.9 engines next to it (a PyTorch environment's
# site-packages/nvidia/cudnn/lib, the wheel, or DIR/lib with --with-libs).
#
# Environment:
#   CUDA_COMPUTE_CAP   compute capability to compile the kernels for (default 90; there is no GPU
#                      here to ask, so it is always explicit)
#   PFSTORER_CUDA_DIR  where the toolkit wheels are unpacked (default: .cuda/ in the repository)
#   PYTHON             python with pip (default python3)
#
# Why link stubs: candle's CUDA backend (cudarc, `dynamic-linking`) links libcuda, libnvrtc,
# libcurand, libcublas and libcublasLt at build time. The driver library only exists where a
# driver is installed, and the math libraries are large, so the link uses generated stubs that
# carry the real sonames (libcuda.so.1, libcublas.so.13, ...). At run time the dynamic loader
# finds the real libraries: the driver's libcuda.so.1, and CUDA 13 cuBLAS/cuRAND/NVRTC/cudart
# from a CUDA 13 toolkit or the nvidia-* 13.x wheels, on LD_LIBRARY_PATH (see README, "GPU").
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cuda_dir="${PFSTORER_CUDA_DIR:-$repo/.cuda}"
python="${PYTHON:-python3}"
compute_cap="${CUDA_COMPUTE_CAP:-90}"

# CUDA 13.0 (driver >= 580), one pinned version per wheel.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

toolkit="$cuda_dir/nvidia/cu13"
if [[ ! -x "$toolkit/bin/nvcc" || ! -x "$toolkit/nvvm/bin/cicc" ]]; then
  echo "build-cuda: installing the CUDA 13.0 compiler wheels into $cuda_dir" >&2
  "$python" -m pip install --quiet --no-deps --disable-pip-version-check \
    --target "$cuda_dir" "${wheels[@]}"
fi
for tool in bin/nvcc bin/ptxas bin/fatbinary nvvm/bin/cicc; do
  [[ -x "$toolkit/$tool" ]] || { echo "build-cuda: $toolkit/$tool missing after install" >&2; exit 1; }
done

# Unversioned names the linker looks for (-lcudart).
ln -sf libcudart.so.13 "$toolkit/lib/libcudart.so"

# nvcc from the wheels does not add the CCCL headers (cuda/std/..., cub) to its search path.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$toolkit/include/cccl"

# Link stubs: one function per entry point cudarc declares for each library, returning 999
# (CUDA_ERROR_UNKNOWN), so a stub that is picked up at run time by mistake fails cleanly
# (`--device cuda: no usable CUDA device`) instead of pretending to work.
stubs="$toolkit/lib/stubs"
mkdir -p "$stubs"
cudarc_src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -1)"
if [[ -z "$cudarc_src" ]]; then
  (cd "$repo" && cargo fetch --quiet)
  cudarc_src="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -1)"
fi
make_stub() { # module, library name, soname
  local module="$1" lib="$2" soname="$3" c="$stubs/$2.c"
  sed -n 's/^pub unsafe fn \([A-Za-z0-9_]*\)(.*/int \1(void) { return 999; }/p' \
    "$cudarc_src/src/$module/sys/mod.rs" | sort -u > "$c"
  [[ -s "$c" ]] || { echo "build-cuda: no entry points found for $lib in $cudarc_src" >&2; exit 1; }
  gcc -shared -fPIC -o "$stubs/$lib.so" -Wl,-soname,"$soname" "$c"
}
make_stub driver   libcuda     libcuda.so.1
make_stub nvrtc    libnvrtc    libnvrtc.so.13
make_stub curand   libcurand   libcurand.so.10
make_stub cublas   libcublas   libcublas.so.13
make_stub cublaslt libcublasLt libcublasLt.so.13
# NCCL (linked only by the --nccl build): cudarc's `nccl` feature binds the NCCL 2.30 API.
make_stub nccl     libnccl     libnccl.so.2

bundle=""
pack=""
with_libs=0
cudnn=0
nccl=0
cargo_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --pack) pack="$2"; shift 2 ;;
    --with-libs) with_libs=1; shift ;;
    --cudnn) cudnn=1; shift ;;
    --nccl) nccl=1; shift ;;
    *) cargo_args+=("$1"); shift ;;
  esac
done
# A bundle carries both builds: the GPU check compares them.
[[ -n "$bundle" || -n "$pack" ]] && cudnn=1

# cuDNN 9 for CUDA 13, one pinned version (the newest on PyPI when this was written).
cudnn_wheel=nvidia-cudnn-cu13==9.28.1.4
cudnn_dir="$cuda_dir/nvidia/cudnn"
if [[ "$cudnn" == 1 && ! -f "$cudnn_dir/lib/libcudnn.so.9" ]]; then
  echo "build-cuda: fetching $cudnn_wheel (headers and libcudnn.so.9 only) into $cudnn_dir" >&2
  wheel_dl="$cuda_dir/wheels"
  mkdir -p "$wheel_dl" "$cudnn_dir"
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheel_dl" "$cudnn_wheel"
  whl="$(ls "$wheel_dl"/nvidia_cudnn_cu13-"${cudnn_wheel#*==}"-*.whl | head -1)"
  # The engines (libcudnn_*.so.9, ~900 MB) are loaded at run time only; the link needs the
  # front end, which exports the whole API.
  "$python" - "$whl" "$cuda_dir" <<'PY'
import sys, zipfile
whl, dest = sys.argv[1:3]
with zipfile.ZipFile(whl) as z:
    z.extractall(dest, [n for n in z.namelist()
                        if n.startswith("nvidia/cudnn/include/") or n == "nvidia/cudnn/lib/libcudnn.so.9"])
PY
fi
if [[ "$cudnn" == 1 ]]; then
  [[ -f "$cudnn_dir/lib/libcudnn.so.9" && -f "$cudnn_dir/include/cudnn_version.h" ]] ||
    { echo "build-cuda: $cudnn_dir lacks libcudnn.so.9 or cudnn_version.h" >&2; exit 1; }
  ln -sf "$cudnn_dir/lib/libcudnn.so.9" "$stubs/libcudnn.so"
  cudnn_version="$(sed -n 's/^#define CUDNN_\(MAJOR\|MINOR\|PATCHLEVEL\) *\([0-9]*\).*/\2/p' \
    "$cudnn_dir/include/cudnn_version.h" | paste -sd.)"
fi

export CUDA_HOME="$toolkit"
export CUDA_ROOT="$toolkit"
export PATH="$toolkit/bin:$PATH"
export CUDA_COMPUTE_CAP="$compute_cap"
export CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stubs -L native=$toolkit/lib"

echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $compute_cap${cudnn_version:+, cuDNN $cudnn_version}" >&2
cd "$repo"
# One target folder for both builds: candle's kernels (the slow part) do not depend on cuDNN and
# are compiled once; each build's binary is copied out under its own name.
target_dir="${CARGO_TARGET_DIR:-$repo/target/cuda}"
# The parity tests that follow PFSTORER_TEST_DEVICE / PFSTORER_TEST_DTYPE, and the CUDA kernel
# checks (tests/cuda_kernels.rs).
parity_tests=(parity_unet parity_text parity_vae pipeline_restore cuda_kernels)
if [[ -n "$pack" && -z "$bundle" ]]; then
  bundle="$(mktemp -d)/gpu-bundle"
fi

variants=(cuda)
if [[ -n "$bundle" ]]; then variants=(cuda cudnn); elif [[ "$cudnn" == 1 ]]; then variants=(cudnn); fi
# --nccl: data-parallel base training across processes (target/cuda/pfstorer-nccl); at run time
# libnccl.so.2 >= 2.30 (the nvidia-nccl-cu13 wheel, or a system NCCL) on LD_LIBRARY_PATH.
if [[ "$nccl" == 1 ]]; then variants+=(nccl); fi
for features in "${variants[@]}"; do
  suffix=""; [[ "$features" == cudnn ]] && suffix="-cudnn"; [[ "$features" == nccl ]] && suffix="-nccl"
  cargo build --release --features "$features" --target-dir "$target_dir" "${cargo_args[@]}"
  cp "$target_dir/release/pfstorer" "$target_dir/pfstorer$suffix"
  extra=""; [[ "$features" == cudnn ]] && extra=", cuDNN $cudnn_version"; [[ "$features" == nccl ]] && extra=", NCCL"
  echo "build-cuda: built $target_dir/pfstorer$suffix (CUDA 13.0, sm_$compute_cap$extra)" >&2
  [[ -n "$bundle" ]] || continue
  mkdir -p "$bundle/tests$suffix"
  test_flags=()
  for t in "${parity_tests[@]}"; do test_flags+=(--test "$t"); done
  cargo test --release --features "$features" --target-dir "$target_dir" --no-run \
    --message-format=json "${test_flags[@]}" > "$target_dir/test-executables$suffix.json"
  "$python" - "$target_dir/test-executables$suffix.json" "$bundle/tests$suffix" <<'PY'
import json, shutil, sys, os
listing, dest = sys.argv[1], sys.argv[2]
for line in open(listing):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") == "compiler-artifact" and exe and "test" in msg["target"]["kind"]:
        shutil.copy2(exe, os.path.join(dest, msg["target"]["name"]))
        print("bundle: test", os.path.basename(dest), msg["target"]["name"])
PY
  cp "$target_dir/pfstorer$suffix" "$bundle/pfstorer$suffix"
done
[[ -n "$bundle" ]] || exit 0

rm -rf "$bundle/fixtures"
[[ -n "$pack" ]] || cp -r "$repo/tests/fixtures" "$bundle/fixtures"
cp "$repo/scripts/gpu-check.sh" "$repo/scripts/gpu_reference.py" "$bundle/"
strip "$bundle"/pfstorer* "$bundle"/tests*/* 2>/dev/null || true
if [[ "$with_libs" == 1 ]]; then
  "$python" -m pip install --quiet --no-deps --target "$bundle/.wheels" \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cuda-runtime==13.0.96 "$cudnn_wheel"
  mkdir -p "$bundle/lib"
  find "$bundle/.wheels" -name 'lib*.so*' -exec cp -P {} "$bundle/lib/" \;
  rm -rf "$bundle/.wheels"
fi
du -sh "$bundle" >&2
if [[ -n "$pack" ]]; then
  # Every executable embeds the same PTX of candle's kernels (~50 MB): with the files in name
  # order and a dictionary wider than any one file, xz finds each copy in the previous file and
  # stores the PTX about once (xz -6's 8 MiB window stored it once per executable). One thread
  # keeps one block; compression needs ~2 GB of memory, decompression ~200 MB.
  tar --sort=name -C "$(dirname "$bundle")" -cf - "$(basename "$bundle")" |
    xz -T1 --lzma2=preset=6,dict=192MiB > "$pack"
  du -h "$pack" >&2
  size=$(stat -c %s "$pack")
  if ((size >= 64 * 1024 * 1024)); then
    echo "build-cuda: $pack is $size bytes, over the 64 MiB a device run carries" >&2
    exit 1
  fi
fi
