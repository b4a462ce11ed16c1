"""What a BridgeTower user moving to ManagerTower calls: the processor (saved, reloaded with AutoProcessor, equal to
the original transforms), `model(**processor(...))` with `pixel_mask` for every head, bridge mode equal to HF
BridgeTower on the same processor inputs, the heads' Auto classes, and the retrieval call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoProcessor,
    BridgeTowerConfig,
    BridgeTowerModel,
)

from manager_plugin.managertower import (
    TASK_HEADS,
    ManagerTowerHeadModel,
    ManagerTowerImageProcessor,
    ManagerTowerModel,
    ManagerTowerProcessor,
)
from manager_plugin.managertower.heads import select
from manager_plugin.managertower.processing_managertower import image_processor_for
from manager_plugin.managertower.tiny import build_tokenizer, write_tiny

pytestmark = pytest.mark.usefixtures("single_thread")  # the tiny model is fastest on one thread

SIDE, PATCH = 32, 8  # the tiny model's image size and patch
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["a red circle on the left", "two blue squares", "a green triangle at the top", "what colour is the shape"]


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [_image(70, 50, 0), _image(40, 40, 1), _image(45, 90, 2), _image(64, 32, 3)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny"), image_size=SIDE, patch_size=PATCH)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir)


def _original(resize, crop: bool) -> T.Compose:
    """The authors' `clip` (Resize(side), CenterCrop) and `albef` (Resize((side, side))) transforms, by torchvision."""
    steps = [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC)] + ([T.CenterCrop(SIDE)] if crop else [])
    return T.Compose([*steps, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def test_processor_round_trips_through_save_and_auto_processor(tiny_dir, processor, tmp_path):
    assert type(processor) is ManagerTowerProcessor
    assert type(processor.image_processor) is ManagerTowerImageProcessor
    assert processor.image_processor.size.shortest_edge == SIDE
    assert type(AutoImageProcessor.from_pretrained(tiny_dir)) is ManagerTowerImageProcessor
    assert processor.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    stretch = ManagerTowerProcessor(image_processor_for(SIDE, "albef"), build_tokenizer())
    stretch.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.image_processor.do_center_crop, loaded.image_processor.do_pad) == (False, False)
    expected = stretch(images=IMAGES, text=TEXTS, padding=True, return_tensors="pt")
    got = loaded(images=IMAGES, text=TEXTS, padding=True, return_tensors="pt")
    assert got.keys() == expected.keys() == {"input_ids", "attention_mask", "pixel_values", "pixel_mask"}
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_image_fits_equal_the_original_transforms(processor):
    crop = processor(images=IMAGES, return_tensors="pt")
    stretch = processor(images=IMAGES, do_center_crop=False, do_pad=False, return_tensors="pt")
    for index, image in enumerate(IMAGES):
        expected_crop = _original(SIDE, crop=True)(image)
        expected_stretch = _original((SIDE, SIDE), crop=False)(image)
        torch.testing.assert_close(crop["pixel_values"][index], expected_crop, atol=1e-6, rtol=0)
        torch.testing.assert_close(stretch["pixel_values"][index], expected_stretch, atol=1e-6, rtol=0)
    assert crop["pixel_mask"].shape == (4, SIDE, SIDE) and bool(crop["pixel_mask"].all())
    assert bool(stretch["pixel_mask"].all())


def test_pad_fit_keeps_the_whole_image_and_masks_the_padding(processor):
    wide = IMAGES[3]  # 64 x 32: resized to 32 x 16, padded below
    padded = processor(images=[wide], do_center_crop=False, return_tensors="pt")
    mask, pixels = padded["pixel_mask"][0], padded["pixel_values"][0]
    assert bool(mask[:16].all()) and not bool(mask[16:].any())
    assert not bool(pixels[:, 16:].any())  # zeros after normalisation, as BridgeTower pads
    torch.testing.assert_close(pixels[:, :16], _original((16, SIDE), crop=False)(wide), atol=1e-6, rtol=0)


def _head(base: ManagerTowerModel, name: str) -> ManagerTowerHeadModel:
    torch.manual_seed(0)
    return TASK_HEADS[name].from_base_model(base, **({"num_labels": 5} if name == "vqav2" else {})).eval()


def test_model_takes_processor_outputs_with_pixel_mask_for_every_head(tiny_dir, processor):
    base = ManagerTowerModel.from_pretrained(tiny_dir).eval()
    inputs = processor(images=IMAGES[:3], text=TEXTS[:3], padding=True, return_tensors="pt")
    pairs = processor(images=[IMAGES[:2], IMAGES[2:4], IMAGES[1:3]], text=TEXTS[:3], padding=True, return_tensors="pt")
    assert pairs["pixel_values"].shape == (3, 2, 3, SIDE, SIDE) and pairs["pixel_mask"].shape == (3, 2, SIDE, SIDE)
    with torch.no_grad():
        fused = base(**inputs)
        unmasked = base(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        assert torch.equal(fused.pooler_output, unmasked.pooler_output)  # an all-ones mask changes nothing
        outputs = {name: _head(base, name)(**(pairs if name == "nlvr2" else inputs)) for name in TASK_HEADS}
    assert outputs["pretrain"].mlm_logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert outputs["pretrain"].itm_logits.shape == (3, 2) and outputs["pretrain"].loss is None
    assert outputs["vqav2"].logits.shape == (3, 5)
    assert outputs["snli_ve"].logits.shape == (3, 3) and outputs["nlvr2"].logits.shape == (3, 2)
    assert outputs["retrieval"].losses.keys() == {"itc", "itm"}
    # Pre-training's ITM swaps in false images where the label is 0, with their own (padded) masks.
    padded = processor(images=IMAGES[1:], text=TEXTS[:3], padding=True, do_center_crop=False, return_tensors="pt")
    true_mask, false_mask = padded["pixel_mask"], padded["pixel_mask"].flip(0)
    false = {"false_pixel_values": padded["pixel_values"].flip(0), "false_pixel_mask": false_mask}
    pretrain = _head(base, "pretrain")
    with torch.no_grad():
        trained = pretrain(**padded, **false, itm_labels=torch.tensor([1, 0, 0]))
        swapped = torch.cat((padded["pixel_values"][:1], false["false_pixel_values"][1:]))
        expected = pretrain(
            padded["input_ids"], padded["attention_mask"], swapped, torch.cat((true_mask[:1], false_mask[1:]))
        )
    assert trained.losses.keys() == {"itm"}
    torch.testing.assert_close(trained.itm_logits, expected.itm_logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"pixel_mask of shape \(3, 16, 16\) does not fit .* expected \(3, 32, 32\)"):
        base(**{**inputs, "pixel_mask": torch.ones(3, 16, 16, dtype=torch.long)})


@pytest.mark.parametrize("manager_type", ["AAUE", "SAUE", "bridge"])
def test_padding_is_masked_out_of_every_attention_over_images(tmp_path, processor, manager_type):
    """What the padded patches hold cannot change the outputs when `pixel_mask` marks them; it does without it."""
    base = ManagerTowerModel.from_pretrained(write_tiny(tmp_path, manager_type=manager_type)).eval()
    inputs = processor(images=IMAGES[2:], text=TEXTS[:2], padding=True, do_center_crop=False, return_tensors="pt")
    assert not bool(inputs["pixel_mask"].all())  # both images are padded (45 x 90 and 64 x 32)
    noisy = inputs["pixel_values"] + 5 * (1 - inputs["pixel_mask"][:, None]) * torch.randn_like(inputs["pixel_values"])
    with torch.no_grad():
        clean = base(**inputs)
        masked = base(**{**inputs, "pixel_values": noisy})
        unmasked = base(inputs["input_ids"], inputs["attention_mask"], noisy)
    for name in ("text_features", "pooler_output"):
        torch.testing.assert_close(masked[name], clean[name], atol=1e-5, rtol=0)
    # Image tokens of padding only are outputs nobody reads; the class token and real patches must not move.
    real = torch.cat(
        (torch.ones(2, 1), torch.nn.functional.max_pool2d(inputs["pixel_mask"][:, None].float(), PATCH).flatten(1)), 1
    )
    torch.testing.assert_close(masked.image_features[real.bool()], clean.image_features[real.bool()], atol=1e-5, rtol=0)
    assert (unmasked.pooler_output - clean.pooler_output).abs().max() > 1e-3


def test_bridge_mode_equals_hf_bridgetower_on_processor_inputs(processor):
    torch.manual_seed(3)
    config = BridgeTowerConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        text_config={"vocab_size": len(processor.tokenizer), "hidden_size": 32, "num_hidden_layers": 3,
                     "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 66},
        vision_config={"hidden_size": 64, "num_hidden_layers": 3, "patch_size": PATCH, "image_size": SIDE},
    )  # fmt: skip
    bridgetower = BridgeTowerModel(config).eval()
    model = ManagerTowerModel.from_bridgetower(bridgetower)
    inputs = processor(images=IMAGES, text=TEXTS, padding=True, return_tensors="pt")
    assert "pixel_mask" in inputs and not bool(inputs["attention_mask"].all())  # padded texts
    with torch.no_grad():
        expected, got = bridgetower(**inputs), model(**inputs)
    for name in ("text_features", "image_features", "pooler_output"):
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0)


def test_auto_classes_and_from_pretrained_give_each_head(tiny_dir, tmp_path):
    base = ManagerTowerModel.from_pretrained(tiny_dir)
    # HF's Auto classes where HF has one for the task; ManagerTowerHeadModel.from_pretrained for the others.
    loaders = {"pretrain": AutoModelForPreTraining, "vqav2": AutoModelForVisualQuestionAnswering}
    for name, head_class in TASK_HEADS.items():
        head = _head(base, name)
        head.save_pretrained(tmp_path / name)
        loaded = loaders.get(name, ManagerTowerHeadModel).from_pretrained(tmp_path / name)
        assert type(loaded) is head_class, name
        for key, tensor in head.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key
    assert type(AutoModel.from_pretrained(tiny_dir)) is ManagerTowerModel
    with pytest.raises(ValueError, match=r"holds architectures \['ManagerTowerModel'\], not a ManagerTower head"):
        ManagerTowerHeadModel.from_pretrained(tiny_dir)


def _fit(linear: torch.nn.Linear, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
    """Set `linear` so that it maps each row of `inputs` to the row of `outputs` (least squares, exact here)."""
    solution = torch.linalg.pinv(torch.cat((inputs, torch.ones(len(inputs), 1)), dim=1)) @ outputs
    linear.weight.copy_(solution[:-1].t())
    linear.bias.copy_(solution[-1])


def test_retrieval_call_ranks_a_planted_match_first(tiny_dir, processor):
    """A retrieval head whose ITC and ITM single out one image-text pair: it must come first both ways."""
    model = _head(ManagerTowerModel.from_pretrained(tiny_dir), "retrieval")
    images = [_image(40 + 3 * i, 40, 10 + i) for i in range(5)]
    texts = ["a red circle", "two blue squares", "a green triangle", "a white shape", "three black circles"]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    # Plant image 3 <-> text 1: the ITC heads are fitted (exactly: 5 inputs in 32 dimensions) to map text 1 and
    # image 3 to one direction and the others to random ones, so ITC proposes the pair; the ITM "match" logit is
    # fitted to be 10 on their fused features and 0 on every other pair's (25 pairs in 64 dimensions), so ITM must
    # rank them first.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text_enc = model.managertower.encode_text(inputs["input_ids"], inputs["attention_mask"])
        image_enc = model.managertower.encode_image(inputs["pixel_values"], inputs["pixel_mask"])
        for head, encoding, planted in (
            (model.cross_modal_itc_text_head, text_enc, 1),
            (model.cross_modal_itc_image_head, image_enc, 3),
        ):
            wanted = torch.randn(5, model.config.contrastive_hidden_size, generator=generator)
            wanted[planted] = torch.ones(model.config.contrastive_hidden_size)
            _fit(head, encoding.last_hidden_state[:, 0], wanted)
        image_index, text_index = torch.arange(5).repeat_interleave(5), torch.arange(5).repeat(5)
        pooled = model.managertower.fuse(select(text_enc, text_index), select(image_enc, image_index)).pooler_output
        wanted = ((image_index == 3) & (text_index == 1)).float()
        model.itm_score.fc.weight[1] = 10 * torch.linalg.pinv(pooled) @ wanted
        model.itm_score.fc.bias[1] = 0
        ranking = model.rank(**inputs, k=2, batch_size=2)
    assert ranking.texts_for_images.shape == (5, 5) and ranking.images_for_texts.shape == (5, 5)
    assert ranking.texts_for_images[3, 0] == 1 and ranking.images_for_texts[1, 0] == 3
    assert ranking.itc_scores.argmax(dim=1)[3] == 1  # ITC proposed it
    # Every row is a permutation; scored candidates (at most k per row and column proposals) come first.
    for order in (ranking.texts_for_images, ranking.images_for_texts):
        assert torch.equal(order.sort(dim=1).values, torch.arange(5).expand(5, 5))
    scored = torch.isfinite(ranking.itm_scores)
    assert scored.sum(dim=1).min() >= 2 and scored[3, 1]
    itm = ranking.itm_scores.gather(1, ranking.texts_for_images)
    assert bool((itm[:, :-1] >= itm[:, 1:]).all())  # ITM order, -inf (not re-ranked) last
