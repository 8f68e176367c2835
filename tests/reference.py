"""Hugging Face transformers as the reference implementation (tests only)."""
import torch


def hf_greedy(model_dir, prompts, max_new_tokens, kv_dtype=None, **generate_kwargs):
    """Greedy token ids and the logprob of each chosen token (of the model's raw logits), one prompt at a time (no
    padding).  ``generate_kwargs`` go to ``generate`` (e.g. ``repetition_penalty``, ``logits_processor``).
    ``kv_dtype``: every key and value row is rounded to it as it enters the cache (and attended so), as a cache
    of that dtype under a float32 model holds them (``--kv-dtype``)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if kv_dtype is None:
        return [_greedy_one(model, p, max_new_tokens, generate_kwargs) for p in prompts]
    from unittest import mock

    from transformers.cache_utils import Cache
    update = Cache.update

    def rounded(self, key_states, value_states, *args, **kwargs):
        r = lambda t: t.to(kv_dtype).to(t.dtype)
        return update(self, r(key_states), r(value_states), *args, **kwargs)
    with mock.patch.object(Cache, "update", rounded):
        return [_greedy_one(model, p, max_new_tokens, generate_kwargs) for p in prompts]


def _greedy_one(model, p, max_new_tokens, generate_kwargs):
    # an explicit mask: without one generate takes every pad_token_id (0) in the prompt for padding
    ids = torch.tensor([p])
    g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       min_new_tokens=max_new_tokens,
                       do_sample=False, output_logits=True, return_dict_in_generate=True,
                       eos_token_id=None, pad_token_id=0, **generate_kwargs)
    toks = g.sequences[0, len(p):].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, toks)]
    return toks, lps


def dequantized_twin(model_dir, out_dir):
    """A float32 copy of a quantized checkpoint, no quantization_config: the reference transformers runs in
    float32.  MXFP4 (gpt-oss): experts dequantized into transformers' input-major ``gate_up_proj`` /
    ``down_proj``; FP8 with block scales: each weight times its blocks' ``weight_scale_inv``."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from mpiinfer.weights.mxfp4 import dequantize
    if os.path.isdir(out_dir):
        return str(out_dir)
    os.makedirs(out_dir)
    for f in os.listdir(model_dir):
        if f.endswith(".json") and f != "config.json":
            shutil.copy(os.path.join(model_dir, f), out_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    quant = cfg.pop("quantization_config")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    t = load_file(os.path.join(model_dir, "model.safetensors"))
    for name in [n for n in t if n.endswith("_blocks")]:
        base = name[:-len("_blocks")]
        t[base] = dequantize(t.pop(name), t.pop(base + "_scales")).transpose(1, 2).contiguous()
    for name in [n for n in t if n.endswith("_scale_inv")]:
        base, (br, bc) = name[:-len("_scale_inv")], quant["weight_block_size"]
        w = t[base].float()
        scale = t.pop(name).repeat_interleave(br, 0).repeat_interleave(bc, 1)[:w.shape[0], :w.shape[1]]
        t[base] = (w * scale).contiguous()
    save_file(t, os.path.join(out_dir, "model.safetensors"))
    return str(out_dir)
