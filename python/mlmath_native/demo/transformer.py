"""A tiny character-level transformer trained on the Zen of Python (the ``this`` module).

    chars (B, T) -> token + position embedding (B, T, d)
      -> L x [ x += Attn(LN(x)) ;  x += FF(LN(x)) ]      pre-norm blocks
      -> LN -> linear -> logits (B*T, V) -> cross-entropy against the next character

    Attn(h) = concat_heads(attention(h Wq, h Wk, h Wv, causal)) Wo     (H heads of d/H)
    FF(h)   = GELU(h W1 + b1) W2 + b2                                   (hidden 4d)

Every product is ``mn.matmul``, the attention is ``mn.attention`` / ``mn.attention_backward``
(blocked, causal, with the log-sum-exp kept for the backward), the loss and its gradient one
``mn.cross_entropy`` call, the update ``mn.AdamW`` (weight decay on the matrices only).  The
embedding, layer norm and GELU, and all the backward passes except attention's, are NumPy
below.  Activations are kept 2-D, (B*T, features); weights are (in, out) so a layer is
``x @ W``.

The text is 856 characters, so the model learns it by heart: the loss falls far below the
unigram entropy (the loss of a model that knows only the character frequencies) and the
samples recite the Zen.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

import mlmath_native as mn

from ._common import DemoResult, KernelTimer, Progress, log, require

Array = NDArray[Any]
Params = dict[str, Array]


@dataclass
class TransformerConfig:
    steps: int = 1200
    batch_size: int = 16
    block: int = 64  # context length T
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decay from lr to min_lr over the steps
    weight_decay: float = 0.1
    dtype: str = "float32"
    seed: int = 0
    sample_chars: int = 240
    temperature: float = 0.7
    threads: int | None = None


def quick_config(**overrides: Any) -> TransformerConfig:
    """Settings for a run of a few seconds (the tests, ``--quick``)."""
    cfg = TransformerConfig(
        steps=300,
        batch_size=8,
        block=32,
        d_model=32,
        layers=1,
        lr=1e-2,
        min_lr=1e-3,
        sample_chars=80,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# -- data --------------------------------------------------------------------------------------


def zen_text() -> str:
    """The Zen of Python: ``this.s`` decoded from ROT13 (importing ``this`` prints it, so the
    import runs with stdout redirected)."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


class Vocab:
    """Characters <-> integer ids (sorted, so the ids do not depend on the text's order)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> Array:
        return np.array([self.index[c] for c in s], dtype=np.int64)

    def decode(self, ids: Array) -> str:
        return "".join(self.chars[i] for i in ids)


def unigram_entropy(text: str) -> float:
    """H = -sum_c p_c log p_c in nats: the cross-entropy of the best model that ignores
    context."""
    n = len(text)
    return -sum(k / n * math.log(k / n) for k in Counter(text).values())


def bigram_entropy(text: str) -> float:
    """H(next | previous character) in nats, for comparison (a model with one character of
    context)."""
    pairs = Counter(zip(text, text[1:], strict=False))
    firsts = Counter(text[:-1])
    n = len(text) - 1
    return -sum(k / n * math.log(k / firsts[a]) for (a, _), k in pairs.items())


def batches(data: Array, batch_size: int, block: int, steps: int, seed: int):
    """``steps`` batches ``(x, y)`` of random windows: x (B, T) characters, y (B, T) the
    characters that follow them."""
    rng = np.random.default_rng([seed, 1])
    for _ in range(steps):
        start = rng.integers(0, len(data) - block, batch_size)
        idx = start[:, None] + np.arange(block)  # (B, T)
        yield data[idx], data[idx + 1]


# -- the model ---------------------------------------------------------------------------------


def init_params(cfg: TransformerConfig, vocab_size: int) -> Params:
    """Embeddings N(0, 0.02^2); linear weights uniform in +-1/sqrt(fan_in) (PyTorch's default
    bound), the projections back into the residual stream scaled by 1/sqrt(2 L); zero biases,
    layer-norm gains of one."""
    rng = np.random.default_rng([cfg.seed, 0])
    d, dt = cfg.d_model, cfg.dtype

    def linear(fan_in: int, fan_out: int, scale: float = 1.0) -> Array:
        bound = scale / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, (fan_in, fan_out)).astype(dt)

    p: Params = {
        "tok_emb": (0.02 * rng.standard_normal((vocab_size, d))).astype(dt),
        "pos_emb": (0.02 * rng.standard_normal((cfg.block, d))).astype(dt),
    }
    resid = 1 / math.sqrt(2 * cfg.layers)
    for layer in range(cfg.layers):
        b = f"blocks.{layer}."
        p[b + "ln1.weight"], p[b + "ln1.bias"] = np.ones(d, dt), np.zeros(d, dt)
        p[b + "attn.wqkv"] = linear(d, 3 * d)
        p[b + "attn.wo"] = linear(d, d, resid)
        p[b + "ln2.weight"], p[b + "ln2.bias"] = np.ones(d, dt), np.zeros(d, dt)
        p[b + "ff.w1"], p[b + "ff.b1"] = linear(d, 4 * d), np.zeros(4 * d, dt)
        p[b + "ff.w2"], p[b + "ff.b2"] = linear(4 * d, d, resid), np.zeros(d, dt)
    p["ln_f.weight"], p["ln_f.bias"] = np.ones(d, dt), np.zeros(d, dt)
    p["head.weight"], p["head.bias"] = linear(d, vocab_size), np.zeros(vocab_size, dt)
    return p


def decayed(name: str, value: Array) -> bool:
    """AdamW's weight decay applies to the matrices (embeddings included), not to biases and
    layer-norm parameters."""
    return value.ndim == 2


class GroupedAdamW:
    """Two ``mn.AdamW`` over the two parameter groups (with and without weight decay), as
    torch.optim.AdamW with two param groups.  ``options`` go to both ``mn.AdamW`` (e.g.
    ``state_dtype``, ``stochastic_rounding``, ``master_weights``, ``seed``: the optimizer
    formats demo)."""

    def __init__(self, params: Params, lr: float, weight_decay: float, **options: Any) -> None:
        self.decay = [k for k, v in params.items() if decayed(k, v)]
        self.plain = [k for k, v in params.items() if not decayed(k, v)]
        self.opts = [
            (
                mn.AdamW(
                    [params[k] for k in self.decay], lr=lr, weight_decay=weight_decay, **options
                ),
                self.decay,
            ),
            (
                mn.AdamW([params[k] for k in self.plain], lr=lr, weight_decay=0.0, **options),
                self.plain,
            ),
        ]

    def set_lr(self, lr: float) -> None:
        for opt, _ in self.opts:
            opt.lr = lr

    def step(self, grads: Params) -> None:
        for opt, names in self.opts:
            opt.step([grads[k] for k in names])


def lr_at(step: int, cfg: TransformerConfig) -> float:
    """Cosine decay from cfg.lr (step 0) to cfg.min_lr (the last step)."""
    t = step / max(cfg.steps - 1, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def layer_norm(x: Array, g: Array, b: Array, eps: float = 1e-5) -> tuple[Array, tuple]:
    """y = g * (x - mean) / sqrt(var + eps) + b over the last axis (var biased, as PyTorch)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd)


def layer_norm_backward(dy: Array, g: Array, cache: tuple) -> tuple[Array, Array, Array]:
    """With xhat the normalised input and dxhat = dy * g:
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dg = sum dy * xhat,
    db = sum dy (means over the features, sums over the rows)."""
    xhat, rstd = cache
    dxhat = dy * g
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


_GELU_C = math.sqrt(2 / math.pi)


def gelu(u: Array) -> Array:
    """GELU, tanh approximation (PyTorch's ``approximate="tanh"``):
    0.5 u (1 + tanh(c (u + 0.044715 u^3))), c = sqrt(2 / pi)."""
    return 0.5 * u * (1 + np.tanh(_GELU_C * (u + 0.044715 * u * u * u)))


def gelu_backward(dy: Array, u: Array) -> Array:
    """d gelu / du = 0.5 (1 + t) + 0.5 u (1 - t^2) c (1 + 3 * 0.044715 u^2),  t = tanh(...)."""
    t = np.tanh(_GELU_C * (u + 0.044715 * u * u * u))
    return dy * (0.5 * (1 + t) + 0.5 * u * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * u * u))


def split_heads(qkv: Array, b: int, t: int, heads: int) -> tuple[Array, Array, Array]:
    """(B*T, 3d) -> q, k, v, each (B, H, T, d/H) C-contiguous (the kernel's layout)."""
    dh = qkv.shape[1] // (3 * heads)
    parts = qkv.reshape(b, t, 3, heads, dh).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, dh)
    return tuple(np.ascontiguousarray(p) for p in parts)  # type: ignore[return-value]


def merge_heads(a: Array) -> Array:
    """(B, H, T, dh) -> (B*T, H*dh), heads side by side (the inverse of split_heads' layout)."""
    b, h, t, dh = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b * t, h * dh)


def forward(
    params: Params, x: Array, cfg: TransformerConfig, kt: KernelTimer
) -> tuple[Array, list[Any]]:
    """Logits (B*T, V) for the characters x (B, T), and the caches for :func:`backward`."""
    b, t = x.shape
    # embedding: a row lookup per character, plus the position's row
    h = (params["tok_emb"][x] + params["pos_emb"][:t]).reshape(b * t, -1)  # (N, d), N = B*T
    caches: list[Any] = [x]
    for layer in range(cfg.layers):
        p = f"blocks.{layer}."
        # attention sub-block: h += Attn(LN(h))
        a_in, ln1 = layer_norm(h, params[p + "ln1.weight"], params[p + "ln1.bias"])
        q, k, v = split_heads(kt.matmul(a_in, params[p + "attn.wqkv"]), b, t, cfg.heads)
        att, lse = kt.attention(q, k, v, causal=True, return_lse=True)  # (B, H, T, dh)
        att2 = merge_heads(att)
        h = h + kt.matmul(att2, params[p + "attn.wo"])
        # feed-forward sub-block: h += W2 GELU(W1 LN(h) + b1) + b2
        f_in, ln2 = layer_norm(h, params[p + "ln2.weight"], params[p + "ln2.bias"])
        u = kt.matmul(f_in, params[p + "ff.w1"]) + params[p + "ff.b1"]  # (N, 4d)
        gu = gelu(u)
        h = h + kt.matmul(gu, params[p + "ff.w2"]) + params[p + "ff.b2"]
        caches.append((a_in, ln1, q, k, v, att, lse, att2, f_in, ln2, u, gu))
    hf, lnf = layer_norm(h, params["ln_f.weight"], params["ln_f.bias"])
    logits = kt.matmul(hf, params["head.weight"]) + params["head.bias"]  # (N, V)
    caches.append((hf, lnf))
    return logits, caches


def backward(
    params: Params, caches: list[Any], dlogits: Array, cfg: TransformerConfig, kt: KernelTimer
) -> Params:
    """Gradients of every parameter from d loss / d logits (B*T, V).

    A linear layer y = x W (+ b) gives dW = x^T dy, db = sum_rows dy, dx = dy W^T; a residual
    h + f(h) passes dh through unchanged and adds f's input gradient."""
    grads: Params = {}
    hf, lnf = caches[-1]
    grads["head.weight"] = kt.matmul(hf.T, dlogits)
    grads["head.bias"] = dlogits.sum(axis=0)
    dh, grads["ln_f.weight"], grads["ln_f.bias"] = layer_norm_backward(
        kt.matmul(dlogits, params["head.weight"].T), params["ln_f.weight"], lnf
    )
    x = caches[0]
    b, t = x.shape
    for layer in reversed(range(cfg.layers)):
        p = f"blocks.{layer}."
        a_in, ln1, q, k, v, att, lse, att2, f_in, ln2, u, gu = caches[1 + layer]
        # feed-forward
        grads[p + "ff.w2"] = kt.matmul(gu.T, dh)
        grads[p + "ff.b2"] = dh.sum(axis=0)
        du = gelu_backward(kt.matmul(dh, params[p + "ff.w2"].T), u)
        grads[p + "ff.w1"] = kt.matmul(f_in.T, du)
        grads[p + "ff.b1"] = du.sum(axis=0)
        df_in = kt.matmul(du, params[p + "ff.w1"].T)
        dx, grads[p + "ln2.weight"], grads[p + "ln2.bias"] = layer_norm_backward(
            df_in, params[p + "ln2.weight"], ln2
        )
        dh = dh + dx
        # attention
        grads[p + "attn.wo"] = kt.matmul(att2.T, dh)
        datt = kt.matmul(dh, params[p + "attn.wo"].T)  # (N, d), heads side by side
        datt4 = np.ascontiguousarray(datt.reshape(b, t, cfg.heads, -1).transpose(0, 2, 1, 3))
        dq, dk, dv = kt.attention_backward(q, k, v, att, lse, datt4, causal=True)
        # (3, B, H, T, dh) -> (B, T, 3, H, dh) -> (N, 3d): split_heads' layout, undone
        dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b * t, -1)
        grads[p + "attn.wqkv"] = kt.matmul(a_in.T, dqkv)
        da_in = kt.matmul(dqkv, params[p + "attn.wqkv"].T)
        dx, grads[p + "ln1.weight"], grads[p + "ln1.bias"] = layer_norm_backward(
            da_in, params[p + "ln1.weight"], ln1
        )
        dh = dh + dx
    # embedding: the rows that were looked up collect their gradient (repeats add up)
    dh3 = dh.reshape(b, t, -1)
    grads["pos_emb"] = np.zeros_like(params["pos_emb"])
    grads["pos_emb"][:t] = dh3.sum(axis=0)
    grads["tok_emb"] = np.zeros_like(params["tok_emb"])
    np.add.at(grads["tok_emb"], x.ravel(), dh)
    return grads


class Optimizer(Protocol):
    """What :func:`train` steps: :class:`GroupedAdamW`, or any object with the same two
    methods (the optimizer formats demo wraps other optimizers this way)."""

    def set_lr(self, lr: float) -> None: ...

    def step(self, grads: Params) -> Any: ...


def train_step(
    params: Params,
    opt: Optimizer,
    x: Array,
    y: Array,
    cfg: TransformerConfig,
    kt: KernelTimer,
) -> tuple[float, float]:
    """One AdamW step on a batch; the batch's mean loss (before the update) and next-character
    accuracy."""
    logits, caches = forward(params, x, cfg, kt)
    loss, dlogits = kt.cross_entropy(logits, y.ravel(), return_grad=True)
    grads = backward(params, caches, dlogits, cfg, kt)
    kt.call(opt.step, grads)
    return float(loss), float((logits.argmax(axis=1) == y.ravel()).mean())


def train(
    params: Params,
    opt: Optimizer,
    data: Array,
    cfg: TransformerConfig,
    kt: KernelTimer | None = None,
    *,
    progress: bool = False,
    desc: str = "transformer",
) -> dict[str, list[float]]:
    """cfg.steps steps of ``opt`` on the batches of cfg.seed, the learning rate following
    :func:`lr_at`; the history ``loss``/``accuracy``/``lr`` per step."""
    kt = kt or KernelTimer()
    hist: dict[str, list[float]] = {"loss": [], "accuracy": [], "lr": []}
    bar = Progress(cfg.steps, desc, enabled=progress)
    for step, (x, y) in enumerate(batches(data, cfg.batch_size, cfg.block, cfg.steps, cfg.seed)):
        lr = lr_at(step, cfg)
        opt.set_lr(lr)
        with kt.step():
            loss, acc = train_step(params, opt, x, y, cfg, kt)
        hist["loss"].append(loss)
        hist["accuracy"].append(acc)
        hist["lr"].append(lr)
        recent = slice(-20, None)
        bar.update(
            1,
            loss=float(np.mean(hist["loss"][recent])),
            acc=float(np.mean(hist["accuracy"][recent])),
        )
    bar.close()
    return hist


def text_loss(params: Params, data: Array, cfg: TransformerConfig) -> float:
    """Mean loss over every character of the text, read in consecutive windows of T."""
    kt, total, count = KernelTimer(), 0.0, 0
    for s in range(0, len(data) - 1, cfg.block):
        x = data[s : s + cfg.block][None]
        y = data[s + 1 : s + cfg.block + 1]
        x = x[:, : len(y)]
        logits, _ = forward(params, x, cfg, kt)
        total += float(mn.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
    return total / count


def sample(
    params: Params,
    vocab: Vocab,
    cfg: TransformerConfig,
    prompt: str,
    n_chars: int,
    rng: np.random.Generator,
) -> str:
    """Continue ``prompt`` by n_chars characters drawn from softmax(logits / temperature)."""
    ids = list(vocab.encode(prompt))
    kt = KernelTimer()
    for _ in range(n_chars):
        context = np.array(ids[-cfg.block :])[None]
        logits, _ = forward(params, context, cfg, kt)
        p = mn.softmax(logits[-1].astype(np.float64) / cfg.temperature)
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return vocab.decode(np.array(ids))


# -- the demo ----------------------------------------------------------------------------------


def run(
    cfg: TransformerConfig | None = None,
    *,
    out: str | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> DemoResult:
    """Train on the Zen of Python, print the loss against the unigram entropy (nats) and a
    sample.  Returns a :class:`DemoResult`: ``final_loss`` is the loss over the whole text at
    the end, ``accuracy`` the next-character accuracy over the last training steps, history
    ``loss``/``accuracy``/``lr`` per step; extra has the entropies and the sample."""
    cfg = cfg or TransformerConfig()
    if out:
        require("matplotlib")  # before training, not after it
    if cfg.threads:
        mn.set_num_threads(cfg.threads)
    text = zen_text()
    vocab = Vocab(text)
    data = vocab.encode(text)
    h1, h2 = unigram_entropy(text), bigram_entropy(text)
    log(
        f"transformer: the Zen of Python, {len(text)} characters, {len(vocab)} distinct; "
        f"{cfg.layers} blocks, d {cfg.d_model}, {cfg.heads} heads, context {cfg.block}, "
        f"{cfg.steps} steps of batch {cfg.batch_size}, AdamW lr {cfg.lr}, {cfg.dtype}, "
        f"{mn.get_num_threads()} threads",
        verbose=verbose,
    )
    log(
        f"unigram entropy {h1:.3f} nats/char (bigram {h2:.3f}): the loss of a model that "
        "knows the character frequencies (one character of context)",
        verbose=verbose,
    )
    params = init_params(cfg, len(vocab))
    opt = GroupedAdamW(params, cfg.lr, cfg.weight_decay)
    kt = KernelTimer()
    t0 = time.perf_counter()
    hist = train(params, opt, data, cfg, kt, progress=progress)
    wall = time.perf_counter() - t0
    final = text_loss(params, data, cfg)
    tail = max(1, min(50, cfg.steps // 10))
    acc = float(np.mean(hist["accuracy"][-tail:]))
    log(
        f"loss over the text {final:.3f} nats/char vs unigram entropy {h1:.3f} "
        f"({final / h1:.0%} of it); first step {hist['loss'][0]:.3f}, last {tail} steps "
        f"{np.mean(hist['loss'][-tail:]):.3f}, next-character accuracy {acc:.1%}",
        verbose=verbose,
    )
    log(f"training {wall:.1f} s; steps: {kt.report()}", verbose=verbose)
    rng = np.random.default_rng([cfg.seed, 2])
    samples = [
        sample(params, vocab, cfg, prompt, cfg.sample_chars, rng)
        for prompt in ("Beautiful is", "Errors should")
    ]
    log(f"samples (temperature {cfg.temperature:.2g}):", verbose=verbose)
    for s in samples:
        log("  | " + s.replace("\n", "\n  | "), verbose=verbose)
    result = DemoResult(
        name="transformer",
        final_loss=final,
        accuracy=acc,
        history=hist,
        kernel_seconds=kt.seconds,
        step_seconds=kt.step_seconds,
        extra={
            "unigram_entropy": h1,
            "bigram_entropy": h2,
            "samples": samples,
            "wall_seconds": wall,
            "params": params,
            "plot": None,
        },
    )
    if out:
        plot(result, out)
        result.extra["plot"] = out
        log(f"wrote {out}", verbose=verbose)
    return result


def plot(result: DemoResult, path: str) -> None:
    """The training loss per step against the unigram and bigram entropies."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    loss = np.asarray(result.history["loss"])
    ax.plot(np.arange(1, len(loss) + 1), loss, lw=0.8, label="training loss (batch)")
    ax.axhline(result.extra["unigram_entropy"], color="tab:red", ls="--", label="unigram entropy")
    ax.axhline(result.extra["bigram_entropy"], color="tab:orange", ls=":", label="bigram entropy")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("char transformer on the Zen of Python")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
