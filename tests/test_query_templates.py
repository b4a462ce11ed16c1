"""The adaptive managers' query (the user's instruction) found through each model family's own chat template.

Templates: the project's ChatML (LLaVA-OneVision) and Vicuna (its tiny LLaVA-1.5 / NeXT) templates, and the chat
templates of public checkpoints, written out here: llava-1.5-7b-hf (Vicuna `USER: ... ASSISTANT:`),
LLaVA-NeXT-Video-7B-hf (the same, with videos), llava-v1.6-mistral-7b-hf (`[INST] ... [/INST]`) and
llama3-llava-next-8b-hf (Llama-3 headers). The expected mask is found independently: the characters of the question
asked with the image, located in the rendered text, and the tokens that spell them.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer

from llava_integration import instruction_query_mask, tiny
from llava_integration.chat_template import CHAT_TEMPLATE
from llava_integration.query import user_turn_markers
from training.data import Record, get_template

LLAVA_15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_VIDEO = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAVA_NEXT_LLAMA3 = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml (llava_onevision)": CHAT_TEMPLATE,
    "tiny vicuna (llava, llava_next)": tiny.VICUNA_TEMPLATE,
    "llava-1.5-7b-hf": LLAVA_15,
    "LLaVA-NeXT-Video-7B-hf": LLAVA_NEXT_VIDEO,
    "llava-v1.6-mistral-7b-hf": LLAVA_NEXT_MISTRAL,
    "llama3-llava-next-8b-hf": LLAVA_NEXT_LLAMA3,
}
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

ASKED = "What colour is the shape?"  # the question asked with the image: the query
IMAGE, TEXT = {"type": "image"}, "text"


def user(*parts) -> dict:
    return {
        "role": "user",
        "content": [part if isinstance(part, dict) else {"type": TEXT, TEXT: part} for part in parts],
    }


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": TEXT, TEXT: text}]}


CONVERSATIONS = {  # (messages, add_generation_prompt)
    "one turn, asking": ([user(IMAGE, ASKED)], True),
    "two images, then more turns": (
        [user(IMAGE, IMAGE, ASKED), assistant("red"), user("Where is the shape?"), assistant("left")],
        False,
    ),
    "the image in the second user turn": (
        [user("Describe the image."), assistant("a shape"), user(IMAGE, ASKED), assistant("blue")],
        False,
    ),
    "images in two user turns: the first one's": (
        [user(IMAGE, ASKED), assistant("red"), user(IMAGE, "Where is the shape?"), assistant("left")],
        False,
    ),
    "the image in the second turn, asking": (
        [user("How many shapes are there?"), assistant("one"), user(IMAGE, ASKED)],
        True,
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    """The project's tiny tokenizer, with Llama-3's header tokens as the special tokens they are there."""
    tokenizer = tiny.build_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_TOKENS], special_tokens=True)
    return tokenizer


def rendered(tokenizer, template: str, conversation: str) -> tuple[str, dict]:
    messages, prompt = CONVERSATIONS[conversation]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=prompt)
    return text, tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


def expected_mask(tokenizer, text: str, encoded) -> torch.Tensor:
    """The tokens holding a character of the question asked with the image (white-space tokens aside)."""
    begin = text.index(ASKED)
    end = begin + len(ASKED)
    return torch.tensor(
        [
            a < end and b > begin and bool(tokenizer.decode([token]).strip())
            for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
        ]
    )


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_the_query_is_the_question_asked_with_the_image_in_every_template(tokenizer, template, conversation):
    text, encoded = rendered(tokenizer, TEMPLATES[template], conversation)
    assert text.count(ASKED) == 1  # the reference is unambiguous
    mask = instruction_query_mask(torch.tensor(encoded["input_ids"]), tokenizer, chat_template=TEMPLATES[template])
    expected = expected_mask(tokenizer, text, encoded)
    assert expected.sum() > 0
    assert torch.equal(mask, expected), tokenizer.decode(torch.tensor(encoded["input_ids"])[mask])


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_a_left_padded_batch_masks_each_row_alone(tokenizer, template):
    """Rows of different conversations, padded on the left; a row without an image has no query."""
    texts = [rendered(tokenizer, TEMPLATES[template], name)[0] for name in CONVERSATIONS]
    texts.append(tokenizer.apply_chat_template([user("Say yes.")], chat_template=TEMPLATES[template], tokenize=False))
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    masks = instruction_query_mask(
        batch["input_ids"], tokenizer, batch["attention_mask"], chat_template=TEMPLATES[template]
    )
    for row, text in enumerate(texts):
        alone = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        expected = expected_mask(tokenizer, text, alone) if ASKED in text else torch.zeros(len(alone["input_ids"]))
        padding = batch["input_ids"].shape[1] - len(alone["input_ids"])
        assert not masks[row, :padding].any()
        assert torch.equal(masks[row, padding:], expected.bool())


def test_the_markers_are_learnt_from_the_template_not_named(tokenizer):
    """Each template's own user-turn opening and closing, as the tokens that spell them."""

    def spelt(patterns):
        return {tokenizer.decode(list(pattern)).strip() for pattern in patterns}

    expected = {
        "chatml (llava_onevision)": ({"<|im_end|>\n<|im_start|>user"}, {"<|im_end|>\n<|im_start|>assistant"}),
        "llava-1.5-7b-hf": ({"USER:"}, {"ASSISTANT:"}),
        "llava-v1.6-mistral-7b-hf": ({"[INST]"}, {"[/INST]"}),
        "llama3-llava-next-8b-hf": (
            {"<|start_header_id|>user<|end_header_id|>"},
            {"<|eot_id|><|start_header_id|>assistant<|end_header_id|>"},
        ),
    }
    for name, (starts, ends) in expected.items():
        turn = user_turn_markers(tokenizer, TEMPLATES[name])
        assert (spelt(turn.starts), spelt(turn.ends)) == (starts, ends), name


def test_without_a_user_turn_the_query_is_empty(tokenizer):
    """No chat template, one that leaves user messages unmarked, or the plain stage-1 prompt: no instruction, so the
    managers use the visual tokens as their query."""
    ids = torch.tensor(tokenizer("<image>\nWhat colour is the shape?", add_special_tokens=False)["input_ids"])
    unmarked = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert user_turn_markers(tokenizer, unmarked) is None
    assert not instruction_query_mask(ids, tokenizer, chat_template=unmarked).any()
    bare = tiny.build_tokenizer()
    bare.chat_template = None
    assert user_turn_markers(bare, None) is None
    assert not instruction_query_mask(ids, bare).any()
    plain = torch.tensor(tokenizer("<image>a red circle\n", add_special_tokens=False)["input_ids"])
    assert not instruction_query_mask(plain, tokenizer, chat_template=CHAT_TEMPLATE).any()


def renumbered_tokenizer() -> Qwen2Tokenizer:
    """The tiny tokenizer with other ids for its tokens (the same merges, so the same tokens): its byte-level BPE's
    vocabulary numbered backwards, but for the newline, which takes the id "What" has in the tiny one, and the special
    tokens added in the reverse order."""
    model = json.loads(tiny.build_tokenizer().backend_tokenizer.to_str())["model"]
    order = sorted(model["vocab"], key=model["vocab"].get, reverse=True)
    newline, what = order.index("\u010a"), model["vocab"]["What"]  # "\u010a": the newline, byte-level
    order[newline], order[what] = order[what], order[newline]
    renumbered = Qwen2Tokenizer(
        vocab={token: index for index, token in enumerate(order)},
        merges=[tuple(merge) for merge in model["merges"]],
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    specials = [AddedToken(token, special=True, normalized=False) for token in reversed(tiny.SPECIAL_TOKENS)]
    renumbered.add_tokens(specials, special_tokens=True)
    return renumbered


def test_what_is_learnt_of_a_tokenizer_and_template_answers_for_no_other():
    """The markers, media ids and blank tokens learnt once per tokenizer and template: two tokenizers of one size that
    number the same tokens differently and two templates, asked in turn in one process (twice: the second round reads
    what the first learnt), each get the independently found query."""
    tokenizer, other = tiny.build_tokenizer(), renumbered_tokenizer()
    assert len(tokenizer) == len(other)  # the vocabulary's size cannot tell them apart

    def ids(tok, text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    for text in ("<image>", "<|im_start|>", "USER"):
        assert ids(other, text) != ids(tokenizer, text), text
    assert ids(other, "\n") == ids(tokenizer, "What")  # a blank token in one, part of the query in the other
    for _ in range(2):
        for tok in (tokenizer, other):
            for template in ("chatml (llava_onevision)", "llava-1.5-7b-hf"):
                text, encoded = rendered(tok, TEMPLATES[template], "images in two user turns: the first one's")
                ids = torch.tensor(encoded["input_ids"])
                expected = expected_mask(tok, text, encoded)
                assert expected.sum() > 0
                assert torch.equal(instruction_query_mask(ids, tok, chat_template=TEMPLATES[template]), expected)


def test_tokens_added_after_a_query_are_read(tokenizer):
    """A tokenizer given its image token after a first query: what was learnt without it is not reused."""
    late = tiny.build_tokenizer(media_tokens=False)
    _, encoded = rendered(late, CHAT_TEMPLATE, "one turn, asking")  # `<image>` is plain text: no image, no query
    assert not instruction_query_mask(torch.tensor(encoded["input_ids"]), late, chat_template=CHAT_TEMPLATE).any()
    late.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    text, encoded = rendered(late, CHAT_TEMPLATE, "one turn, asking")
    mask = instruction_query_mask(torch.tensor(encoded["input_ids"]), late, chat_template=CHAT_TEMPLATE)
    assert torch.equal(mask, expected_mask(late, text, encoded))


def test_chat_template_encodes_with_the_ids_of_each_processor():
    """`ChatTemplate.encode` on the ChatML path (no generation blocks: the assistant header's ids are tokenised once
    per tokenizer) with two processors whose tokenizers number tokens differently, in turn: each sample's ids are its
    text's, its labels the tokens of the replies, its query the question asked with the image."""
    chatml = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    processors = [tiny.build_processor(tok) for tok in (tiny.build_tokenizer(), renumbered_tokenizer())]
    turns = (("human", f"<image>\n{ASKED}"), ("gpt", "red"), ("human", "Where is the shape?"), ("gpt", "left"))
    record = Record(id="r", images=("a.png",), turns=turns, source="data.json", index=0)
    for _ in range(2):
        for processor in processors:
            processor.chat_template = chatml
            encoded = get_template("chat").encode(record, processor)
            tok, text = processor.tokenizer, encoded.text
            tokens = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            assert encoded.input_ids.tolist() == tokens["input_ids"]
            replies = [
                (text.index(reply), text.index(reply) + len(reply)) for reply in ("red<|im_end|>", "left<|im_end|>")
            ]
            labelled = [any(a < end and b > begin for begin, end in replies) for a, b in tokens["offset_mapping"]]
            assert encoded.target_mask.tolist() == labelled
            assert torch.equal(encoded.query_mask, expected_mask(tok, text, tokens))
