"""``gemmalens report``: one self-contained HTML page for a finished run (data and code embedded, no network).

Per prompt it shows the prompt and generated tokens (generated ones coloured by the chosen token's probability,
the top alternatives on hover, from the sampling capture points), attention patterns where captured (a head
grid per layer and one large pattern), the logit lens where captured, and the run's summary. The page is plain
HTML, CSS, canvas and JavaScript (sinks/report.html): nothing to fetch, nothing to build, small enough to mail.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gemmalens.errors import ConfigError

from .reader import open_activations

TEMPLATE = Path(__file__).with_name("report.html")
ATTENTION = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn_weights$")
FEATURES = re.compile(r"^sae\.([A-Za-z0-9_]+)\.features$")
LENS = re.compile(r"^model\.layers\.(\d+)\.logit_lens\.tokens$")


def build_report(run_dir: str | Path, baseline: str | Path | None = None) -> str:
    """The report page of the run in ``run_dir`` (its results folder); with ``baseline`` (another run's folder,
    the same prompts without the edits), each prompt's tokens beside the baseline's."""
    results, summary, archive = _run(run_dir)
    pieces = token_pieces(summary.get("model"))
    layers = ((summary.get("model") or {}).get("config") or {}).get("num_hidden_layers")
    prompts = [_prompt(result, archive, pieces, layers) for result in results]
    if baseline is not None:
        base_results, _, base_archive = _run(baseline)
        by_id = {int(r["id"]): r for r in base_results}
        for prompt in prompts:
            if prompt["id"] in by_id:
                base = _prompt(by_id[prompt["id"]], base_archive, pieces, layers)
                prompt["baseline"] = {"tokens": base["tokens"], "probs": base["probs"],
                                      "ids": by_id[prompt["id"]]["tokens"]}
    data = {"summary": _summary(summary), "prompts": prompts}
    page = TEMPLATE.read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # never closes the script element
    return page.replace("/*DATA*/null", payload)


def _run(run_dir: str | Path):
    folder = Path(run_dir)
    if not (folder / "results.json").exists():
        raise ConfigError(f"{folder}: no results.json; pass the --output-dir of a finished gemmalens run")
    results = json.loads((folder / "results.json").read_text())
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    archive = open_activations(folder) if (folder / "activations" / "activations_index.json").exists() else None
    return results, summary, archive


def token_pieces(model: dict[str, Any] | None):
    """A function from token id to its text, from the tokenizer.json of the run's model folder (``model``: what
    summary.json and run.start say of the model) when it is at hand; else ``#id``."""
    folder = (model or {}).get("folder")
    path = Path(folder) / "tokenizer.json" if folder else None
    if path is not None and path.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        return lambda i: (tokenizer.id_to_token(int(i)) or f"#{i}").replace("\u2581", " ")
    return lambda i: f"#{i}"


def _summary(summary: dict[str, Any]) -> dict[str, Any]:
    model = summary.get("model") or {}
    return {"complete": summary.get("complete"), "reason": summary.get("reason"),
            "prompts": f"{summary.get('prompts_done')}/{summary.get('prompts_total')}",
            "model": model.get("name") or model.get("reference"), "dtype": model.get("dtype"),
            "tokens generated": summary.get("tokens_generated"),
            "tokens per second": round(summary.get("tokens_per_second") or 0.0, 1),
            "captured": ", ".join((summary.get("capture") or {}).get("names", [])[:12]) or "nothing",
            "interventions": len(summary.get("interventions") or []), "device": summary.get("device"),
            "versions": summary.get("versions")}


def _prompt(result: dict[str, Any], archive, piece, layers: int | None) -> dict[str, Any]:
    """One prompt's data; ``layers``: the model's layer count (the last layer's logit lens stands in for the
    sampler's alternatives when those were not captured: it is the model's own next-token distribution)."""
    index = int(result["id"])
    out: dict[str, Any] = {"id": index, "text": result["prompt"], "category": result.get("category"),
                           "prompt_tokens": [piece(t) for t in result["prompt_tokens"]],
                           "tokens": [piece(t) for t in result["tokens"]], "finish": result["finish_reason"],
                           "output": result["text"], "probs": None, "alternatives": None, "attention": {},
                           "lens": {}, "features": {}, "ids": result["tokens"],
                           "interventions": result.get("interventions") or []}
    if archive is None or index not in archive.prompts:
        return out
    table = archive.sampling(index)
    if any("token_prob" in row or "top_probs" in row for row in table):
        out["probs"] = [row.get("token_prob", _chosen(row)) for row in table][:len(result["tokens"])]
        out["alternatives"] = [[[piece(t), round(p, 4)] for t, p in zip(row.get("top_tokens", []),
                                                                        row.get("top_probs", []))]
                               for row in table][:len(result["tokens"])]
    for name in archive.names:
        if match := ATTENTION.match(name):
            positions, weights = archive.trajectory(name, index)  # [heads, T, K]
            size = min(weights.shape[1], weights.shape[2])
            square = np.clip(weights[:, :size, :size], 0, 1)
            out["attention"][match.group(1)] = {
                "heads": int(square.shape[0]), "size": int(size),
                "data": [base64.b64encode((h * 255).round().astype(np.uint8).tobytes()).decode() for h in square]}
        elif match := FEATURES.match(name):
            positions, sparse = archive.trajectory(name, index, sparse=True)
            starts = np.concatenate([[0], np.cumsum(sparse.counts)])
            tops = []
            for j in range(len(positions)):
                indices, values = sparse.indices[starts[j]:starts[j + 1]], sparse.values[starts[j]:starts[j + 1]]
                best = np.argsort(-values)[:5]
                tops.append([[int(indices[b]), round(float(values[b]), 3)] for b in best])
            out["features"][match.group(1)] = {"positions": positions.tolist(), "top": tops}
        elif match := LENS.match(name):
            _, tokens = archive.trajectory(name, index)
            _, probs = archive.trajectory(name.replace(".tokens", ".probs"), index)
            out["lens"][match.group(1)] = [[[piece(t), round(float(p), 4)] for t, p in zip(row[:5], chance[:5])]
                                           for row, chance in zip(tokens.tolist(), probs.tolist())]
    last = out["lens"].get(str(layers - 1)) if layers else None
    if last is not None and not any(out["alternatives"] or []):  # the model's own top tokens, from the last layer's
        start = len(result["prompt_tokens"]) - 1  # lens: position p predicts the token at p + 1
        out["alternatives"] = [last[start + k] if start + k < len(last) else [] for k in range(len(result["tokens"]))]
    return out



def _chosen(row: dict[str, Any]) -> float | None:
    """The chosen token's probability from the top alternatives, when only they were captured."""
    for token, prob in zip(row.get("top_tokens", []), row.get("top_probs", [])):
        if token == row.get("token"):
            return prob
    return None
