#!/usr/bin/env bash
# GPU check of a pfstorer CUDA bundle, on a machine with an NVIDIA GPU, nvidia-smi and PyTorch but
# no network and no Rust toolchain. Everything comes in the bundle that
# `scripts/build-cuda.sh --bundle DIR` makes:
#   DIR/pfstorer  DIR/pfstorer-cudnn  DIR/tests/<parity executables>  DIR/tests-cudnn/<the same,
#   built with cuDNN>  DIR/fixtures/  DIR/gpu-check.sh  DIR/gpu_reference.py  DIR/lib/ (optional)
#
#   bash DIR/gpu-check.sh [--bundle DIR] [--fixtures DIR] [--dtypes bf16,f32] [--variants cuda,cudnn]
#                         [--gpu N] [--work DIR] [--skip-parity] [--skip-reference]
#                         [--budget SECONDS] [--parity-budget SECONDS] [--dry-run]
# --fixtures: the fixture root (default DIR/fixtures; a packed bundle, build-cuda.sh --pack, has
# none and uses the repository's tests/fixtures).
# --variants: which builds to measure: cuda (DIR/pfstorer, DIR/tests; no cuDNN) and cudnn
# (DIR/pfstorer-cudnn, DIR/tests-cudnn); default both, those present.
# --dry-run: print the plan (every step, its time cap, the order) and exit; needs no GPU.
#
# The matrix: {variants} x {dtypes} for
# (a) parity: every test executable of the variant on CUDA, per dtype (the tests apply their own
#     documented bf16 tolerance), `--test-threads 1`; at most --parity-budget seconds (150);
# (b) pfstorer timings on the full-size architecture with random weights written once to
#     $WORK (bench weights), per dtype and variant: bench unet, bench restore (512 px, 200 steps);
#     bench train (512 px, 2 iterations) per variant in f32 only (the trainer's only precision),
#     bench train-base (512 px, batch 1, 2 steps) on the first variant;
# (c) the same UNet forward and restore with the PyTorch reference (gpu_reference.py, needs
#     STABLESR_ROOT = extracted IceClear/StableSR sources; skipped with a message otherwise), on
#     the same weights and dtype;
# (d) one table (rows: measurements and parity tests; columns: each variant, PyTorch, ratios) and
#     $OUT/gpu-check.json (or $WORK/gpu-check.json without OUT).
# Peak GPU memory of every command is measured here, the same way for both sides: nvidia-smi
# polled every 100 ms while the command runs, maximum minus the reading just before it started.
# Order: parity, weights, every variant's and PyTorch's unet for each dtype, then per dtype (the
# first one first) the restores, training after the first dtype's. The whole run stays within the
# time budget (default 470 s, under 8 minutes): every step has its own cap, is cut to what is
# left, and is skipped (reported as such) when less than 20 s remain.
#
# Environment: PYTHON (default python3), STABLESR_ROOT, WORK (default /tmp/pfstorer-gpu-check),
# OUT. Exit status: 0 parity passed and every benchmark ran; 1 a parity check failed or timed
# out; 2 usage or missing bundle; 3 parity passed but a benchmark command failed.
set -uo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bundle="$script_dir"
fixtures=""
dtypes="bf16,f32"
variants=""
gpu=0
skip_parity=0
skip_reference=0
budget=470
parity_budget=150
dry_run=0
work="${WORK:-${TMPDIR:-/tmp}/pfstorer-gpu-check}"
python="${PYTHON:-python3}"

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu-check: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --bundle) bundle="${2:?--bundle needs a folder}"; shift 2 ;;
    --fixtures) fixtures="${2:?--fixtures needs a folder}"; shift 2 ;;
    --dtypes) dtypes="${2:?--dtypes needs a list}"; shift 2 ;;
    --gpu) gpu="${2:?--gpu needs an index}"; shift 2 ;;
    --work) work="${2:?--work needs a folder}"; shift 2 ;;
    --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
    --parity-budget) parity_budget="${2:?--parity-budget needs seconds}"; shift 2 ;;
    --variants) variants="${2:?--variants needs a list}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --skip-parity) skip_parity=1; shift ;;
    --skip-reference) skip_reference=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ "$gpu" =~ ^[0-9]+$ ]] || die "--gpu must be a GPU index, got '$gpu'"
[[ "$budget" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$budget'"
[[ "$parity_budget" =~ ^[0-9]+$ ]] || die "--parity-budget must be whole seconds, got '$parity_budget'"
IFS=, read -r -a dtype_list <<< "$dtypes"
((${#dtype_list[@]})) || die "--dtypes is empty"
for dt in "${dtype_list[@]}"; do
  [[ "$dt" == f16 || "$dt" == bf16 || "$dt" == f32 ]] || die "--dtypes: '$dt' is not one of f16, bf16, f32"
done
bundle="$(cd "$bundle" 2>/dev/null && pwd)" || die "bundle folder not found"

# Variant name -> binary and test folder. A variant asked for but absent is a usage error; by
# default every variant whose binary is in the bundle runs.
variant_bin() { case "$1" in cuda) echo "$bundle/pfstorer" ;; cudnn) echo "$bundle/pfstorer-cudnn" ;; esac; }
variant_tests() { case "$1" in cuda) echo "$bundle/tests" ;; cudnn) echo "$bundle/tests-cudnn" ;; esac; }
variant_label() { case "$1" in cuda) echo "no cuDNN" ;; cudnn) echo "cuDNN" ;; esac; }
if [[ -z "$variants" ]]; then
  variant_list=()
  for v in cuda cudnn; do [[ -x "$(variant_bin "$v")" ]] && variant_list+=("$v"); done
  ((${#variant_list[@]})) || variant_list=(cuda)
else
  IFS=, read -r -a variant_list <<< "$variants"
  ((${#variant_list[@]})) || die "--variants is empty"
  for v in "${variant_list[@]}"; do
    [[ "$v" == cuda || "$v" == cudnn ]] || die "--variants: '$v' is not one of cuda, cudnn"
    [[ -x "$(variant_bin "$v")" ]] || die "--variants $v: no $(variant_bin "$v") in the bundle"
  done
fi

if ((!dry_run)); then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found"
fi
command -v timeout >/dev/null || die "timeout (coreutils) not found"
mkdir -p "$work/logs" || die "cannot create $work"
work="$(cd "$work" && pwd)"
logs="$work/logs"
results="$work/results.tsv"
notes="$work/notes.txt"
: > "$results"
: > "$notes"
out_dir="${OUT:-$work}"
mkdir -p "$out_dir" || die "cannot create $out_dir"

ref_script="$bundle/gpu_reference.py"
[[ -f "$ref_script" ]] || ref_script="$script_dir/gpu_reference.py"
base_w="$work/stablesr_face_random.safetensors"
cfw_w="$work/cfw_random.safetensors"

# nvidia-smi numbers GPUs in PCI order; make CUDA do the same, then show only the chosen one.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
export CUDA_VISIBLE_DEVICES="$gpu"

start=$SECONDS
planned=0    # --dry-run: the sum of the caps
reserve=20   # seconds kept for the report
min_step=20  # no step starts with less time than this
left() { echo $((budget - (SECONDS - start))); }
note() { echo "gpu-check: $*" | tee -a "$notes" >&2; }
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" 2>/dev/null | head -1 | tr -d ' '; }

if ((dry_run)); then
  gpu_info="(dry run: GPU not queried)"
else
  gpu_info="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$gpu" 2>&1)" \
    || die "nvidia-smi cannot query GPU $gpu: $gpu_info"
fi
echo "gpu-check: GPU $gpu: $gpu_info; bundle $bundle; variants ${variant_list[*]}; dtypes ${dtype_list[*]}; work $work; budget ${budget}s" >&2

# ---- CUDA 13 runtime libraries for pfstorer (never put in front of PyTorch's own) -------------
# cuDNN (libcudnn.so.9 and its engines) only for the cudnn variant: the folder that holds
# libcudnn.so.9 also holds the engines it loads.
ld_dirs=()
cudnn_dirs=()
[[ -d "$bundle/lib" ]] && ld_dirs+=("$bundle/lib")
if command -v "$python" >/dev/null; then
  mapfile -t site_dirs < <("$python" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
  for sd in "${site_dirs[@]}"; do
    for d in "$sd"/nvidia/*/lib; do
      [[ -d "$d" ]] || continue
      if compgen -G "$d/libcublas.so.13*" >/dev/null || compgen -G "$d/libcublasLt.so.13*" >/dev/null ||
         compgen -G "$d/libcurand.so.10*" >/dev/null || compgen -G "$d/libnvrtc.so.13*" >/dev/null ||
         compgen -G "$d/libcudart.so.13*" >/dev/null; then
        ld_dirs+=("$d")
      fi
      if compgen -G "$d/libcudnn.so.9*" >/dev/null; then
        cudnn_dirs+=("$d")
      fi
    done
  done
fi
pf_ld="$(IFS=:; echo "${ld_dirs[*]}")"
pf_ld="${pf_ld}${LD_LIBRARY_PATH:+${pf_ld:+:}$LD_LIBRARY_PATH}"
cudnn_ld="$(IFS=:; echo "${cudnn_dirs[*]}")"
variant_ld() { # the library path of one variant
  if [[ "$1" == cudnn && -n "$cudnn_ld" ]]; then echo "${pf_ld:+$pf_ld:}$cudnn_ld"; else echo "$pf_ld"; fi
}
libs_file="$work/libs.txt"
: > "$libs_file"
echo "gpu-check: library folders for pfstorer: ${ld_dirs[*]:-(none; system default paths only)}; for cuDNN: ${cudnn_dirs[*]:-(none)}" >&2
for v in "${variant_list[@]}"; do
  bin="$(variant_bin "$v")"
  [[ -x "$bin" ]] || { note "no $bin: variant $v skipped"; continue; }
  ldd_out="$(LD_LIBRARY_PATH="$(variant_ld "$v")" ldd "$bin" 2>&1)"
  for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudnn.so.9; do
    line="$(grep -F "$lib" <<< "$ldd_out" | head -1)"
    if [[ -z "$line" ]]; then
      printf '%s\tnot linked\t%s\t-\n' "$v" "$lib" >> "$libs_file"
    elif [[ "$line" == *"not found"* ]]; then
      printf '%s\tMISSING\t%s\t-\n' "$v" "$lib" >> "$libs_file"
      note "$(basename "$bin") needs $lib, not found (put it in $bundle/lib or install the nvidia-* 13.x / nvidia-cudnn-cu13 wheels)"
    else
      path="$(awk '{print $3}' <<< "$line")"
      printf '%s\tfound\t%s\t%s\n' "$v" "$lib" "$path" >> "$libs_file"
    fi
  done
done
sed 's/^/gpu-check:   /' "$libs_file" >&2

# ---- one measured command -----------------------------------------------------------------
# run_step SECTION IMPL NAME DTYPE CAP_SECONDS command...
run_step() {
  local section="$1" impl="$2" name="$3" dt="$4" cap="$5"
  shift 5
  local id="${section}_${impl}_${name}_${dt}"
  local out="$logs/$id.out" err="$logs/$id.err" mem="$logs/$id.mem"
  local t
  t=$(($(left) - reserve))
  ((t > cap)) && t=$cap
  if ((dry_run)); then
    printf 'plan: %-7s %-8s %-18s %-4s cap %3ss: %s\n' "$section" "$impl" "$name" "$dt" "$cap" "$*"
    printf '%s\t%s\t%s\t%s\tplanned\t-\t-\t-\t-\t%s\t%s\n' "$section" "$impl" "$name" "$dt" "$out" "$err" >> "$results"
    planned=$((planned + cap))
    return 0
  fi
  if ((t < min_step)); then
    printf '%s\t%s\t%s\t%s\tskipped\t-\t-\t-\t-\t%s\t%s\n' "$section" "$impl" "$name" "$dt" "$out" "$err" >> "$results"
    note "$section $impl $name $dt: skipped, time budget spent"
    return 0
  fi
  local baseline
  baseline="$(gpu_mem)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" -lms 100 > "$mem" 2>/dev/null &
  local mon=$!
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$t" "$@" > "$out" 2> "$err"
  rc=$?
  t1=$(date +%s.%N)
  kill "$mon" 2>/dev/null
  wait "$mon" 2>/dev/null
  local peak status wall
  peak="$(tr -d ' ' < "$mem" | grep -E '^[0-9]+$' | sort -n | tail -1)"
  wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$section" "$impl" "$name" "$dt" "$status" "$rc" \
    "$wall" "${peak:--}" "${baseline:--}" "$out" "$err" >> "$results"
  printf 'gpu-check: [%4ds] %-9s %-8s %-16s %-4s %-8s %6ss  (timeout %ss)\n' "$((SECONDS - start))" \
    "$section" "$impl" "$name" "$dt" "$status" "$wall" "$t" >&2
  if [[ $status != ok ]]; then
    tail -n 5 "$err" | sed 's/^/gpu-check:     | /' >&2
  fi
}

# ---- (a) parity ---------------------------------------------------------------------------
# Capped per executable and in all (--parity-budget), so the timings always get their share.
parity_start=$SECONDS
if ((skip_parity)); then
  note "(a) parity skipped (--skip-parity)"
else
  for dt in f32 bf16; do
    for v in "${variant_list[@]}"; do
      dir="$(variant_tests "$v")"
      if [[ ! -d "$dir" ]]; then
        [[ $dt == f32 ]] && note "(a) no $dir folder: parity of $v skipped"
        continue
      fi
      for exe in "$dir"/*; do
        [[ -f "$exe" && -x "$exe" ]] || continue
        spent=$((SECONDS - parity_start))
        cap=60
        ((parity_budget - spent < cap)) && cap=$((parity_budget - spent))
        ((cap < 0)) && cap=0
        run_step parity "$v" "$(basename "$exe")" "$dt" "$cap" \
          env LD_LIBRARY_PATH="$(variant_ld "$v")" PFSTORER_FIXTURES="${fixtures:-$bundle/fixtures}" \
          PFSTORER_TEST_DEVICE=cuda PFSTORER_TEST_DTYPE="$dt" "$exe" --test-threads 1
      done
    done
  done
fi

# ---- (b) + (c) timings --------------------------------------------------------------------
reference_ok=0
if ((skip_reference)); then
  note "(c) PyTorch reference skipped (--skip-reference)"
elif [[ -z "${STABLESR_ROOT:-}" || ! -f "${STABLESR_ROOT:-/nonexistent}/configs/stableSRNew/v2-finetune_face_T_512.yaml" ]]; then
  note "(c) PyTorch reference skipped: set STABLESR_ROOT to extracted IceClear/StableSR sources (commit 398ee93)"
elif ! command -v "$python" >/dev/null; then
  note "(c) PyTorch reference skipped: no python '$python' (set PYTHON)"
elif [[ ! -f "$ref_script" ]]; then
  note "(c) PyTorch reference skipped: gpu_reference.py not found next to this script or in the bundle"
else
  reference_ok=1
fi

first_bin="$(variant_bin "${variant_list[0]}")"
if [[ -x "$first_bin" ]]; then
  if [[ -s "$base_w" && -s "$cfw_w" ]]; then
    note "(b) random weights already in $work, reused"
  else
    run_step bench "${variant_list[0]}" weights - 240 env LD_LIBRARY_PATH="$(variant_ld "${variant_list[0]}")" "$first_bin" bench weights --out-dir "$work"
  fi
fi
have_weights=0
[[ -s "$base_w" && -s "$cfw_w" ]] && have_weights=1
((dry_run)) && have_weights=1
if ((!have_weights)); then
  note "(b)/(c) no random weights in $work: timings skipped"
fi

# The cheap UNet forward first for the whole matrix, then the restores (the first dtype first) and,
# after the first dtype's restores, training; each step is cut or skipped by the budget.
for dt in "${dtype_list[@]}"; do
  ((have_weights)) || break
  for v in "${variant_list[@]}"; do
    run_step bench "$v" unet "$dt" 100 env LD_LIBRARY_PATH="$(variant_ld "$v")" "$(variant_bin "$v")" bench unet \
      --weights "$base_w" --latent 64 --runs 3 --device cuda --dtype "$dt"
  done
  if ((reference_ok)); then
    run_step bench pytorch unet "$dt" 150 env STABLESR_ROOT="$STABLESR_ROOT" "$python" "$ref_script" \
      --weights "$base_w" --device cuda --dtype "$dt" --latent 64 --runs 3 --what unet
  fi
done
train_pending=1
for dt in "${dtype_list[@]}"; do
  ((have_weights)) || break
  for v in "${variant_list[@]}"; do
    run_step bench "$v" restore "$dt" 180 env LD_LIBRARY_PATH="$(variant_ld "$v")" "$(variant_bin "$v")" bench restore \
      --base "$base_w" --cfw "$cfw_w" --size 512 --steps 200 --device cuda --dtype "$dt"
  done
  if ((reference_ok)); then
    run_step bench pytorch restore "$dt" 240 env STABLESR_ROOT="$STABLESR_ROOT" "$python" "$ref_script" \
      --weights "$base_w" --cfw "$cfw_w" --device cuda --dtype "$dt" --size 512 --steps 200 --what restore
  fi
  # Training always runs in f32 (pfstorer's trainer refuses half precision): once per variant,
  # after the first dtype's restores.
  if ((train_pending)); then
    train_pending=0
    for v in "${variant_list[@]}"; do
      run_step bench "$v" train f32 150 env LD_LIBRARY_PATH="$(variant_ld "$v")" "$(variant_bin "$v")" bench train \
        --base "$base_w" --size 512 --iters 2 --device cuda
    done
    # Base training (train-base) at world size 1, batch 1, on the first variant: step time,
    # images/s and GPU memory of the paper's Base Model trainer.
    v="${variant_list[0]}"
    run_step bench "$v" train-base f32 150 env LD_LIBRARY_PATH="$(variant_ld "$v")" "$(variant_bin "$v")" bench train-base \
      --base "$base_w" --size 512 --batch-size 1 --iters 2 --device cuda
  fi
done

if ((dry_run)); then
  echo "plan: variants ${variant_list[*]}, dtypes ${dtype_list[*]}; $(wc -l < "$results") steps, caps summing to ${planned}s; every step is cut to the budget left (${budget}s in all, parity at most ${parity_budget}s)"
  exit 0
fi

# ---- (d) report ---------------------------------------------------------------------------
report_py="$python"
command -v "$report_py" >/dev/null || report_py=python3
if ! command -v "$report_py" >/dev/null; then
  echo "gpu-check: no python for the report; raw results:" >&2
  cat "$results"
  if grep -qP '^parity\t[^\t]*\t[^\t]*\t[^\t]*\t(failed|timeout)\t' "$results"; then exit 1; fi
  exit 0
fi
"$report_py" - "$results" "$notes" "$libs_file" "$out_dir/gpu-check.json" "$gpu_info" "$bundle" "$work" \
  "$((SECONDS - start))" "$budget" "$(IFS=,; echo "${variant_list[*]}")" <<'PY'
import json
import re
import sys

results, notes, libs, json_out, gpu_info, bundle, work, elapsed, budget, variants = sys.argv[1:11]
variants = [v for v in variants.split(",") if v]
LABEL = {"cuda": "no cuDNN", "cudnn": "cuDNN", "pytorch": "PyTorch"}


def last_json(path):
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip().startswith("{")]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def tail(path, n=8):
    try:
        with open(path, errors="replace") as f:
            return [l.rstrip("\n") for l in f.readlines()[-n:]]
    except OSError:
        return []


def num(x):
    return float(x) if x not in ("", "-") else None


rows = []
with open(results) as f:
    for line in f:
        p = line.rstrip("\n").split("\t")
        if len(p) != 11:
            continue
        section, impl, name, dtype, status, rc, wall, peak, base, out, err = p
        peak_gb = None
        if num(peak) is not None and num(base) is not None:
            peak_gb = max(0.0, num(peak) - num(base)) * 1048576 / 1e9  # nvidia-smi MiB -> GB
        rows.append(dict(section=section, impl=impl, name=name, dtype=dtype, status=status,
                         rc=None if rc == "-" else int(rc), wall_s=num(wall), peak_gpu_gb=peak_gb,
                         baseline_gpu_mib=num(base), out=out, err=err))

parity = []
for r in (r for r in rows if r["section"] == "parity"):
    text = "\n".join(tail(r["out"], 200))
    counts = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
    passed = sum(int(c[0]) for c in counts)
    failed = sum(int(c[1]) for c in counts)
    ignored = sum(int(c[2]) for c in counts)
    parity.append(dict(variant=r["impl"], test=r["name"], dtype=r["dtype"], status=r["status"], rc=r["rc"],
                       passed=passed, failed=failed, ignored=ignored, wall_s=r["wall_s"],
                       peak_gpu_gb=r["peak_gpu_gb"], log=r["err"], stdout=r["out"],
                       tail=[] if r["status"] in ("ok", "skipped") else tail(r["out"], 6) + tail(r["err"], 6)))

bench = []
for r in (r for r in rows if r["section"] == "bench"):
    res = last_json(r["out"]) if r["status"] == "ok" else None
    bench.append(dict(impl=r["impl"], what=r["name"], dtype=r["dtype"], status=r["status"], rc=r["rc"],
                      wall_s=r["wall_s"], peak_gpu_gb=r["peak_gpu_gb"], baseline_gpu_mib=r["baseline_gpu_mib"],
                      result=res, log=r["err"],
                      tail=[] if r["status"] in ("ok", "skipped") else tail(r["err"], 8)))


def find(impl, what, dtype):
    for b in bench:
        if b["impl"] == impl and b["what"] == what and b["dtype"] == dtype:
            return b
    return None


def field(b, key):
    if b is None or not b["result"]:
        return None
    v = b["result"].get(key)
    return float(v) if isinstance(v, (int, float)) else None


MEASURES = [  # label, what, pfstorer field, pytorch field, show memory
    ("unet fwd: encoder + UNet, CFG 2, 64x64", "unet", "median_s", "median_s", True),
    ("restore 512 px, 200 steps: total", "restore", "total_s", "total_s", True),
    ("restore 512 px, 200 steps: sampling", "restore", "sample_s", "sample_s", False),
    ("train 512 px: median iteration", "train", "median_s", None, True),
    ("train 512 px: projected 500 iters", "train", "projected_500_s", None, False),
    ("train-base 512 px, batch 1: median step", "train-base", "median_step_s", None, True),
]
comparison = []
order = list(dict.fromkeys(b["dtype"] for b in bench if b["what"] not in ("weights", "train", "train-base")))
order += [d for d in dict.fromkeys(b["dtype"] for b in bench if b["what"] in ("train", "train-base")) if d not in order]
for dtype in order:
    for label, what, pf_key, pt_key, mem in MEASURES:
        cells = {}
        for impl in variants + (["pytorch"] if pt_key else []):
            b = find(impl, what, dtype)
            key = pt_key if impl == "pytorch" else pf_key
            cells[impl] = dict(s=field(b, key), status=b["status"] if b else "not run",
                               peak_gpu_gb=b["peak_gpu_gb"] if (b and mem) else None)
        if all(c["status"] == "not run" for c in cells.values()):
            continue
        ours = [cells[v]["s"] for v in variants if cells.get(v, {}).get("s") is not None]
        pt_s = cells.get("pytorch", {}).get("s")
        cu, cd = cells.get("cuda", {}).get("s"), cells.get("cudnn", {}).get("s")
        comparison.append(dict(
            measurement=label, dtype=dtype, cells=cells,
            cudnn_over_plain=(cd / cu) if cd is not None and cu else None,
            best_over_pytorch=(min(ours) / pt_s) if ours and pt_s else None))

lib_rows = []
try:
    with open(libs) as f:
        for line in f:
            v, st, name, path = line.rstrip("\n").split("\t")
            lib_rows.append(dict(variant=v, lib=name, status=st, path=None if path == "-" else path))
except (OSError, ValueError):
    pass
with open(notes) as f:
    note_lines = [l.rstrip("\n") for l in f if l.strip()]

parity_failed = any(p["status"] in ("failed", "timeout") for p in parity)
bench_failed = any(b["status"] in ("failed", "timeout") for b in bench)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def cell_s(c):
    if c is None:
        return "-"
    if c["status"] == "ok":
        return fmt(c["s"], ".3f")
    return "-" if c["status"] == "not run" else c["status"]


impls = variants + ["pytorch"]
print()
print(f"GPU: {gpu_info}")
print()
print("One table: timings in seconds (GB = peak GPU memory, nvidia-smi max during the command minus idle)")
print("and parity (tiny fixtures on CUDA: passed/total tests, or the failure). The trainer is f32 only.")
head = (f"{'measurement':<40} {'dtype':<5} " + " ".join(f"{LABEL[i] + ' s':>11}" for i in impls)
        + f" {'cuDNN/no':>8} {'best/PT':>7} " + " ".join(f"{'GB ' + LABEL[i]:>12}" for i in impls))
print(head)
print("-" * len(head))
for c in comparison:
    cells = c["cells"]
    print(f"{c['measurement']:<40} {c['dtype']:<5} "
          + " ".join(f"{cell_s(cells.get(i)):>11}" for i in impls)
          + f" {fmt(c['cudnn_over_plain'], '.2f'):>8} {fmt(c['best_over_pytorch'], '.2f'):>7} "
          + " ".join(f"{fmt((cells.get(i) or {}).get('peak_gpu_gb'), '.2f'):>12}" for i in impls))
if not comparison:
    print("(no timings)")
tests = list(dict.fromkeys((p["test"], p["dtype"]) for p in parity))
for test, dtype in tests:
    cells = []
    for i in impls:
        p = next((p for p in parity if p["test"] == test and p["dtype"] == dtype and p["variant"] == i), None)
        if p is None:
            cells.append("-")
        elif p["status"] == "ok":
            cells.append(f"{p['passed']}/{p['passed'] + p['failed']} ok")
        elif p["status"] == "failed" and p["passed"] + p["failed"]:
            cells.append(f"FAIL {p['failed']}/{p['passed'] + p['failed']}")
        else:
            cells.append(p["status"].upper() if p["status"] in ("failed", "timeout") else p["status"])
    print(f"{'parity ' + test:<40} {dtype:<5} " + " ".join(f"{x:>11}" for x in cells))
print("cuDNN/no = cuDNN build / build without cuDNN; best/PT = faster pfstorer build / PyTorch (below 1: pfstorer faster)")
for p in parity:
    if p["tail"]:
        print(f"\nparity {p['variant']} {p['test']} {p['dtype']}: {p['status']} (rc {p['rc']}), log {p['stdout']}")
        for line in p["tail"]:
            print(f"    | {line}")
for b in bench:
    if b["tail"]:
        print(f"\n{b['impl']} {b['what']} {b['dtype']}: {b['status']} (rc {b['rc']}), log {b['log']}")
        for line in b["tail"]:
            print(f"    | {line}")
if note_lines:
    print()
    for n in note_lines:
        print(n)

report = dict(gpu=gpu_info, bundle=bundle, work=work, elapsed_s=int(elapsed), budget_s=int(budget),
              variants=variants, libraries=lib_rows, parity=parity, bench=bench, comparison=comparison,
              notes=note_lines, parity_failed=parity_failed, bench_failed=bench_failed,
              memory_method="nvidia-smi memory.used polled every 100 ms during the command; "
                            "max minus the reading just before it; MiB converted to GB (1e9 bytes)")
with open(json_out, "w") as f:
    json.dump(report, f, indent=1)
print(f"\nwritten: {json_out}")
sys.exit(1 if parity_failed else 3 if bench_failed else 0)
PY
exit $?
