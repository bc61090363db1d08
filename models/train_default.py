"""Train the embedded default model: a tiny byte-level Llama on Python's standard-library sources.

    python -m models.train_default [--minutes 30] [--long-minutes 14] [--out models/default_model]

The corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (without site-packages and the test
suite), each file framed by BOS/EOS; 1% of the files (every 100th) are held out for validation. The model
(4 layers, d_model 256, 8 query / 2 KV heads, tied embeddings, vocab 259) trains with AdamW under a time budget
(warm-up then cosine decay of the learning rate over the budget): first on 256-byte windows (batch 16), then,
continuing from that checkpoint, on 1536-byte windows (batch 3) so that it also writes sensibly after a
prompt of a thousand bytes or more (the demo's few-shot prompt). Saved in HF format (bf16, ~6 MB) through
``models.checkpoint.save_checkpoint``, so it loads through the same path as any Llama checkpoint; the loss of
each phase is recorded in ``config.json`` under ``hydragen_default_model``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import LlamaConfig
from models.llama import Llama, causal_attention, init_params
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "default_model")

DEFAULT_CONFIG = LlamaConfig(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID)


def load_corpus(root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) token streams (int32) from the stdlib ``.py`` files, each framed as BOS bytes EOS."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    train, valid = [], []
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
        doc = np.concatenate([[BOS_ID], data, [EOS_ID]]).astype(np.int32)
        (valid if i % 100 == 0 else train).append(doc)
    return np.concatenate(train), np.concatenate(valid)


def batches(stream: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        yield np.stack([stream[s:s + seq + 1] for s in starts])


def loss_fn(params, config: LlamaConfig, tokens):
    """Mean next-token cross-entropy (nats per byte). tokens ``[B, T+1]``."""
    model = Llama(config, params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    hidden, _ = model(inputs, positions, None, causal_attention)
    logits = model.logits(hidden)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train(minutes: float, out: str, batch: int = 16, seq: int = 256, peak_lr: float = 3e-3, seed: int = 0,
          log_every: int = 25, init: str | None = None) -> list[tuple[int, float, float]]:
    """Train for ``minutes`` (from scratch, or continuing from the checkpoint ``init``) and save to ``out``."""
    train_stream, valid_stream = load_corpus()
    print(f"corpus: {len(train_stream) / 1e6:.1f}M train bytes, {len(valid_stream) / 1e6:.2f}M valid bytes")
    if init:
        model = load_checkpoint(init, dtype=jnp.float32)
        config, params = model.config, model.params()
        print(f"continuing from {init}")
    else:
        config = DEFAULT_CONFIG
        params = init_params(config, jax.random.key(seed), jnp.float32)
    print(f"params: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M")
    opt = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), opt)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens, lr):
        opt_state[1].hyperparams["learning_rate"] = lr
        loss, grads = jax.value_and_grad(loss_fn)(params, config, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn, static_argnums=1)
    rng = np.random.default_rng(seed)
    data = batches(train_stream, batch, seq, rng)
    valid_batches = list(zip(range(8), batches(valid_stream, batch, seq, np.random.default_rng(1))))
    budget = minutes * 60
    start = time.time()
    curve, it, ema = [], 0, None
    while True:
        frac = (time.time() - start) / budget
        if frac >= 1:
            break
        lr = peak_lr * min(1.0, frac / 0.03) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        params, opt_state, loss = step(params, opt_state, next(data), jnp.float32(lr))
        it += 1
        ema = float(loss) if ema is None else 0.9 * ema + 0.1 * float(loss)
        if it % log_every == 0:
            print(f"step {it:5d}  {time.time() - start:6.0f}s  lr {lr:.2e}  train loss {ema:.3f}", flush=True)
        if it % (log_every * 8) == 0:
            v = float(np.mean([eval_loss(params, config, b) for _, b in valid_batches]))
            curve.append((it, ema, v))
            print(f"step {it:5d}  valid loss {v:.3f} nats/byte", flush=True)
    v = float(np.mean([eval_loss(params, config, b) for _, b in valid_batches]))
    curve.append((it, ema, v))
    print(f"final: step {it}, train loss {ema:.3f}, valid loss {v:.3f} nats/byte "
          f"({v / math.log(2):.2f} bits/byte), {time.time() - start:.0f}s")
    runs = []
    if init:
        with open(os.path.join(init, "config.json")) as f:
            prev = json.load(f).get("hydragen_default_model", {})
        runs = prev.get("runs") or ([prev] if prev else [])
    runs.append({"steps": it, "batch": batch, "seq": seq, "minutes": minutes, "train_loss": round(ema, 4),
                 "valid_loss": round(v, 4)})
    save_checkpoint(Llama(config, params), out, dtype=jnp.bfloat16,
                    extra_config={"hydragen_default_model": {"valid_loss": round(v, 4), "runs": runs}})
    print(f"saved to {out}")
    return curve


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="time budget of the first phase")
    ap.add_argument("--long-minutes", type=float, default=14.0, help="time budget of the long-window phase (0: skip)")
    ap.add_argument("--long-seq", type=int, default=1536)
    ap.add_argument("--long-batch", type=int, default=3)
    ap.add_argument("--long-lr", type=float, default=1e-3)
    ap.add_argument("--out", default=DEFAULT_DIR)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, help="continue from this checkpoint (e.g. to lengthen the context)")
    args = ap.parse_args(argv)
    train(args.minutes, args.out, args.batch, args.seq, args.lr, args.seed, init=args.init)
    if args.long_minutes > 0:
        train(args.long_minutes, args.out, args.long_batch, args.long_seq, args.long_lr, args.seed, init=args.out)


if __name__ == "__main__":
    main()
