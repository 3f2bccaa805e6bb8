"""GPU benchmark: gemmalens beside mlx-lm and transformers on Gemma 3 shapes (random bf16 weights), one card.

Measures copy bandwidths (MLX here, torch in bench/gpu_torch.py) and from the best the floor no decode can beat;
transformers with a static cache under torch.compile (its own process, compiled and warmed up at the timed
shapes, compile time apart); then, interleaved in rounds (the card's speed drifts), gemmalens without capture,
mlx-lm's `batch_generate` with prefill and completion batches as large as the batch (its defaults would split
it) or `generate_step` at batch 1, and mlx-lm's model in a plain loop (a ceiling for its drivers). Prompt 64
tokens, 128 new tokens, greedy, batch 1, 16, 64, 256; 4B shapes at batch 16. At the capture batches:
`resid_out` of every layer to an npz archiver in another process (runs of one batch, and at batch 64 runs of
four batches: the sustained speed), and every point except attention to a decoding subscriber against the
bus's own limit for those frames. Checks first that the compiled decode step and the eager one agree, and the
decode attention kernel (engine/kernels.py) against float32 attention on the CPU; prints where a decode step's
time goes (the model alone, eager and compiled, and the whole loop). Prints a table last.

    python bench/gpu.py [--new-tokens 128] [--batches 1,16,64,256] [--rounds 3] [--steady 4] [--no-torch]
                        [--no-four-b] [--capture-batches 16,64] [--archiver 1x8,4x4] [--engine-breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import gemmalens  # noqa: F401  (the engine's set-up before MLX)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemmalens.engine.config import Gemma3Config, layer_pattern
from gemmalens.engine.events import ActivationEvent, ResultEvent, StepEvent
from gemmalens.engine.generation import GenerationConfig, generate
from gemmalens.engine.model import Gemma3
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import publish_run
from gemmalens.prompts import Prompt
from gemmalens.engine.sampling import SamplingParams
from gemmalens.engine.selection import select
from gemmalens.engine.transfer import host_copier

ONE_B = Gemma3Config(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                     query_pre_attn_scalar=256.0, max_position_embeddings=32768, layer_types=layer_pattern(26, 6))
FOUR_B = Gemma3Config(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                      query_pre_attn_scalar=256.0, max_position_embeddings=131072, rope_scaling_factor=8.0,
                      layer_types=layer_pattern(34, 6))
GREEDY = SamplingParams(0.0, 1.0, None, 1.0)


class IdTokenizer:
    """Prompts are lists of ids; nothing stops early, so every row makes exactly the tokens asked for."""

    pad_id, bos_id, stop_ids = 0, 2, frozenset()

    def format(self, prompt, chat=False):
        return prompt

    def encode(self, prompt, chat=False):
        return list(prompt)

    def decode(self, ids):
        return ""

    def pad_batch(self, rows):
        from gemmalens.engine.tokenizer import Tokenizer

        return Tokenizer.pad_batch(self, rows)


def random_weights(config):
    shapes = dict(tree_flatten(Gemma3(config).parameters()))
    weights = {}
    for i, (name, value) in enumerate(sorted(shapes.items())):
        key = mx.random.key(i)
        scale = 0.0 if name.endswith("norm.weight") else 0.02
        weights[name] = (mx.random.normal(value.shape, key=key) * scale).astype(mx.bfloat16)
    mx.eval(weights)
    return weights


def gemmalens_model(config, weights):
    model = Gemma3(config)
    model.load_weights(list(weights.items()))
    return model


def prompts_for(batch, length=64, seed=0):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(3, 262000, size=length - 1).tolist() for _ in range(batch)]


def prompt_set(batch, length=64):
    """``batch`` prompts of random ids (``IdTokenizer`` feeds them as they are)."""
    return [Prompt(i, ids) for i, ids in enumerate(prompts_for(batch, length))]


RUN_INFO = {"spec": {}, "prompts": [], "capture": {}, "engines": 1, "segment": {"resume": False, "skipped": []}}


def run_plain(model, batch, new_tokens, compiled=True, batches=1):
    config = GenerationConfig(max_tokens=new_tokens, sampling=GREEDY, batch_size=batch, compiled=compiled)
    started = time.perf_counter()
    results = [e.result for e in generate(model, IdTokenizer(), prompt_set(batch * batches), config)
               if isinstance(e, ResultEvent)]
    seconds = time.perf_counter() - started
    return sum(len(r.tokens) for r in results) / seconds, results


def archiver(writers=None, processes=None):
    """The npz archiver as a sink script (``writers`` threads in each of ``processes``; default: the archiver's own
    defaults)."""
    return ("import sys\nfrom gemmalens.sinks.npz import NpzArchiver\n"
            "sink = NpzArchiver(sys.argv[1], sys.argv[2], compress=sys.argv[3] == 'deflate', name='npz', "
            f"writers={writers}, processes={processes})\nsys.exit(0 if sink.run() else 1)")


ARCHIVER = archiver()
COUNTER = ("import sys\nfrom gemmalens.sinks.base import Subscriber\n"
           "class Counter(Subscriber):\n    topics = ('act.',)\n    def on_activation(self, frame):\n        pass\n"
           "sink = Counter(sys.argv[1], name='count')\nsink.run(timeout=600)\nsys.exit(0 if sink.complete else 1)")
ALL_BUT_ATTENTION = (["*"], ["*.attn_scores", "*.attn_weights"])


class TimedPublisher(Publisher):
    """Notes when the run starts: after its sinks have subscribed (their start-up is not the bus's speed)."""

    def start(self, run_info):
        super().start(run_info)
        self.started = time.perf_counter()


@contextlib.contextmanager
def sink_process(sink, workers, storage="stored"):
    """A publisher (lz4, ``workers`` threads) on a fresh ipc address, and ``sink`` (a script taking the address,
    a folder and ``storage``) subscribed to it in its own process. Leaving waits for the sink, which must have
    received everything; ``publisher.ended`` is then the time, ``publisher.spawned`` when the sink was started."""
    folder = tempfile.mkdtemp(prefix="gl-bench-")
    address = f"ipc://{folder}/bus"
    publisher = TimedPublisher(reliable=address, expect=1, codec="lz4", workers=workers, queue_size=256)
    publisher.spawned = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", sink, address, folder, storage], cwd=folder)
    try:
        yield publisher
        assert process.wait() == 0, "the sink missed frames"
        publisher.ended = time.perf_counter()
    finally:
        process.kill()
        shutil.rmtree(folder, ignore_errors=True)


def run_captured(model, batch, new_tokens, patterns, exclude=(), sink=None, workers=2, storage="stored", batches=1):
    """The engine publishing to a sink in its own process (default: an npz archiver, as `gemmalens run` does,
    its files ``stored`` or compressed by ``deflate``). Timed from ``run.start`` (the sink has subscribed) until
    the sink has written everything and exited; returns tokens/s, raw bytes/s on the bus and the seconds the
    sink took to start. ``batches``: batches of ``batch`` prompts in the run (the end's fixed cost spread over more).

    ``workers``: compression threads for frames of 1 MiB or more (resid_out's smaller frames are compressed by
    the sender thread itself); eight suit every point's hundreds of megabytes per step."""
    config = GenerationConfig(max_tokens=new_tokens, sampling=GREEDY, batch_size=batch)
    selection = select(model.config, list(patterns), list(exclude), positions="generated")
    with sink_process(sink or ARCHIVER, workers, storage) as publisher:
        publisher.wait_for_sinks()
        publisher.start(RUN_INFO)
        results, totals = publish_run(model, IdTokenizer(), prompt_set(batch * batches), config, selection,
                                      publisher)
    seconds = publisher.ended - publisher.started
    return (sum(len(r.tokens) for r in results) / seconds, totals["bytes_raw"] / seconds,
            publisher.started - publisher.spawned)


def bus_limit(model, batch, patterns, exclude, sink=None, workers=8, repeats=8, storage="stored"):
    """MB/s of raw activations the bus carries (publisher, lz4, ``workers`` threads, ipc, a sink in another process;
    default: one that decodes every frame; an archiver writes its files as ``storage`` says) when the frames are on
    the host already: one decode step's frames and tokens of ``batch``, sent ``repeats`` times."""
    config = GenerationConfig(max_tokens=2, sampling=GREEDY, batch_size=batch)
    selection = select(model.config, list(patterns), list(exclude), positions="generated")
    events = [e for e in generate(model, IdTokenizer(), prompt_set(batch), config, selection)
              if isinstance(e, (ActivationEvent, StepEvent)) and e.step == 1]
    raw = sum(e.host()[0].nbytes for e in events if isinstance(e, ActivationEvent))  # fetched once, then reused
    with sink_process(sink or COUNTER, workers, storage) as publisher:
        publisher.wait_for_sinks()
        publisher.start(RUN_INFO)
        for i in range(repeats):
            for event in events:
                publisher.publish(dataclasses.replace(event, step=i))
        publisher.finish(True)
    return repeats * raw / (publisher.ended - publisher.started)


def spread(values, spec=".0f"):
    """The median of ``values`` and, in brackets, all of them in the order they were measured."""
    return f"{statistics.median(values):{spec}} ({' '.join(f'{v:{spec}}' for v in values)})"


def mlx_lm_model(config, weights):
    """mlx-lm's Gemma 3 with the same weights."""
    from mlx_lm.models.gemma3_text import Model, ModelArgs

    scaling = {"factor": config.rope_scaling_factor, "rope_type": "linear"} if config.rope_scaling_factor != 1 else None
    args = ModelArgs(model_type="gemma3_text", hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                     intermediate_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
                     head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, vocab_size=config.vocab_size,
                     num_key_value_heads=config.num_key_value_heads, sliding_window=config.sliding_window,
                     sliding_window_pattern=6, max_position_embeddings=config.max_position_embeddings,
                     rope_scaling=scaling)
    model = Model(args)
    model.load_weights([(k, v) for k, v in weights.items()], strict=False)
    model.sanitize({})
    return model


def run_mlx_lm(model, batch, new_tokens):
    """mlx-lm driven at its best for this batch: ``generate_step`` at batch 1; ``batch_generate`` with its
    prefill and completion batches as large as the batch (its defaults, 8 and 32, would split a batch of 64)."""
    from types import SimpleNamespace

    from mlx_lm.generate import batch_generate, generate_step

    rows = prompts_for(batch)
    started = time.perf_counter()
    if batch == 1:
        steps = generate_step(mx.array(rows[0]), model, max_tokens=new_tokens)
        count = sum(1 for _ in zip(range(new_tokens), steps))
    else:
        tokenizer = SimpleNamespace(eos_token_ids=set(), decode=lambda ids: "")
        response = batch_generate(model, tokenizer, rows, max_tokens=new_tokens, return_token_ids=True,
                                  completion_batch_size=batch, prefill_batch_size=batch)
        count = sum(len(ids) for ids in response.token_ids)
    assert count == batch * new_tokens, (count, batch * new_tokens)
    return count / (time.perf_counter() - started)


def mlx_lm_survives(batch):
    """Whether mlx-lm's ``batch_generate`` gets through a few tokens at ``batch`` (tried in a child process: a
    crash of mlx-lm or MLX under it must not end the benchmark)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu\n"
            "gpu.run_mlx_lm(gpu.mlx_lm_model(gpu.ONE_B, gpu.random_weights(gpu.ONE_B)), int(sys.argv[2]), 4)")
    from pathlib import Path

    done = subprocess.run([sys.executable, "-P", "-c", code, str(Path(__file__).parent), str(batch)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"mlx-lm at batch {batch}: exit {done.returncode}; not run at this batch", flush=True)
    return done.returncode == 0


def run_mlx_lm_loop(model, batch, new_tokens):
    """mlx-lm's model in the plainest loop: its own caches, the whole batch at once (equal prompt lengths, no
    padding), greedy, the next step queued before the current token is read. A ceiling for mlx-lm's drivers."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    started = time.perf_counter()
    tokens = mx.argmax(model(mx.array(prompts_for(batch)), cache=cache)[:, -1], axis=-1)
    mx.async_eval(tokens)
    count = 0
    for _ in range(new_tokens - 1):
        following = mx.argmax(model(tokens[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(following)
        tokens.tolist()
        count += batch
        tokens = following
    tokens.tolist()
    count += batch
    return count / (time.perf_counter() - started)


def run_transformers(shapes, batches, new_tokens, repeats=2):
    """transformers' static cache under torch.compile (bench/gpu_torch.py) in a process of its own: its JSON."""
    import json
    from pathlib import Path

    script = Path(__file__).with_name("gpu_torch.py")
    done = subprocess.run([sys.executable, str(script), "--shapes", shapes, "--batches", ",".join(map(str, batches)),
                           "--new-tokens", str(new_tokens), "--repeats", str(repeats)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"transformers run failed:\n{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_breakdown(model, batch=1, steps=30):
    """Milliseconds per decode step: the model alone (eager, compiled), and the whole generation loop."""
    from gemmalens.engine.generation import DecodeStep

    out = {}
    ids = mx.array(prompts_for(batch), dtype=mx.int32)
    pad = mx.zeros((batch,), dtype=mx.int32)
    for compiled in (False, True):
        cache = model.make_cache(batch, 64 + steps + 8)
        mx.eval(model(ids, pad, cache, last_only=True))
        step = DecodeStep(model, cache, frozenset(), compiled)
        token = ids[:, -1:]
        for i in range(steps + 3):
            if i == 3:
                started = time.perf_counter()
            logits, _ = step(token, pad)
            token = mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
            mx.eval(token)
        out["compiled" if compiled else "eager"] = (time.perf_counter() - started) / steps * 1e3
    rate, _ = run_plain(model, batch, steps)
    out["generate loop"] = 1e3 * batch / rate
    return out


HEADERS = ("import json, sys\nfrom gemmalens.sinks.base import Subscriber\n"
           "class Headers(Subscriber):\n    topics = ('act.',)\n    def handle(self, parts):\n"
           "        if parts[0].startswith(b'act.'):  # counted, not decoded\n"
           "            header = json.loads(parts[1]); key = (header['engine'], parts[0].decode())\n"
           "            self.received[key] = self.received.get(key, 0) + 1; self.expected_seq[key] = header['seq'] + 1\n"
           "        else:\n            super().handle(parts)\n"
           "sink = Headers(sys.argv[1], name='headers')\nsink.run(timeout=600)\nsys.exit(0 if sink.complete else 1)")


def engine_breakdown(model, batch=64, new_tokens=128, patterns=("model.layers.*.resid_out",)):
    """Where a captured run loses speed in the engine's process: tokens/s of plain generation (median of three),
    capturing without copying to the host, capturing with each step's values copied in another thread (as the
    publisher does) but not sent, and publishing to a subscriber that reads only headers."""
    config = GenerationConfig(max_tokens=new_tokens, sampling=GREEDY, batch_size=batch)
    selection = select(model.config, list(patterns), [], positions="generated")

    def captured(copy):
        copies: queue.Queue = queue.Queue(maxsize=256)
        copier = threading.Thread(target=lambda: [event.host() for event in iter(copies.get, None)])
        copier.start()
        started, tokens = time.perf_counter(), 0
        for event in generate(model, IdTokenizer(), prompt_set(batch), config, selection):
            if isinstance(event, ActivationEvent) and copy:
                copies.put(event)
            elif isinstance(event, StepEvent):
                tokens += len(event.tokens)
        copies.put(None)
        copier.join()
        return tokens / (time.perf_counter() - started)

    out = {"plain": statistics.median(run_plain(model, batch, new_tokens)[0] for _ in range(3))}
    out["capture, no copies"] = captured(copy=False)
    out["capture + copies"] = captured(copy=True)
    out["published, headers read"] = run_captured(model, batch, new_tokens, patterns, sink=HEADERS)[0]
    return out


def bandwidths():
    """GB/s: device to device; device to host by ``np.array`` and by the engine's copier (64 MiB, best of 3)."""
    a = mx.random.normal((1 << 28,)).astype(mx.bfloat16)  # 512 MiB
    mx.eval(a)
    b = mx.array(a) + 0
    mx.eval(b)
    started = time.perf_counter()
    for _ in range(10):
        b = a + 0
        mx.eval(b)
    device = 10 * 2 * a.nbytes / (time.perf_counter() - started) / 1e9
    out = {"device": device}
    for label, copy in (("np.array", np.array), ("copier", host_copier())):
        best = float("inf")
        for i in range(3):
            fresh = (a[: 1 << 25] + i).view(mx.uint16)
            mx.eval(fresh)
            started = time.perf_counter()
            host = copy(fresh)
            best = min(best, time.perf_counter() - started)
            assert np.array_equal(host, np.array(fresh)), f"{label} copied wrong values"
        out[label] = (1 << 26) / best / 1e9
    return out


def check_compiled_equals_eager(model):
    eager = run_plain(model, 4, 32, compiled=False)[1]
    fast = run_plain(model, 4, 32, compiled=True)[1]
    same = [a.tokens == b.tokens for a, b in zip(eager, fast)]
    from gemmalens.engine.generation import DecodeStep

    ids = mx.array(prompts_for(2), dtype=mx.int32)
    pad = mx.zeros((2,), dtype=mx.int32)
    errors = []
    for compiled in (False, True):
        cache = model.make_cache(2, 80)
        model(ids, pad, cache, last_only=True)
        step = DecodeStep(model, cache, frozenset(), compiled)
        errors.append(step(ids[:, -1:], pad)[0].astype(mx.float32))
    rel = float(mx.linalg.norm(errors[0] - errors[1]) / mx.linalg.norm(errors[0]))
    return all(same), rel


def check_attention_kernel():
    """Max absolute error of the decode attention kernel and of MLX's own attention on the GPU against float32
    attention computed on the CPU, per dtype, over decode shapes (1B and 4B heads, masks with hidden keys)."""
    from gemmalens.engine import kernels

    def reference(q, k, v, scale, mask):
        with mx.stream(mx.cpu):
            B, H, L, D = q.shape
            G = k.shape[1]
            q, k, v, mask = (x.astype(mx.float32) for x in (q, k, v, mask))
            scores = (q.reshape(B, G, H // G, L, D) * scale) @ k[:, :, None].swapaxes(-1, -2)
            weights = mx.softmax(scores.reshape(B, H, L, -1) + mask, axis=-1)
            return (weights.reshape(B, G, H // G, L, -1) @ v[:, :, None]).reshape(B, H, L, D)

    errors = {}
    for dtype in (mx.bfloat16, mx.float32):
        for B, H, G, K in [(1, 4, 1, 256), (64, 4, 1, 256), (3, 8, 4, 1024), (2, 4, 1, kernels.MAX_KEYS)]:
            key = mx.random.split(mx.random.key(B * K + H), 4)
            q = mx.random.normal((B, H, 1, 256), key=key[0]).astype(dtype)
            k, v = (mx.random.normal((B, G, K, 256), key=key[i]).astype(dtype) for i in (1, 2))
            seen = (mx.random.uniform(shape=(B, 1, 1, K), key=key[3]) < 0.6) | (mx.arange(K) == 0)
            mask = mx.where(seen, mx.array(0, dtype), mx.array(-mx.inf, dtype))
            want = reference(q, k, v, 0.0625, mask)
            for label, got in (("kernel", kernels.attention(q, k, v, 0.0625, mask)),
                               ("mlx", mx.fast.scaled_dot_product_attention(q, k, v, scale=0.0625, mask=mask))):
                error = mx.abs(np.array(got.astype(mx.float32)) - np.array(want)).max().item()
                name = (label, str(dtype).rsplit(".", 1)[-1])
                errors[name] = max(errors.get(name, 0.0), error)
    return errors


def floor_rate(config, weight_bytes, batch, bandwidth, prompt=64, new_tokens=128):
    """Tokens/s no decode can beat at ``bandwidth`` (bytes/s): each step reads every weight once and each row's
    keys and values once (their mean length over the run: the prompt and half the new tokens; sliding layers at
    most their window)."""
    length = prompt + new_tokens / 2
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2  # keys and values, bf16
    kv = sum(min(length, config.sliding_window) if config.is_sliding(i) else length
             for i in range(config.num_hidden_layers)) * per_token
    return batch * bandwidth / (weight_bytes + batch * kv)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--capture-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of gemmalens, mlx-lm (batch_generate) and mlx-lm's plain loop, interleaved, per "
                             "batch (medians reported)")
    parser.add_argument("--steady", type=int, default=4, metavar="K",
                        help="at batch 64, runs of K batches: resid_out -> npz against plain, the sustained speed; "
                             "0 skips")
    parser.add_argument("--capture-batches", default="16,64",
                        help="batches at which the capture figures (resid_out -> npz, all but attention) are taken")
    parser.add_argument("--no-four-b", dest="four_b", action="store_false", help="skip the 4B-shape run at batch 16")
    parser.add_argument("--no-torch", dest="torch", action="store_false",
                        help="skip transformers (static cache, torch.compile)")
    parser.add_argument("--engine-breakdown", action="store_true",
                        help="also split a captured run's cost in the engine's process (batch 64, resid_out)")
    parser.add_argument("--archiver", type=lambda text: [tuple(map(int, s.split("x"))) for s in text.split(",")],
                        default=[], metavar="PxW,...",
                        help="also measure the npz archiver's own limit, stored and deflated files, with P processes "
                             "of W writer threads each (e.g. 1x8,4x4)")
    args = parser.parse_args()
    began = time.perf_counter()
    batches = list(map(int, args.batches.split(",")))
    capture_batches = set(map(int, args.capture_batches.split(","))) if args.capture_batches else set()
    print("device:", mx.default_device(), flush=True)
    copies = bandwidths()
    print(f"copy device->device (MLX) {copies['device']:.0f} GB/s; device->host np.array {copies['np.array']:.1f} "
          f"GB/s, engine's copier ({type(host_copier()).__name__}) {copies['copier']:.1f} GB/s", flush=True)
    torch_runs = {}
    if args.torch:  # first: its compiles take minutes, and its copy speed sets the floor with MLX's
        torch_runs["1b"] = run_transformers("1b", batches, args.new_tokens)
        print(f"[{time.perf_counter() - began:.0f} s] transformers 1B: {torch_runs['1b']}", flush=True)
    best_copy = max([copies["device"]] + [r["copy_GBps"] for r in torch_runs.values() if r]) * 1e9
    weights = random_weights(ONE_B)
    model = gemmalens_model(ONE_B, weights)
    theirs_model = mlx_lm_model(ONE_B, weights)
    same, rel = check_compiled_equals_eager(model)
    print(f"compiled vs eager: greedy tokens identical {same}; logits relative difference {rel:.2e}", flush=True)
    errors = check_attention_kernel()
    print("decode attention, max |error| against float32 on the CPU: " + ", ".join(
        f"{label} {dtype} {error:.1e}" for (label, dtype), error in errors.items()), flush=True)
    for batch in (1, 64):  # where a decode step's time goes: the model alone, eager and compiled, and the loop
        decode_breakdown(model, batch)  # warm-up
        parts = decode_breakdown(model, batch)
        print(f"batch {batch} ms per decode step: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    weight_bytes = sum(v.nbytes for v in weights.values())
    rows = []
    for batch in batches:
        row = {"batch": batch}
        peer = mlx_lm_survives(batch)
        run_plain(model, batch, args.new_tokens)  # warm-up: compiles for exactly these shapes
        if peer:
            run_mlx_lm(theirs_model, batch, args.new_tokens)
            run_mlx_lm_loop(theirs_model, batch, args.new_tokens)
        mx.reset_peak_memory()
        run_plain(model, batch, args.new_tokens)
        row["peak"] = mx.get_peak_memory() / 1e9
        plain, theirs, loop = [], [], []
        for _ in range(args.rounds):  # interleaved: the card's and the host's speed drift between runs
            plain.append(run_plain(model, batch, args.new_tokens)[0])
            theirs.append(run_mlx_lm(theirs_model, batch, args.new_tokens) if peer else float("nan"))
            loop.append(run_mlx_lm_loop(theirs_model, batch, args.new_tokens) if peer else float("nan"))
        row["plain"], row["mlx-lm"], row["loop"] = map(statistics.median, (plain, theirs, loop))
        row["ratio"] = statistics.median(p / t for p, t in zip(plain, theirs)) if peer else float("nan")
        torch_row = (torch_runs.get("1b") or {}).get("batches", {}).get(str(batch))
        row["torch"] = torch_row["tok_s"] if torch_row else float("nan")
        row["floor"] = floor_rate(ONE_B, weight_bytes, batch, best_copy, new_tokens=args.new_tokens)
        print(f"[{time.perf_counter() - began:.0f} s] batch {batch}: gemmalens {spread(plain)} tok/s, mlx-lm "
              f"batch_generate {spread(theirs)}, mlx-lm loop {spread(loop)}, transformers {row['torch']:.0f}, "
              f"floor {row['floor']:.0f}", flush=True)
        if batch in capture_batches:
            run_captured(model, batch, 4, ["model.layers.*.resid_out"])  # warm-up of the capturing steps: each
            run_captured(model, batch, 2, *ALL_BUT_ATTENTION, sink=COUNTER, workers=8)  # selection compiles its own
            resid = [run_captured(model, batch, args.new_tokens, ["model.layers.*.resid_out"])
                     for _ in range(args.rounds)]
            row["resid"] = statistics.median(r[0] for r in resid)
            row["resid vs own"] = row["resid"] / row["plain"]
            row["all"], row["all bus"], _ = run_captured(model, batch, args.capture_tokens, *ALL_BUT_ATTENTION,
                                                         sink=COUNTER, workers=8)
            row["limit"] = bus_limit(model, batch, *ALL_BUT_ATTENTION)
            print(f"[{time.perf_counter() - began:.0f} s] batch {batch}: resid -> npz {spread([r[0] for r in resid])} "
                  f"({spread([r[1] / 1e6 for r in resid])} MB/s); all-but-attention {row['all']:.0f} "
                  f"({row['all bus'] / 1e6:.0f} MB/s; bus limit {row['limit'] / 1e6:.0f} MB/s)", flush=True)
        if batch == 64 and args.steady:
            steady = {"plain": [], "stored": []}
            for _ in range(args.rounds):
                steady["plain"].append(run_plain(model, batch, args.new_tokens, batches=args.steady)[0])
                steady["stored"].append(run_captured(model, batch, args.new_tokens, ["model.layers.*.resid_out"],
                                                     batches=args.steady)[0])
            row["steady"] = statistics.median(c / p for c, p in zip(steady["stored"], steady["plain"]))
            print(f"[{time.perf_counter() - began:.0f} s] batch {batch}, {args.steady} batches per run: gemmalens "
                  f"{spread(steady['plain'])} tok/s, resid -> npz {spread(steady['stored'])} "
                  f"({row['steady']:.0%} of own)", flush=True)
        rows.append(row)
    four_b = None
    if args.four_b:
        del model, weights, theirs_model
        mx.clear_cache()
        weights = random_weights(FOUR_B)
        model, theirs_model = gemmalens_model(FOUR_B, weights), mlx_lm_model(FOUR_B, weights)
        for warm in range(2):
            plain = run_plain(model, 16, args.new_tokens)[0]
            theirs = run_mlx_lm(theirs_model, 16, args.new_tokens)
        torch_four = run_transformers("4b", [16], args.new_tokens) if args.torch else None
        four_b = (plain, theirs, torch_four["batches"]["16"]["tok_s"] if torch_four else float("nan"))
    torch_copy = ", ".join(f"{r['copy_GBps']:.0f}" for r in torch_runs.values() if r) or "not run"
    print(f"\nweights {weight_bytes / 1e9:.2f} GB; best device-to-device copy {best_copy / 1e9:.0f} GB/s (MLX "
          f"{copies['device']:.0f}, torch {torch_copy})")
    print(f"{'batch':>5} {'gemmalens':>10} {'mlx-lm':>8} {'mlx loop':>9} {'transf.':>8} {'vs mlx-lm':>9} "
          f"{'vs transf.':>10} {'floor':>7} {'of floor':>9} {'resid->npz':>11} {'steady':>7} {'all-b-attn':>11} "
          f"{'of bus':>7} {'peak GB':>8}")
    for r in rows:
        steady = f"{r['steady']:.0%}" if "steady" in r else "-"
        capture = (f"{r['resid vs own']:>11.0%} {steady:>7} {r['all']:>11.0f} {r['all bus'] / r['limit']:>7.0%}"
                   if "resid" in r else f"{'-':>11} {'-':>7} {'-':>11} {'-':>7}")
        print(f"{r['batch']:>5} {r['plain']:>10.0f} {r['mlx-lm']:>8.0f} {r['loop']:>9.0f} {r['torch']:>8.0f} "
              f"{r['ratio']:>9.2f} {r['plain'] / r['torch']:>10.2f} {r['floor']:>7.0f} {r['plain'] / r['floor']:>9.1%} "
              f"{capture} {r['peak']:>8.1f}")
    if four_b:
        print(f"4B shapes, batch 16: gemmalens {four_b[0]:.0f} tok/s, mlx-lm {four_b[1]:.0f} (x{four_b[0] / four_b[1]:.2f}), "
              f"transformers {four_b[2]:.0f} (x{four_b[0] / four_b[2]:.2f})")
    if args.engine_breakdown:
        parts = engine_breakdown(gemmalens_model(ONE_B, random_weights(ONE_B)))
        print("engine's process, resid_out at batch 64: " + ", ".join(
            f"{k} {v:.0f} tok/s ({v / parts['plain']:.0%})" for k, v in parts.items()), flush=True)
    for processes, writers in args.archiver:  # what the archiver itself takes: frames already on the host
        for storage in ("stored", "deflate"):
            limit = bus_limit(gemmalens_model(ONE_B, random_weights(ONE_B)), 64, ["model.layers.*.resid_out"], [],
                              sink=archiver(writers, processes), workers=1, repeats=400, storage=storage)
            print(f"npz archiver, {processes} process(es) of {writers} writers, resid_out frames of batch 64, files "
                  f"{storage}: {limit / 1e6:.0f} MB/s", flush=True)
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
