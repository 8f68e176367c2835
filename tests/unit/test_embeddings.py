"""Embeddings: JSONL ``input`` records and /v1/embeddings bodies, the checkpoint's pooling (sentence-transformers'
modules.json), and the vectors against transformers' final hidden states pooled the same way (cosine >= 0.99999
in float32), with prefix caching, chunked prefill, several inputs per request, and the output shapes (JSONL,
OpenAI's CreateEmbeddingResponse with float and base64 encodings, HDF5)."""
import base64
import json
import os
import shutil

import numpy as np
import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import ConfigError, EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.pooling import checkpoint_pooling
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.io.openai_batch import batch_output_record, parse_openai_record
from mpiinfer.io.records import parse_record
from mpiinfer.io.resume import result_from_json, result_to_json
from mpiinfer.messages import Request, Result
from mpiinfer.tokenizer import Tokenizer

DEFAULTS = SamplingParams()


def jsonl(**rec):
    return parse_record(json.dumps({"id": "e", **rec}), 1, 0, DEFAULTS)


def body(**b):
    return parse_openai_record(json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                                           "body": {"model": "m", **b}}), 1, 0, DEFAULTS)


def test_records_and_bodies():
    r = jsonl(input="the sea")
    assert r.inputs == ["the sea"] and r.sampling.pooling == "auto" and r.sampling.normalize is None
    r = jsonl(input=[5, 6, 7], pooling="mean", normalize=False)
    assert r.inputs == [[5, 6, 7]] and r.sampling.pooling == "mean" and r.sampling.normalize is False
    r = body(input=["a", "b c"], encoding_format="base64", user="u")
    assert r.inputs == ["a", "b c"] and r.extra["encoding_format"] == "base64"
    assert body(input=[[1, 2], [3]]).inputs == [[1, 2], [3]] and body(input=[1, 2]).inputs == [[1, 2]]
    assert body(input="x", dimensions=64).sampling.dimensions == 64 and jsonl(input="x", dimensions=8).sampling.dimensions == 8
    for rec, words in [(jsonl(input="x", max_tokens=3), "takes only pooling, normalize and dimensions, not max_tokens"),
                       (jsonl(input="x", dimensions=0), "dimensions must be a positive integer"),
                       (jsonl(input="x", dimensions="8"), "dimensions must be an integer"),
                       (jsonl(prompt="x", pooling="mean"), "pooling: only for embedding records"),
                       (jsonl(input="x", pooling="cls"), "pooling must be one of auto, last, mean"),
                       (jsonl(input=""), "input must not be an empty string"),
                       (jsonl(input={"a": 1}), "input must be a string or an array of token ids"),
                       (jsonl(input="x", prompt="y"), "more than one prompt field"),
                       (body(input="x", truncate_prompt_tokens=64), "body.truncate_prompt_tokens in an embeddings"),
                       (body(input="x", encoding_format="hex"), 'encoding_format must be "float" or "base64"'),
                       (body(), "embeddings body has no input"),
                       (body(input=["a", 3]), "body.input[0] must be a non-negative integer")]:
        assert isinstance(rec, Result) and words in rec.error.message, (words, rec.error)


def test_checkpoint_pooling(model_dirs, tmp_path):
    d = tmp_path / "m"
    assert checkpoint_pooling(str(tmp_path)) == ("last", True)          # no sentence-transformers files
    (d / "1_Pooling").mkdir(parents=True)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (d / "modules.json").write_text(json.dumps(mods))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                             "pooling_mode_cls_token": False}))
    assert checkpoint_pooling(str(d)) == ("mean", False)
    mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (d / "modules.json").write_text(json.dumps(mods))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert checkpoint_pooling(str(d)) == ("last", True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ConfigError, match="pooling cls_token is not supported"):
        checkpoint_pooling(str(d))


def hf_embed(model, ids, pooling, normalize):
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
    v = h[-1] if pooling == "last" else h.mean(0)
    return torch.nn.functional.normalize(v, dim=0) if normalize else v


def cos(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), b.double()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral"])
def test_vectors_match_transformers(arch, model_dirs):
    """Inputs sharing prefixes (last pooling takes cache hits, mean computes every row), chunked prefill of 7
    tokens, several inputs in one request, and a generation request beside them."""
    from transformers import AutoModelForCausalLM
    d = model_dirs(arch)
    tok = Tokenizer(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24, prefix_min_blocks=1), Mesh.single(), Device("cpu"))
    eng = Engine(runner, tok, max_batch=4, step_tokens=7)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, tok.vocab_size, (40,), generator=g).tolist()
    texts = [shared + torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 23)] + \
        [shared[:16], shared[:20]]
    reqs = []
    for pooling in ("last", "mean"):
        for normalize in (True, False):
            for t in texts:
                sp = SamplingParams(max_tokens=0, pooling=pooling, normalize=normalize)
                reqs.append(Request(len(reqs), len(reqs), sp, inputs=[t]))
    reqs.append(Request(len(reqs), "many", SamplingParams(max_tokens=0, pooling="mean", normalize=True),
                        inputs=["the old man and the sea", [5, 6, 7], "salt"]))
    reqs.append(Request(len(reqs), "gen", SamplingParams(max_tokens=4), prompt_token_ids=shared))
    res = sorted(eng.generate(reqs), key=lambda r: r.index)
    assert all(r.error is None for r in res)
    for req, r in zip(reqs[:-2], res):
        want = hf_embed(hf, req.inputs[0], req.sampling.pooling, req.sampling.normalize)
        assert len(r.embeddings) == 1 and cos(r.embeddings[0], want) >= 0.99999
        assert torch.allclose(torch.tensor(r.embeddings[0]), want, atol=1e-4, rtol=1e-4)
        assert r.prompt_tokens == len(req.inputs[0])
    many = res[-2]
    ids = [tok.encode("the old man and the sea"), [5, 6, 7], tok.encode("salt")]
    assert len(many.embeddings) == 3 and many.prompt_tokens == sum(map(len, ids))
    for v, x in zip(many.embeddings, ids):
        assert cos(v, hf_embed(hf, x, "mean", True)) >= 0.99999
    assert len(res[-1].token_ids) == 4 and res[-1].embeddings is None
    assert sum(r.cached_tokens for r in res[:len(texts)]) > 0        # last pooling took prefix-cache hits
    assert sum(r.cached_tokens for r in res[2 * len(texts):4 * len(texts)]) == 0     # mean pooling computed all


def test_default_pooling_comes_from_the_checkpoint(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM
    src = model_dirs("llama")
    d = tmp_path / "st"
    shutil.copytree(src, d)
    (d / "1_Pooling").mkdir()
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    eng = Engine(ModelRunner(str(d), EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu")),
                 Tokenizer(str(d)))
    r = next(iter(eng.generate([jsonl(input=[4, 5, 6, 7])])))
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = hf_embed(hf, [4, 5, 6, 7], "mean", False)                 # mean, not normalised (no Normalize module)
    assert torch.allclose(torch.tensor(r.embeddings[0]), want, atol=1e-5)


def test_output_shapes(tmp_path):
    openai = pytest.importorskip("openai")
    vecs = [[0.5, -0.25, 1.0], [0.0, 2.0, -1.5]]
    for fmt in ("float", "base64"):
        r = Result(3, "e", prompt_tokens=7, embeddings=vecs,
                   extra={"custom_id": "e", "url": "/v1/embeddings", "encoding_format": fmt})
        back = result_from_json(json.loads(json.dumps(result_to_json(r))))         # the journal keeps them
        rec = batch_output_record(back, created=5, model="m")
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        b = rec["response"]["body"]
        if fmt == "base64":           # the openai client decodes base64 (little-endian float32) before its model
            b = {**b, "data": [{**e, "embedding": np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
                                .tolist()} for e in b["data"]]}
        obj = openai.types.CreateEmbeddingResponse.model_validate(b)
        assert obj.usage.prompt_tokens == obj.usage.total_tokens == 7 and [d.index for d in obj.data] == [0, 1]
        assert [d.embedding for d in obj.data] == vecs
    assert Result(0, "j", prompt_tokens=2, embeddings=[vecs[0]]).to_record() == \
        {"id": "j", "embedding": vecs[0], "usage": {"prompt_tokens": 2}}
    from mpiinfer.io.hdf5 import Hdf5Writer, read_hdf5_results
    path = os.path.join(tmp_path, "o.h5")
    with Hdf5Writer(path) as w:
        w.write(Result(0, "a", prompt_tokens=2, embeddings=[vecs[0]]))
        w.write(Result(1, "b", text="hi", token_ids=[1, 2], finish_reason="length", prompt_tokens=1))
    a, b = read_hdf5_results(path)
    assert a.embeddings == [vecs[0]] and b.embeddings is None and b.text == "hi"


def test_base_model_checkpoints(model_dirs, tmp_path):
    """Checkpoints saved from the base model: tensors without the "model." prefix under a causal LM's config (as
    Qwen3-Embedding is published), and a base-model architecture without an LM head (a sentence-transformers
    export): the same vectors as the causal LM; generation refused there with an error record."""
    from safetensors.torch import load_file, save_file
    src = model_dirs("qwen3")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    base = {k.removeprefix("model."): v for k, v in tensors.items() if not k.startswith("lm_head.")}
    cfg = json.load(open(os.path.join(src, "config.json")))
    ids = [7, 8, 9, 10, 11]

    def embed(d, extra=()):
        eng = Engine(ModelRunner(str(d), EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu")),
                     Tokenizer(str(d)))
        reqs = [Request(0, "e", SamplingParams(max_tokens=0, pooling="mean", normalize=True), inputs=[ids]), *extra]
        return sorted(eng.generate(reqs), key=lambda r: r.index)
    want = embed(src)[0].embeddings[0]
    for name, arch, keep_head in (("prefixless", cfg["architectures"][0], True), ("base", "Qwen3Model", False)):
        d = tmp_path / name
        shutil.copytree(src, d)
        t = dict(base)
        if keep_head and "lm_head.weight" in tensors:
            t["lm_head.weight"] = tensors["lm_head.weight"]
        os.remove(d / "model.safetensors")
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, "architectures": [arch], "tie_word_embeddings": False}))
        gen = Request(1, "g", SamplingParams(max_tokens=2), prompt_token_ids=ids)
        e, g = embed(d, [gen])
        assert torch.allclose(torch.tensor(e.embeddings[0]), torch.tensor(want), atol=1e-6)
        if keep_head:
            assert g.error is None and len(g.token_ids) == 2
        else:
            assert g.error.type == "invalid_request" and "without an LM head" in g.error.message


def test_pooling_the_checkpoint_asks_for_but_mpiinfer_lacks(model_dirs, tmp_path):
    """CLS pooling, or a Dense module after pooling (other vectors than pooled hidden states): a record relying
    on the checkpoint is an error record naming why, the job goes on; one giving pooling and normalize runs."""
    src = model_dirs("llama")
    for name, mods, pool_cfg, words in (
            ("cls", [("Pooling", "1_Pooling")], {"pooling_mode_cls_token": True}, "pooling cls_token"),
            ("dense", [("Pooling", "1_Pooling"), ("Dense", "2_Dense")], {"pooling_mode_mean_tokens": True},
             "sentence_transformers.models.Dense")):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
        (d / "modules.json").write_text(json.dumps(
            [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
            + [{"idx": i + 1, "name": str(i + 1), "path": p, "type": f"sentence_transformers.models.{k}"}
               for i, (k, p) in enumerate(mods)]))
        eng = Engine(ModelRunner(str(d), EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu")),
                     Tokenizer(str(d)))
        res = sorted(eng.generate([
            Request(0, "auto", SamplingParams(max_tokens=0, pooling="auto"), inputs=[[4, 5, 6]]),
            Request(1, "own", SamplingParams(max_tokens=0, pooling="mean", normalize=True), inputs=[[4, 5, 6]]),
            Request(2, "gen", SamplingParams(max_tokens=2), prompt_token_ids=[4, 5])]), key=lambda r: r.index)
        assert res[0].error.type == "invalid_request" and words in res[0].error.message, res[0].error
        assert res[1].error is None and len(res[1].embeddings[0]) == 64
        assert res[2].error is None and len(res[2].token_ids) == 2


def score_body(**b):
    return parse_openai_record(json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/score",
                                           "body": {"model": "m", **b}}), 1, 0, DEFAULTS)


def test_score_requests_are_cosines_of_embeddings(model_dirs):
    """vLLM's /v1/score for an embedding model: one to one, one to many (text_1 embedded once), pairwise; each
    score the cosine similarity of transformers' pooled final hidden states."""
    from transformers import AutoModelForCausalLM
    d = model_dirs("llama")
    tok = Tokenizer(d)
    eng = Engine(ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu")), tok)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cases = [("the sea", "the old man", [("the sea", "the old man")]),
             ("salt", ["wind", "night ship", "salt"], [("salt", "wind"), ("salt", "night ship"), ("salt", "salt")]),
             (["a b", "c"], ["c", "a b"], [("a b", "c"), ("c", "a b")])]
    for t1, t2, pairs in cases:
        req = score_body(text_1=t1, text_2=t2)
        assert len(req.inputs) == (1 if isinstance(t1, str) else len(t1)) + (1 if isinstance(t2, str) else len(t2))
        res = next(iter(eng.generate([req])))
        body = batch_output_record(res, created=1, model="m")["response"]["body"]
        assert body["object"] == "list" and [x["index"] for x in body["data"]] == list(range(len(pairs)))
        for x, (a, b) in zip(body["data"], pairs):
            ea, eb = (hf_embed(hf, tok.encode(t), "last", True) for t in (a, b))
            assert x["object"] == "score" and x["score"] == pytest.approx(float(ea @ eb), abs=1e-5)
        if pairs[-1][0] == pairs[-1][1]:
            assert body["data"][-1]["score"] == pytest.approx(1.0, abs=1e-6)    # a text against itself
    for bad, words in [(dict(text_1=["a", "b"], text_2=["c", "d", "e"]), "give one text_1, or as many as text_2"),
                       (dict(text_1="a"), "score body has no text_2"),
                       (dict(text_1="a", text_2=[]), "non-empty array of strings"),
                       (dict(text_1="a", text_2=[5]), "body.text_2[0] must be a string"),
                       (dict(text_1="a", text_2="b", truncate_prompt_tokens=5), "body.truncate_prompt_tokens")]:
        e = score_body(**bad)
        assert isinstance(e, Result) and words in e.error.message, (bad, e.error)


def test_matryoshka_dimensions(model_dirs, tmp_path):
    """dimensions keeps the first values, then normalises (vLLM's order); only for a model whose config.json says
    it is Matryoshka-trained, and only its listed sizes when it lists them; otherwise an error record."""
    from transformers import AutoModelForCausalLM
    src = model_dirs("llama")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = [4, 5, 6, 7, 8]
    with torch.no_grad():
        h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
    cfg = json.load(open(os.path.join(src, "config.json")))
    for name, extra, cases in (("plain", {}, {16: "not Matryoshka-trained"}),
                               ("any", {"is_matryoshka": True}, {16: None, 65: "more than the model's hidden size"}),
                               ("listed", {"matryoshka_dimensions": [8, 32]}, {8: None, 16: "not one of"})):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "config.json").write_text(json.dumps({**cfg, **extra}))
        eng = Engine(ModelRunner(str(d), EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu")),
                     Tokenizer(str(d)))
        for dims, words in cases.items():
            for pooling, v in (("last", h[-1]), ("mean", h.mean(0))):
                sp = SamplingParams(max_tokens=0, pooling=pooling, normalize=True, dimensions=dims)
                r = next(iter(eng.generate([Request(0, "e", sp, inputs=[ids])])))
                if words:
                    assert r.error.type == "invalid_request" and words in r.error.message, (name, dims, r.error)
                    continue
                want = torch.nn.functional.normalize(v[:dims], dim=0)
                assert len(r.embeddings[0]) == dims and torch.allclose(torch.tensor(r.embeddings[0]), want, atol=1e-5)
