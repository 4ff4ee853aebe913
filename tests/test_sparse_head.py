"""The training forward that runs the LM head on labelled positions only must give upstream's loss
and gradients (it is on by default, so a mistake here would silently change every run)."""
import json

from conftest import requires_upstream, run_py, subprocess_env

SCRIPT = r"""
import json, sys, copy
import torch
from types import SimpleNamespace
from transformers import AutoTokenizer
from llava_vla_plugin.train import register
register.register()
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
from llava.train.train import DataCollatorForSupervisedDataset
from llava_vla_plugin.train.dataset import VLADataset
from llava_vla_plugin.train.register import add_action_tokens
tiny, data, folder = sys.argv[1:4]
torch.manual_seed(0)
model = LlavaQwenForCausalLM.from_pretrained(tiny, attn_implementation="sdpa", torch_dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(tiny, model_max_length=1024)
add_action_tokens(model, tok)
args = SimpleNamespace(image_folder=folder, image_processor=model.get_vision_tower().image_processor, image_aspect_ratio="pad",
                       is_multimodal=True, early_mix_text=False, image_grid_pinpoints=None, mm_use_im_start_end=False)
ds = VLADataset(data, tok, args)
batch = DataCollatorForSupervisedDataset(tok)([ds[0], ds[1], ds[2]])
batch.pop("ids", None)
model.train()
res = {}
for name, fwd in [("upstream", type(model).forward.__wrapped_upstream__), ("sparse", type(model).forward)]:
    model.zero_grad(set_to_none=True)
    out = fwd(model, **copy.copy(batch))
    out.loss.backward()
    res[name] = {"loss": float(out.loss), "grad_head": model.lm_head.weight.grad.clone(),
                 "grad_proj": model.get_model().mm_projector[0].weight.grad.clone(), "shape": list(out.logits.shape)}
u, s = res["upstream"], res["sparse"]
print("RESULT" + json.dumps({"loss_u": u["loss"], "loss_s": s["loss"], "shape_u": u["shape"], "shape_s": s["shape"],
    "head_diff": float((u["grad_head"] - s["grad_head"]).abs().max()), "head_scale": float(u["grad_head"].abs().max()),
    "proj_diff": float((u["grad_proj"] - s["grad_proj"]).abs().max()), "proj_scale": float(u["grad_proj"].abs().max())}))
"""


@requires_upstream
def test_sparse_head_matches_upstream_loss_and_gradients(tiny_model, tmp_path):
    from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

    data = write_vla_dataset(tmp_path, "ds", 3, image_fn=lambda i, r: colour_image(r, i), action_fn=lambda i, r: r.uniform(-1, 1, 7),
                             instruction_fn=lambda i: ["open the drawer", "pick up the red block now", "wipe"][i])
    proc = run_py(["-c", SCRIPT, str(tiny_model.llava_dir), str(data), str(tmp_path)], env=subprocess_env(tiny_model.env()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert abs(r["loss_u"] - r["loss_s"]) < 1e-5 * abs(r["loss_u"])
    assert r["shape_s"] == [24, r["shape_u"][-1]]  # 3 samples x (7 actions + <|im_end|>)
    assert r["head_diff"] <= 1e-4 * r["head_scale"] and r["proj_diff"] <= 1e-4 * r["proj_scale"]
