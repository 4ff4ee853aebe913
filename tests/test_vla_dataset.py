"""VLADataset on upstream's LazySupervisedDataset: ids/labels, <image> guarantee, bad samples, co-training."""
import copy
import json
from types import SimpleNamespace

import pytest

from conftest import requires_upstream
from llava_vla_plugin.testing.vla_samples import colour_image, write_mixture, write_vla_dataset

pytestmark = requires_upstream


@pytest.fixture()
def data(tmp_path):
    write_vla_dataset(tmp_path, "ds_a", 6, image_fn=lambda i, r: colour_image(r, i % 3),
                      action_fn=lambda i, r: r.uniform(-1, 1, 7))
    return tmp_path


@pytest.fixture()
def make_dataset(qwen_tokenizer):
    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor

    from llava_vla_plugin.train import register
    register.register()

    def make(data_path, image_folder, **kw):
        from llava_vla_plugin.train.dataset import VLADataset

        tok = copy.deepcopy(qwen_tokenizer)
        args = SimpleNamespace(image_folder=str(image_folder), image_processor=SigLipImageProcessor(),
                               image_aspect_ratio="pad", is_multimodal=True, early_mix_text=False,
                               image_grid_pinpoints=None, mm_use_im_start_end=False, **kw)
        return VLADataset(str(data_path), tok, args)

    return make


def test_vla_item_ids_labels_and_image(data, make_dataset):
    ds = make_dataset(data / "ds_a/train.jsonl", data)
    item = ds[0]
    sample = json.loads((data / "ds_a/train.jsonl").read_text().splitlines()[0])
    at = ds.action_tokenizer
    labels = item["labels"].numpy()
    assert labels[labels != -100].tolist() == [*at.encode_to_ids(sample["conversations"][1]["value"]).tolist(), 151645]
    assert (item["input_ids"] == -200).sum() == 1
    pixels, size, kind = item["image"][0]
    assert tuple(pixels.shape) == (3, 384, 384) and size == (64, 48) and kind == "image"
    assert ds.dataset_statistics["ds_a"]["action"]["mask"][-1] is False
    assert len(ds.lengths) == 6 and all(m > 0 for m in ds.modality_lengths)


def test_missing_image_names_sample_and_file(data, make_dataset):
    (data / "ds_a/images/train/000002/0000.jpg").unlink()
    ds = make_dataset(data / "ds_a/train.jsonl", data)
    from llava_vla_plugin.train.dataset import BadSampleError

    with pytest.raises(BadSampleError, match=r"ds_a/train/000002/0000.*ds_a/train.jsonl.*000002/0000.jpg does not exist"):
        ds[2]


def test_skip_option_counts_and_never_hides(data, make_dataset):
    p = data / "ds_a/images/train/000002/0000.jpg"
    p.write_bytes(b"not a jpeg")
    ds = make_dataset(data / "ds_a/train.jsonl", data, vla_skip_bad_samples=True)
    item = ds[2]
    assert ds.skipped == 1
    assert item["id"] == "ds_a/train/000003/0000"  # the substitute is named, not silent


def test_malformed_action_refused(data, make_dataset):
    lines = (data / "ds_a/train.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["conversations"][1]["value"] = [0.1] * 6
    lines[1] = json.dumps(bad)
    (data / "ds_a/train.jsonl").write_text("\n".join(lines) + "\n")
    ds = make_dataset(data / "ds_a/train.jsonl", data)
    with pytest.raises(ValueError, match="6 values, expected 7"):
        ds[1]


def test_string_samples_go_to_upstream_with_image_token_inserted(data, make_dataset):
    """Co-training with ordinary LLaVA data: a sample with an image but no <image> is never trained blind."""
    plain = {"id": "llava-1", "image": "ds_a/images/train/000000/0000.jpg",
             "conversations": [{"from": "human", "value": "What colour dominates?"}, {"from": "gpt", "value": "Red."}]}
    (data / "plain").mkdir()
    (data / "plain/train.jsonl").write_text(json.dumps(plain) + "\n")
    mix = write_mixture(data, [("ds_a", 1.0), ("plain", 1.0)])
    ds = make_dataset(mix, data)
    assert len(ds) == 7
    item = ds[6]
    ids = item["input_ids"].numpy()
    assert (ids == -200).sum() == 1
    labelled = ds.tokenizer.decode([int(t) for t in item["labels"] if t >= 0])
    assert "Red." in labelled


def test_weights_resample_deterministically(data, make_dataset):
    write_vla_dataset(data, "ds_b", 4, image_fn=lambda i, r: colour_image(r, 0), action_fn=lambda i, r: [0.0] * 7)
    mix = write_mixture(data, [("ds_a", 0.5), ("ds_b", 2.0)])
    ds1 = make_dataset(mix, data)
    ds2 = make_dataset(mix, data)
    assert len(ds1) == 3 + 8
    assert [s["id"] for s in ds1.list_data_dict] == [s["id"] for s in ds2.list_data_dict]
    assert set(ds1.dataset_statistics) == {"ds_a", "ds_b"}
