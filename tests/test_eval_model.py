"""The `llava_ov_manager` lmms-eval model, called in-process, against per-sample references built by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from lmms_eval.api.instance import GenerationResult, Instance
from transformers import AutoProcessor

from eval.model import LlavaOvManager
from llava_integration import (
    QUERY_MASK_KWARG,
    apply_manager,
    load_model,
    manager_of,
    prepare_inputs,
    save_manager,
    set_image_aspect_ratio,
)
from manager_plugin import ManagerConfig

TASK, SPLIT = "probe", "test"
# (text, image sizes): one image (an AnyRes grid), two images, text only, an image placed by the text itself.
DOCUMENTS = [
    ("What colour is the shape?", [(40, 90)]),
    ("What shape is in the image?", [(64, 64), (32, 48)]),
    ("Answer with a single word. yes or no", []),
    ("<image>\nWhere is the shape?", [(96, 40)]),
    ("How many shapes are there?", [(32, 32)]),
]


def build_checkpoint(tiny_dir, directory, manager_type="static", seed=0):
    """The tiny model with a manager whose weights are all non-zero, saved as a merged checkpoint."""
    torch.manual_seed(seed)
    model = load_model(tiny_dir, dtype=torch.float32).eval()
    apply_manager(model, ManagerConfig(manager_type=manager_type))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in manager_of(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(directory)
    return directory


def documents():
    return [
        {"text": text, "images": [random_image(h, w, seed=10 * index + k) for k, (h, w) in enumerate(sizes)]}
        for index, (text, sizes) in enumerate(DOCUMENTS)
    ]


def requests(kind, arguments_of):
    return [
        Instance(
            request_type=kind,
            arguments=arguments_of(index, document),
            idx=0,
            metadata={"task": TASK, "doc_id": index, "repeats": 1},
        )
        for index, document in enumerate(documents())
    ]


def visuals(document):
    return document["images"]


def reference_prompt(processor, document):
    images = [] if "<image>" in document["text"] else [{"type": "image"}] * len(document["images"])
    content = images + [{"type": "text", "text": document["text"]}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def evaluation_model(path, **model_args):
    model = LlavaOvManager(pretrained=str(path), dtype="float32", device="cpu", **model_args)
    model.task_dict = {TASK: {SPLIT: documents()}}
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def static_checkpoint(tiny_dir, tmp_path_factory):
    return build_checkpoint(tiny_dir, tmp_path_factory.mktemp("static"))


def test_generate_until_batches_like_one_request_at_a_time(static_checkpoint):
    settings = {"max_new_tokens": 6, "until": ["square"], "do_sample": False}
    evaluated = evaluation_model(static_checkpoint, batch_size=3)
    answers = evaluated.generate_until(
        requests("generate_until", lambda i, doc: (doc["text"], dict(settings), visuals, i, TASK, SPLIT))
    )

    reference = load_model(static_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(static_checkpoint)
    expected = []
    for document in documents():
        inputs = prepare_inputs(
            processor,
            [reference_prompt(processor, document)],
            [document["images"]],
            reference.config.vision_aspect_ratio,
        )
        with torch.no_grad():
            output = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
        text = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        expected.append(text.split("square")[0])
    assert answers == expected
    assert evaluated.image_aspect_ratio == "anyres_max_9"


def reference_loglikelihood(model, processor, document, continuation, query_mask_of=None):
    """log P(continuation | prompt) and greedy-ness, from one unpadded sequence, token by token."""
    prompt = reference_prompt(processor, document)
    inputs = prepare_inputs(processor, [prompt], [document["images"]], model.config.vision_aspect_ratio)
    continuation_ids = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"][0], torch.tensor(continuation_ids)])[None]
    inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    extra = {} if query_mask_of is None else {QUERY_MASK_KWARG: query_mask_of(ids[0])[None]}
    with torch.no_grad():
        logits = model(**inputs, **extra).logits[0].float()
    total, greedy = 0.0, True
    for offset, token in enumerate(continuation_ids):
        position = ids.shape[1] - len(continuation_ids) + offset - 1
        total += torch.log_softmax(logits[position], dim=-1)[token].item()
        greedy &= int(logits[position].argmax()) == token
    return total, greedy


CONTINUATIONS = ["red", "blue square", "yes", "left of the circle", "two"]


def test_loglikelihood_is_the_continuations_negative_log_probability(static_checkpoint):
    evaluated = evaluation_model(static_checkpoint, batch_size=2)
    scores = evaluated.loglikelihood(
        requests("loglikelihood", lambda i, doc: (doc["text"], CONTINUATIONS[i], visuals, i, TASK, SPLIT))
    )
    reference = load_model(static_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(static_checkpoint)
    for score, document, continuation in zip(scores, documents(), CONTINUATIONS):
        # A GenerationResult is the only output lmms-eval 0.7.3 passes to the task without turning it into a string.
        assert isinstance(score, GenerationResult)
        negative_loglikelihood, greedy = score.text
        expected, expected_greedy = reference_loglikelihood(reference, processor, document, continuation)
        assert negative_loglikelihood == pytest.approx(-expected, abs=1e-4)
        assert greedy == expected_greedy


CHOICES = ["red", "blue square", "yes", "A", "left of the circle"]


def test_multiple_choice_encodes_each_document_once_and_scores_like_one_choice_at_a_time(static_checkpoint):
    evaluated = evaluation_model(static_checkpoint, batch_size=2)
    choice_requests = [
        Instance(
            request_type="loglikelihood",
            arguments=(document["text"], choice, visuals, doc_id, TASK, SPLIT),
            idx=choice_index,
            metadata={"task": TASK, "doc_id": doc_id, "repeats": 1},
        )
        for choice_index, choice in enumerate(CHOICES[:4])
        for doc_id, document in enumerate(documents())
    ]  # choice-major: the choices of one document are not neighbours
    encodings = []
    spy = evaluated.model.model.vision_tower.register_forward_hook(lambda *_: encodings.append(1))
    try:
        scores = evaluated.loglikelihood(choice_requests)
    finally:
        spy.remove()
    assert len(encodings) == 3  # one vision pass per batch of 2 documents (5 documents), not one per choice (20)

    reference = load_model(static_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(static_checkpoint)
    for score, request in zip(scores, choice_requests):
        _, choice, _, doc_id, _, _ = request.args
        expected, expected_greedy = reference_loglikelihood(reference, processor, documents()[doc_id], choice)
        assert -score.text[0] == pytest.approx(expected, abs=1e-5)
        assert score.text[1] == expected_greedy


def instruction_tokens(processor):
    """The instruction by hand: the user turn's text around the images, without its role name, images and blanks."""
    tokenizer = processor.tokenizer
    image_id, start_id, end_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<|im_start|>", "<|im_end|>"))

    def mask(ids):
        ids = ids.tolist()
        first_image = ids.index(image_id)
        turn = max(index for index in range(first_image) if ids[index] == start_id) + 2  # past `<|im_start|>user`
        stop = ids.index(end_id, first_image)
        return torch.tensor(
            [
                turn <= index < stop and ids[index] != image_id and bool(tokenizer.decode([ids[index]]).strip())
                for index in range(len(ids))
            ]
        )

    return mask


def test_adaptive_query_managers_get_the_instruction_tokens(tiny_dir, tmp_path):
    checkpoint = build_checkpoint(tiny_dir, tmp_path / "adaptive", manager_type="adaptive_last", seed=1)
    evaluated = evaluation_model(checkpoint, batch_size=3)
    with_images = [0, 3, 4]
    all_requests = requests("loglikelihood", lambda i, doc: (doc["text"], CONTINUATIONS[i], visuals, i, TASK, SPLIT))
    scores = evaluated.loglikelihood([all_requests[index] for index in with_images])

    reference = load_model(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    for score, index in zip(scores, with_images):
        document = documents()[index]
        expected, _ = reference_loglikelihood(
            reference, processor, document, CONTINUATIONS[index], instruction_tokens(processor)
        )
        without_query, _ = reference_loglikelihood(reference, processor, document, CONTINUATIONS[index])
        assert score.text[0] == pytest.approx(-expected, abs=1e-4)
        assert abs(expected - without_query) > 1e-3  # the query matters, so a missing mask would show

    seen = []
    spy = evaluated.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get(QUERY_MASK_KWARG)), with_kwargs=True, prepend=True
    )
    try:
        evaluated.generate_until(
            [
                requests(
                    "generate_until", lambda i, doc: (doc["text"], {"max_new_tokens": 3}, visuals, i, TASK, SPLIT)
                )[0]
            ]
        )
    finally:
        spy.remove()
    prompt_ids = prepare_inputs(
        processor,
        [reference_prompt(processor, documents()[0])],
        [documents()[0]["images"]],
        reference.config.vision_aspect_ratio,
    )["input_ids"][0]
    assert torch.equal(seen[0][0], instruction_tokens(processor)(prompt_ids))  # the prefill step gets the mask
    assert all(mask is None for mask in seen[1:])  # decode steps do not


def test_model_arguments(tiny_dir, static_checkpoint, tmp_path):
    adapter = tmp_path / "adapter"
    save_manager(load_model(static_checkpoint, dtype=torch.float32), adapter)
    with_adapter = LlavaOvManager(pretrained=str(tiny_dir), manager=str(adapter), dtype="float32", device="cpu")
    merged = LlavaOvManager(pretrained=str(static_checkpoint), dtype="float32", device="cpu")
    assert manager_of(with_adapter.model).config == manager_of(merged.model).config
    for (name, value), (_, merged_value) in zip(
        manager_of(with_adapter.model).state_dict().items(), manager_of(merged.model).state_dict().items()
    ):
        assert torch.equal(value, merged_value), name

    square = LlavaOvManager(pretrained=str(static_checkpoint), dtype="float32", device="cpu", grid="false")
    assert square.image_aspect_ratio == square.model.config.vision_aspect_ratio == "square"
    square_checkpoint = tmp_path / "square"
    model = load_model(static_checkpoint, dtype=torch.float32)
    set_image_aspect_ratio(model, "square")
    model.save_pretrained(square_checkpoint)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(square_checkpoint)
    assert LlavaOvManager(pretrained=str(square_checkpoint), device="cpu").image_aspect_ratio == "square"
    assert (
        LlavaOvManager(pretrained=str(square_checkpoint), device="cpu", grid=True).image_aspect_ratio == "anyres_max_9"
    )

    with pytest.raises(ValueError, match="unknown model_args.*colour"):
        LlavaOvManager(pretrained=str(tiny_dir), colour="red")
    with pytest.raises(ValueError, match="grid='sometimes'"):
        LlavaOvManager(pretrained=str(tiny_dir), device="cpu", grid="sometimes")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        LlavaOvManager(pretrained=str(tiny_dir), device="cpu", dtype="float8")


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_llava_1_5_and_next_checkpoints_evaluate_like_one_request_at_a_time(family, tmp_path):
    from llava_integration.processing import image_mode_of
    from llava_integration.tiny import write_tiny

    base = write_tiny(tmp_path / "base", family=family)
    checkpoint = build_checkpoint(base, tmp_path / "merged")
    settings = {"max_new_tokens": 4, "do_sample": False}
    evaluated = evaluation_model(checkpoint, batch_size=3)
    answers = evaluated.generate_until(
        requests("generate_until", lambda i, doc: (doc["text"], dict(settings), visuals, i, TASK, SPLIT))
    )
    assert evaluated.image_aspect_ratio is None  # the processor's own image mode

    reference = load_model(checkpoint, dtype=torch.float32).eval()
    assert manager_of(reference).config.model_family == family
    processor = AutoProcessor.from_pretrained(checkpoint)
    expected = []
    for document in documents():
        prompt = reference_prompt(processor, document)
        inputs = prepare_inputs(processor, [prompt], [document["images"]], image_mode_of(reference))
        with torch.no_grad():
            output = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert answers == expected
    with pytest.raises(ValueError, match="grid=True: .* has one image mode"):
        LlavaOvManager(pretrained=str(checkpoint), dtype="float32", device="cpu", grid="true")


def write_video(path, frames=6, seed=0):
    """A short random mp4 (64x64, mpeg4) written with PyAV."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            image = (rng.random((64, 64, 3)) * 255).astype("uint8")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_video_documents_evaluate_like_one_request_at_a_time(static_checkpoint, tmp_path):
    from lmms_eval.models.model_utils.load_video import read_video

    video = write_video(tmp_path / "clip.mp4")
    docs = [
        {"text": "What happens in the video?", "visuals": [video]},
        {"text": "What colour is the shape?", "visuals": [random_image(40, 90, seed=3)]},
        {"text": "Describe both.", "visuals": [random_image(64, 64, seed=4), video]},
    ]
    evaluated = LlavaOvManager(
        pretrained=str(static_checkpoint), dtype="float32", device="cpu", batch_size=3, max_frames=4
    )
    evaluated.task_dict = {TASK: {SPLIT: docs}}
    settings = {"max_new_tokens": 4, "do_sample": False}
    requests = [
        Instance(
            request_type="generate_until",
            arguments=(doc["text"], dict(settings), lambda d: d["visuals"], index, TASK, SPLIT),
            idx=0,
            metadata={"task": TASK, "doc_id": index, "repeats": 1},
        )
        for index, doc in enumerate(docs)
    ]
    answers = evaluated.generate_until(requests)

    reference = load_model(static_checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(static_checkpoint)
    expected = []
    for doc in docs:
        images = [v for v in doc["visuals"] if not isinstance(v, str)]
        videos = [read_video(v, num_frm=4) for v in doc["visuals"] if isinstance(v, str)]
        content = [{"type": "video"}] * len(videos) + [{"type": "image"}] * len(images)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [*content, {"type": "text", "text": doc["text"]}]}], add_generation_prompt=True
        )
        inputs = prepare_inputs(processor, [prompt], [images], "anyres_max_9", videos=[videos])
        assert (inputs["input_ids"] == reference.config.video_token_id).any() == bool(videos)
        with torch.no_grad():
            output = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert answers == expected


def test_documents_give_images_and_sampled_video_frames_and_refuse_anything_else(tmp_path):
    from eval.prompting import request_media

    video = write_video(tmp_path / "clip.mp4", frames=6)
    media = request_media([random_image(20, 30), video], "doc 0", num_frames=3)
    assert [image.size for image in media.images] == [(30, 20)]
    assert [frames.shape for frames in media.videos] == [(3, 64, 64, 3)]
    with pytest.raises(TypeError, match=r"doc 1: llava_ov_manager takes images and video files .* got a dict"):
        request_media([{"array": [0.0], "sampling_rate": 16000}], "doc 1", num_frames=3)
