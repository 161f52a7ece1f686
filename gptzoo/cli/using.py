"""`gptzoo sample`, `serve`, `eval`, `import-hf` and `export-hf`: using and moving models."""

import click

from gptzoo.cli.app import friendly_errors, main, mark_output_complete
from gptzoo.errors import GptzooError


@main.command()
@click.option("--ckpt", "run_dir", required=True, type=click.Path(), help="A run directory.")
@click.option("--prompt", "prompts", multiple=True,
              help="Text to continue (repeatable: the prompts are generated as one batch).")
@click.option("--prompt-file", type=click.Path(), help="A file with one prompt per line.")
@click.option("--max-new-tokens", default=500, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-k", default=None, type=int, help="Sample only from the k most likely tokens.")
@click.option("--top-p", default=None, type=float, help="Sample only from the smallest nucleus "
              "of tokens whose probability reaches p.")
@click.option("--stop", default=None, help="Stop a sample once it has produced this text.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--num-samples", default=1, show_default=True, type=int,
              help="Samples per prompt, with seeds seed, seed+1, ...")
@click.option("--no-cache", is_flag=True, help="Recompute the context every token (slow).")
@click.option("--context", default=None, type=click.Choice(["shift", "crop", "slide"]),
              help="Past the window: keep its last --keep and re-encode it (shift), recompute "
              "the last block_size tokens every token (crop, nanoGPT), or slide the cache "
              "(rotary/ALiBi only). Default: slide for a sliding-window model, else shift.")
@click.option("--keep", default=0.5, show_default=True, type=float,
              help="Fraction of the window that --context shift keeps.")
@friendly_errors
def sample(run_dir, prompts, prompt_file, max_new_tokens, temperature, top_k, top_p, stop, seed,
           num_samples, no_cache, context, keep):
    """Generate text from a trained run, printing it as it is produced."""
    from pathlib import Path

    from gptzoo.compile_cache import enable_compilation_cache
    from gptzoo.sample import check_context, check_sampling_args, stream_batch
    from gptzoo.trainer import load

    check_sampling_args(max_new_tokens, temperature, top_k, top_p, context, keep)
    enable_compilation_cache()
    if num_samples < 1:
        raise GptzooError(f"--num-samples={num_samples} must be at least 1; pass 1 or more")
    prompts = list(prompts)
    if prompt_file:
        if not Path(prompt_file).is_file():
            raise GptzooError(f"--prompt-file {prompt_file} does not exist; pass a text file "
                              "with one prompt per line")
        prompts += Path(prompt_file).read_text(encoding="utf-8").splitlines()
    prompts = prompts or [""]
    model, tokenizer = load(run_dir)
    check_context(model, context, use_cache=not no_cache)
    for p in prompts:
        tokenizer.encode(p)  # fail on unknown characters before printing anything
    rows = [(p, seed + i) for p in prompts for i in range(num_samples)]
    pieces = stream_batch(model, tokenizer, [p for p, _ in rows], seeds=[s for _, s in rows],
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, stop=stop, use_cache=not no_cache, context=context,
                          keep=keep)
    if len(rows) == 1:  # one sample streams as it is produced
        click.echo(prompts[0], nl=False)
        for (piece,) in pieces:
            click.echo(piece, nl=False)
        click.echo()
    else:
        texts = [p for p, _ in rows]
        for chunk in pieces:
            texts = [t + c for t, c in zip(texts, chunk, strict=True)]
        click.echo("\n---------------\n".join(texts))
    mark_output_complete()


@main.command()
@click.option("--ckpt", "run_dir", required=True, type=click.Path(), help="A run directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--slots", default=8, show_default=True, type=int,
              help="Generations decoded at once (continuous batching).")
@click.option("--max-queue", default=64, show_default=True, type=int,
              help="Generations that may wait for a slot; more are refused with 429.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every "
              "endpoint but /health and /metrics.")
@click.option("--chat-template", type=click.Path(),
              help="A Jinja chat template [the run's own, else a plain one].")
@friendly_errors
def serve(run_dir, host, port, slots, max_queue, api_key, chat_template):
    """Serve a run over an OpenAI-compatible HTTP API (completions, chat, streaming)."""
    from gptzoo.compile_cache import enable_compilation_cache
    from gptzoo.serve import serve as run_server

    enable_compilation_cache()
    run_server(run_dir, host=host, port=port, slots=slots, max_queue=max_queue,
               api_key=api_key, chat_template=chat_template, log=click.echo)


@main.command(name="eval")
@click.option("--ckpt", "run_dir", required=True, type=click.Path(), help="A run directory.")
@click.option("--data", "data_path", type=click.Path(),
              help="Evaluate on this text's validation split instead of the run's data.path "
              "(an imported model's is the shipped tiny Shakespeare).")
@friendly_errors
def evaluate(run_dir, data_path):
    """Loss, bits per token and bits per byte of text on the whole validation split."""
    from gptzoo.compile_cache import enable_compilation_cache
    from gptzoo.trainer import evaluate_run

    enable_compilation_cache()
    result = evaluate_run(run_dir, data_path)
    click.echo(f"val loss {result.loss:.4f} | {result.bits_per_token:.4f} bits per token "
               f"| {result.bits_per_byte:.4f} bits per byte | {result.n_tokens:,} tokens")


@main.command(name="import-hf")
@click.argument("hf_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="The run directory to write.")
@click.option("--block-size", type=int, default=None,
              help="Context of a rotary model's run (KV cache, training window) [the config's "
              "max_position_embeddings, at most 4096]. GPT-2 keeps n_positions.")
@click.option("--adapter", type=click.Path(), metavar="PEFT_DIR",
              help="Also read this PEFT LoRA adapter of the model: --out becomes a LoRA run over "
              "the model, imported into OUT/base.")
@friendly_errors
def import_hf(hf_dir, out, block_size, adapter):
    """Turn a local Hugging Face folder (GPT-2, LLaMA, Mistral, Qwen2: any family with a Hugging
    Face format) into a run directory; with --adapter, a LoRA run over it."""
    from gptzoo.hf import import_hf as run_import
    from gptzoo.hf.peft_runs import import_peft

    if adapter:
        import_peft(hf_dir, adapter, out, block_size)
    else:
        run_import(hf_dir, out, block_size)
    click.echo(f"imported {adapter or hf_dir} into {out}; try gptzoo sample --ckpt {out}")


@main.command(name="export-hf")
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="The folder to write.")
@click.option("--peft", is_flag=True, help="Write a LoRA run's adapters alone, as PEFT's "
              "adapter_config.json and adapter_model.safetensors [the whole model, merged].")
@friendly_errors
def export_hf(run_dir, out, peft):
    """Write a run of a family with a Hugging Face format (gpt2, llama) as a Hugging Face folder
    (config.json, model.safetensors, tokenizer) for AutoModelForCausalLM.from_pretrained; with
    --peft, a LoRA run's adapters for PEFT."""
    from gptzoo.hf import export_hf as run_export
    from gptzoo.hf.peft_runs import export_peft

    (export_peft if peft else run_export)(run_dir, out)
    click.echo(f"exported {run_dir} to {out}")
