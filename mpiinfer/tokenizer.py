"""Tokenizer and chat template of a checkpoint directory.

Owns: encoding prompts with ``tokenizers`` on ``tokenizer.json`` (special tokens
added by its post-processor, as Hugging Face's fast tokenizers do), rendering
``messages`` with the model's chat template in a sandboxed jinja2 environment
(``ImmutableSandboxedEnvironment``: no attribute access to Python internals, no
file or module access), and decoding.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from .config import ConfigError


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


class ChatTemplateError(ValueError):
    pass


class Tokenizer:
    def __init__(self, model_dir: str):
        from tokenizers import Tokenizer as HFTokenizer
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{model_dir} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on a corrupt file
            raise ConfigError(f"cannot load {path}: {e}") from None
        cfg = {}
        cpath = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cpath):
            try:
                with open(cpath) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {cpath}: {e}") from None
        template = cfg.get("chat_template")
        tpath = os.path.join(model_dir, "chat_template.jinja")
        if template is None and os.path.isfile(tpath):
            with open(tpath) as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template = template
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self._compiled = None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _template(self):
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message):
                raise ChatTemplateError(message)

            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled

    def apply_chat_template(self, messages: list) -> str:
        if not self.chat_template:
            raise ChatTemplateError("the model has no chat template: send a plain 'prompt' instead of 'messages'")
        try:
            return self._template().render(messages=messages, add_generation_prompt=True,
                                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja2 errors, sandbox SecurityError
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_messages(self, messages: list) -> list:
        """Chat-templated ids, as transformers' apply_chat_template(tokenize=True) gives them."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
