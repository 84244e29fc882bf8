#!/usr/bin/env bash
# The measurements behind the documentation's accuracy tables, on the real data, in the order the issues
# need them; every one scored on dense labels, choices on validation cases only.
#
#   NNUNET_WEAK_DATA=../shared/data benchmarks/reproduce_tables.sh [STEP ...]
#
# STEP: datasets (convert and plan what the other steps use; done by each step as needed),
# scribble_ablations, caml_defaults, scribble_3d, confkd, action, kaf, la, scribble_ramps (default: all
# but datasets, in that order). Needs the nnU-Net folders set (`eval "$(nnunet-weak env)"`).
#
# Every compare/tune call keeps each run's per-case scores in benchmarks/records (--records): a run
# recorded there is scored from its record, not trained again, so the steps can be spread over several
# machines or sessions (commit the records), and re-running a finished step rebuilds its tables in
# seconds. Training times are for 2 CPU cores and vary by machine: a 2D ACDC run at 20x50 took 25-55 min
# (scribble trainer; CAML about twice that), a 3D one at 10x25 about an hour or more.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
records="${NNUNET_WEAK_RECORDS:-$here/records}"
data="${NNUNET_WEAK_DATA:?set NNUNET_WEAK_DATA to the folder holding acdc/ and la/ (e.g. ../shared/data)}"
: "${nnUNet_raw:?set the nnU-Net folders first: eval \"\$(nnunet-weak env)\"}"
: "${nnUNet_preprocessed:?set the nnU-Net folders first: eval \"\$(nnunet-weak env)\"}"
: "${nnUNet_results:?set the nnU-Net folders first: eval \"\$(nnunet-weak env)\"}"
acdc="$data/acdc"
out="$nnUNet_results/reproduce_tables"
cpu_2d=(-p nnUNetPlansCPU --budget 20x50 --device cpu --records "$records")

raw_exists() { compgen -G "$nnUNet_raw/Dataset$(printf %03d "$1")_*" > /dev/null; }
plans_exist() {  # ID PLANS CONFIGURATION: preprocessed to the end (nnU-Net writes in place: count the cases)
  local folder expected
  folder="$(compgen -G "$nnUNet_preprocessed/Dataset$(printf %03d "$1")_*")" || return 1
  expected="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["numTraining"])' \
    "$folder/dataset.json" 2> /dev/null)" || return 1
  [ "$(find "$folder/$2_$3" -name '*.pkl' 2> /dev/null | wc -l)" -eq "$expected" ] &&
    [ "$(find "$folder/gt_segmentations" -type f 2> /dev/null | wc -l)" -eq "$expected" ]
}

acdc_scribbles() {  # 27 hand-drawn scribbles, 127 its dense twin; CPU plans made on the dense twin
  raw_exists 27 || nnunet-weak convert acdc --h5 "$acdc/volumes" --spacing "$acdc/spacing.csv" \
    --scribbles "$acdc/scribbles" -np 2
  plans_exist 127 nnUNetPlansCPU 2d || nnunet-weak plan_and_preprocess -d 127 -c 2d -pl nnUNetPlannerCPU
  plans_exist 27 nnUNetPlansCPU 2d || \
    nnunet-weak plan_and_preprocess -d 27 -c 2d --plans_from 127 -overwrite_plans_name nnUNetPlansCPU
}

acdc_twin() {  # ID DENSE_ID CONVERT_ARGS...: an ACDC variant on the CPU plans and splits of 127
  local id=$1 dense_id=$2
  shift 2
  acdc_scribbles
  raw_exists "$id" || nnunet-weak convert acdc --h5 "$acdc/volumes" --spacing "$acdc/spacing.csv" \
    --scribbles "$acdc/scribbles" --id "$id" --dense_id "$dense_id" -np 2 "$@"
  plans_exist "$id" nnUNetPlansCPU 2d || \
    nnunet-weak plan_and_preprocess -d "$id" -c 2d --plans_from 127 -overwrite_plans_name nnUNetPlansCPU
}

la_semi() {  # 37: LA, 12 training volumes (4 labelled), 4 test volumes, 2.5 mm plans
  if ! raw_exists 37; then
    local lists
    lists="$(mktemp -d)"
    head -12 "$data/la/available.list" > "$lists/train.list"
    tail -4 "$data/la/available.list" > "$lists/test.list"
    nnunet-weak convert la --h5 "$data/la" --spacing 0.625 0.625 0.625 --train_list "$lists/train.list" \
      --test_list "$lists/test.list" --labelled_count 4
    rm -r "$lists"
  fi
  plans_exist 37 nnUNetPlans2.5mm 3d_fullres || nnunet-weak plan_and_preprocess -d 37 -c 3d_fullres \
    -overwrite_target_spacing 2.5 2.5 2.5 -overwrite_plans_name nnUNetPlans2.5mm
}

datasets() {
  acdc_scribbles
  acdc_twin 227 228 --supervision semi --labelled_count 14                       # CAML: 7 patients
  acdc_twin 327 328 --supervision mixed --weak_label erosion --labelled_count 4  # ConfKD: 2 strong patients
  acdc_twin 427 428 --supervision mixed --weak_label scribble --labelled_count 4
  acdc_twin 337 338 --supervision mixed --weak_label erosion --labelled_count 14 # ConfKD: 7 strong patients
  acdc_twin 437 438 --supervision mixed --weak_label scribble --labelled_count 14
  acdc_twin 527 528 --supervision semi --labelled_count 4                        # KAF: 2 labelled patients
  acdc_twin 627 628 --supervision semi --labelled_count 12                       # KAF: 6
  acdc_twin 727 728 --supervision semi --labelled_count 6                        # ACTION: 3
  la_semi
}

scribble_ablations() {  # issue 14: the scribble trainer, its ablations and the partial loss, 3 seeds
  acdc_scribbles
  # the method's claim against the partial loss first: it is the one a user acts on
  nnunet-weak compare --sparse 27 --no_dense "${cpu_2d[@]}" --disable_tta --seeds 3 \
    --trainers nnUNetWeakTrainer ScribbleAttentionTrainer -o "$out/scribble_20x50"
  # then the ablations; the runs above are reused, not trained again
  local trainers=(ScribbleAttentionTrainer ScribbleAttentionTrainer_noAttentionBlock
                  ScribbleAttentionTrainer_noAttentiveLoss ScribbleAttentionTrainer_noCRF nnUNetWeakTrainer)
  nnunet-weak compare --sparse 27 --no_dense "${cpu_2d[@]}" --disable_tta --seeds 3 --trainers "${trainers[@]}" \
    --baseline ScribbleAttentionTrainer -o "$out/scribble_ablations"
}

caml_defaults() {  # issue 14: CAML's supervised_weight and labelled_per_batch chosen on validation
  acdc_twin 227 228 --supervision semi --labelled_count 14
  # History (2026-12-01..03; labelled_per_batch=0 names the half batch the runs then had by default):
  # over 3 seeds supervised_weight=1 was ahead of the paper's 0.5 at half the batch labelled (validation
  # Dice 0.594 against 0.520, Wilcoxon p = 4e-6; 0.5 left RV unlearned in one seed), then 6 of 8 labelled
  # led half the batch (0.612 against 0.594, paired +0.018, p = 6.5e-4): the default became a share of
  # 0.75 (6 of ACDC's 2D batch of 8; 1 of LA's 3D batch of 2, as half). The default rows are the runs
  # trained as labelled_per_batch=6, the same 6 + 2 batches (documentation/CAMLTrainer.md).
  nnunet-weak tune -d 227 -tr CAMLTrainer --grid labelled_per_batch=0 "${cpu_2d[@]}" --seeds 3 \
    -o "$out/caml_labelled_per_batch_seeds3"
  nnunet-weak compare --sparse 227 --no_dense "${cpu_2d[@]}" --disable_tta --seeds 3 \
    --trainers nnUNetWeakTrainer CAMLTrainer -o "$out/caml_acdc"
  # both choices together over 3 seeds: supervised_weight=1 still leads at the new split (0.612 against
  # 0.537, p = 6e-7; measured 2026-12-03)
  nnunet-weak tune -d 227 -tr CAMLTrainer --grid labelled_per_batch=0 supervised_weight=0.5 "${cpu_2d[@]}" \
    --seeds 3 -o "$out/caml_defaults_factorial"
}

scribble_3d() {  # issue 20: which 3D attention a 3D user should take (seed 0: a hint)
  acdc_scribbles
  plans_exist 127 nnUNetPlansCPU 3d_fullres || nnunet-weak plan_and_preprocess -d 127 -c 3d_fullres -pl nnUNetPlannerCPU
  plans_exist 27 nnUNetPlansCPU 3d_fullres || \
    nnunet-weak plan_and_preprocess -d 27 -c 3d_fullres --plans_from 127 -overwrite_plans_name nnUNetPlansCPU
  nnunet-weak compare --sparse 27 --no_dense -c 3d_fullres -p nnUNetPlansCPU --budget 10x25 --device cpu \
    --records "$records" --disable_tta --seeds 1 \
    --trainers nnUNetWeakTrainer ScribbleAttentionTrainer_window8 ScribbleAttentionTrainer_stride8 \
    ScribbleAttentionTrainer -o "$out/scribble_3d"
}

confkd() {  # issue 16: ConfKD's rows on eroded and on scribbled weak labels, and its λ sweep
  acdc_twin 327 328 --supervision mixed --weak_label erosion --labelled_count 4
  acdc_twin 427 428 --supervision mixed --weak_label scribble --labelled_count 4
  # first the sweep that sets the defaults the rows below run at: 8 combinations on each dataset, one seed each (a
  # hint; the winner is then run over 3 seeds against the defaults), chosen by the mean over both datasets; its
  # defaults' runs are ConfKD's seed 0 below
  nnunet-weak tune -d 327 427 -tr ConfKDTrainer --grid lambda_kl=0.1 lambda_entropy=0.01 detach_teacher=1 \
    "${cpu_2d[@]}" --seeds 1 -o "$out/confkd_lambdas"
  # beyond the grid: stronger distillation, since the eroded labels lose the myocardium (documentation/ConfKDTrainer.md)
  nnunet-weak tune -d 327 -tr ConfKDTrainer --grid lambda_kl=10 detach_teacher=1 "${cpu_2d[@]}" --seeds 1 \
    -o "$out/confkd_strong_kl"
  local trainers=(nnUNetWeakTrainer ConfKDTrainer ConfKDTrainer_noKL ConfKDTrainer_noEntropy) dense_only
  # the issue's second setting: 7 strong patients instead of 2, the rest weak as above
  acdc_twin 337 338 --supervision mixed --weak_label erosion --labelled_count 14
  acdc_twin 437 438 --supervision mixed --weak_label scribble --labelled_count 14
  for id in 327 427 337 437; do
    # nnU-Net on the strong cases alone never reads a weak label, and each eroded/scribbled pair shares its strong
    # cases and split: one row per pair (327's serves 427, 437's serves 337)
    case $id in 327|437) dense_only=(nnUNetWeakTrainer_denseCasesOnly) ;; *) dense_only=() ;; esac
    nnunet-weak compare --sparse $id --no_dense "${cpu_2d[@]}" --disable_tta --seeds 3 \
      --trainers "${dense_only[@]}" "${trainers[@]}" -o "$out/confkd_$id"
  done
}

action() {  # issue 17: ACTION on ACDC with 3 labelled patients
  acdc_twin 727 728 --supervision semi --labelled_count 6
  nnunet-weak compare --sparse 727 --no_dense "${cpu_2d[@]}" --disable_tta --seeds 3 \
    --trainers nnUNetWeakTrainer ACTIONPretrainTrainer:ACTIONTrainer ACTIONTrainer CAMLTrainer -o "$out/action_acdc"
}

kaf() {  # issue 18: KAF with 2 and 6 labelled patients, with its detector and with DoG keypoints
  for spec in "527 528 4" "627 628 12"; do
    read -r id dense_id count <<< "$spec"
    acdc_twin "$id" "$dense_id" --supervision semi --labelled_count "$count"
    nnunet-weak compare --sparse "$id" --no_dense "${cpu_2d[@]}" --disable_tta --seeds 3 \
      --trainers nnUNetWeakTrainer KAFTrainer KAFPretrainTrainer:KAFTrainer \
      KAFPretrainTrainer_DoGKeypoints:KAFTrainer_DoGKeypoints -o "$out/kaf_$id"
  done
}

la() {  # issues 14 and 17: LA with 4 labelled volumes (fold all: test scores only)
  la_semi
  nnunet-weak compare --sparse 37 --no_dense -c 3d_fullres -p nnUNetPlans2.5mm -f all --budget 20x50 --device cpu \
    --records "$records" --disable_tta --seeds 3 \
    --trainers nnUNetWeakTrainer CAMLTrainer ACTIONPretrainTrainer_teacherTemperature06:ACTIONTrainer -o "$out/la"
}

scribble_ramps() {  # issue 14: attentive_rampup chosen on validation (measured 2026-11-30; kept reproducible)
  acdc_scribbles
  nnunet-weak tune -d 27 -tr ScribbleAttentionTrainer --grid attentive_rampup=0,0.25 "${cpu_2d[@]}" --seeds 3 \
    -o "$out/scribble_ramps"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(scribble_ablations caml_defaults scribble_3d confkd action kaf la scribble_ramps)
for step in "${steps[@]}"; do
  case "$step" in
    datasets|scribble_ablations|caml_defaults|scribble_3d|confkd|action|kaf|la|scribble_ramps) "$step" ;;
    *) echo "unknown step '$step'; see the top of $0" >&2; exit 2 ;;
  esac
done
