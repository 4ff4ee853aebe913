"""The rule behind issue 26: every path that depends on the tower's or the language model's shape is
tested on a shape where that path is not empty (docs/WHERE_TO_CHANGE.md, "Shape-dependent paths").

A tower built with one layer keeps none after upstream's cut (mm_vision_select_layer -2 drops the
last), so LoRA found no tower module to wrap and the defaults' unloadable run went unseen. This test
pins the shapes the shared tiny model gives those paths: the session model (ZeRO-3 gathers, export,
sparse head, visual-token budget) keeps a tower layer with its linear layers, the LM has more than
one decoder layer, and the LoRA targets cover every LM linear layer and no vision module. The LoRA
run itself uses a 3-layer tower (tests/test_lora.py); the real 0.5B shape is in test_real_arch.py
and test_export_hf_real.py.
"""
import json

import pytest

from conftest import requires_upstream, run_py, subprocess_env

pytestmark = requires_upstream

SCRIPT = r'''
import json, re, sys
import torch
from llava.model.builder import load_pretrained_model
from llava_vla_plugin.train import lora
_, model, _, _ = load_pretrained_model(sys.argv[1], None, "llava_qwen", device_map="cpu", torch_dtype="float32")
tower = model.get_model().get_vision_tower().vision_tower.vision_model
targets = lora.language_model_lora_targets(model)
linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
matched = {n for n in linear if re.fullmatch(targets, n)}
print("RESULT " + json.dumps({
    "tower_layers_kept": len(tower.encoder.layers),
    "tower_linear": sorted(n for n in linear if "vision_tower" in n),
    "lm_layers": model.config.num_hidden_layers,
    "lm_linear": sorted(n for n in linear if n.startswith("model.layers.")),
    "matched": sorted(matched),
    "hidden": model.config.hidden_size, "vocab_rows": model.get_input_embeddings().weight.shape[0],
}))
'''


def test_shared_tiny_model_keeps_every_shape_path_non_empty(tiny_model):
    proc = run_py(["-c", SCRIPT, str(tiny_model.llava_dir)], env=subprocess_env(tiny_model.env()), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert r["tower_layers_kept"] >= 1, "the shared tiny tower has no layer left after upstream's cut"
    assert len(r["tower_linear"]) >= 6, r["tower_linear"]  # q/k/v/out_proj + fc1/fc2 of the kept layer
    assert r["lm_layers"] >= 2
    assert r["matched"] == r["lm_linear"] and len(r["matched"]) == 7 * r["lm_layers"]
    assert not [n for n in r["matched"] if "vision_tower" in n or "mm_projector" in n]
