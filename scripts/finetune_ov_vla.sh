#!/usr/bin/env bash
# Fine-tune LLaVA-OneVision as a VLA on converted Open X-Embodiment data.
# Defaults: one 8-GPU node, DeepSpeed ZeRO-2, from lmms-lab/llava-onevision-qwen2-7b-ov.
# Every setting is an environment variable (or a key of CONFIG=run.yaml; the environment wins);
# extra arguments go to the trainer unchanged (they come last, so they override the defaults below).
# Relative paths resolve against the directory you run from; DEEPSPEED also against the repository.
#
#   MODEL=lmms-lab/llava-onevision-qwen2-7b-ov  VISION_TOWER=google/siglip-so400m-patch14-384
#   DATA=converted/mixture.yaml  IMAGE_FOLDER=converted  OUTPUT_DIR=runs/ov-vla
#   NUM_GPUS=8 (0 = one CPU process, no DeepSpeed; without CUDA the default is refused: set 0, or N on purpose)  NNODES=1 (multi-node: set NODE_RANK,
#   MASTER_ADDR, MASTER_PORT as for any torchrun job; scripts/slurm_finetune.sbatch)  DEEPSPEED=configs/zero2.json (zero3.json too)
#   BATCH_SIZE=8 GRAD_ACCUM=1 LR=2e-5 EPOCHS=1 MAX_STEPS=-1 SAVE_STEPS=1000 IMAGE_ASPECT_RATIO=anyres_max_9
#   MODEL_MAX_LENGTH=4096 PRECISION=bf16 where CUDA is found, else fp32 NUM_WORKERS=4 REPORT_TO=none SEED=42
#   GRADIENT_CHECKPOINTING=True (recomputes activations: ~30% slower steps, far less activation memory)
#   RESUME=auto (continue from the newest OUTPUT_DIR/checkpoint-*, refused if the run configuration
#     changed) | never (refuse an OUTPUT_DIR that holds checkpoints) | <checkpoint path>
#   SAVE_TOTAL_LIMIT=2 (checkpoints kept; older ones are deleted) KEEP_OPTIMIZER=latest (only the newest
#     checkpoint keeps optimizer state, which resuming needs; older ones keep weights only) | all
#   VLA_PYTHON=.venv/bin/python (the interpreter that has the plugin and upstream)
#   VAL_DATA=converted/<ds>/val.jsonl (or a mixture) EVAL_STEPS=500: held-out action loss/accuracy/L1
#   every EVAL_STEPS and at the end -> OUTPUT_DIR/vla_metrics.jsonl, OUTPUT_DIR/final_metrics.json
#   CONFIG=run.yaml: settings from a file (scripts/launch_config.py); every launch writes the resolved
#   settings to OUTPUT_DIR/launch_config.yaml, so CONFIG=OUTPUT_DIR/launch_config.yaml replays a run.
#   ACTION_REPR=bins (bins_chunk, parallel_l1, fast: llava_vla_plugin/core/representations/) HORIZON=1 (chunk length H)
#   REPR_OPTIONS= the representation's own settings, key=value,... (fast: tokenizer=DIR from vla-fit-fast)
#   WINDOW_MODE=oft (openvla): how H-step windows are cut from each episode (data_tools/action_windows.py)
#   IMAGE_AUG=0 (1): OpenVLA's train-time image augmentation (llava_vla_plugin/core/augment.py); the
#   checkpoint records it and the policy then centre-crops its inputs, as OpenVLA-OFT does
#   CAMERAS=primary (primary,wrist: the wrist view too, as OneVision's multi-image input) PROPRIO=0 (1: the robot
#   state as tokens in the prompt); both recorded in the checkpoint (llava_vla_plugin/core/inputs.py)
#   REMIX_REFERENCE= a finished run on the same DATA: this run becomes a Re-Mix proxy that learns dataset weights
#   against it -> OUTPUT_DIR/remix_weights.json, remix_weights.png, remix_mixture.yaml (llava_vla_plugin/train/remix.py)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CALLER=$(pwd)
# VLA_PYTHON, not PYTHON: many environments (make, CI images) export PYTHON for other purposes.
PYTHON=${VLA_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
# This checkout's plugin, whatever the current directory or the installed copy.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

abspath() {  # a user path -> absolute, against the directory the launcher was run from
  case "$1" in /*|"") printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER" "${1#./}" ;; esac
}

CONFIG_ARGS=()
if [ -n "${CONFIG:-}" ]; then
  CONFIG=$(abspath "$CONFIG")
  CONFIG_SHELL=$("$PYTHON" "$ROOT/scripts/launch_config.py" read "$CONFIG")
  eval "$CONFIG_SHELL"
  echo "[finetune] settings from $CONFIG (environment variables override it)"
fi

NUM_GPUS_GIVEN=${NUM_GPUS+yes}  # the default 8 is for a GPU node; see the CUDA check below
MODEL=${MODEL:-lmms-lab/llava-onevision-qwen2-7b-ov}
VISION_TOWER=${VISION_TOWER:-google/siglip-so400m-patch14-384}
DATA=${DATA:-converted/mixture.yaml}
IMAGE_FOLDER=${IMAGE_FOLDER:-converted}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ov-vla}
NUM_GPUS=${NUM_GPUS:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-$ROOT/configs/zero2.json}
BATCH_SIZE=${BATCH_SIZE:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
LR=${LR:-2e-5}
EPOCHS=${EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:--1}
SAVE_STEPS=${SAVE_STEPS:-1000}
IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-anyres_max_9}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-4096}
NUM_WORKERS=${NUM_WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}
VAL_DATA=${VAL_DATA:-}
EVAL_STEPS=${EVAL_STEPS:-500}
SEED=${SEED:-42}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}
RESUME=${RESUME:-auto}
SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-2}
KEEP_OPTIMIZER=${KEEP_OPTIMIZER:-latest}
ACTION_REPR=${ACTION_REPR:-bins}
HORIZON=${HORIZON:-1}
WINDOW_MODE=${WINDOW_MODE:-oft}
REPR_OPTIONS=${REPR_OPTIONS:-}
IMAGE_AUG=${IMAGE_AUG:-0}
case "$IMAGE_AUG" in
  0|1) ;;
  *) echo "IMAGE_AUG=$IMAGE_AUG: expected 0 (no augmentation) or 1 (OpenVLA's train-time image augmentation)" >&2; exit 2 ;;
esac
REMIX_REFERENCE=${REMIX_REFERENCE:-}
CAMERAS=${CAMERAS:-primary}
PROPRIO=${PROPRIO:-0}
case "$PROPRIO" in
  0|1) ;;
  *) echo "PROPRIO=$PROPRIO: expected 0 (no robot state) or 1 (the state as tokens in the prompt)" >&2; exit 2 ;;
esac

# User paths: against the caller's directory (the launcher used to cd to the repository first).
DATA=$(abspath "$DATA"); IMAGE_FOLDER=$(abspath "$IMAGE_FOLDER"); OUTPUT_DIR=$(abspath "$OUTPUT_DIR")
VAL_DATA=$(abspath "$VAL_DATA"); REMIX_REFERENCE=$(abspath "$REMIX_REFERENCE")
opts=""  # REPR_OPTIONS' tokenizer=DIR (fast) is a user path too
IFS=',' read -ra _opts <<< "$REPR_OPTIONS"
for o in "${_opts[@]}"; do
  case "$o" in tokenizer=*) o="tokenizer=$(abspath "${o#tokenizer=}")" ;; esac
  opts+="${opts:+,}$o"
done
REPR_OPTIONS=$opts
if [ -e "$MODEL" ]; then MODEL=$(abspath "$MODEL"); fi  # else a hub id
case "$RESUME" in auto|never) ;; *) RESUME=$(abspath "$RESUME") ;; esac
case "$DEEPSPEED" in
  /*) ;;
  *) if [ -e "$CALLER/$DEEPSPEED" ]; then DEEPSPEED=$(abspath "$DEEPSPEED")
     elif [ -e "$ROOT/$DEEPSPEED" ]; then DEEPSPEED="$ROOT/$DEEPSPEED"  # configs/zero3.json from anywhere
     else echo "DEEPSPEED=$DEEPSPEED: no such file in $CALLER or $ROOT" >&2; exit 2; fi ;;
esac

# CUDA decides the process setup and the precision default (tf32 and bf16 autocast need a GPU).
case "$NUM_GPUS" in ''|*[!0-9]*) echo "NUM_GPUS=$NUM_GPUS: expected a number of processes per node (0 = one CPU process)" >&2; exit 2 ;; esac
HAS_CUDA=0
if [ "$NUM_GPUS" != "0" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_CUDA=1; fi
if [ "$HAS_CUDA" = "0" ] && [ "$NUM_GPUS" != "0" ]; then
  CORES=$(nproc 2>/dev/null || echo "?")
  if [ -z "$NUM_GPUS_GIVEN" ]; then  # a user on a CPU host who did not ask for processes: refuse, say the fix
    echo "[finetune] error: no CUDA GPU found (nvidia-smi), and NUM_GPUS defaults to $NUM_GPUS (one process per GPU):" \
      "that would start $NUM_GPUS CPU training processes on $CORES cores. Set NUM_GPUS=0 to train in one CPU process" \
      "without DeepSpeed (e.g. the tiny model), or NUM_GPUS=N to run N DeepSpeed CPU processes on purpose." >&2
    exit 2
  fi
  echo "[finetune] WARNING: no CUDA GPU found: starting $NUM_GPUS CPU training process(es) per node (DeepSpeed on gloo)" \
    "on $CORES cores, as NUM_GPUS=$NUM_GPUS asks; NUM_GPUS=0 runs one CPU process without DeepSpeed" >&2
fi
if [ "$HAS_CUDA" = "1" ]; then PRECISION=${PRECISION:-bf16}; else PRECISION=${PRECISION:-fp32}; fi
case "$PRECISION" in
  bf16) PREC_ARGS=(--bf16 True); if [ "$HAS_CUDA" = "1" ]; then PREC_ARGS+=(--tf32 True); fi ;;
  fp16) PREC_ARGS=(--fp16 True) ;;
  fp32) PREC_ARGS=(--bf16 False --fp16 False) ;;
  *) echo "PRECISION must be bf16, fp16 or fp32" >&2; exit 2 ;;
esac

case "$IMAGE_ASPECT_RATIO" in
  anyres*) GRID_ARGS=(--image_grid_pinpoints "(1x1),...,(6x6)" --mm_patch_merge_type spatial_unpad) ;;
  *) GRID_ARGS=(--mm_patch_merge_type spatial_unpad) ;;
esac

ARGS=(
  --model_name_or_path "$MODEL"
  --version qwen_1_5
  --data_path "$DATA"
  --image_folder "$IMAGE_FOLDER"
  --vision_tower "$VISION_TOWER"
  --mm_tunable_parts "mm_vision_tower,mm_mlp_adapter,mm_language_model"
  --mm_vision_tower_lr 2e-6
  --mm_projector_type mlp2x_gelu
  --mm_vision_select_layer -2
  --mm_use_im_start_end False
  --mm_use_im_patch_token False
  --group_by_modality_length True
  --image_aspect_ratio "$IMAGE_ASPECT_RATIO"
  "${GRID_ARGS[@]}"
  "${PREC_ARGS[@]}"
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs "$EPOCHS"
  --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --save_strategy steps
  --save_steps "$SAVE_STEPS"
  --save_total_limit "$SAVE_TOTAL_LIMIT"
  --vla_keep_optimizer_state "$KEEP_OPTIMIZER"
  --vla_resume "$RESUME"
  --seed "$SEED"
  --learning_rate "$LR"
  --weight_decay 0.
  --warmup_ratio 0.03
  --lr_scheduler_type cosine
  --logging_steps 1
  --model_max_length "$MODEL_MAX_LENGTH"
  --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
  --dataloader_num_workers "$NUM_WORKERS"
  --lazy_preprocess True
  --report_to "$REPORT_TO"
  --dataloader_drop_last True
  --vla_action_repr "$ACTION_REPR"
  --vla_horizon "$HORIZON"
  --vla_window_mode "$WINDOW_MODE"
  --vla_repr_options "$REPR_OPTIONS"
)

if [ -n "$VAL_DATA" ]; then ARGS+=(--vla_val_data "$VAL_DATA" --vla_eval_steps "$EVAL_STEPS" --per_device_eval_batch_size "$BATCH_SIZE"); fi

# Only when on: with IMAGE_AUG=0 the trainer's arguments are exactly what they were before the option existed.
if [ "$IMAGE_AUG" = "1" ]; then ARGS+=(--vla_image_aug True); fi
if [ -n "$REMIX_REFERENCE" ]; then ARGS+=(--vla_remix_reference "$REMIX_REFERENCE"); fi  # likewise only when set
if [ "$CAMERAS" != "primary" ]; then ARGS+=(--vla_cameras "$CAMERAS"); fi
if [ "$PROPRIO" = "1" ]; then ARGS+=(--vla_proprio True); fi

ARGS+=("${CONFIG_ARGS[@]}")

# Bad data paths and VLA options stop the launch here, before OUTPUT_DIR is created or written and before
# anything heavy loads (llava_vla_plugin/train/preflight.py; exit 2). The trainer checks the same again.
"$PYTHON" -m llava_vla_plugin.train.preflight "${ARGS[@]}" "$@" || exit $?
# A launch that stops later, before its run starts, removes what it wrote (run_config.discard_launch_config).
if [ ! -e "$OUTPUT_DIR" ]; then export VLA_LAUNCH_NEW_OUTPUT_DIR="$OUTPUT_DIR"; fi
mkdir -p "$OUTPUT_DIR"
if [ "$NODE_RANK" = "0" ]; then
  # launch_config.pending.yaml: the trainer renames it to launch_config.yaml once the run starts, so a
  # refused rerun (e.g. a changed configuration) does not overwrite the record of the run in OUTPUT_DIR.
  "$PYTHON" "$ROOT/scripts/launch_config.py" write "$OUTPUT_DIR/launch_config.pending.yaml" \
    MODEL="$MODEL" VISION_TOWER="$VISION_TOWER" DATA="$DATA" IMAGE_FOLDER="$IMAGE_FOLDER" OUTPUT_DIR="$OUTPUT_DIR" \
    NUM_GPUS="$NUM_GPUS" NNODES="$NNODES" MASTER_PORT="$MASTER_PORT" DEEPSPEED="$DEEPSPEED" BATCH_SIZE="$BATCH_SIZE" \
    GRAD_ACCUM="$GRAD_ACCUM" LR="$LR" EPOCHS="$EPOCHS" MAX_STEPS="$MAX_STEPS" SAVE_STEPS="$SAVE_STEPS" \
    IMAGE_ASPECT_RATIO="$IMAGE_ASPECT_RATIO" MODEL_MAX_LENGTH="$MODEL_MAX_LENGTH" PRECISION="$PRECISION" \
    NUM_WORKERS="$NUM_WORKERS" REPORT_TO="$REPORT_TO" VAL_DATA="$VAL_DATA" EVAL_STEPS="$EVAL_STEPS" SEED="$SEED" \
    GRADIENT_CHECKPOINTING="$GRADIENT_CHECKPOINTING" RESUME="$RESUME" SAVE_TOTAL_LIMIT="$SAVE_TOTAL_LIMIT" \
    KEEP_OPTIMIZER="$KEEP_OPTIMIZER" ACTION_REPR="$ACTION_REPR" HORIZON="$HORIZON" WINDOW_MODE="$WINDOW_MODE" \
    REPR_OPTIONS="$REPR_OPTIONS" IMAGE_AUG="$IMAGE_AUG" REMIX_REFERENCE="$REMIX_REFERENCE" CAMERAS="$CAMERAS" PROPRIO="$PROPRIO" -- "${CONFIG_ARGS[@]}" "$@"
  echo "[finetune] resolved settings -> $OUTPUT_DIR/launch_config.yaml (once training starts)"
fi
if [ "$NUM_GPUS" = "0" ]; then
  echo "[finetune] one CPU process, no DeepSpeed, $PRECISION -> $OUTPUT_DIR"
  exec "$PYTHON" -m llava_vla_plugin.train "${ARGS[@]}" --use_cpu True "$@"
fi
DIST_ARGS=()
DEEPSPEED_ARG=$DEEPSPEED
if [ "$HAS_CUDA" = "0" ]; then
  # No CUDA: DeepSpeed still runs (CPU accelerator, gloo), e.g. to check a config before a GPU run.
  DIST_ARGS=(--use_cpu True --ddp_backend gloo)
  # torch's AdamW instead of compiling DeepSpeed's CPU Adam (minutes, for nothing): scripts/launch_config.py
  DEEPSPEED_ARG=$("$PYTHON" "$ROOT/scripts/launch_config.py" cpu-deepspeed "$DEEPSPEED")
  echo "[finetune] no CUDA: DeepSpeed's optimizer is torch's AdamW (torch_adam), nothing is compiled"
fi
echo "[finetune] torchrun: node $NODE_RANK of $NNODES x $NUM_GPUS process(es), DeepSpeed $DEEPSPEED -> $OUTPUT_DIR"
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "$NUM_GPUS" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m llava_vla_plugin.train --deepspeed "$DEEPSPEED_ARG" "${ARGS[@]}" "${DIST_ARGS[@]}" "$@"
