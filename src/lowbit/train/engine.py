"""The training engine: one loop for every recipe.

:func:`train` takes a resolved config (see :mod:`lowbit.config`), builds the data, the model
(``lowbit.models.create`` then ``lowbit.nn.convert``), the optimizer, schedule, loss and loss
scaler, and trains for ``epochs`` epochs, evaluating after each one. Every epoch it writes
``metrics.csv``, ``metrics.json``, ``curves.png`` and an atomic ``last.pt`` checkpoint (plus
``model_best.pt`` when the evaluation metric improved) to the run folder.

Resuming from ``last.pt`` restores the model, optimizer, scheduler and scaler states and every
random-number state; data order and augmentation are a pure function of (seed, epoch), so a
resumed run ends with the same weights, bit for bit, as one that was never interrupted (on CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import config as config_mod
from .callbacks import build_callbacks
from .checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_save,
    get_rng_state,
    load_checkpoint,
    load_init_weights,
    load_model_state,
    set_rng_state,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    setup_distributed,
    sync_buffers,
    teardown_distributed,
)
from .losses import build_loss
from .metrics import plot_curves, topk_correct, write_metrics
from .optim import build_optimizer, build_scheduler

__all__ = [
    "TrainingDivergedError",
    "RunResult",
    "Task",
    "Trainer",
    "train",
    "train_variants",
    "evaluate",
    "build_model",
    "build_task",
    "resolve_device",
]


PLOT_EVERY_S = 10.0


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What a finished run returns."""

    out_dir: Path | None
    metrics: list[dict[str, Any]]
    best_metric: float | None
    best_epoch: int | None
    model: nn.Module
    config: dict[str, Any]

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics (empty when no epoch ran)."""
        return self.metrics[-1] if self.metrics else {}


class _NullScaler:
    """The loss-scaler slot when no scaling is configured (GradScaler-like, pass-through)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        return False

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        return True

    def update(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def build_scaler(cfg: Mapping[str, Any]) -> Any:
    """The loss scaler named by ``scaler.name`` (``none`` is a pass-through)."""
    name = cfg["scaler"]["name"]
    if name == "none":
        return _NullScaler()
    from .loss_scaler import EnhancedLossScaler

    try:
        return EnhancedLossScaler(**cfg["scaler"]["kwargs"])
    except TypeError as exc:
        raise ValueError(f"scaler.kwargs: {exc}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA (this process's ``LOCAL_RANK`` GPU) when present, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return dev


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# -------------------------------------------------------------------------------- data
@dataclass
class Task:
    """The data side of a run: loaders (classification) or token streams (language model).

    A training loader must support ``len()``, iteration over ``(x, y)`` batches and
    ``set_epoch(epoch)`` (its order and augmentation a pure function of seed and epoch, for exact
    resume); ``lowbit.data.BatchLoader`` is one.
    """

    kind: str  # "classify" | "lm"
    num_classes: int
    in_channels: int | None = None
    train_loader: Any = None
    eval_loader: Any = None
    train_tokens: torch.Tensor | None = None
    eval_tokens: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _subset(ds: Any, idx: torch.Tensor) -> Any:
    if hasattr(ds, "subset"):
        return ds.subset(idx)
    if dataclasses.is_dataclass(ds):
        return dataclasses.replace(ds, images=ds.images[idx], labels=ds.labels[idx])
    new = copy.copy(ds)
    new.images, new.labels = ds.images[idx], ds.labels[idx]
    return new


def _limit(ds: Any, n: int, seed: int, random_subset: bool) -> Any:
    total = len(ds.labels)
    if n <= 0 or n >= total:
        return ds
    if random_subset:
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(total, generator=g)[:n].sort().values
    else:
        idx = torch.arange(n)
    return _subset(ds, idx)


def _lm_split(corpus: Any, split: str) -> torch.Tensor:
    names = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
    if split not in names:
        raise ValueError(f"language-model split must be train, valid or test, got {split!r}")
    tokens = getattr(corpus, names[split])
    if tokens is None or len(tokens) < 2:
        raise ValueError(f"the corpus has no usable {split!r} split")
    return tokens


def build_task(cfg: Mapping[str, Any], dist_info: DistInfo | None = None,
               device: torch.device | None = None) -> Task:
    """Load the datasets named in ``cfg["data"]`` and wrap them in loaders.

    On a CUDA ``device`` the uint8 images are moved to the GPU once, and batches are cut and
    augmented there.
    """
    on_gpu = device if device is not None and device.type == "cuda" else None
    from .. import data as data_mod

    d = cfg["data"]
    dist_info = dist_info or DistInfo()
    root = d["root"] or None
    train_ds = data_mod.get_dataset(d["name"], split=d["train_split"], root=root,
                                    download=d["download"])
    if hasattr(train_ds, "vocab") and hasattr(train_ds, "valid"):  # a language-model corpus
        corpus = train_ds
        train_tokens = _lm_split(corpus, d["train_split"])
        eval_tokens = _lm_split(corpus, d["eval_split"])
        if d["limit"]:
            train_tokens = train_tokens[: d["limit"]]
        if d["eval_limit"]:
            eval_tokens = eval_tokens[: d["eval_limit"]]
        if dist_info.enabled:  # each process trains on its own contiguous share of the stream
            share = len(train_tokens) // dist_info.world_size
            train_tokens = train_tokens[dist_info.rank * share: (dist_info.rank + 1) * share]
        return Task("lm", num_classes=len(corpus.vocab), train_tokens=train_tokens,
                    eval_tokens=eval_tokens, extra={"corpus": corpus})
    eval_ds = data_mod.get_dataset(d["name"], split=d["eval_split"], root=root,
                                   download=d["download"])
    train_ds = _limit(train_ds, d["limit"], cfg["seed"], random_subset=True)
    # a fixed-seed random subset: test sets are often sorted by class, and runs with other
    # seeds must still be scored on the same images
    eval_ds = _limit(eval_ds, d["eval_limit"], 0, random_subset=True)
    train_loader = data_mod.BatchLoader(
        train_ds, d["batch_size"], shuffle=True, augment=d["augment"] or None, seed=cfg["seed"],
        drop_last=d["drop_last"], rank=dist_info.rank, world_size=dist_info.world_size,
        device=on_gpu,
    )
    if dist_info.enabled:  # an exact shard per process (no wrap-around padding): exact metrics
        eval_ds = _subset(eval_ds, torch.arange(dist_info.rank, len(eval_ds.labels),
                                                dist_info.world_size))
    eval_loader = data_mod.BatchLoader(eval_ds, d["eval_batch_size"], shuffle=False,
                                       augment=None, seed=cfg["seed"], drop_last=False,
                                       device=on_gpu)
    if len(train_loader) == 0:
        raise ValueError(
            f"data.batch_size={d['batch_size']} leaves no training batch "
            f"({len(train_ds.labels)} items, drop_last={d['drop_last']})"
        )
    return Task("classify", num_classes=len(train_ds.classes),
                in_channels=int(train_ds.images.shape[1]), train_loader=train_loader,
                eval_loader=eval_loader)


# ------------------------------------------------------------------------------- model
def build_model(cfg: Mapping[str, Any], task: Task, *, init_weights: bool = False) -> nn.Module:
    """``lowbit.models.create`` from ``cfg["model"]``, then ``lowbit.nn.convert`` to the scheme.

    With ``init_weights`` the float weights named by ``model.init`` are loaded in between (a new
    run starts from them; a checkpoint being restored brings its own weights instead).
    """
    from .. import models

    kwargs = dict(cfg["model"]["kwargs"])
    if task.in_channels is not None:
        kwargs.setdefault("in_channels", task.in_channels)
    model = models.create(cfg["model"]["name"], num_classes=task.num_classes, **kwargs)
    if init_weights and cfg["model"]["init"]:
        load_init_weights(model, cfg["model"]["init"], cfg["model"]["name"])
    q = cfg["quant"]
    if q["scheme"] not in ("", "fp32") or q["overrides"] or q["first_last"] \
            or q["norm"] != "bn":
        from .. import nn as lnn

        extra: dict[str, Any] = {}
        if q["first_last"]:
            extra["first_last"] = q["first_last"]
        if q["norm"] != "bn":
            extra["norm"] = q["norm"]
            if q["norm_bits"]:
                bits = q["norm_bits"]
                extra["norm_kwargs"] = {"act_format": f"int{bits}", "grad_format": f"int{bits}"}
        elif q["norm_bits"]:
            raise ValueError("quant.norm_bits needs quant.norm = range, l1 or linf")
        model = lnn.convert(model, q["scheme"], overrides=dict(q["overrides"]) or None,
                            inplace=True, **extra)
    return model


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_task(model: nn.Module, task: Task, cfg: Mapping[str, Any], loss_fn: Callable,
                  device: torch.device, dist_info: DistInfo | None = None) -> dict[str, float]:
    """Evaluate ``model`` on ``task``'s evaluation data (switches the model to eval mode).

    Classification: ``val_loss``, ``val_top1`` and ``val_top5`` (%); language models:
    ``val_loss`` (mean cross-entropy per token) and ``val_ppl``.
    """
    dist_info = dist_info or DistInfo()
    model.eval()
    if task.kind == "lm":
        from .. import data as data_mod

        state = None
        loss_sum, count = 0.0, 0
        windows = data_mod.lm_batches(task.eval_tokens, cfg["data"]["eval_batch_size"],
                                      cfg["data"]["bptt"])
        for x, y in windows:
            x, y = x.to(device), y.to(device)
            logits, state = model(x, state)
            loss_sum += float(nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
        # every process evaluates the whole stream: nothing to reduce
        mean = loss_sum / count
        return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}
    loss_sum, c1, c5, count = 0.0, 0, 0, 0
    for x, y in task.eval_loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(loss_fn(out, y)) * y.shape[0]
        t1, t5 = topk_correct(out, y, (1, 5))
        c1, c5, count = c1 + t1, c5 + t5, count + y.shape[0]
    loss_sum, c1, c5, count = all_reduce_sum([loss_sum, c1, c5, count], dist_info, device)
    metrics = {"val_loss": loss_sum / count, "val_top1": 100.0 * c1 / count}
    if task.num_classes > 5:
        metrics["val_top5"] = 100.0 * c5 / count
    return metrics


# ------------------------------------------------------------------------------ trainer
def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_out_dir(cfg: Mapping[str, Any]) -> Path:
    """``runs/<recipe>-<timestamp>`` (with a suffix if that folder exists)."""
    base = Path("runs") / f"{cfg.get('recipe', 'run')}-{_timestamp()}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _show_progress(cfg: Mapping[str, Any], dist_info: DistInfo) -> bool:
    return bool(cfg["progress"]) and dist_info.is_main and sys.stderr.isatty()


class Trainer:
    """Holds everything a run needs; :meth:`fit` runs the epochs.

    Attributes useful to callbacks: ``model`` (unwrapped), ``optimizer``, ``scheduler``,
    ``scaler``, ``cfg``, ``epoch`` (0-based, current), ``step`` (global optimizer steps),
    ``last_loss`` (float).
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        out_dir: str | os.PathLike | None = None,
        resume: str | os.PathLike | Mapping[str, Any] | None = None,
        callbacks: Sequence[Any] = (),
        scaler: Any = None,
        log: Callable[[str], None] | None = print,
        model: nn.Module | None = None,
        task: Task | None = None,
    ) -> None:
        self.cfg = copy.deepcopy(dict(cfg))
        self._given_model, self._given_task = model, task
        self.device = resolve_device(self.cfg["device"])
        self.dist = setup_distributed(self.device)
        self.log = log if (log is not None and self.dist.is_main) else (lambda _msg: None)
        try:
            self._setup(out_dir, resume, callbacks, scaler)
        except BaseException:
            teardown_distributed(self.dist)
            raise

    # ----------------------------------------------------------------------- set-up
    def _setup(self, out_dir, resume, callbacks, scaler) -> None:
        cfg = self.cfg
        ckpt = None
        if resume is not None:
            ckpt = resume if isinstance(resume, Mapping) else load_checkpoint(resume)
        names = ([] if self._given_task is not None else ["data.name"]) + (
            [] if self._given_model is not None else ["model.name", "quant.scheme"])
        config_mod.check_names(cfg, names)
        seed_everything(cfg["seed"])
        self.task = self._given_task or build_task(cfg, self.dist, self.device)
        if self._given_model is not None:
            model = self._given_model
        else:
            model = build_model(cfg, self.task, init_weights=ckpt is None)
        self.model = model.to(self.device)
        self.model_name = cfg["model"]["name"]
        if self.task.kind == "classify":
            self.steps_per_epoch = len(self.task.train_loader)
        else:
            self.steps_per_epoch = len(self._lm_windows(self.task.train_tokens,
                                                       cfg["data"]["batch_size"]))
        o = cfg["optim"]
        self.optimizer = build_optimizer(
            self.model, o["name"], lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
            weight_decay=o["weight_decay"], betas=o["betas"], eps=o["eps"], fused=o["fused"],
        )
        self.scheduler = build_scheduler(self.optimizer, cfg["schedule"], epochs=cfg["epochs"],
                                         steps_per_epoch=self.steps_per_epoch, base_lr=o["lr"])
        if o["master_dtype"] != "fp32":  # 16-bit master weights (the FP8 training recipe)
            from .master_weights import MasterWeights

            self.optimizer = MasterWeights(self.optimizer, o["master_dtype"],
                                           rounding=o["master_rounding"], seed=cfg["seed"])
        self.loss_fn = build_loss(cfg["loss"]["name"],
                                  label_smoothing=cfg["loss"]["label_smoothing"])
        if self.task.kind == "lm" and cfg["loss"]["name"] != "cross_entropy":
            raise ValueError("language models train with loss.name='cross_entropy' only")
        self.scaler = scaler if scaler is not None else build_scaler(cfg)
        self.callbacks = list(build_callbacks(cfg["train"]["callbacks"])) + list(callbacks)
        self.start_epoch = 0
        self.step = 0
        self.epoch = 0
        self.last_loss = float("nan")
        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        if ckpt is not None:
            self._restore(ckpt)
        if out_dir is not None:
            self.out_dir: Path = Path(out_dir)
        elif ckpt is not None and "path" in ckpt:
            self.out_dir = Path(ckpt["path"]).parent
        elif cfg["out"]:
            self.out_dir = Path(cfg["out"])
        else:
            self.out_dir = default_out_dir(cfg)
        if ckpt is None and (self.out_dir / "last.pt").exists():
            raise ValueError(
                f"{str(self.out_dir)!r} already holds a run (last.pt); resume it with "
                f"--resume or choose another --out"
            )
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg["out"] = str(self.out_dir)
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids)

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        load_model_state(self.model, ckpt, self.model_name)
        # the schedule follows this run's config (e.g. more epochs, another lr); only the
        # position in it comes from the checkpoint
        fresh_rule = dict(self.scheduler.lr_lambdas[0].__dict__)
        fresh_base = list(self.scheduler.base_lrs)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scheduler.lr_lambdas[0].__dict__.update(fresh_rule)
            self.scheduler.base_lrs = fresh_base
            rule, pos = self.scheduler.lr_lambdas[0], self.scheduler.last_epoch
            for group, base in zip(self.optimizer.param_groups, fresh_base):
                group["initial_lr"] = base
                group["lr"] = base * rule(pos)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
            if ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {ckpt.get('path', '')!r} does not fit this run's optimizer, "
                f"schedule or loss scaler: {exc}"
            ) from None
        if ckpt.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise CheckpointError(
                f"checkpoint {ckpt.get('path', '')!r} was trained with "
                f"{ckpt['steps_per_epoch']} steps per epoch, this run has {self.steps_per_epoch} "
                "(different data, batch size or number of processes); it cannot resume exactly"
            )
        self.start_epoch = int(ckpt["epoch"])
        self.step = int(ckpt.get("step", 0))
        self.history = [dict(r) for r in ckpt.get("metrics", [])]
        self.best_metric = ckpt.get("best_metric")
        self.best_epoch = ckpt.get("best_epoch")
        set_rng_state(ckpt["rng"], self.model)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """Everything needed to resume after ``epoch`` completed epochs."""
        import lowbit

        return {
            "format": FORMAT,
            "lowbit_version": lowbit.__version__,
            "model_name": self.model_name,
            "config": copy.deepcopy(self.cfg),
            "epoch": epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "metrics": copy.deepcopy(self.history),
            "rng": get_rng_state(self.model),
        }

    # ------------------------------------------------------------------------ loops
    def _lm_windows(self, tokens: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
        from .. import data as data_mod

        return list(data_mod.lm_batches(tokens, batch_size, self.cfg["data"]["bptt"]))

    def _check_finite(self, loss: torch.Tensor, epoch: int, i: int) -> float:
        value = float(loss.detach())
        if self.dist.enabled:  # every process must stop together
            flag = 0.0 if math.isfinite(value) else 1.0
            (bad,) = all_reduce_sum([flag], self.dist, self.device)
            ok = bad == 0
        else:
            ok = math.isfinite(value)
        if not ok:
            self._diverged(f"the loss became {value} at step {i + 1}", epoch)
        return value

    def _diverged(self, what: str, epoch: int) -> None:
        last = self.out_dir / "last.pt"
        kept = (f"the last good checkpoint is kept at {str(last)!r} (after epoch {epoch})"
                if last.exists() else "no checkpoint had been written yet")
        raise TrainingDivergedError(
            f"training diverged: {what} in epoch {epoch + 1}; stopped, {kept}. "
            "Try a lower optim.lr (or a loss scaler)."
        )

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.cfg["train"]["grad_clip"]
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        for cb in self.callbacks:
            if hasattr(cb, "after_step"):
                cb.after_step(self)

    def _progress(self, it: Iterable, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True,
                    disable=not _show_progress(self.cfg, self.dist))

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the epoch's training metrics."""
        self.epoch = epoch
        self.ddp_model.train()
        desc = f"epoch {epoch + 1}/{self.cfg['epochs']}"
        if self.task.kind == "lm":
            return self._train_epoch_lm(epoch, desc)
        loader = self.task.train_loader
        loader.set_epoch(epoch)
        loss_sum, correct, count = 0.0, 0, 0
        bar = self._progress(loader, len(loader), desc)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = self.ddp_model(x)
            loss = self.loss_fn(out, y)
            value = self._check_finite(loss, epoch, i)
            self.last_loss = value
            self._optimizer_step(loss)
            n = y.shape[0]
            loss_sum += value * n
            correct += int((out.detach().argmax(1) == y).sum())
            count += n
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / count:.4f}")
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], self.dist,
                                                  self.device)
        return {"train_loss": loss_sum / count, "train_top1": 100.0 * correct / count}

    def _train_epoch_lm(self, epoch: int, desc: str) -> dict[str, float]:
        bs = self.cfg["data"]["batch_size"]
        windows = self._lm_windows(self.task.train_tokens, bs)
        state = None
        loss_sum, count = 0.0, 0
        bar = self._progress(windows, len(windows), desc)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            if state is not None:  # truncated BPTT: carry the state, cut the graph
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else (
                    state.detach())
            logits, state = self.ddp_model(x, state)
            loss = self.loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            value = self._check_finite(loss, epoch, i)
            self.last_loss = value
            self._optimizer_step(loss)
            loss_sum += value * y.numel()
            count += y.numel()
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / count:.3f}")
        loss_sum, count = all_reduce_sum([loss_sum, count], self.dist, self.device)
        mean = loss_sum / count
        return {"train_loss": mean, "train_ppl": math.exp(min(mean, 50.0))}

    def evaluate(self) -> dict[str, float]:
        """Loss and top-1/top-5 accuracy (%) or perplexity on the evaluation split."""
        return evaluate_task(self.model, self.task, self.cfg, self.loss_fn, self.device,
                             self.dist)

    def _improved(self, metrics: Mapping[str, float]) -> tuple[float, bool]:
        if "val_ppl" in metrics:
            value = metrics["val_ppl"]
            better = self.best_metric is None or value < self.best_metric
        else:
            value = metrics["val_top1"]
            better = self.best_metric is None or value > self.best_metric
        return value, better

    def fit(self) -> RunResult:
        """Train from ``start_epoch`` to ``epochs``; returns the run's result."""
        try:
            return self._fit()
        finally:
            teardown_distributed(self.dist)

    def _fit(self) -> RunResult:
        cfg = self.cfg
        epochs = cfg["epochs"]
        for cb in self.callbacks:
            if hasattr(cb, "on_train_start"):
                cb.on_train_start(self)
        if self.start_epoch:
            self.log(f"resuming {self.out_dir} after epoch {self.start_epoch}")
        elif self.dist.is_main:
            self.log(f"training {cfg.get('recipe', '')}"
                     f"{'/' + cfg['variant'] if cfg.get('variant') else ''} -> {self.out_dir}")
        self._plotted = time.monotonic()
        for epoch in range(self.start_epoch, epochs):
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
            row.update(self.train_epoch(epoch))
            sync_buffers(self.model, self.dist)
            row.update(self.evaluate())
            if not math.isfinite(row["val_loss"]):
                self._diverged(f"the evaluation loss became {row['val_loss']}", epoch)
            if hasattr(self.scaler, "loss_scale"):
                row["loss_scale"] = float(self.scaler.loss_scale)
            if hasattr(self.scaler, "skipped_steps"):  # overflowing steps so far (cumulative)
                row["skipped_steps"] = int(self.scaler.skipped_steps)
            for cb in self.callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, row)
            row["time_s"] = round(time.perf_counter() - t0, 3)
            value, better = self._improved(row)
            if better:
                self.best_metric, self.best_epoch = value, epoch + 1
            self.history.append(row)
            if self.dist.is_main:
                state = self.checkpoint_state(epoch + 1)
                atomic_save(state, self.out_dir / "last.pt")
                if better:
                    atomic_save(state, self.out_dir / "model_best.pt")
                write_metrics(self.history, self.out_dir)
                # the plot costs ~0.3 s: redraw on the last epoch and at most every 10 s
                if epoch + 1 == epochs or time.monotonic() - self._plotted >= PLOT_EVERY_S:
                    plot_curves(self.history, self.out_dir / "curves.png",
                                title=f"{cfg.get('recipe', '')} {cfg.get('variant', '')}".strip())
                    self._plotted = time.monotonic()
                self.log(_format_row(row))
        return RunResult(self.out_dir, self.history, self.best_metric, self.best_epoch,
                         self.model, self.cfg)


def _format_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']:>3}"]
    for k in ("train_loss", "val_loss"):
        if k in row:
            parts.append(f"{k} {row[k]:.4f}")
    for k in ("val_top1", "val_top5"):
        if k in row:
            parts.append(f"{k} {row[k]:.2f}%")
    if "val_ppl" in row:
        parts.append(f"val_ppl {row['val_ppl']:.2f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['time_s']:.1f}s")
    return "  ".join(parts)


# ------------------------------------------------------------------------ entry points
def train(
    config: str | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    out_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    callbacks: Sequence[Any] = (),
    scaler: Any = None,
    log: Callable[[str], None] | None = print,
    model: nn.Module | None = None,
    task: Task | None = None,
) -> RunResult:
    """Train one run: a recipe name, recipe path or config table, plus ``key=value`` overrides.

    ``resume`` is a checkpoint file or run folder to continue from. Without ``config`` the
    checkpoint's stored config is used (with ``overrides`` on top, e.g. more ``epochs``); with
    ``config`` that config is used and the checkpoint must fit its model. The run writes to
    ``out_dir``, else the checkpoint's folder when resuming, else ``out=``, else
    ``runs/<recipe>-<timestamp>``. Recipes with several variants go through
    :func:`train_variants`.

    ``model`` and ``task`` replace the model and data the config names (bring your own
    ``nn.Module`` or loaders); ``model.name`` is still recorded to check checkpoints.
    """
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None and config is None:
        cfg = config_mod.resolve(ckpt["config"], overrides)
    else:
        cfg = config_mod.resolve(config, overrides)
    runs = config_mod.split_variants(cfg)
    if len(runs) > 1:
        raise ValueError(
            f"recipe {cfg['recipe']!r} has variants {[label for label, _ in runs]}: use "
            "train_variants(), or pick one with variant=<label>"
        )
    run_cfg = runs[0][1]
    if ckpt is not None and out_dir is None:
        out_dir = Path(ckpt["path"]).parent
    return Trainer(run_cfg, out_dir=out_dir, resume=ckpt, callbacks=callbacks, scaler=scaler,
                   log=log, model=model, task=task).fit()


def train_variants(
    config: str | Mapping[str, Any] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    out_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = print,
) -> list[tuple[str, RunResult]]:
    """Train every variant of a recipe (a single ``("", result)`` for a recipe without variants).

    Variant runs go to ``<out>/<label>/``. ``resume`` is the parent run folder: each variant
    continues from its own ``last.pt`` and variants that never started begin from scratch. A
    ``resume`` path holding ``last.pt`` itself (or a checkpoint file) resumes that one run.
    """
    if resume is not None:
        root = Path(resume)
        if root.is_file() or (root / "last.pt").is_file():
            return [("", train(config, overrides, resume=root, out_dir=out_dir, log=log))]
        saved = sorted(root.glob("*/last.pt")) if root.is_dir() else []
        if not saved:
            raise CheckpointError(
                f"no checkpoint to resume: {str(root)!r} holds no last.pt (nor do its variant "
                "folders)"
            )
        if config is None:
            stored = load_checkpoint(saved[0])["config"]
            config = stored["recipe"]
            overrides = [*stored.get("overrides", []), *_override_items(overrides)]
        out = Path(out_dir) if out_dir is not None else root
    cfg = config_mod.resolve(config, overrides)
    if resume is None:
        out = Path(out_dir) if out_dir is not None else (
            Path(cfg["out"]) if cfg["out"] else default_out_dir(cfg))
    runs = config_mod.split_variants(cfg)
    for _, sub in runs:  # a typo in the last variant must not surface after the first trained
        config_mod.check_names(sub)
    if len(runs) == 1 and not runs[0][0]:
        return [("", Trainer(runs[0][1], out_dir=out, log=log).fit())]
    results = []
    for label, sub in runs:
        vdir = out / label
        ckpt = load_checkpoint(vdir) if resume is not None and (vdir / "last.pt").is_file() \
            else None
        results.append((label, Trainer(sub, out_dir=vdir, resume=ckpt, log=log).fit()))
    return results


def _override_items(overrides: Sequence[str] | Mapping[str, Any]) -> list[Any]:
    if isinstance(overrides, Mapping):
        return [[k, v] for k, v in overrides.items()]
    return list(overrides)


def evaluate(
    checkpoint: str | os.PathLike,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Rebuild the model stored in ``checkpoint`` and evaluate it on its evaluation split.

    ``overrides`` may change data settings (``data.root=...``, ``data.eval_split=...``).
    Post-training quantized checkpoints (``lowbit ptq``) are rebuilt with their quantizers.
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = config_mod.resolve(ckpt["config"], overrides)
    config_mod.check_names(cfg)
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    task = build_task(cfg, device=device)
    model = build_model(cfg, task).to(device)
    if "ptq" in ckpt:  # written by `lowbit ptq`: give the float model the quantized structure
        from lowbit.ptq import restore_quantized

        restore_quantized(model, ckpt["ptq"])
    load_model_state(model, ckpt, cfg["model"]["name"])
    loss_fn = build_loss(cfg["loss"]["name"], label_smoothing=0.0)
    metrics = evaluate_task(model, task, cfg, loss_fn, device)
    return {"checkpoint": ckpt["path"], "epoch": ckpt["epoch"], "model": ckpt["model_name"],
            **metrics}
