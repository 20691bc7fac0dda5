"""An independent float64 numpy ViT forward pass, written from the papers' equations.

It shares no code with `vpt_jax`: the tests use it where the golden fixtures do not reach (MAP
pooling, the pre_logits layer, tokens inserted before a layer, extra keys/values in attention).
Parameters are read from a flat dict of canonical '/'-joined names.
"""

import math

import numpy as np


def layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def attention(p, prefix, xq, xkv, extra_kv=None):
  """softmax(Q [K; P_K]^T / sqrt(dh)) [V; P_V], heads split as in the DenseGeneral kernels."""
  g = lambda n: np.asarray(p[f"{prefix}/{n}"], np.float64)
  q = np.einsum("bld,dhk->blhk", xq, g("query/kernel")) + g("query/bias")
  k = np.einsum("bld,dhk->blhk", xkv, g("key/kernel")) + g("key/bias")
  v = np.einsum("bld,dhk->blhk", xkv, g("value/kernel")) + g("value/bias")
  if extra_kv is not None:
    ek, ev = (np.broadcast_to(np.asarray(t, np.float64), (xkv.shape[0],) + np.shape(t)[-3:])
              for t in extra_kv)
    k = np.concatenate([k, ek], axis=1)
    v = np.concatenate([v, ev], axis=1)
  w = softmax(np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1]))
  o = np.einsum("bhqt,bthk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", o, g("out/kernel")) + g("out/bias")


def gelu_erf(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def mlp(p, prefix, x, exact_gelu=False):
  g = lambda n: np.asarray(p[f"{prefix}/{n}"], np.float64)
  h = (gelu_erf if exact_gelu else gelu_tanh)(x @ g("Dense_0/kernel") + g("Dense_0/bias"))
  return h @ g("Dense_1/kernel") + g("Dense_1/bias")


def embed_patches(p, images, patch):
  """(B, H, W, C) -> (B, gh*gw, D): each patch flattened row-major times the reshaped kernel."""
  x = np.asarray(images, np.float64)
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, gh * gw, patch * patch * c)
  kern = np.asarray(p["embedding/kernel"], np.float64).reshape(patch * patch * c, -1)
  return patches @ kern + np.asarray(p["embedding/bias"], np.float64)


def head(p, f):
  """pre_logits (if any) and head (if any) applied to pooled features."""
  g = lambda n: np.asarray(p[n], np.float64)
  if "pre_logits/kernel" in p:
    f = np.tanh(f @ g("pre_logits/kernel") + g("pre_logits/bias"))
  if "head/kernel" in p:
    f = f @ g("head/kernel") + g("head/bias")
  return f


def forward(p, images, *, patch, depth, pool, cls_row, insert=None, extra_kv=None,
            patch_tokens=None, return_tokens=False, mlp_scale=None, head_input=False,
            mlp_fn=None, features_fn=None, exact_gelu=False):
  """Logits (or features when there is no head) of a ViT.

  insert: {layer: (fn(x) -> x)} applied to the sequence before that layer.
  extra_kv: {layer: (k, v)} appended to keys/values of that layer's attention.
  patch_tokens: precomputed (B, gh*gw, D) patch embeddings (instead of embedding `images`).
  return_tokens: return the final-LayerNorm token sequence instead of the logits.
  mlp_scale: {layer: s} multiplies that layer's MLP output by s before the residual.
  head_input: return the features the head reads (after pre_logits) instead of the logits.
  mlp_fn: {layer: fn(y) -> y} applied to that layer's MLP output before the residual (adapters).
  features_fn: fn(features) -> features between pre_logits and the head (MLP heads, side nets).
  exact_gelu: the erf form of GELU (PyTorch's nn.GELU: MAE, MoCo v3) instead of the tanh form.
  pool may also be a function of the token sequence (e.g. MAE's mean over every row but the
  class token). The final LayerNorm is the one the parameters hold: `Transformer/encoder_norm`
  over every token, or (MAE) `fc_norm` over the pooled feature.
  """
  g = lambda n: np.asarray(p[n], np.float64)
  t = embed_patches(p, images, patch) if patch_tokens is None else patch_tokens
  b = t.shape[0]
  pe = g("pos_embedding")
  if "cls" in p:
    cls = np.broadcast_to(g("cls"), (b, 1, t.shape[-1]))
    t = np.concatenate([cls, t], 1) + pe if cls_row else np.concatenate([cls, t + pe], 1)
  else:
    t = t + pe
  for i in range(depth):
    blk = f"Transformer/encoderblock_{i}"
    if insert and i in insert:
      t = insert[i](t)
    y = layer_norm(t, g(f"{blk}/LayerNorm_0/scale"), g(f"{blk}/LayerNorm_0/bias"))
    kv = extra_kv.get(i) if extra_kv else None
    t = t + attention(p, f"{blk}/MultiHeadDotProductAttention_0", y, y, kv)
    y = layer_norm(t, g(f"{blk}/LayerNorm_1/scale"), g(f"{blk}/LayerNorm_1/bias"))
    y = (mlp_scale or {}).get(i, 1.0) * mlp(p, f"{blk}/MlpBlock_0", y, exact_gelu)
    t = t + (mlp_fn or {}).get(i, lambda v: v)(y)
  if "Transformer/encoder_norm/scale" in p:
    t = layer_norm(t, g("Transformer/encoder_norm/scale"), g("Transformer/encoder_norm/bias"))
  if return_tokens:
    return t
  if callable(pool):
    f = pool(t)
  elif pool == "token":
    f = t[:, 0]
  elif pool == "gap":
    f = t.mean(1)
  else:
    probe = np.broadcast_to(g("MAPHead_0/probe"), (b, 1, t.shape[-1]))
    a = attention(p, "MAPHead_0/MultiHeadDotProductAttention_0", probe, t)
    y = layer_norm(a, g("MAPHead_0/LayerNorm_0/scale"), g("MAPHead_0/LayerNorm_0/bias"))
    f = (a + mlp(p, "MAPHead_0/MlpBlock_0", y))[:, 0]
  if "fc_norm/scale" in p:
    f = layer_norm(f, g("fc_norm/scale"), g("fc_norm/bias"))
  if head_input or features_fn:
    f = head({k: v for k, v in p.items() if not k.startswith("head/")}, f)
  if head_input:
    return f
  if features_fn:
    return head({k: v for k, v in p.items() if k.startswith("head/")}, features_fn(f))
  return head(p, f)
