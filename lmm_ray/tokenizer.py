"""A tokenizer trained locally (no hub): byte-level BPE over the generated skills' text.

One vocabulary serves every family: it carries all families' special tokens, and a ChatML
chat template whose `{"type": "image"}` item renders to the family's image placeholder (the
processor then expands it to the image's tokens). The corpus repeats every answer word, with
and without a leading space, so that answers are single tokens and first-token probes are exact.
"""

from __future__ import annotations

import functools
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lmm_ray.number_words import COUNT_WORDS

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",  # qwen2.x-vl
    "<image>", "<video>",  # llava, llava-onevision
    "<img>", "</img>", "<IMG_CONTEXT>",  # internvl
]


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VOCAB_SIZE = 1024
CORPUS_SAMPLES_PER_SKILL = 200


def chat_template(image_placeholder: str) -> str:
    return CHATML.replace("IMAGE_PLACEHOLDER", image_placeholder)


def corpus() -> list[str]:
    """Text the BPE is trained on: every generated skill's questions and answers, numbers, chat words."""
    from lmm_ray import skills

    skills._load_generators()
    lines: list[str] = []
    words: set[str] = set()
    for name in skills.SKILLS.names():
        for s in skills.generate(name, CORPUS_SAMPLES_PER_SKILL, seed=0, image_size=32):
            lines.append(s.question)
            lines.append(s.answer)
            words.update(re.findall(r"[a-z]+", (s.question + " " + s.answer + " " + " ".join(s.choices)).lower()))
            words.update(s.choices)
            words.add(s.answer)
    words.update(COUNT_WORDS)
    words.update(str(i) for i in range(100))
    words.update(["user", "assistant", "system", "you", "are", "a", "helpful"])
    for w in sorted(words):
        lines += [w, " " + w] * 20
    return lines


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str()


def build_tokenizer(image_placeholder: str, specials: dict[str, str]) -> PreTrainedTokenizerFast:
    """The local tokenizer for one family (the BPE is trained once per process and reused)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe_json()),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        # A named dict becomes attributes (tok.image_token, ...) that the processors read.
        extra_special_tokens=dict(specials),
        chat_template=chat_template(image_placeholder),
        model_max_length=4096,
    )
