"""One frozen backbone, many tuned tasks: a mixed batch where every example names its task.

    server = serving.MultiTaskServer.from_workdirs({"digits": wd1, "pets": wd2, "dtd": wd3})
    logits = server(images, task_ids)       # (B, C_max); -inf beyond each example's class count

VPT's point is that a task costs a few thousand parameters on top of a shared backbone. Serving
makes that concrete: the backbone's weights are held once, each task contributes its prompts and
head, and one jitted call runs a batch whose examples belong to different tasks:

* prompts: the tasks' per-layer prompt sets are stacked into (tasks, layers, p, d); before every
  layer each example gathers its own (p, d) set with its task id (`MultiTaskPrompts`), inserting
  or replacing the prompt tokens exactly as `vpt_jax.prompts.vpt.VPT` does (the same `plan`).
  VPT-deep, VPT-shallow, deep-shared, the first/last k layers, projected and E2VPT-pruned prompts
  all reduce to this table plus a (tasks, layers) "fresh prompts here" mask. Where every task's
  prompt outputs are discarded (deep layers) they enter as memory (keys/values only), like the
  single-task fast path.
* E2VPT key-value prompts: stacked (tasks, kv layers, heads, n, head_dim), gathered per example
  (the hooks' `extra_kv` accepts per-example keys/values).
* heads: kernels zero-padded to (D, C_max) and stacked; one (B, D) x (D, tasks * C_max) matmul,
  then each example picks its task's slice. Logits beyond a task's class count are -inf.

Equal prompt lengths are required (and equal key-value lengths and layers). Padding a shorter
prompt set with dummy tokens would not be exact: the ViT's attention has no mask, so any extra
token changes every other token's softmax. Unsupported options (locations other than 'prepend',
pooling other than 'original', expand=False before the last layer) are refused with the option
and the workdir named.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpt_jax.models.hooks import Hooks, LayerInput
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.prompts import plan as plan_lib
from vpt_jax.prompts import vpt
from vpt_jax.tuning import build, families
from vpt_jax.tuning import workdir as workdir_lib

Array = jax.Array

# Model fields that must agree for tasks to share one backbone (num_classes may differ).
SHARED_FIELDS = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "pool_type",
                 "class_token", "posemb_cls_row", "representation_size", "in_channels",
                 "map_num_heads", "map_mlp_dim", "dtype", "approximate_gelu", "fc_norm")


class ServingError(ValueError):
  """Tasks that cannot be served together from one backbone."""


@dataclasses.dataclass
class Task:
  """What one tuned task adds to the shared backbone (inference form: dropout off, prompts
  projected).

  tokens: layer -> (p, d) prompts that layer receives fresh (inserted at the first, replacing the
    previous prompt outputs at the others); empty for an unprompted task.
  kv: layer -> (keys, values), each (heads, n, head_dim); empty without key-value prompts.
  """

  name: str
  head_kernel: np.ndarray          # (D, C)
  head_bias: np.ndarray            # (C,)
  tokens: Dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
  kv: Dict[int, Tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return int(self.head_kernel.shape[1])

  @property
  def length(self) -> int:
    return next(iter(self.tokens.values())).shape[0] if self.tokens else 0

  @property
  def kv_length(self) -> int:
    return next(iter(self.kv.values()))[0].shape[1] if self.kv else 0


def task_from_model(name: str, model: VisionTransformer, variables: Mapping[str, Any]) -> Task:
  """The `Task` of a (possibly VPT-prompted) model; refuses options a mixed batch cannot run."""
  family = families.family_of(model)
  if family:  # one shared ViT runs the mixed batch; its prompt plan has no window or pad form
    raise ServingError(f"{name}: a {family} backbone is not served by mixed batches (they share "
                       "one ViT encoder; Swin prompts live inside its windows and a pad prompt "
                       "changes the input size); predict it per task (`vpt_jax.predict`)")
  hooks = model.hooks
  head = variables["params"]["head"]
  task = Task(name, np.asarray(head["kernel"], np.float32), np.asarray(head["bias"], np.float32))
  if hooks is None:
    return task
  if type(hooks) is not vpt.VPT:  # pylint: disable=unidiomatic-typecheck
    raise ServingError(f"{name}: encoder hooks {type(hooks).__name__} are not VPT prompts; "
                       "serving supports VPT / E2VPT prompt sets only")
  if hooks.length and hooks.location != "prepend":
    raise ServingError(f"{name}: prompt.location={hooks.location!r} is not supported by mixed "
                       "batches (only 'prepend')")
  if hooks.pool != "original":
    raise ServingError(f"{name}: prompt.pool={hooks.pool!r} is not supported by mixed batches "
                       "(only 'original')")
  if hooks.length and not hooks.expand and max(hooks.layers) < model.depth - 1:
    raise ServingError(f"{name}: prompt.expand=False is not supported by mixed batches (it drops "
                       "the prompts before the last layer, so examples would differ in length)")
  pv = variables.get("prompts", {}).get("hooks", {})
  if hooks.length:
    masks = None
    if hooks.masks:
      m = variables["prompt_masks"]["hooks"]
      masks = (m["token_mask"], m["segment_mask"])
    t = np.asarray(vpt.prompt_values(
        pv["tokens"], projection=(pv["proj_kernel"], pv["proj_bias"]) if hooks.project else None,
        masks=masks), np.float32)
    if masks is not None:
      # A pruned token is never a key or value and 'original' pooling drops it, so the compact
      # prompt set computes exactly what the masked one does.
      t = t[:, np.asarray(masks[0]) != 0]
    task.tokens = {layer: t[0 if hooks.shared else i] for i, layer in enumerate(hooks.layers)}
  if hooks.kv_length:
    keys = np.asarray(pv["kv"], np.float32)
    values = keys if hooks.kv_shared else np.asarray(pv["kv_values"], np.float32)
    task.kv = {layer: (keys[i], values[i]) for i, layer in enumerate(hooks.kv_layers)}
  return task


class MultiTaskPrompts(Hooks):
  """Per-example prompts: each example gathers its task's prompts from stacked tables.

  Its variables (collection 'serving') are inputs, never trained: `task_ids` (B,), `tokens`
  (tasks, depth, p, d), `fresh` (tasks, depth) bool (this layer gets the task's prompts, else
  the previous layer's prompt outputs flow through), `kv_keys` / `kv_values`
  (tasks, kv layers, heads, n, head_dim).

  plan: the prompt plan (`vpt_jax.prompts.plan`) of the tasks' fresh-prompt table, the same
  rules as a single task's: where every task's prompt outputs go unread, the prompts enter as
  memory (keys/values only, per example), as the single-task fast path does.
  """

  length: int
  num_prefix: int
  plan: plan_lib.PromptPlan
  kv_layers: Tuple[int, ...] = ()

  def setup(self):
    var = lambda name: self.variable("serving", name, lambda: None)
    self.task_ids = var("task_ids")
    if self.length:
      self.tokens = var("tokens")
      self.fresh = var("fresh")
    if self.kv_layers:
      self.kv_keys = var("kv_keys")
      self.kv_values = var("kv_values")

  def _extra_kv(self, layer: int):
    if layer not in self.kv_layers:
      return None
    ids, i = self.task_ids.value, self.kv_layers.index(layer)
    # (B, heads, n, head_dim) -> (B, n, heads, head_dim), the per-example form of the hook.
    keys = jnp.swapaxes(self.kv_keys.value[ids, i], 1, 2)
    values = jnp.swapaxes(self.kv_values.value[ids, i], 1, 2)
    return keys, values

  def layer(self, layer, x, *, num_prompts, train):
    kv = self._extra_kv(layer)
    if not self.length:
      return LayerInput(x, num_prompts, extra_kv=kv)
    ids = self.task_ids.value
    tokens, n, memory = plan_lib.edit(
        self.plan.action(layer), x, prefix=self.num_prefix, carried=num_prompts,
        fresh=lambda memory: self.tokens.value[ids, layer],
        choose=self.fresh.value[ids, layer])
    return LayerInput(tokens, n, memory=memory, extra_kv=kv)

  def after_encoder(self, x, *, num_prompts, train):
    # 'original' pooling: the backbone's own pooling over the non-prompt tokens.
    k = self.num_prefix
    return jnp.concatenate([x[:, :k], x[:, k + num_prompts:]], axis=1) if num_prompts else x


def _check_compatible(tasks: Sequence[Task], depth: int) -> Tuple[int, Tuple[int, ...]]:
  """(prompt length, kv layers) shared by all tasks, or a ServingError."""
  first = tasks[0]
  for t in tasks[1:]:
    if t.length != first.length:
      raise ServingError(
          f"prompt lengths differ: {first.name} has {first.length}, {t.name} has {t.length}. A "
          "mixed batch needs equal lengths (dummy padding tokens would change the other tokens' "
          "attention, which has no mask); serve these tasks from separate servers")
    if first.length and min(t.tokens) != min(first.tokens):
      raise ServingError(
          f"prompts enter at different layers: {first.name} at {min(first.tokens)}, {t.name} at "
          f"{min(t.tokens)}; a mixed batch needs the same first prompted layer")
    if sorted(t.kv) != sorted(first.kv) or t.kv_length != first.kv_length:
      raise ServingError(
          f"key-value prompts differ: {first.name} has {first.kv_length} in layers "
          f"{sorted(first.kv)}, {t.name} has {t.kv_length} in layers {sorted(t.kv)}; a mixed "
          "batch needs the same kv_length and kv layers")
  if any(layer >= depth for layer in first.tokens):
    raise ServingError(f"{first.name}: prompted layer beyond the backbone's depth {depth}")
  return first.length, tuple(sorted(first.kv))


class MultiTaskServer:
  """A backbone plus stacked task tables; `server(images, task_ids)` runs one jitted call.

  Build with `from_workdirs` (tuned runs) or `from_tasks` (any `Task`s, e.g. for benchmarks).
  """

  def __init__(self, backbone: VisionTransformer, params: Mapping[str, Any], tasks: Sequence[Task]):
    if not tasks:
      raise ServingError("no tasks to serve")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
      raise ServingError(f"task names must be unique, got {names}")
    length, kv_layers = _check_compatible(tasks, backbone.depth)
    self.tasks = list(tasks)
    self.names = names
    self.num_classes = np.array([t.num_classes for t in tasks], np.int32)
    self.params = {k: v for k, v in params.items() if k != "head"}
    self.tables = self._stack(tasks, backbone.depth, length, kv_layers)
    fresh = (np.asarray(self.tables["serving"]["fresh"]) if length
             else np.zeros((1, backbone.depth), bool))
    plan = plan_lib.make(fresh, length, fast_path=getattr(backbone, "fast_path", False))
    hooks = MultiTaskPrompts(length=length, num_prefix=int(backbone.class_token), plan=plan,
                             kv_layers=kv_layers)
    self.model = backbone.clone(hooks=hooks, num_classes=None)
    self._apply = jax.jit(self._logits)

  @staticmethod
  def _stack(tasks: Sequence[Task], depth: int, length: int,
             kv_layers: Tuple[int, ...]) -> Dict[str, Array]:
    n, c_max = len(tasks), max(t.num_classes for t in tasks)
    d = tasks[0].head_kernel.shape[0]
    kernel = np.zeros((n, d, c_max), np.float32)
    bias = np.zeros((n, c_max), np.float32)
    for i, t in enumerate(tasks):
      kernel[i, :, :t.num_classes] = t.head_kernel
      bias[i, :t.num_classes] = t.head_bias
    out: Dict[str, Any] = {"head_kernel": kernel, "head_bias": bias}
    serving: Dict[str, Any] = {}
    if length:
      width = next(iter(tasks[0].tokens.values())).shape[1]
      tokens = np.zeros((n, depth, length, width), np.float32)
      fresh = np.zeros((n, depth), bool)
      for i, t in enumerate(tasks):
        for layer, tok in t.tokens.items():
          tokens[i, layer], fresh[i, layer] = tok, True
      serving.update(tokens=tokens, fresh=fresh)
    if kv_layers:
      serving["kv_keys"] = np.stack([np.stack([t.kv[l][0] for l in kv_layers]) for t in tasks])
      serving["kv_values"] = np.stack([np.stack([t.kv[l][1] for l in kv_layers]) for t in tasks])
    out["serving"] = serving
    return jax.device_put(out)  # (jnp.asarray would compile a copy per shape)

  def _logits(self, params, tables, images: Array, task_ids: Array) -> Array:
    serving = {"hooks": {**tables["serving"], "task_ids": task_ids}}
    feats = self.model.apply({"params": params, "serving": serving}, images)   # (B, D)
    n, d, c = tables["head_kernel"].shape
    # All heads in one matmul, then each example keeps its task's slice.
    all_logits = feats @ jnp.transpose(tables["head_kernel"], (1, 0, 2)).reshape(d, n * c)
    all_logits = all_logits.reshape(-1, n, c) + tables["head_bias"][None]
    logits = jnp.take_along_axis(all_logits, task_ids[:, None, None], axis=1)[:, 0]
    valid = jnp.arange(c)[None] < jnp.asarray(self.num_classes)[task_ids][:, None]
    return jnp.where(valid, logits, -jnp.inf)

  def __call__(self, images: Array, task_ids: Union[Array, Sequence[int]]) -> Array:
    """(B, C_max) logits; row b is task `task_ids[b]`'s, -inf beyond its class count."""
    if not isinstance(task_ids, jax.core.Tracer):
      ids = np.asarray(task_ids)
      if ids.dtype.kind not in "iu" and ids.size:
        raise ValueError(f"task_ids of dtype {ids.dtype}: need integer task ids")
      bad = sorted({int(i) for i in ids.ravel() if not 0 <= i < len(self.names)})
      if bad:
        raise ValueError(f"task id(s) {bad} out of range: this server has {len(self.names)} "
                         f"tasks, ids 0..{len(self.names) - 1} ({self.names}); "
                         f"use server.task_ids(names)")
    task_ids = jnp.asarray(task_ids, jnp.int32)
    if task_ids.shape != (images.shape[0],):
      raise ValueError(f"task_ids of shape {tuple(task_ids.shape)}: need one id per image "
                       f"({images.shape[0]})")
    return self._apply(self.params, self.tables, images, task_ids)

  def task_ids(self, names: Sequence[str]) -> np.ndarray:
    """Task names -> ids (the order the server was built with)."""
    unknown = [n for n in names if n not in self.names]
    if unknown:
      raise KeyError(f"unknown task(s) {unknown}; this server has {self.names}")
    return np.array([self.names.index(n) for n in names], np.int32)

  def predict(self, images: Array, tasks: Sequence[str]) -> List[np.ndarray]:
    """Per-example class probabilities, each of its own task's length."""
    probs = np.asarray(jax.nn.softmax(self(images, self.task_ids(tasks)), axis=-1))
    return [p[:self.num_classes[i]] for p, i in zip(probs, self.task_ids(tasks))]

  @classmethod
  def from_tasks(cls, backbone: VisionTransformer, params: Mapping[str, Any],
                 tasks: Sequence[Task]) -> "MultiTaskServer":
    return cls(backbone.clone(hooks=None), params, tasks)

  @classmethod
  def from_workdirs(cls, workdirs: Union[Sequence[str], Mapping[str, str]], *,
                    which: str = "last") -> "MultiTaskServer":
    """Loads every tuned run (`load_tuned`; `which`: 'last', what results.json reports, or
    'best') and checks that they share one backbone.

    The runs must name the same backbone file (sha256) and model config, and must not have
    trained any backbone weight (protocol vpt or linear): otherwise the error names the workdir.
    """
    if not isinstance(workdirs, Mapping):
      workdirs = {str(w): str(w) for w in workdirs}
    if not workdirs:
      raise ServingError("no workdirs to serve")
    tasks, ref, pre_ref = [], None, None
    for name, wd in workdirs.items():
      tuned = workdir_lib.load_tuned(wd, which=which)
      pre = build.preprocessing_spec(tuned.config)
      if pre_ref is None:
        pre_ref = (wd, pre)
      elif pre != pre_ref[1]:
        raise ServingError(f"workdir {wd} preprocesses its images otherwise than {pre_ref[0]} "
                           f"({pre} vs {pre_ref[1]}): one batch of images cannot be both; "
                           "serve these tasks from separate servers")
      config, model, variables, sha = (tuned.config, tuned.model, tuned.variables,
                                       tuned.backbone_sha256)
      try:
        tasks.append(task_from_model(name, model, variables))  # refuses pools other than original
      except ServingError as e:
        raise ServingError(f"workdir {wd}: {e}") from None
      fields = {f: getattr(model, f) for f in SHARED_FIELDS}
      if ref is None:
        ref = (wd, sha, fields, variables["params"])
      else:
        _check_same_backbone(wd, sha, fields, variables["params"], config.protocol, ref)
    # With pool 'original', `prompts.attach` kept the backbone's own pool_type.
    backbone = model.clone(hooks=None)
    try:
      server = cls(backbone, ref[3], tasks)
    except ServingError as e:
      raise ServingError(f"workdirs {list(workdirs.values())}: {e}") from None
    server.preprocessing = pre_ref[1]  # what every served task's images must go through
    server.read_image = tuned.read_image
    return server


def _flat(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()
          if k[0] != "head"}


def _check_same_backbone(wd: str, sha: str, fields: Dict[str, Any], params: Mapping[str, Any],
                         protocol: str, ref: Tuple[str, str, Dict[str, Any], Any]) -> None:
  ref_wd, ref_sha, ref_fields, ref_params = ref
  if sha != ref_sha:
    raise ServingError(f"workdir {wd} was tuned on another backbone file than {ref_wd} "
                       f"(backbone_sha256 {sha[:12]}... vs {ref_sha[:12]}...)")
  diff = [f"{k}: {fields[k]!r} vs {ref_fields[k]!r}" for k in SHARED_FIELDS
          if fields[k] != ref_fields[k]]
  if diff:
    raise ServingError(f"workdir {wd} has another model config than {ref_wd}: " + "; ".join(diff))
  a, b = _flat(params), _flat(ref_params)
  changed = [k for k in sorted(set(a) | set(b))
             if k not in a or k not in b or not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))]
  if changed:
    raise ServingError(f"workdir {wd} (protocol {protocol!r}) changed backbone weights "
                       f"({changed[0]}{' and more' if len(changed) > 1 else ''}) relative to "
                       f"{ref_wd}; only prompt + head runs (protocol vpt or linear) can share one "
                       "backbone")
