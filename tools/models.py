"""Model architectures (random, seeded weights) used to exercise packratd.

Every factory returns a ``torch.nn.Module`` in eval mode whose weights are a
pure function of ``seed`` (the global RNG state is left untouched).  All
models are written with plain ops (conv / linear / matmul / softmax /
layer_norm / embedding) and no data-dependent control flow, so that
``torch.export.export`` can trace them with a dynamic batch dimension.

Registry
--------
``MODELS[name] = (factory, example_inputs_fn)`` where ``example_inputs_fn(batch,
**kw)`` returns a tuple of tensors in the model's positional-argument order
(integer inputs are valid: ids lie inside the vocabulary, masks are 0/1).

=================  ===========================================  ==========================
name               inputs                                       outputs
=================  ===========================================  ==========================
resnet50           x float32 [B,3,224,224]                      logits float32 [B,1000]
bert               input_ids int64 [B,S], attention_mask        last hidden states
                   int64 [B,S] (1 keep, 0 pad)                  float32 [B,S,768]
gpt2               input_ids int64 [B,S]                        logits of the LAST position
                                                                only, float32 [B,50257]
tiny_mlp           x float32 [B,64]                             logits float32 [B,10]
tiny_two_input     x float32 [B,16], ids int64 [B,8] (<100)     (float32 [B,4], float32 [B])
=================  ===========================================  ==========================

``S`` (seq_len, default 128) is baked into the exported graph; only the batch
dimension is dynamic.

``input_spec(ep)`` reads the user-input spec (name / numpy dtype name / shape
with ``None`` for symbolic dims) back out of a loaded ``ExportedProgram``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "resnet50",
    "bert_base",
    "gpt2_small",
    "tiny_mlp",
    "tiny_two_input",
    "MODELS",
    "example_inputs",
    "input_spec",
    "TORCH_TO_NUMPY_DTYPE",
]

DEFAULT_SEED = 0


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for the duration of the block, then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------
# ResNet-50 (same layout as torchvision.models.resnet50, v1.5: stride on 3x3)
# ---------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

        # torchvision's init (kaiming fan_out for convs, BN weight=1 bias=0),
        # plus zero_init_residual-like damping of the last BN of each block so
        # that activations stay O(1) through 16 blocks with random weights
        # (keeps eager-vs-exported comparisons meaningful at atol 1e-4).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                # Non-trivial running stats so BN is not an identity in eval.
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0.2)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50(seed: int = DEFAULT_SEED) -> nn.Module:
    """ResNet-50 v1.5, 1000 classes. Input float32 [B,3,224,224] -> float32 [B,1000]."""
    with _seeded(seed):
        return _finish(ResNet((3, 4, 6, 3), 1000))


# ---------------------------------------------------------------------------
# Transformer pieces (hand-written attention: matmul + softmax)
# ---------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    ``bias`` is an additive float mask broadcastable to [B, H, S, S].
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, S, Dh]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores + bias, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, d)
        return self.out(ctx)


class BertLayer(nn.Module):
    """Post-LN encoder layer (BERT)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, eps: float = 1e-12):
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, bias))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class BertEncoder(nn.Module):
    def __init__(self, vocab=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 max_pos=512, type_vocab=2, seq_len=128):
        super().__init__()
        assert seq_len <= max_pos
        self.seq_len = seq_len
        self.vocab_size = vocab
        self.word_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_pos, d_model)
        self.type_emb = nn.Embedding(type_vocab, d_model)
        self.emb_ln = nn.LayerNorm(d_model, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.register_buffer("position_ids", torch.arange(max_pos).unsqueeze(0), persistent=False)
        for m in self.modules():  # BERT init: N(0, 0.02)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = (self.word_emb(input_ids)
             + self.pos_emb(self.position_ids[:, :s])
             + self.type_emb.weight[0])  # token_type_ids == 0 everywhere
        x = self.emb_ln(x)
        # [B,S] int (1 keep / 0 pad) -> additive [B,1,1,S]: 0 keep, -10000 pad.
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x


def bert_base(seq_len: int = 128, seed: int = DEFAULT_SEED) -> nn.Module:
    """BERT-base encoder. Inputs input_ids/attention_mask int64 [B,S]; output
    the final hidden states float32 [B,S,768] (not pooled)."""
    with _seeded(seed):
        return _finish(BertEncoder(seq_len=seq_len))


class GPT2Block(nn.Module):
    """Pre-LN decoder block (GPT-2)."""

    def __init__(self, d_model: int, n_heads: int, eps: float = 1e-5):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias)
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab=50257, d_model=768, n_layers=12, n_heads=12, n_ctx=1024, seq_len=128):
        super().__init__()
        assert seq_len <= n_ctx
        self.seq_len = seq_len
        self.vocab_size = vocab
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(n_ctx, d_model)
        self.blocks = nn.ModuleList(GPT2Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, eps=1e-5)
        # Additive causal mask for the baked-in sequence length: 0 on/below
        # the diagonal, -1e4 above (finite, so no NaNs from softmax).
        causal = torch.full((seq_len, seq_len), -10000.0).triu(1)
        self.register_buffer("causal_bias", causal[None, None], persistent=False)
        self.register_buffer("position_ids", torch.arange(n_ctx).unsqueeze(0), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.wpe.weight, std=0.01)
        for blk in self.blocks:  # GPT-2's scaled init of residual projections
            nn.init.normal_(blk.attn.out.weight, std=0.02 / math.sqrt(2 * n_layers))
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(self.position_ids[:, :s])
        bias = self.causal_bias[:, :, :s, :s]
        for blk in self.blocks:
            x = blk(x, bias)
        last = self.ln_f(x[:, -1, :])  # [B, d]
        return F.linear(last, self.wte.weight)  # tied LM head -> [B, vocab]


def gpt2_small(seq_len: int = 128, seed: int = DEFAULT_SEED) -> nn.Module:
    """GPT-2 small (124M, tied LM head). Input input_ids int64 [B,S]; output the
    logits of the LAST position only, float32 [B,50257]."""
    with _seeded(seed):
        return _finish(GPT2(seq_len=seq_len))


# ---------------------------------------------------------------------------
# Tiny models for tests / `make run`
# ---------------------------------------------------------------------------


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(),
            nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_mlp(seed: int = DEFAULT_SEED) -> nn.Module:
    """x float32 [B,64] -> float32 [B,10]."""
    with _seeded(seed):
        return _finish(TinyMLP())


class TinyTwoInput(nn.Module):
    VOCAB = 100

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, 16)
        self.fx = nn.Linear(16, 32)
        self.head = nn.Linear(32 + 16, 4)
        self.score = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor):
        e = self.emb(ids).mean(dim=1)                     # [B,16]
        h = torch.cat([torch.tanh(self.fx(x)), e], dim=1)  # [B,48]
        out = self.head(h)                                 # [B,4]
        score = self.score(out).squeeze(-1)                # [B]
        return out, score


def tiny_two_input(seed: int = DEFAULT_SEED) -> nn.Module:
    """x float32 [B,16], ids int64 [B,8] (values < 100) -> (float32 [B,4], float32 [B])."""
    with _seeded(seed):
        return _finish(TinyTwoInput())


# ---------------------------------------------------------------------------
# Example inputs + registry
# ---------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ex_resnet50(batch: int, seed: int = 1, **_) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 224, 224, generator=_gen(seed)),)


def _ex_bert(batch: int, seq_len: int = 128, seed: int = 1, **_) -> Tuple[torch.Tensor, ...]:
    g = _gen(seed)
    ids = torch.randint(0, 30522, (batch, seq_len), generator=g, dtype=torch.int64)
    # Each row keeps a random-length prefix (>= 1 token) and pads the rest.
    lengths = torch.randint(1, seq_len + 1, (batch, 1), generator=g)
    mask = (torch.arange(seq_len)[None, :] < lengths).to(torch.int64)
    return ids, mask


def _ex_gpt2(batch: int, seq_len: int = 128, seed: int = 1, **_) -> Tuple[torch.Tensor, ...]:
    return (torch.randint(0, 50257, (batch, seq_len), generator=_gen(seed), dtype=torch.int64),)


def _ex_tiny_mlp(batch: int, seed: int = 1, **_) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 64, generator=_gen(seed)),)


def _ex_tiny_two_input(batch: int, seed: int = 1, **_) -> Tuple[torch.Tensor, ...]:
    g = _gen(seed)
    return (torch.randn(batch, 16, generator=g),
            torch.randint(0, TinyTwoInput.VOCAB, (batch, 8), generator=g, dtype=torch.int64))


MODELS: Dict[str, Tuple[Callable[..., nn.Module], Callable[..., Tuple[torch.Tensor, ...]]]] = {
    "resnet50": (resnet50, _ex_resnet50),
    "bert": (bert_base, _ex_bert),
    "gpt2": (gpt2_small, _ex_gpt2),
    "tiny_mlp": (tiny_mlp, _ex_tiny_mlp),
    "tiny_two_input": (tiny_two_input, _ex_tiny_two_input),
}

# Models whose factory / example function take a ``seq_len`` keyword.
SEQ_MODELS = frozenset({"bert", "gpt2"})


def build(name: str, seq_len: int | None = None) -> nn.Module:
    """Build registry model ``name`` (eval mode, seeded weights)."""
    factory, _ = MODELS[name]
    if name in SEQ_MODELS and seq_len is not None:
        return factory(seq_len=seq_len)
    return factory()


def example_inputs(name: str, batch: int, seq_len: int | None = None, seed: int = 1) -> Tuple[torch.Tensor, ...]:
    """Valid example inputs for registry model ``name`` at the given batch size."""
    _, fn = MODELS[name]
    if name in SEQ_MODELS and seq_len is not None:
        return fn(batch, seq_len=seq_len, seed=seed)
    return fn(batch, seed=seed)


# ---------------------------------------------------------------------------
# Reading the input spec back out of an ExportedProgram
# ---------------------------------------------------------------------------

TORCH_TO_NUMPY_DTYPE = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",  # no numpy equivalent; name kept for errors
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}


def input_spec(ep) -> List[dict]:
    """User-input spec of a (loaded) ``torch.export.ExportedProgram``.

    Returns one dict per user tensor input, in call order::

        {"name": "input_ids", "dtype": "int64", "shape": [None, 128]}

    ``dtype`` is a numpy dtype name; ``shape`` holds ints for static dims and
    ``None`` for symbolic ones (the batch dim).  Parameters, buffers and
    constants are lifted placeholders too and are excluded; so are non-tensor
    user inputs (e.g. constant ints), which have no shape.
    """
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    spec = []
    for name in user_inputs:
        node = placeholders.get(name)
        if node is None:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        shape = [int(d) if isinstance(d, int) else None for d in val.shape]
        dtype = TORCH_TO_NUMPY_DTYPE.get(val.dtype, str(val.dtype).removeprefix("torch."))
        spec.append({"name": name, "dtype": dtype, "shape": shape})
    return spec


class SlowMLP(nn.Module):
    """Compute-heavy, weight-light: x float32 [B,256,256] -> float32 [B,8].

    Used by the reliability tests, which need a batch that takes long enough to kill a worker
    while it holds it (about 2*256^3*ITERS FLOP per row)."""
    ITERS = 96

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, 256) / 256 ** 0.5)
        self.head = nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(self.ITERS):
            h = torch.tanh(h @ self.w)
        return self.head(h.mean(dim=1))


def slow_mlp(seed: int = DEFAULT_SEED) -> nn.Module:
    with _seeded(seed):
        return _finish(SlowMLP())


def _ex_slow_mlp(batch: int, seed: int = 1, **_) -> Tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 256, 256, generator=_gen(seed)),)


MODELS["slow_mlp"] = (slow_mlp, _ex_slow_mlp)
