"""Hugging Face transformers as the reference implementation (tests only)."""
import torch


def hf_greedy(model_dir, prompts, max_new_tokens, **generate_kwargs):
    """Greedy token ids and the logprob of each chosen token (of the model's raw logits), one prompt at a time (no
    padding).  ``generate_kwargs`` go to ``generate`` (e.g. ``repetition_penalty``, ``logits_processor``)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    for p in prompts:
        # an explicit mask: without one generate takes every pad_token_id (0) in the prompt for padding
        ids = torch.tensor([p])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens,
                           do_sample=False, output_logits=True, return_dict_in_generate=True,
                           eos_token_id=None, pad_token_id=0, **generate_kwargs)
        toks = g.sequences[0, len(p):].tolist()
        lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, toks)]
        out.append((toks, lps))
    return out
