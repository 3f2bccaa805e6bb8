"""GPU benchmark: gemmalens against mlx-lm on Gemma 3 1B shapes (random bf16 weights), one process, one card.

Measures copy bandwidths; gemmalens without capture; gemmalens publishing resid_out of every layer to an
npz archiver (files stored, then compressed as `gemmalens run` writes them by default); gemmalens publishing
every point except attention (scores and weights) to a subscriber that decodes every frame; the bus's own
limit for those frames (the same frames, already on the host, sent again); mlx-lm's Gemma 3 on the same
weights and inputs. Prompt 64 tokens, 128 new tokens, greedy, batch 1, 16, 64; then 4B shapes at batch 16
without capture, against mlx-lm. gemmalens, resid_out -> npz and mlx-lm run in interleaved rounds (the card's
speed drifts between runs) and their medians are reported, ratios as the median of each round's; at batch 64,
rounds of runs of four batches each (256 prompts: a harvest's sustained speed, the fixed cost of a run's end,
about 0.05-0.1 s for the sink's last files and exit, spread over four times the tokens) follow. Checks first
that the compiled decode step and the eager one agree, and the decode attention kernel (engine/kernels.py)
against float32 attention on the CPU beside MLX's own. Prints a table last.

    python bench/gpu.py [--new-tokens 128] [--capture-tokens 16] [--batches 1,16,64] [--rounds 3] [--steady 4]
                        [--no-four-b] [--archiver 1x8,4x4] [--engine-breakdown]
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
from gemmalens.engine.generation import ActivationEvent, GenerationConfig, ResultEvent, StepEvent, generate
from gemmalens.engine.model import Gemma3
from gemmalens.engine.prompts import Prompt
from gemmalens.engine.publisher import Publisher
from gemmalens.engine.run import publish_run
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


def run_plain(model, batch, new_tokens, compiled=True, batches=1):
    config = GenerationConfig(max_tokens=new_tokens, sampling=GREEDY, batch_size=batch, compiled=compiled)
    started = time.perf_counter()
    results = [e.result for e in generate(model, IdTokenizer(), prompts_for(batch * batches), config)
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

    def start(self, run_info, should_stop=lambda: False):
        super().start(run_info, should_stop)
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
    prompts = [Prompt(i, p) for i, p in enumerate(prompts_for(batch * batches))]
    selection = select(model.config, list(patterns), list(exclude), positions="generated")
    with sink_process(sink or ARCHIVER, workers, storage) as publisher:
        results, totals = publish_run(model, IdTokenizer(), prompts, config, selection, publisher, {"engines": 1})
    seconds = publisher.ended - publisher.started
    return (sum(len(r.tokens) for r in results) / seconds, totals["bytes_raw"] / seconds,
            publisher.started - publisher.spawned)


def bus_limit(model, batch, patterns, exclude, sink=None, workers=8, repeats=8, storage="stored"):
    """MB/s of raw activations the bus carries (publisher, lz4, ``workers`` threads, ipc, a sink in another process;
    default: one that decodes every frame; an archiver writes its files as ``storage`` says) when the frames are on
    the host already: one decode step's frames and tokens of ``batch``, sent ``repeats`` times."""
    config = GenerationConfig(max_tokens=2, sampling=GREEDY, batch_size=batch)
    selection = select(model.config, list(patterns), list(exclude), positions="generated")
    events = [e for e in generate(model, IdTokenizer(), prompts_for(batch), config, selection)
              if isinstance(e, (ActivationEvent, StepEvent)) and e.step == 1]
    raw = sum(e.host()[0].nbytes for e in events if isinstance(e, ActivationEvent))  # fetched once, then reused
    with sink_process(sink or COUNTER, workers, storage) as publisher:
        publisher.start({"capture": selection.to_dict()})
        for i in range(repeats):
            for event in events:
                publisher.publish(dataclasses.replace(event, step=i))
        publisher.finish(True)
    return repeats * raw / (publisher.ended - publisher.started)


def spread(values, spec=".0f"):
    """The median of ``values`` and, in brackets, all of them in the order they were measured."""
    return f"{statistics.median(values):{spec}} ({' '.join(f'{v:{spec}}' for v in values)})"


def run_mlx_lm(config, weights, batch, new_tokens, warm_up=True):
    from mlx_lm.generate import batch_generate, generate_step
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
    rows = prompts_for(batch)
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(eos_token_ids=set(), decode=lambda ids: "")
    rate = 0.0
    for _ in range(2 if warm_up else 1):  # a first run warms up (kernels for these shapes); the last is timed
        started = time.perf_counter()
        if batch == 1:
            steps = generate_step(mx.array(rows[0]), model, max_tokens=new_tokens)
            count = sum(1 for _ in zip(range(new_tokens), steps))
        else:
            response = batch_generate(model, tokenizer, rows, max_tokens=new_tokens, return_token_ids=True)
            count = sum(len(ids) for ids in response.token_ids)
        rate = count / (time.perf_counter() - started)
    return rate


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
        for event in generate(model, IdTokenizer(), prompts_for(batch), config, selection):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--capture-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of gemmalens, resid_out -> npz and mlx-lm, interleaved, per batch "
                             "(medians reported)")
    parser.add_argument("--steady", type=int, default=4, metavar="K",
                        help="at batch 64, also rounds of K batches per run (plain, resid_out -> npz stored and "
                             "deflated): the capture's sustained speed, its end's fixed cost spread; 0 skips")
    parser.add_argument("--no-four-b", dest="four_b", action="store_false", help="skip the 4B-shape run at batch 16")
    parser.add_argument("--engine-breakdown", action="store_true",
                        help="also split a captured run's cost in the engine's process (batch 64, resid_out)")
    parser.add_argument("--archiver", type=lambda text: [tuple(map(int, s.split("x"))) for s in text.split(",")],
                        default=[], metavar="PxW,...",
                        help="also measure the npz archiver's own limit, stored and deflated files, with P processes "
                             "of W writer threads each (e.g. 1x8,4x4)")
    args = parser.parse_args()
    print("device:", mx.default_device(), flush=True)
    copies = bandwidths()
    device_bw = copies["device"]
    print(f"copy device->device {device_bw:.0f} GB/s; device->host np.array {copies['np.array']:.1f} GB/s, "
          f"engine's copier ({type(host_copier()).__name__}) {copies['copier']:.1f} GB/s", flush=True)
    weights = random_weights(ONE_B)
    model = gemmalens_model(ONE_B, weights)
    same, rel = check_compiled_equals_eager(model)
    print(f"compiled vs eager: greedy tokens identical {same}; logits relative difference {rel:.2e}", flush=True)
    errors = check_attention_kernel()
    print("decode attention, max |error| against float32 on the CPU: " + ", ".join(
        f"{label} {dtype} {error:.1e}" for (label, dtype), error in errors.items()), flush=True)
    bytes_per_token = sum(v.nbytes for v in weights.values())
    for batch in (1, 64):
        decode_breakdown(model, batch)  # warm-up
        parts = decode_breakdown(model, batch)
        print(f"batch {batch} ms per decode step: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    rows = []
    for batch in map(int, args.batches.split(",")):
        row = {"batch": batch}
        run_plain(model, batch, args.new_tokens)  # warm-up: compiles for exactly these shapes
        run_captured(model, batch, 4, ["model.layers.*.resid_out"])  # warm-up of the capturing steps: each
        run_captured(model, batch, 2, *ALL_BUT_ATTENTION, sink=COUNTER, workers=8)  # selection compiles its own
        mx.reset_peak_memory()
        run_plain(model, batch, args.new_tokens)
        row["peak"] = mx.get_peak_memory() / 1e9
        plain, theirs, resid = [], [], []
        for r in range(args.rounds):  # interleaved: the card's and the host's speed drift between runs
            plain.append(run_plain(model, batch, args.new_tokens)[0])
            resid.append(run_captured(model, batch, args.new_tokens, ["model.layers.*.resid_out"]))
            theirs.append(run_mlx_lm(ONE_B, weights, batch, args.new_tokens, warm_up=r == 0))
        row["plain"], row["mlx-lm"] = statistics.median(plain), statistics.median(theirs)
        row["ratio"] = statistics.median(p / t for p, t in zip(plain, theirs))
        row["resid"], row["resid bus"] = (statistics.median(run[i] for run in resid) for i in (0, 1))
        row["resid vs own"] = statistics.median(run[0] / p for run, p in zip(resid, plain))
        row["deflate"], _, _ = run_captured(model, batch, args.new_tokens, ["model.layers.*.resid_out"],
                                            storage="deflate")
        row["all"], row["all bus"], _ = run_captured(model, batch, args.capture_tokens, *ALL_BUT_ATTENTION,
                                                     sink=COUNTER, workers=8)
        row["limit"] = bus_limit(model, batch, *ALL_BUT_ATTENTION)
        print(f"batch {batch}: gemmalens {spread(plain)} tok/s, mlx-lm {spread(theirs)}, resid -> npz "
              f"{spread([run[0] for run in resid])} ({spread([run[1] / 1e6 for run in resid])} MB/s; the archiver took "
              f"{spread([run[2] for run in resid], '.1f')} s to start, not counted); compressed files "
              f"{row['deflate']:.0f}; all-but-attention {row['all']:.0f} ({row['all bus'] / 1e6:.0f} MB/s; bus limit "
              f"{row['limit'] / 1e6:.0f} MB/s)", flush=True)
        if batch == 64 and args.steady:
            steady = {"plain": [], "stored": [], "deflate": []}
            for _ in range(args.rounds):
                steady["plain"].append(run_plain(model, batch, args.new_tokens, batches=args.steady)[0])
                for storage in ("stored", "deflate"):
                    steady[storage].append(run_captured(model, batch, args.new_tokens, ["model.layers.*.resid_out"],
                                                        storage=storage, batches=args.steady)[0])
            row["steady"] = {k: statistics.median(v) for k, v in steady.items()}
            row["steady vs own"] = {k: statistics.median(c / p for c, p in zip(steady[k], steady["plain"]))
                                    for k in ("stored", "deflate")}
            print(f"batch {batch}, {args.steady} batches per run: gemmalens {spread(steady['plain'])} tok/s, resid -> "
                  f"npz {spread(steady['stored'])} ({row['steady vs own']['stored']:.0%} of own), compressed files "
                  f"{spread(steady['deflate'])} ({row['steady vs own']['deflate']:.0%})", flush=True)
        rows.append(row)
    floor = device_bw * 1e9 / bytes_per_token
    print(f"\nweights {bytes_per_token / 1e9:.2f} GB: batch-1 bandwidth floor {floor:.0f} tok/s")
    print(f"{'batch':>5} {'gemmalens':>10} {'mlx-lm':>8} {'ratio':>6} {'floor%':>7} {'resid->npz':>11} {'vs own':>7} "
          f"{'bus MB/s':>9} {'deflated':>9} {'vs own':>7} {'all-but-attn':>13} {'bus MB/s':>9} {'limit MB/s':>11} "
          f"{'of limit':>9} {'peak GB':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['plain']:>10.0f} {r['mlx-lm']:>8.0f} {r['ratio']:>6.2f} "
              f"{(r['plain'] / floor if r['batch'] == 1 else float('nan')):>7.1%} {r['resid']:>11.0f} "
              f"{r['resid vs own']:>7.0%} {r['resid bus'] / 1e6:>9.0f} {r['deflate']:>9.0f} "
              f"{r['deflate'] / r['plain']:>7.0%} {r['all']:>13.0f} {r['all bus'] / 1e6:>9.0f} "
              f"{r['limit'] / 1e6:>11.0f} {r['all bus'] / r['limit']:>9.0%} {r['peak']:>8.1f}")
    for r in rows:
        if "steady" in r:
            print(f"batch {r['batch']}, {args.steady} batches per run ({args.steady * r['batch']} prompts): gemmalens "
                  f"{r['steady']['plain']:.0f} tok/s, resid->npz {r['steady']['stored']:.0f} "
                  f"({r['steady vs own']['stored']:.0%} of own), deflated {r['steady']['deflate']:.0f} "
                  f"({r['steady vs own']['deflate']:.0%})")
    if args.engine_breakdown:
        parts = engine_breakdown(model)
        print("engine's process, resid_out at batch 64: " + ", ".join(
            f"{k} {v:.0f} tok/s ({v / parts['plain']:.0%})" for k, v in parts.items()), flush=True)
    for processes, writers in args.archiver:  # what the archiver itself takes: frames already on the host
        for storage in ("stored", "deflate"):
            limit = bus_limit(model, 64, ["model.layers.*.resid_out"], [], sink=archiver(writers, processes),
                              workers=1, repeats=400, storage=storage)
            print(f"npz archiver, {processes} process(es) of {writers} writers, resid_out frames of batch 64, files "
                  f"{storage}: {limit / 1e6:.0f} MB/s", flush=True)
    if args.four_b:
        del model, weights
        mx.clear_cache()
        weights = random_weights(FOUR_B)
        model = gemmalens_model(FOUR_B, weights)
        run_plain(model, 16, args.new_tokens)
        plain, _ = run_plain(model, 16, args.new_tokens)
        theirs = run_mlx_lm(FOUR_B, weights, 16, args.new_tokens)
        print(f"\n4B shapes, batch 16: gemmalens {plain:.0f} tok/s, mlx-lm {theirs:.0f}, ratio {plain / theirs:.2f}")


if __name__ == "__main__":
    main()
