"""The strongest peer on the GPU: transformers' Gemma 3 with a static KV cache, decoding under torch.compile.

Run by bench/gpu.py in a process of its own (torch and MLX each want the card's memory): random bf16 weights
at the shapes given, prompts of random ids, greedy, every row made to run the full length. For each batch the
first `generate` call compiles (its time less a timed call's is reported as compile time), then `--repeats`
calls are timed and their median kept. Also measures torch's device-to-device copy. Prints one JSON object.

    python bench/gpu_torch.py --shapes 1b --batches 1,16,64 --prompt 64 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import CompileConfig, Gemma3ForCausalLM, Gemma3TextConfig

SHAPES = {
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
               max_position_embeddings=32768),
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
               max_position_embeddings=131072, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, sliding_window=8, max_position_embeddings=4096),
}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 1 GiB, bytes read plus written, best of 10 after warm-up."""
    a = torch.empty(1 << 29 if device.type == "cuda" else 1 << 24, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    best = float("inf")
    for _ in range(10):
        sync(device)
        started = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * a.nbytes / best / 1e9


def build(shapes: str, device) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(**SHAPES[shapes], query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForCausalLM(config).to(torch.bfloat16).eval()
    for parameter in model.parameters():  # random weights of a trained scale (the default init is tiny)
        parameter.data.normal_(0, 0.02)
    return model


def timed_generate(model, batch: int, prompt: int, new_tokens: int, device) -> float:
    ids = torch.randint(3, model.config.vocab_size - 100, (batch, prompt), device=device)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, cache_implementation="static",
                             compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"), pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - started
    assert out.shape == (batch, prompt + new_tokens), out.shape
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(args.shapes, device)
    out = {"torch": torch.__version__, "copy_GBps": copy_bandwidth(device), "batches": {}}
    for batch in map(int, args.batches.split(",")):
        first = timed_generate(model, batch, args.prompt, args.new_tokens, device)  # compiles for these shapes
        times = [timed_generate(model, batch, args.prompt, args.new_tokens, device) for _ in range(args.repeats)]
        steady = statistics.median(times)
        out["batches"][batch] = {"tok_s": batch * args.new_tokens / steady, "all": [batch * args.new_tokens / t
                                                                                    for t in times],
                                 "compile_s": first - steady}
        print(json.dumps({"progress": batch, **out["batches"][batch]}), flush=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
