"""Random-weight models of the real classes, for the tests (tiny) and the reasoning benchmark (real size).

No weights can be downloaded here, so tests build these, save them to a folder and production code
loads them through the same ``from_pretrained`` paths as real checkpoints: a LLaVA VLM (its processor
needs no torchvision), a CLIP model, a BART rewriter and a sentence encoder, all sharing a byte-level BPE tokenizer
trained on a few sentences (no hub access).
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = [
    "the photo of the glacier we hiked up to the lake last week",
    "Anna: did you see the sunset? Bob: yes, the picture from the beach was lovely",
    "turn numbers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20",
    "Search: Conversation of May 2023: Which numbered turns answer the search? Reply with numbers or 0",
]


def tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def image_processor(side: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


#: LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336 px (576 image tokens) and a Llama-7B decoder.
LLAVA_7B = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14),
                text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32))
LLAVA_TINY = dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8),
                  text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2))


def llava(path: Path, seed: int = 0, shape: dict = LLAVA_TINY, vocab_size: int | None = None,
          device: str = "cpu") -> Path:
    """A LLaVA model of ``shape`` with random weights (bf16 when built on CUDA), saved with its processor."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    torch.manual_seed(seed)
    tok = tokenizer()
    v = shape["vision"]
    processor = LlavaProcessor(image_processor=image_processor(v["image_size"]), tokenizer=tok,
                               patch_size=v["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    vision = CLIPVisionConfig(**v)
    text = LlamaConfig(vocab_size=vocab_size or len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape["text"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def clip(path: Path, projection: int = 16, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = tokenizer()
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **common),
                        vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=projection)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=image_processor(), tokenizer=tok).save_pretrained(path)
    return path


def bart(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    tok = tokenizer()
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)
    BartForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentence_encoder(path: Path, dim: int = 48, seed: int = 0) -> Path:
    """A sentence-transformers model (BERT, mean pooling) whose vectors have ``dim`` dimensions, not MiniLM's 384."""
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tok = tokenizer()
    base = Path(path) / "transformer"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=dim, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=2 * dim, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    encoder = SentenceTransformer(modules=[Transformer(str(base), max_seq_length=128), Pooling(dim, "mean")])
    encoder.save(str(path))
    shutil.rmtree(base)
    return Path(path)
