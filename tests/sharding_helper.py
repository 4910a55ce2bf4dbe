"""Run in a subprocess with simulated CPU devices (XLA_FLAGS set by the test):

  python sharding_helper.py steps [ARCH]       # mesh vs one device, 3 methods (gpt2, llama)
  python sharding_helper.py save DIR           # save a sharded state (4 x 2 mesh)
  python sharding_helper.py restore DIR        # restore it on this process's devices
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cljax import steps
from cljax.methods import BuildContext, MethodConfig, build
from cljax.methods import regularizers
from cljax.models import GPT2Classifier, GPT2Config, init_params
from cljax.models.llama import LlamaConfig
from cljax.train import sharding
from cljax.train.checkpoint import Checkpointer

# The tiny model's matrices are small: shard every leaf of 1024+ elements over "model".
sharding.MIN_SHARDED_SIZE = 1024
CONFIG = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                    num_labels=4, pad_token_id=63, eos_token_id=63)
# A grouped-query Llama (2 of 4 key-value heads): its k/v projections are half the width.
CONFIGS = {"gpt2": CONFIG, "llama": LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, num_labels=4,
    pad_token_id=63, eos_token_id=63)}
CTX = BuildContext(num_labels=4, num_tasks=2, max_length=12, n_layer=2, pad_token_id=63)


def batches(n, batch_size=8, seed=0):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    ids = rs.randint(0, 63, (batch_size, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[::3, 9:], mask[::3, 9:] = 63, 0
    cm = np.zeros((batch_size, 4), bool)
    cm[:, :2] = True
    out.append({"input_ids": ids, "attention_mask": mask,
                "labels": rs.randint(0, 2, batch_size).astype(np.int32),
                "weights": np.ones(batch_size, np.float32), "class_mask": cm,
                "task_ids": np.zeros(batch_size, np.int32)})
  return out


def train(mesh, method_name, config=CONFIG):
  model = GPT2Classifier(config)
  params = init_params(model, jax.random.PRNGKey(0))
  params = jax.device_put(params, sharding.param_shardings(mesh, params))
  method = build(method_name, MethodConfig(ewc_lambda=50.0, replay_size=8,
                                           replay_batch_size=4), CTX)
  mstate = method.init(params)
  data = batches(4)
  if method_name == "ewc":  # a real per-example Fisher, computed on this mesh
    arrays = {k: np.concatenate([b[k] for b in data]) for k in data[0]}
    fisher = regularizers.fisher_diagonal(model, params, arrays, num_samples=32, chunk=8)
    mstate = regularizers.consolidate_ewc(mstate, fisher, jax.tree.map(lambda p: p + 0.01,
                                                                       params))
  tx, _ = steps.make_optimizer(total_steps=10, learning_rate=1e-3)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(1), method, mstate)
  sh = sharding.state_shardings(mesh, state, params)
  state = jax.device_put(state, sh)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, method=method,
                                   dropout_rng_impl="threefry"),
                 in_shardings=(sh, sharding.batch_sharding(mesh)),
                 out_shardings=(sh, sharding.replicated(mesh)), donate_argnums=0)
  for b in data:
    state, _ = step(state, sharding.shard_batch(b, mesh))
  return jax.device_get(state)


def check_steps(arch="gpt2"):
  devices = jax.devices()
  assert len(devices) == 8, devices
  one = sharding.make_mesh(1, 1, devices[:1])
  many = sharding.make_mesh(4, 2)
  config = CONFIGS[arch]
  for method in ("finetune", "ewc", "replay"):
    a, b = train(one, method, config), train(many, method, config)
    worst = max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
                if np.issubdtype(np.asarray(x).dtype, np.floating))
    assert worst < 2e-5, (method, worst)
    moved = float(np.abs(np.asarray(a.params["score"]["kernel"]) -
                         np.asarray(init_params(GPT2Classifier(config), jax.random.PRNGKey(0))
                                    ["score"]["kernel"])).max())
    assert moved > 1e-4, (method, moved)
    print(f"{method}: max |one device - 4x2 mesh| = {worst:.2e}")
  params = init_params(GPT2Classifier(config), jax.random.PRNGKey(0))
  mlp_in = {"gpt2": ("h_0", "mlp", "c_fc"), "llama": ("layers_0", "mlp", "up_proj")}[arch]
  sh = sharding.param_shardings(many, params)
  for name in mlp_in:
    sh = sh[name]
  assert sh["kernel"].spec == jax.sharding.PartitionSpec(None, "model"), sh["kernel"].spec
  print("OK")


def _state(mesh):
  model = GPT2Classifier(CONFIG)
  params = init_params(model, jax.random.PRNGKey(0))
  tx, _ = steps.make_optimizer(total_steps=10)
  method = build("ewc+replay", MethodConfig(replay_size=8), CTX)
  state = steps.init_train_state(params, tx, jax.random.PRNGKey(1), method)
  return state, params


def save(directory):
  mesh = sharding.make_mesh(4, 2)
  state, params = _state(mesh)
  sh = sharding.state_shardings(mesh, state, params)
  state = jax.device_put(jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x,
                                      state), sh)
  wte = state.params["wte"]["embedding"]
  assert len(wte.sharding.device_set) == 8 and wte.addressable_shards[0].data.shape == (32, 32)
  ckpt = Checkpointer(directory)
  ckpt.save(7, state, {"note": "sharded"})
  ckpt.close()   # the write completes before the expected values are kept
  np.savez(os.path.join(directory, "expected.npz"),
           *[np.asarray(x) for x in jax.tree.leaves(state)])
  print("OK")


def restore(directory):
  n = jax.device_count()
  mesh = sharding.make_mesh(n, 1)
  state, params = _state(mesh)
  abstract = jax.eval_shape(lambda: state)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, sharding.state_shardings(mesh, abstract, params))
  restored, meta = Checkpointer(directory).restore(target)
  assert meta == {"note": "sharded"}
  expected = np.load(os.path.join(directory, "expected.npz"))
  leaves = jax.tree.leaves(restored)
  assert len(leaves) == len(expected.files)
  for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(np.asarray(leaf), expected[f"arr_{i}"])
  assert len(restored.params["wte"]["embedding"].sharding.device_set) == n
  print("OK")


if __name__ == "__main__":
  {"steps": lambda: check_steps(*sys.argv[2:]), "save": lambda: save(sys.argv[2]),
   "restore": lambda: restore(sys.argv[2])}[sys.argv[1]]()
