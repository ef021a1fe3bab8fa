#!/usr/bin/env bash
# GPU check of a pfstorer CUDA bundle, on a machine with an NVIDIA GPU, nvidia-smi and PyTorch but
# no network and no Rust toolchain. Everything comes in the bundle that
# `scripts/build-cuda.sh --bundle DIR` makes:
#   DIR/pfstorer  DIR/tests/<parity executables>  DIR/fixtures/  DIR/gpu-check.sh
#   DIR/gpu_reference.py  DIR/lib/ (optional CUDA 13 runtime libraries)
#
#   bash DIR/gpu-check.sh [--bundle DIR] [--fixtures DIR] [--dtypes f16,f32] [--gpu N]
#                         [--work DIR] [--skip-parity] [--skip-reference] [--budget SECONDS]
# --fixtures: the fixture root (default DIR/fixtures; a packed bundle, build-cuda.sh --pack, has
# none and uses the repository's tests/fixtures).
#
# (a) parity: every DIR/tests/* executable on CUDA, in f32 and then bf16 (the tests apply their
#     own documented bf16 tolerance), `--test-threads 1`;
# (b) pfstorer timings on the full-size architecture with random weights written once to
#     $WORK (bench weights), then per dtype: bench unet, bench restore (512 px, 200 steps);
#     bench train (512 px, 2 iterations) once, in f32 (the trainer's only precision);
# (c) the same UNet forward and restore with the PyTorch reference (gpu_reference.py, needs
#     STABLESR_ROOT = extracted IceClear/StableSR sources; skipped with a message otherwise), on
#     the same weights and dtype;
# (d) a side-by-side table and $OUT/gpu-check.json (or $WORK/gpu-check.json without OUT).
# Peak GPU memory of every command is measured here, the same way for both sides: nvidia-smi
# polled every 100 ms while the command runs, maximum minus the reading just before it started.
# The first dtype always runs; later ones only while enough of the time budget (default 470 s,
# under 8 minutes in all) is left. Every step has its own timeout.
#
# Environment: PYTHON (default python3), STABLESR_ROOT, WORK (default /tmp/pfstorer-gpu-check),
# OUT. Exit status: 0 parity passed and every benchmark ran; 1 a parity check failed or timed
# out; 2 usage or missing bundle; 3 parity passed but a benchmark command failed.
set -uo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bundle="$script_dir"
fixtures=""
dtypes="f16,f32"
gpu=0
skip_parity=0
skip_reference=0
budget=470
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
    --skip-parity) skip_parity=1; shift ;;
    --skip-reference) skip_reference=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ "$gpu" =~ ^[0-9]+$ ]] || die "--gpu must be a GPU index, got '$gpu'"
[[ "$budget" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$budget'"
IFS=, read -r -a dtype_list <<< "$dtypes"
((${#dtype_list[@]})) || die "--dtypes is empty"
for dt in "${dtype_list[@]}"; do
  [[ "$dt" == f16 || "$dt" == bf16 || "$dt" == f32 ]] || die "--dtypes: '$dt' is not one of f16, bf16, f32"
done
bundle="$(cd "$bundle" 2>/dev/null && pwd)" || die "bundle folder not found"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found"
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

pf="$bundle/pfstorer"
ref_script="$bundle/gpu_reference.py"
[[ -f "$ref_script" ]] || ref_script="$script_dir/gpu_reference.py"
base_w="$work/stablesr_face_random.safetensors"
cfw_w="$work/cfw_random.safetensors"

# nvidia-smi numbers GPUs in PCI order; make CUDA do the same, then show only the chosen one.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
export CUDA_VISIBLE_DEVICES="$gpu"

start=$SECONDS
reserve=20   # seconds kept for the report
min_step=20  # no step starts with less time than this
left() { echo $((budget - (SECONDS - start))); }
note() { echo "gpu-check: $*" | tee -a "$notes" >&2; }
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" 2>/dev/null | head -1 | tr -d ' '; }

gpu_info="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "$gpu" 2>&1)" \
  || die "nvidia-smi cannot query GPU $gpu: $gpu_info"
echo "gpu-check: GPU $gpu: $gpu_info; bundle $bundle; work $work; budget ${budget}s" >&2

# ---- CUDA 13 runtime libraries for pfstorer (never put in front of PyTorch's own) -------------
ld_dirs=()
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
    done
  done
fi
pf_ld="$(IFS=:; echo "${ld_dirs[*]}")"
pf_ld="${pf_ld}${LD_LIBRARY_PATH:+${pf_ld:+:}$LD_LIBRARY_PATH}"
libs_file="$work/libs.txt"
: > "$libs_file"
if [[ -x "$pf" ]]; then
  echo "gpu-check: library folders for pfstorer: ${ld_dirs[*]:-(none; system default paths only)}" >&2
  ldd_out="$(LD_LIBRARY_PATH="$pf_ld" ldd "$pf" 2>&1)"
  for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    line="$(grep -F "$lib" <<< "$ldd_out" | head -1)"
    if [[ -z "$line" ]]; then
      printf 'not linked\t%s\t-\n' "$lib" >> "$libs_file"
    elif [[ "$line" == *"not found"* ]]; then
      printf 'MISSING\t%s\t-\n' "$lib" >> "$libs_file"
      note "pfstorer needs $lib, not found (put it in $bundle/lib or install the nvidia-* 13.x wheels)"
    else
      path="$(awk '{print $3}' <<< "$line")"
      printf 'found\t%s\t%s\n' "$lib" "$path" >> "$libs_file"
    fi
  done
  sed 's/^/gpu-check:   /' "$libs_file" >&2
else
  note "no pfstorer binary at $pf: (b) skipped"
fi

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
if ((skip_parity)); then
  note "(a) parity skipped (--skip-parity)"
elif [[ ! -d "$bundle/tests" ]]; then
  note "(a) no $bundle/tests folder: parity skipped"
else
  tests=()
  for exe in "$bundle"/tests/*; do
    [[ -f "$exe" && -x "$exe" ]] && tests+=("$exe")
  done
  ((${#tests[@]})) || note "(a) no test executables in $bundle/tests"
  for dt in f32 bf16; do
    for exe in "${tests[@]}"; do
      run_step parity pfstorer "$(basename "$exe")" "$dt" 90 \
        env LD_LIBRARY_PATH="$pf_ld" PFSTORER_FIXTURES="${fixtures:-$bundle/fixtures}" \
        PFSTORER_TEST_DEVICE=cuda PFSTORER_TEST_DTYPE="$dt" "$exe" --test-threads 1
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

if [[ -x "$pf" ]]; then
  if [[ -s "$base_w" && -s "$cfw_w" ]]; then
    note "(b) random weights already in $work, reused"
  else
    run_step bench pfstorer weights - 240 env LD_LIBRARY_PATH="$pf_ld" "$pf" bench weights --out-dir "$work"
  fi
fi
have_weights=0
[[ -s "$base_w" && -s "$cfw_w" ]] && have_weights=1
if ((!have_weights)); then
  note "(b)/(c) no random weights in $work: timings skipped"
fi

first=1
train_pending=1
for dt in "${dtype_list[@]}"; do
  ((have_weights)) || break
  if ((!first && $(left) < 240)); then
    note "dtype $dt skipped: $(left)s of the budget left"
    continue
  fi
  first=0
  if [[ -x "$pf" ]]; then
    run_step bench pfstorer unet "$dt" 120 env LD_LIBRARY_PATH="$pf_ld" "$pf" bench unet \
      --weights "$base_w" --latent 64 --runs 3 --device cuda --dtype "$dt"
  fi
  if ((reference_ok)); then
    run_step bench pytorch unet "$dt" 150 env STABLESR_ROOT="$STABLESR_ROOT" "$python" "$ref_script" \
      --weights "$base_w" --device cuda --dtype "$dt" --latent 64 --runs 3 --what unet
  fi
  if [[ -x "$pf" ]]; then
    run_step bench pfstorer restore "$dt" 240 env LD_LIBRARY_PATH="$pf_ld" "$pf" bench restore \
      --base "$base_w" --cfw "$cfw_w" --size 512 --steps 200 --device cuda --dtype "$dt"
  fi
  if ((reference_ok)); then
    run_step bench pytorch restore "$dt" 240 env STABLESR_ROOT="$STABLESR_ROOT" "$python" "$ref_script" \
      --weights "$base_w" --cfw "$cfw_w" --device cuda --dtype "$dt" --size 512 --steps 200 --what restore
  fi
  # Training always runs in f32 (pfstorer's trainer refuses half precision): once, after the
  # first dtype's measurements.
  if ((train_pending)) && [[ -x "$pf" ]]; then
    train_pending=0
    run_step bench pfstorer train f32 180 env LD_LIBRARY_PATH="$pf_ld" "$pf" bench train \
      --base "$base_w" --size 512 --iters 2 --device cuda
  fi
done

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
  "$((SECONDS - start))" "$budget" <<'PY'
import json
import re
import sys

results, notes, libs, json_out, gpu_info, bundle, work, elapsed, budget = sys.argv[1:10]


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
    parity.append(dict(test=r["name"], dtype=r["dtype"], status=r["status"], rc=r["rc"], passed=passed,
                       failed=failed, ignored=ignored, wall_s=r["wall_s"], peak_gpu_gb=r["peak_gpu_gb"],
                       log=r["err"], stdout=r["out"],
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
    ("unet fwd: encoder + UNet, CFG 2, 64x64 latent", "unet", "median_s", "median_s", True),
    ("restore 512 px, 200 steps: total", "restore", "total_s", "total_s", True),
    ("restore 512 px, 200 steps: sampling loop", "restore", "sample_s", "sample_s", False),
    ("train 512 px (f32 only): median iteration", "train", "median_s", None, True),
    ("train 512 px (f32 only): projected 500 iters", "train", "projected_500_s", None, False),
]
comparison = []
order = list(dict.fromkeys(b["dtype"] for b in bench if b["what"] not in ("weights", "train")))
order += [d for d in dict.fromkeys(b["dtype"] for b in bench if b["what"] == "train") if d not in order]
for dtype in order:
    for label, what, pf_key, pt_key, mem in MEASURES:
        pfb, ptb = find("pfstorer", what, dtype), find("pytorch", what, dtype) if pt_key else None
        if pfb is None and ptb is None:
            continue
        pf_s, pt_s = field(pfb, pf_key), field(ptb, pt_key) if pt_key else None
        comparison.append(dict(
            measurement=label, dtype=dtype, pfstorer_s=pf_s, pytorch_s=pt_s,
            ratio=(pf_s / pt_s) if pf_s is not None and pt_s else None,
            pfstorer_peak_gpu_gb=pfb["peak_gpu_gb"] if (pfb and mem) else None,
            pytorch_peak_gpu_gb=ptb["peak_gpu_gb"] if (ptb and mem) else None,
            pfstorer_status=pfb["status"] if pfb else "not run",
            pytorch_status=(ptb["status"] if ptb else "not run") if pt_key else "no reference"))

lib_rows = []
try:
    with open(libs) as f:
        for line in f:
            st, name, path = line.rstrip("\n").split("\t")
            lib_rows.append(dict(lib=name, status=st, path=None if path == "-" else path))
except (OSError, ValueError):
    pass
with open(notes) as f:
    note_lines = [l.rstrip("\n") for l in f if l.strip()]

parity_failed = any(p["status"] in ("failed", "timeout") for p in parity)
bench_failed = any(b["status"] in ("failed", "timeout") for b in bench)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


print()
print(f"GPU: {gpu_info}")
print()
print("Timings (seconds; peak GPU memory = nvidia-smi max during the command minus idle, GB)")
head = f"{'measurement':<46} {'dtype':<5} {'pfstorer s':>10} {'PyTorch s':>10} {'ratio':>6} {'pf GB':>6} {'PT GB':>6}"
print(head)
print("-" * len(head))
for c in comparison:
    pf_s = fmt(c["pfstorer_s"], ".3f") if c["pfstorer_status"] == "ok" else c["pfstorer_status"]
    pt_s = fmt(c["pytorch_s"], ".3f") if c["pytorch_status"] == "ok" else (
        "-" if c["pytorch_status"] == "no reference" else c["pytorch_status"])
    print(f"{c['measurement']:<46} {c['dtype']:<5} {pf_s:>10} {pt_s:>10} {fmt(c['ratio'], '.2f'):>6} "
          f"{fmt(c['pfstorer_peak_gpu_gb'], '.2f'):>6} {fmt(c['pytorch_peak_gpu_gb'], '.2f'):>6}")
if not comparison:
    print("(no timings)")
print("ratio = pfstorer / PyTorch (below 1: pfstorer faster)")
print()
print("Parity (tiny fixtures on CUDA)")
head = f"{'test':<22} {'dtype':<5} {'result':<8} {'passed':>6} {'failed':>6} {'ignored':>7} {'time s':>7}"
print(head)
print("-" * len(head))
for p in parity:
    print(f"{p['test']:<22} {p['dtype']:<5} {p['status']:<8} {p['passed']:>6} {p['failed']:>6} {p['ignored']:>7} "
          f"{fmt(p['wall_s'], '.1f'):>7}")
    for line in p["tail"]:
        print(f"    | {line}")
if not parity:
    print("(not run)")
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
              libraries=lib_rows, parity=parity, bench=bench, comparison=comparison, notes=note_lines,
              parity_failed=parity_failed, bench_failed=bench_failed,
              memory_method="nvidia-smi memory.used polled every 100 ms during the command; "
                            "max minus the reading just before it; MiB converted to GB (1e9 bytes)")
with open(json_out, "w") as f:
    json.dump(report, f, indent=1)
print(f"\nwritten: {json_out}")
sys.exit(1 if parity_failed else 3 if bench_failed else 0)
PY
exit $?
