"""torch.distributed for the trainer: process group from torchrun's environment, rank helpers,
model wrapping (DDP or FSDP2's `fully_shard`), and the reductions the loop needs.

    torchrun --standalone --nproc_per_node 2 -m fastalign train sft --config cfg.yaml

`TrainerConfig.distributed`: "auto" (DDP when WORLD_SIZE > 1, else a plain single process),
"ddp", "fsdp" or "none". Backends: NCCL for CUDA devices (one GPU per process, cuda:LOCAL_RANK),
gloo for the CPU.

Normalisation (the point of getting this right): a step's loss is the sum of every loss unit
(token, pair) of the *global* batch divided by the global unit count N, counted before any
forward. Each rank backpropagates `loss_sum(micro-batch) / N * world_size`; DDP and FSDP2 both
average gradients over ranks (divide by world_size), so the synchronised gradient is
sum_over_ranks_and_micro_batches(grad loss_sum) / N: exactly the single-process gradient of the
same global batch, whatever the token counts per rank or micro-batch. (Averaging per-rank or
per-micro-batch means instead weights a token by 1 / its own shard's count: a wrong gradient.)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn

from fastalign.models.heads import ScalarHeadModel

MODES = ("auto", "none", "ddp", "fsdp")

# Methods besides forward that losses call on a trained model with gradients; they must run
# through the DDP/FSDP wrapper (DDP only synchronises gradients of calls made through its
# forward; FSDP2 only unshards parameters in its forward hooks).
FORWARD_METHODS = ["score"]


def register_forward_method(name: str) -> None:
    """Declare another model method (like `score`) that losses call with gradients, so that it
    is routed through DDP / registered with FSDP2 when models are wrapped from now on."""
    if name not in FORWARD_METHODS:
        FORWARD_METHODS.append(name)


# ---- process group and ranks ----------------------------------------------------------------


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else env_world_size()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or a plain single process): the one that logs, prints and writes files."""
    return rank() == 0


def resolve_mode(mode: str) -> str:
    """"auto" -> "ddp" when more than one process takes part (torchrun or an initialised group),
    else "none"; the other modes as given."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "ddp" if world_size() > 1 else "none"
    return mode


def resolve_device(spec: str) -> torch.device:
    """The device of this process under distribution: cuda:LOCAL_RANK for CUDA (one GPU per
    process), the CPU otherwise."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    lr, count = local_rank(), torch.cuda.device_count()
    # one GPU per process: cuda:LOCAL_RANK, or cuda:0 when the launcher shows each process one GPU
    index = lr if lr < count else 0 if count == 1 else None
    if index is None:
        raise RuntimeError(f"LOCAL_RANK is {lr} but only {count} GPUs are visible; run at most {count} processes "
                           "per node (--nproc_per_node)")
    if dev.index is not None and dev.index != index:
        raise ValueError(f"device {spec!r}: under distributed training each process uses its own GPU "
                         f"(cuda:{index} here, from LOCAL_RANK); set device to 'cuda' or 'auto' "
                         "(and CUDA_VISIBLE_DEVICES to choose GPUs)")
    return torch.device("cuda", index)


_OWN_GROUP = False  # whether init() created the default group (then shutdown() destroys it)


def init(device: torch.device) -> None:
    """Joins the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), unless one is already initialised: NCCL for CUDA, gloo for CPU."""
    global _OWN_GROUP
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives and all_gather_object use the current device
    if is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed training needs a process group: launch with torchrun (the environment lacks "
                           f"{', '.join(missing)}) or call torch.distributed.init_process_group first")
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _OWN_GROUP = True
    atexit.register(shutdown)  # also when the caller never calls shutdown() (the CLI does)


def shutdown() -> None:
    """Destroys the process group if init() created it (the CLI calls it after training; it
    also runs at interpreter exit)."""
    global _OWN_GROUP
    if _OWN_GROUP and is_initialized():
        # Free DDP/FSDP2 state (kept alive by reference cycles through module hooks) while the
        # group and the interpreter are alive: collected later, during interpreter shutdown, the
        # gloo work objects it holds abort the process (seen: "terminate called without an
        # active exception").
        gc.collect()
        dist.destroy_process_group()  # (local: no barrier, so a failing rank exits at once)
    _OWN_GROUP = False


def barrier() -> None:
    if is_initialized():
        dist.barrier()


# ---- reductions ------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values, op: str = "sum") -> list:
    """Element-wise sum/max/min over ranks of a list of numbers (float64 on the wire, so unit
    counts up to 2^53 stay exact). Identity without a process group."""
    values = list(values)
    if not is_initialized():
        return values
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


def all_agree(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank (also a barrier)."""
    return bool(all_reduce([0.0 if flag else 1.0], "max")[0] == 0.0)


def any_rank(flag: bool) -> bool:
    """True on every rank iff `flag` is True on some rank."""
    return bool(all_reduce([1.0 if flag else 0.0], "max")[0] > 0)


def reduce_weighted(sums: dict, weights: dict) -> dict:
    """{key: sum over ranks of sums[k] / sum over ranks of weights[k]} for the union of every
    rank's keys (a rank that lacks a key contributes nothing to it): unit-weighted means."""
    keys = set(sums)
    if is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(sums))
        keys = set().union(*map(set, gathered))
    keys = sorted(keys)
    red = all_reduce([float(sums.get(k, 0.0)) for k in keys] + [float(weights.get(k, 0.0)) for k in keys])
    n = len(keys)
    return {k: red[i] / red[n + i] if red[n + i] else 0.0 for i, k in enumerate(keys)}


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Overwrites every parameter and buffer with rank src's (same starting point everywhere)."""
    if not is_initialized():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


# ---- wrapping ----------------------------------------------------------------------------------


class _Router(nn.Module):
    """Runs `inner.<method>(...)` as its forward, so that DDP sees calls of methods like `score`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, method, *args, **kwargs):
        if method == "forward":
            return self.inner(*args, **kwargs)
        return getattr(self.inner, method)(*args, **kwargs)


class DDPModel:
    """What a loss function sees of a DDP-trained model: calling it, or a method in
    FORWARD_METHODS, goes through DistributedDataParallel (gradients are synchronised); every
    other attribute (config, generate, ...) is the plain module's."""

    def __init__(self, module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.module = module
        # buffers (rotary tables) are equal on every rank: synchronise them once, not every forward
        params = inspect.signature(DDP).parameters
        buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        self.ddp = DDP(_Router(module), device_ids=[device.index] if device.type == "cuda" else None,
                       find_unused_parameters=find_unused_parameters, **buffers)
        self._methods = tuple(FORWARD_METHODS)

    def __call__(self, *args, **kwargs):
        return self.ddp("forward", *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("module", "ddp", "_methods"):
            raise AttributeError(name)
        if name in self._methods and callable(getattr(self.module, name, None)):
            return functools.partial(self.ddp, name)
        return getattr(self.module, name)

    def no_sync(self):
        return self.ddp.no_sync()


def _hf_model(model: nn.Module) -> nn.Module:
    return getattr(model, "lm", model)  # ScalarHeadModel wraps a causal LM


def shard_(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: every transformer block (the classes in Hugging Face's `_no_split_modules`)
    is its own `fully_shard` unit, then the root (embeddings, final norm, heads). Parameters
    become DTensors sharded over all ranks; the module object stays the same."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    broadcast_module_(model)  # shard rank 0's weights, whatever each rank initialised
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(_hf_model(model), "_no_split_modules", None) or ())
    for sub in model.modules():
        if sub is not model and type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when `model` is FSDP2-sharded over more than one rank: then every forward is a
    collective, and generation must run the same number of steps on every rank."""
    if world_size() <= 1:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def wrap_models(models: dict, trainable, mode: str, device: torch.device) -> dict:
    """Prepares the models for `mode` and returns {role: view} of what the loss functions must
    get instead of the plain module. "ddp": a DDPModel view per trainable role (frozen models
    stay replicated plain modules; `models` itself is untouched). "fsdp": every model is sharded
    in place (frozen ones too: they are as large as the policy), so no views ({}). "none": {}."""
    if mode == "none":
        return {}
    if mode == "ddp":
        for r, m in models.items():
            if r not in trainable:
                broadcast_module_(m)  # frozen replicas start equal too (DDP broadcasts the trained ones)
        # a scalar-head model never uses its LM's vocabulary head: DDP must not wait for its grads
        return {r: DDPModel(m, device, find_unused_parameters=isinstance(m, ScalarHeadModel))
                for r, m in models.items() if r in trainable}
    if mode == "fsdp":
        for m in models.values():
            shard_(m, device)
        return {}
    raise ValueError(f"distributed mode must be none, ddp or fsdp here, got {mode!r}")


def no_sync(views) -> contextlib.AbstractContextManager:
    """DDP: skip the gradient all-reduce for this backward (gradients accumulate locally and are
    reduced with the last micro-batch's). Nothing for other models."""
    stack = contextlib.ExitStack()
    for v in views:
        if isinstance(v, DDPModel):
            stack.enter_context(v.no_sync())
    return stack


# ---- full state dicts (checkpoints) --------------------------------------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict:
    """FSDP2: the full (unsharded) state dict on the CPU of rank 0 ({} on other ranks).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict):
    """FSDP2: loads a full state dict (present on every rank) into the sharded model; returns
    (missing, unexpected) keys."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    res = set_model_state_dict(model, state, options=_options(strict=False))
    return list(res.missing_keys), list(res.unexpected_keys)


def full_optimizer_state(models: dict, optimizer) -> dict:
    """FSDP2: the optimizer's full state in torch's own format (state keyed by parameter index in
    param_groups order, as `optimizer.state_dict()` gives), so checkpoints are the same whatever
    the distribution; on rank 0 ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    holder = nn.ModuleDict(models)
    osd = get_optimizer_state_dict(holder, optimizer, options=_options(cpu_offload=True))
    if not osd:
        return {}
    index, groups = {}, []
    for g in osd["param_groups"]:
        ids = []
        for fqn in g["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**g, "params": ids})
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(models: dict, optimizer, state: dict) -> None:
    """FSDP2: loads an optimizer state in torch's own format (present on every rank)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    holder = nn.ModuleDict(models)
    fqn = {id(p): n for n, p in holder.named_parameters()}
    names = [fqn[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the checkpoint's optimizer state does not match this optimizer's parameters")
    osd = {"state": {names[i]: v for i, v in state["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(holder, optimizer, osd, options=_options())
