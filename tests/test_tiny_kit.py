"""The offline test kit: the real Qwen2 tokenizer and the tiny model, built without any network."""
import json

from conftest import requires_upstream, run_py


def test_real_qwen2_tokenizer(qwen_tokenizer):
    t = qwen_tokenizer
    assert t("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    assert t("\n", add_special_tokens=False)["input_ids"] == [198]
    assert len(t) == 151646
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>"
    assert t.additional_special_tokens == ["<|im_start|>", "<|im_end|>"]
    assert t.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]


def test_tiny_model_cli_without_llava(tmp_path):
    proc = run_py(["-m", "llava_vla_plugin.apps.tiny_model", str(tmp_path / "m"), "--no-llava"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny-vla/siglip-tiny" in proc.stdout and "HF_HUB_OFFLINE=1" in proc.stdout
    cfg = json.loads((tmp_path / "m/tiny-qwen2-llm/config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 2, 151936)
    snap = list((tmp_path / "m/hf_home/hub/models--tiny-vla--siglip-tiny/snapshots").iterdir())
    tower = json.loads((snap[0] / "config.json").read_text())
    assert (tower["hidden_size"], tower["image_size"], tower["patch_size"], tower["num_hidden_layers"]) == (1152, 384, 14, 2)


@requires_upstream
def test_tiny_llava_qwen_checkpoint(tiny_model):
    cfg = json.loads((tiny_model.llava_dir / "config.json").read_text())
    assert cfg["model_type"] == "llava_qwen"
    assert cfg["mm_vision_tower"] == tiny_model.vision_tower
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_use_im_patch_token"] is False
    assert "qwen" in tiny_model.llava_dir.name  # upstream picks the class by the path
