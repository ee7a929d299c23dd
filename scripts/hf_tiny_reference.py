#!/usr/bin/env python3
"""Writes tiny random-weight checkpoints in the Hugging Face layout, by HF transformers itself, and
what transformers computes on them, for tests/hf_checkpoints.rs:

- tests/fixtures/hf/llama: LlamaForCausalLM (untied head), one model.safetensors;
- tests/fixtures/hf/qwen2: Qwen2ForCausalLM (tied head, q/k/v biases), sharded safetensors with
  model.safetensors.index.json;
- both with a tiny byte-level BPE tokenizer (trained here with `tokenizers`) saved by
  PreTrainedTokenizerFast, with a ChatML chat template (in tokenizer_config.json for llama, in
  chat_template.jinja for qwen2);
- tests/fixtures/hf/dinov2: Dinov2Model (hidden 64, one head of 64, patch 14, 2 layers);
- tests/fixtures/hf/reference.json: the chat-templated prompt, its token ids, and the logits at
  every position (LLMs) / last_hidden_state (DINOv2, for a fixed input), in float32.

    python3 -m venv venv && venv/bin/pip install torch==2.9.1 transformers==4.57.1
    venv/bin/python scripts/hf_tiny_reference.py
"""
import json
import pathlib

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

ROOT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/hf"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The solar cell shows a dark crack across its lower half.",
    "Is there any defect in the test image? Yes, a crack near the busbar.",
    "The reference image is a normal cell with intact fingers and busbars.",
    "No. The test cell looks like the reference.",
] * 20
MESSAGES = [{"role": "user", "content": "Is there a crack in the cell?"}]


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def llm(name, model, tok, out):
    d = ROOT / name
    model.eval()
    # HF's init (std 0.02) leaves every logit near 0; larger random weights make the comparison bite.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    kwargs = {"max_shard_size": "40KB"} if name == "qwen2" else {}
    model.save_pretrained(d, safe_serialization=True, **kwargs)
    # LLaMA's template goes into tokenizer_config.json (older transformers' layout), Qwen2's into
    # chat_template.jinja (this version's default): the loader reads both.
    tok.save_pretrained(d, save_jinja_files=(name != "llama"))
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    out[name] = {"prompt": prompt, "ids": ids, "logits": logits.tolist()}


def main():
    torch.manual_seed(0)
    tok = tokenizer()
    vocab = len(tok)
    out = {"source": "scripts/hf_tiny_reference.py (transformers %s, torch %s)" % (
        __import__("transformers").__version__, torch.__version__)}
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llm("llama", LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)), tok, out)
    llm("qwen2", Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)), tok, out)

    vit = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                                   patch_size=14, image_size=28, layer_norm_eps=1e-6)).eval()
    # Random layer scales and biases, so that every tensor matters.
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vit.save_pretrained(ROOT / "dinov2", safe_serialization=True)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        hidden = vit(pixel_values=pixels).last_hidden_state[0]
    out["dinov2"] = {"pixels": pixels.flatten().tolist(), "last_hidden_state": hidden.flatten().tolist(),
                     "shape": list(hidden.shape)}
    (ROOT / "reference.json").write_text(json.dumps(out))
    print("wrote", ROOT)


main()
