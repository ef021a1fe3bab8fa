#!/usr/bin/env bash
# Builds `pfstorer` with the `cuda` feature on a Linux machine that has neither a GPU nor a
# system CUDA toolkit. The CUDA 13.0 compiler and headers come from NVIDIA's Python wheels
# (PyPI), unpacked into a local folder; nothing is installed system-wide.
#
#   scripts/build-cuda.sh                       # sm_90 (H100/H200), binary in target/cuda/release
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # another GPU generation (A100: 80, L4/4090: 89)
#   scripts/build-cuda.sh --bundle DIR          # also the GPU-check bundle (see scripts/GPU.md):
#       DIR/pfstorer, DIR/tests/<parity test executables>, DIR/fixtures, DIR/gpu-check.sh,
#       DIR/gpu_reference.py; add --with-libs to put the CUDA 13 runtime libraries (cuBLAS,
#       cuRAND, NVRTC, cudart wheels, ~1 GB) in DIR/lib for machines without them.
#   scripts/build-cuda.sh --pack FILE.tar.xz   # the bundle without fixtures, compressed (~35 MB
#       instead of 337 MB: the executables are mostly PTX text), for a GPU machine that has the
#       repository (run: tar -xJf FILE -C /tmp && bash /tmp/gpu-bundle/gpu-check.sh
#       --fixtures tests/fixtures).
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

export CUDA_HOME="$toolkit"
export CUDA_ROOT="$toolkit"
export PATH="$toolkit/bin:$PATH"
export CUDA_COMPUTE_CAP="$compute_cap"
export CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stubs -L native=$toolkit/lib"

bundle=""
pack=""
with_libs=0
cargo_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --pack) pack="$2"; shift 2 ;;
    --with-libs) with_libs=1; shift ;;
    *) cargo_args+=("$1"); shift ;;
  esac
done

echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $compute_cap" >&2
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target/cuda}"
cargo build --release --features cuda --target-dir "$target_dir" "${cargo_args[@]}"
echo "build-cuda: built $target_dir/release/pfstorer (CUDA 13.0, sm_$compute_cap)" >&2

if [[ -n "$pack" && -z "$bundle" ]]; then
  bundle="$(mktemp -d)/gpu-bundle"
fi
[[ -n "$bundle" ]] || exit 0
# The parity tests that follow PFSTORER_TEST_DEVICE / PFSTORER_TEST_DTYPE.
parity_tests=(parity_unet parity_text parity_vae pipeline_restore)
mkdir -p "$bundle/tests"
test_flags=()
for t in "${parity_tests[@]}"; do test_flags+=(--test "$t"); done
cargo test --release --features cuda --target-dir "$target_dir" --no-run \
  --message-format=json "${test_flags[@]}" > "$target_dir/test-executables.json"
"$python" - "$target_dir/test-executables.json" "$bundle/tests" <<'PY'
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
        print("bundle: test", msg["target"]["name"])
PY
cp "$target_dir/release/pfstorer" "$bundle/pfstorer"
rm -rf "$bundle/fixtures"
[[ -n "$pack" ]] || cp -r "$repo/tests/fixtures" "$bundle/fixtures"
cp "$repo/scripts/gpu-check.sh" "$repo/scripts/gpu_reference.py" "$bundle/"
strip "$bundle/pfstorer" "$bundle"/tests/* 2>/dev/null || true
if [[ "$with_libs" == 1 ]]; then
  "$python" -m pip install --quiet --no-deps --target "$bundle/.wheels" \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cuda-runtime==13.0.96
  mkdir -p "$bundle/lib"
  find "$bundle/.wheels" -name 'lib*.so*' -exec cp -P {} "$bundle/lib/" \;
  rm -rf "$bundle/.wheels"
fi
du -sh "$bundle" >&2
if [[ -n "$pack" ]]; then
  tar -C "$(dirname "$bundle")" -cf - "$(basename "$bundle")" | xz -T0 -6 > "$pack"
  du -h "$pack" >&2
fi
