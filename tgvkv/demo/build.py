"""Construction of the demo VLM: word-level tokenizer, LLaVA processor (with chat template) and model config.

The model is a stock ``LlavaForConditionalGeneration``: a small CLIP vision tower (96x96 image, 8-px
patches, 12 x 12 = 144 image tokens) and a small Llama language model. Everything here is built from
configs, so :func:`build_processor` and :func:`build_model` need no download.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import scenes

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>", IMAGE_TOKEN)  # ids 0..3
N_IMAGE_TOKENS = (scenes.IMAGE_SIZE // scenes.PATCH) ** 2  # 144

# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{% else %}{% generation %}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{{ '</s>' }}{% endgeneration %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the demo VLM (defaults: v2, 8.3M parameters; v1 was vision 128 x 2 layers (MLP 256), text
    192 x 4 layers (MLP 512)). Width 256 because CPU bf16 (AMX) training pays from there (docs/demo-model.md)."""

    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 768
    text_hidden: int = 256
    text_layers: int = 8
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 768

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over the task vocabulary (lower case, punctuation split off)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in scenes.vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # split on whitespace, then isolate punctuation so "red." and "USER:" become two words
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[.,?!:;]"), behavior="isolated")]
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        known_words=scenes.task_words(),  # saved in tokenizer_config.json; tgvkv.vocabulary names the other words
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_image_processor():
    from transformers import CLIPImageProcessor

    size = scenes.IMAGE_SIZE
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_convert_rgb=True,
    )


def build_processor():
    """``LlavaProcessor`` inserting 144 ``<image>`` tokens per image, with a LLaVA-1.5 style chat template."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=scenes.PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" feature strategy
    )


def build_config(tokenizer, spec: ModelSpec = ModelSpec()):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=scenes.IMAGE_SIZE,
        patch_size=scenes.PATCH,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    return cfg


def build_model(tokenizer, spec: ModelSpec = ModelSpec(), seed: int = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` (weights depend only on ``seed``)."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tokenizer, spec))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    )
    return model
