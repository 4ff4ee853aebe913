"""Upstream's argument dataclasses with the VLA defaults and options (module level: checkpoints pickle them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import llava.train.train as upstream_train

from data_tools.remix_weights import REMIX_SMOOTHING, REMIX_STEP_SIZE
from llava_vla_plugin.core.representations import REPRESENTATIONS
from llava_vla_plugin.core.env import default_attn_implementation


@dataclass
class ModelArguments(upstream_train.ModelArguments):
    # Upstream's default True shrinks the embeddings (the patch token is never used by Qwen models).
    mm_use_im_patch_token: bool = field(default=False)
    version: str = field(default="qwen_1_5")


@dataclass
class DataArguments(upstream_train.DataArguments):
    vla_skip_bad_samples: bool = field(default=False, metadata={"help": "count, log and skip unreadable samples instead of failing"})
    vla_data_seed: int = field(default=0, metadata={"help": "seed of per-dataset weight up/down-sampling"})
    vla_val_data: Optional[str] = field(default=None, metadata={"help": "held-out VLA data (jsonl or mixture yaml): action loss, "
                                                                          "accuracy and L1 every --vla_eval_steps and at the end"})
    vla_eval_steps: int = field(default=0, metadata={"help": "evaluate --vla_val_data every N steps (0: only at the end)"})
    vla_blind: bool = field(default=False, metadata={"help": "ablation: drop the <image> token from VLA prompts, so the model "
                                                               "trains without seeing its images (a blind baseline)"})
    vla_action_repr: str = field(default="bins", metadata={"help": "action representation: " + ", ".join(REPRESENTATIONS)
                                                                    + " (llava_vla_plugin/core/representations.py; described at the top of "
                                                                    "this help)"})
    vla_horizon: int = field(default=1, metadata={"help": "chunk length H (future actions per prediction; bins needs 1)"})
    vla_repr_options: str = field(default="", metadata={"help": "representation-specific settings, key=value,key=value "
                                                                 "(fast: tokenizer=DIR, the folder vla-fit-fast wrote)"})
    vla_window_mode: str = field(default="oft", metadata={"help": "how H-step windows are cut (data_tools/action_windows.py): "
                                                                   "oft (drop each episode's last H-1 frames) or openvla "
                                                                   "(goal = last step; relative dims 0, gripper repeated past it)"})
    vla_image_aug: bool = field(default=False, metadata={"help": "OpenVLA's train-time image augmentation on robot-action "
                                                                  "training images (random crop 0.9, brightness 0.2, contrast, "
                                                                  "saturation, hue; llava_vla_plugin/core/augment.py), recorded "
                                                                  "in the checkpoint: the policy then centre-crops (OFT)"})

    vla_cameras: str = field(default="primary", metadata={"help": "camera views, comma-separated, in this order: primary "
                                                                   "(third-person), wrist; several views enter as OneVision's "
                                                                   "multi-image input (llava_vla_plugin/core/inputs.py)"})
    vla_proprio: bool = field(default=False, metadata={"help": "give the robot state (the converted <split>_proprio.npz), "
                                                                "normalized and discretized into the action bins, as "
                                                                "tokens in the prompt (core/inputs.py)"})


@dataclass
class TrainingArguments(upstream_train.TrainingArguments):
    # flash_attention_2 (upstream's default) raises where flash-attn is not installed.
    attn_implementation: str = field(default_factory=default_attn_implementation)
    vla_lora_merge: bool = field(default=True, metadata={"help": "with --lora_enable True: after training also write "
                                                                  "OUTPUT_DIR/merged, a full checkpoint with the adapter merged in "
                                                                  "(as large as a full fine-tune; plain upstream loads it)"})
    vla_resume: str = field(default="auto", metadata={"help": "auto: continue from the newest checkpoint-* in output_dir "
                                                                "(refused if the run configuration changed); never: refuse "
                                                                "an output_dir that holds checkpoints; or a checkpoint path"})
    vla_keep_optimizer_state: str = field(default="latest", metadata={"help": "latest: only the newest checkpoint keeps "
                                                                              "optimizer state (needed to resume); all"})
    vla_log_batch_digests: bool = field(default=False, metadata={"help": "write a sha256 of every training batch to "
                                                                          "output_dir/batch_digests.jsonl (determinism checks)"})
    vla_remix_reference: Optional[str] = field(default=None, metadata={"help": "Re-Mix proxy run: learn dataset weights "
                                                                             "against this reference run (a finished "
                                                                             "OUTPUT_DIR on the same data); writes "
                                                                             "output_dir/remix_weights.json "
                                                                             "(llava_vla_plugin/train/remix.py)"})
    vla_remix_step_size: float = field(default=REMIX_STEP_SIZE, metadata={"help": "Re-Mix: step size of the weights' exponentiated-"
                                                                       "gradient update (Re-Mix's OXE runs: 0.2)"})
    vla_remix_smoothing: float = field(default=REMIX_SMOOTHING, metadata={"help": "Re-Mix: mixing of the initial weights into each "
                                                                        "update (Re-Mix's OXE runs: 0.05)"})
