"""``gemmalens harvest``: a text corpus's activations, window by window, into a dataset SAE trainers read.

It packs the corpus into windows of ``--context`` tokens (gemmalens/corpus.py), then runs exactly what
``gemmalens run`` runs, with the windows as prompts: prompt passes only (``max_tokens`` 0: no token chosen,
no cache, the pass stopped after the deepest captured layer), the engine(s) and the dataset sink with a row
per window, the results sink as the run's ledger (which windows are done: ``--resume`` continues a stopped
harvest).
"""

from __future__ import annotations

import click

from .options import DEFAULTS, cluster_options, reports_errors


@click.command()
@click.option("--corpus", required=True, metavar="FILE|FOLDER|DATASET",
              help="A .jsonl file (one JSON object per line, its text under --text-field), a .txt file (one document "
                   "per line), a folder saved with datasets' save_to_disk, or a Hub dataset id.")
@click.option("--text-field", default="text", show_default=True, help="The text column of the corpus.")
@click.option("--split", default="train", show_default=True, help="The split of a datasets corpus.")
@click.option("--context", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Tokens per window (a bos, then the corpus's text): one dataset row each.")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, help="Stop after this many windows.")
@click.option("--capture", multiple=True, required=True, metavar="PATTERN",
              help="The points to harvest, as dataset columns (repeatable; e.g. 'model.layers.6.resid_out').")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave out points matching this glob.")
@click.option("--dataset", required=True, metavar="FOLDER|URL", help="Where the dataset goes: a folder or fsspec URL.")
@click.option("--model", default=DEFAULTS.model, help="A .gguf file, model folder or Hub id (default: the embedded "
                                                       "Gemma 3 270M).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Compute dtype (default: float32 on CPU, bfloat16 on GPU).")
@click.option("--wire-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Dtype of the values on the bus and in the dataset (default: the compute dtype).")
@click.option("--sae", "saes", multiple=True, metavar="SOURCE", help="Attach an SAE: its features can be harvested.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Windows per forward pass.")
@click.option("--output-dir", type=click.Path(file_okay=False), default="./gemma3_harvest", show_default=True,
              help="The run's ledger: results.jsonl (a line per window done), summary.json, run_config.json.")
@click.option("--dataset-shard-mb", type=click.FloatRange(min=0, min_open=True), default=500.0, show_default=True,
              help="Close a dataset shard once it holds this many MB.")
@click.option("--resume", is_flag=True, help="Continue a stopped harvest into the same folders.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--progress-every", type=click.FloatRange(min=0.1), default=5.0, show_default=True, metavar="SECONDS",
              help="Seconds between progress lines when stderr is not a terminal.")
@click.option("--verbose", is_flag=True, help="Show tracebacks.")
@cluster_options
@click.pass_context
@reports_errors
def harvest(ctx, corpus, text_field, split, context, max_windows, **o):
    """Record a text corpus's activations (prompt passes over packed windows) as a datasets dataset."""
    from gemmalens.corpus import corpus_windows
    from gemmalens.engine.loading import resolve
    from gemmalens.engine.paths import cache_root
    from gemmalens.engine.tokenizer import load_tokenizer

    folder = resolve(o["model"])
    windows, count = corpus_windows(corpus, load_tokenizer(folder), folder / "tokenizer.json", context,
                                    cache_root() / "corpora", text_field, split, max_windows)
    click.echo(f"harvest: {count} window(s) of {context} tokens from {corpus}", err=True)
    run = ctx.find_root().command.commands["run"]
    ctx.invoke(run, **o, corpus=str(windows), max_tokens=0, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
               positions="prompt", dataset_rows="context", context=context)
