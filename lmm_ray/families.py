"""Model families: the parameter roles of each, how its processor is built, and its tiny config.

A *role* names a group of parameters the study talks about (`llm.attn.q`, `llm.mlp.down`,
`vision`, ...). Each family maps every role to anchored regexes over `named_parameters()`
(transformers 5.x names). Anchoring on the language model's layer path matters: vision towers
contain `q_proj`/`k_proj`/`v_proj` (SigLIP, CLIP, InternViT) and Qwen's vision blocks contain
`mlp.gate_proj/up_proj/down_proj`, so suffix matching would silently unfreeze vision modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import transformers as T

from lmm_ray.registry import Registry

# ---------------------------------------------------------------------------------------------
# Roles

LLM = r"model\.language_model"
LAYER = LLM + r"\.layers\.(?P<layer>\d+)"
W = r"\.(?:weight|bias)"

# Roles shared by every family: the LLM decoder is a Qwen2/Llama-style stack in all of them.
LLM_ROLES: dict[str, list[str]] = {
    "llm.attn.q": [LAYER + r"\.self_attn\.q_proj" + W],
    "llm.attn.k": [LAYER + r"\.self_attn\.k_proj" + W],
    "llm.attn.v": [LAYER + r"\.self_attn\.v_proj" + W],
    "llm.attn.o": [LAYER + r"\.self_attn\.o_proj" + W],
    "llm.mlp.gate": [LAYER + r"\.mlp\.gate_proj" + W],
    "llm.mlp.up": [LAYER + r"\.mlp\.up_proj" + W],
    "llm.mlp.down": [LAYER + r"\.mlp\.down_proj" + W],
    "llm.norm": [LAYER + r"\.(?:input_layernorm|post_attention_layernorm)\.weight", LLM + r"\.norm\.weight"],
    "llm.embed": [LLM + r"\.embed_tokens\.weight"],
    "llm.head": [r"lm_head\.weight"],
}
ROLE_ORDER = [*LLM_ROLES, "vision", "projector"]


@dataclass(frozen=True)
class TinySize:
    """Sizes of a tiny model. An image gives (image_size / patch)^2 / 4 tokens in Qwen2.5-VL, InternVL
    and LLaVA; LLaVA-OneVision adds an "anyres" crop of the same size plus one newline per row
    (2n^2 + n tokens for n = image_size / (2 * patch))."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 64
    patch: int = 8


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # config.model_type of real checkpoints
    model_class: type
    processor_class: type
    roles: dict[str, list[str]]
    image_placeholder: str  # what the chat template writes for an image; the processor expands it
    tokenizer_specials: dict[str, str]  # named special tokens the processor reads off the tokenizer
    build_tiny: Callable[[Any, TinySize], Any]  # (tokenizer, size) -> model
    build_image_processor: Callable[[TinySize], Any]
    processor_kwargs: Callable[[TinySize], dict] = field(default=lambda s: {})
    study_checkpoint: str = ""
    # Dotted paths (from the transformers model, below any peft wrapper) of the ModuleLists that
    # hold the transformer blocks: FSDP shards each block as one unit (parallel.shard_model), and
    # memory.estimate counts the largest one as the all-gather peak. Empty: the family cannot be sharded.
    blocks: tuple[str, ...] = ()

    def compiled_roles(self) -> dict[str, list[re.Pattern]]:
        return {r: [re.compile(p) for p in ps] for r, ps in self.roles.items()}


FAMILIES: Registry[Family] = Registry("model family")


def get_family(name: str) -> Family:
    return FAMILIES.get(name)


def family_of_config(config) -> Family:
    """The family of a loaded model's config (by `model_type`)."""
    for fam in FAMILIES._items.values():
        if fam.model_type == config.model_type:
            return fam
    raise ValueError(
        f"model_type {config.model_type!r} is not a supported family; supported: "
        + ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES._items.values())
    )


# ---------------------------------------------------------------------------------------------
# Tiny builders


def _text_config(tok, s: TinySize, **extra) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # recipes must be able to tune the head apart from the embeddings
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<pad>"),
        **extra,
    )


def _vit(s: TinySize, **extra) -> dict:
    """A SigLIP / CLIP / InternViT vision config of the tiny size (Qwen's ViT names its fields differently)."""
    return dict(hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden, num_hidden_layers=s.vision_layers,
                num_attention_heads=4, **extra)


def _tiny_qwen2_5_vl(tok, s: TinySize):
    head_dim = s.hidden // s.heads
    half = head_dim // 2
    # mrope_section splits head_dim/2 rotary frequencies over (time, height, width) and must sum to it.
    hw = (half - half // 4) // 2
    mrope = [half - 2 * hw, hw, hw]
    ids = tok.convert_tokens_to_ids
    cfg = T.Qwen2_5_VLConfig(
        text_config=_text_config(
            tok, s, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
        ),
        vision_config=dict(
            depth=s.vision_layers,
            hidden_size=s.vision_hidden,
            intermediate_size=2 * s.vision_hidden,
            num_heads=4,
            patch_size=s.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=s.patch * 2 * 4,
            out_hidden_size=s.hidden,
            fullatt_block_indexes=[s.vision_layers - 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    return T.Qwen2_5_VLForConditionalGeneration(cfg)


def _tiny_llava_onevision(tok, s: TinySize):
    # SigLIP patch = 2*patch: the base view then has (image_size/patch)^2/4 tokens like the other
    # families ("anyres" adds a crop of the same size and a newline per row).
    vp = 2 * s.patch
    cfg = T.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text_config(tok, s)),
        vision_config=_vit(s, model_type="siglip_vision_model", image_size=s.image_size, patch_size=vp, vision_use_head=False),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[s.image_size, s.image_size]],  # one "anyres" crop the size of the base view
        vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=False,
    )
    return T.LlavaOnevisionForConditionalGeneration(cfg)


def _tiny_llava(tok, s: TinySize):
    vp = 2 * s.patch
    cfg = T.LlavaConfig(
        text_config=dict(model_type="llama", **_text_config(tok, s)),
        vision_config=_vit(s, model_type="clip_vision_model", image_size=s.image_size, patch_size=vp,
                           projection_dim=s.vision_hidden),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",  # drops CLS
        vision_feature_layer=-1,
        image_seq_length=(s.image_size // vp) ** 2,
        tie_word_embeddings=False,
    )
    return T.LlavaForConditionalGeneration(cfg)


def _tiny_internvl(tok, s: TinySize):
    cfg = T.InternVLConfig(
        text_config=dict(model_type="qwen2", **_text_config(tok, s)),
        vision_config=_vit(s, image_size=[s.image_size, s.image_size], patch_size=[s.patch, s.patch]),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(s.image_size // s.patch) ** 2 // 4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,  # InternVL ties by default; recipes need lm_head apart
    )
    return T.InternVLForConditionalGeneration(cfg)


# ---------------------------------------------------------------------------------------------
# Registry

FAMILIES.register(
    "qwen2_5_vl",
    Family(
        name="qwen2_5_vl",
        model_type="qwen2_5_vl",
        model_class=T.Qwen2_5_VLForConditionalGeneration,
        processor_class=T.Qwen2_5_VLProcessor,
        roles={
            **LLM_ROLES,
            # The merger (projector) lives inside model.visual.
            "vision": [r"model\.visual\.(?!merger\.).+"],
            "projector": [r"model\.visual\.merger\..+"],
        },
        image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
        tokenizer_specials=dict(
            image_token="<|image_pad|>",
            video_token="<|video_pad|>",
            vision_bos_token="<|vision_start|>",
            vision_eos_token="<|vision_end|>",
        ),
        build_tiny=_tiny_qwen2_5_vl,
        build_image_processor=lambda s: T.Qwen2VLImageProcessorPil(
            min_pixels=s.image_size**2, max_pixels=s.image_size**2, patch_size=s.patch, merge_size=2, temporal_patch_size=2
        ),
        study_checkpoint="Qwen/Qwen2.5-VL-7B-Instruct",
        blocks=("model.language_model.layers", "model.visual.blocks"),
    ),
)

_LLAVA_ROLES = {
    **LLM_ROLES,
    "vision": [r"model\.vision_tower\..+"],
    # image_newline is a bare parameter (no module, no trailing dot) in LLaVA-OneVision/NeXT.
    "projector": [r"model\.multi_modal_projector\..+", r"model\.image_newline"],
}

FAMILIES.register(
    "llava_onevision",
    Family(
        name="llava_onevision",
        model_type="llava_onevision",
        model_class=T.LlavaOnevisionForConditionalGeneration,
        processor_class=T.LlavaOnevisionProcessor,
        roles=_LLAVA_ROLES,
        image_placeholder="<image>\n",
        tokenizer_specials=dict(image_token="<image>", video_token="<video>"),
        build_tiny=_tiny_llava_onevision,
        build_image_processor=lambda s: T.LlavaOnevisionImageProcessorPil(
            size={"height": s.image_size, "width": s.image_size}, image_grid_pinpoints=[[s.image_size, s.image_size]]
        ),
        processor_kwargs=lambda s: dict(
            num_image_tokens=(s.image_size // (2 * s.patch)) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
        ),
        study_checkpoint="llava-hf/llava-onevision-qwen2-7b-ov-hf",
        blocks=("model.language_model.layers", "model.vision_tower.encoder.layers"),
    ),
)

FAMILIES.register(
    "internvl",
    Family(
        name="internvl",
        model_type="internvl",
        model_class=T.InternVLForConditionalGeneration,
        processor_class=T.InternVLProcessor,
        roles=_LLAVA_ROLES,
        image_placeholder="<IMG_CONTEXT>\n",
        tokenizer_specials=dict(
            start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>"
        ),
        build_tiny=_tiny_internvl,
        build_image_processor=lambda s: T.GotOcr2ImageProcessorPil(
            size={"height": s.image_size, "width": s.image_size}, crop_to_patches=False, max_patches=1
        ),
        processor_kwargs=lambda s: dict(image_seq_length=(s.image_size // s.patch) ** 2 // 4),
        study_checkpoint="OpenGVLab/InternVL3-8B-hf",
        blocks=("model.language_model.layers", "model.vision_tower.encoder.layer"),
    ),
)

FAMILIES.register(
    "llava",
    Family(
        name="llava",
        model_type="llava",
        model_class=T.LlavaForConditionalGeneration,
        processor_class=T.LlavaProcessor,
        roles=_LLAVA_ROLES,
        image_placeholder="<image>\n",
        tokenizer_specials=dict(image_token="<image>", video_token="<video>"),
        build_tiny=_tiny_llava,
        build_image_processor=lambda s: T.CLIPImageProcessorPil(
            size={"shortest_edge": s.image_size}, crop_size={"height": s.image_size, "width": s.image_size}
        ),
        processor_kwargs=lambda s: dict(
            patch_size=2 * s.patch, vision_feature_select_strategy="default", num_additional_image_tokens=1
        ),
        study_checkpoint="llava-hf/llava-1.5-7b-hf",
        blocks=("model.language_model.layers", "model.vision_tower.encoder.layers"),
    ),
)
