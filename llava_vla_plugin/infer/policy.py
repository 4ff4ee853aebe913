"""VLAPolicy: image + instruction in, robot action out, from any llava_vla_plugin checkpoint or export.

    from llava_vla_plugin import VLAPolicy
    policy = VLAPolicy.from_pretrained("runs/ov-vla", device="cuda", dtype="bfloat16")
    action = policy.predict_action(image, "put the cup in the sink", unnorm_key="bridge_orig")

VLAPolicy is the policy pipeline (infer/pipeline.py: input transforms, a model backend, output transforms);
a training checkpoint takes the upstream backend (infer/upstream_backend.py), a transformers export the
transformers backend (infer/transformers_backend.py). This module keeps the names callers import.
"""
from llava_vla_plugin.infer.pipeline import (ActionConstraint, ImageInputError, VLAPolicy, check_device,  # noqa: F401
                                             resolve_dtype, to_pil)
from llava_vla_plugin.infer.upstream_backend import PreparedInputs, keep_last_logits_only  # noqa: F401

