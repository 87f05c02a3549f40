"""Train a captioner: `python train.py --help` lists every option (one per field of `config.TrainConfig`).

    python train.py --data ../shared/data/flickr8k \
        --encoder-weights ../shared/weights/dinov2-vit-small-patch14/model.safetensors
    python train.py --data ../shared/data/flickr8k --out-dir runs/small --resume   # after a kill: continues exactly
    torchrun --nproc_per_node=2 train.py ...                 # several processes (GPUs: NCCL; CPU: gloo)

It reads top to bottom: `setup` builds a `Run` (configuration, data, model: new, --init-from or --resume; the
objective, built once: token cross-entropy, cross-entropy with an ImageNet teacher distilled into the ViT
(distill.py), or self-critical CIDEr-D (scst.py); the optimizer), then `fit` loops. Each step samples a batch, asks
the objective for its loss, and takes an optimizer step; each epoch ends with validation (loss, caption metrics,
sample captions), `best.pt` by CIDEr, a metrics.csv row and `last.pt`.
`last.pt` is also saved every `checkpoint_every` steps. When the encoder's first blocks are frozen, their output
tokens are computed once per image and cached on disk (features.FeatureCache), so each epoch runs only the
trainable blocks.
"""

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from captioner import Captioner, EncodedImages
from checkpoint import (
    CheckpointError,
    TrainingState,
    load_model_file,
    load_training_checkpoint,
    rng_state,
    save_captioner,
    save_training_checkpoint,
    set_rng_state,
)
from cli import add_arguments, from_arguments
from config import PRESETS, DecodeConfig, ModelConfig, TrainConfig
from data import CaptionedImage, DataError, load_captions
from distill import Distiller, TeacherMissingError, teacher_logits
from features import FeatureCache
from images import ImageError, ImageTransform, load_image
from metrics import METRICS, JavaMissingError, distinct_ratio, format_metrics, score_captions
from model import IGNORE_INDEX, CaptionModel, caption_loss, with_image_layout, with_retrieval
from precision import autocast_dtype, default_device
from pretrained import from_parts
from retrieval import Datastore, memory_ids
from scst import SelfCriticalReward, scst_loss
from tokenizer import CaptionTokenizer, load_gpt2_tokenizer, train_caption_tokenizer

logger = logging.getLogger("train")

# Changing these between a run and its resumption would silently change what is being trained (config.option).
RESUME_MUST_MATCH = tuple(
    item.name for item in dataclasses.fields(TrainConfig) if item.metadata["on_resume"] == "must_match"
)
_MENTIONS_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def train(config: TrainConfig) -> dict:
    """Run training as configured; returns the last epoch's metrics. Rank 0 alone writes files and logs."""
    run = setup(config)
    try:
        fit(run)
    finally:
        if run.board is not None:
            run.board.close()
        if run.world > 1:
            dist.destroy_process_group()
    return run.state.history[-1] if run.state.history else {}


@dataclass
class Run:
    """Everything a training run holds, built once by `setup` and advanced by `fit`."""

    config: TrainConfig
    model: CaptionModel
    tokenizer: CaptionTokenizer
    objective: "Objective"
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainingState
    train_data: "CaptionData"
    val_data: "CaptionData"
    device: torch.device
    dtype: torch.dtype | None  # autocast's, None: float32
    rank: int
    world: int
    steps_per_epoch: int
    board: object | None  # a TensorBoard writer where the package is installed
    validation_seconds: float = 0.0  # the last validation's, for the time estimate

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        """The learning-rate schedule's length."""
        return self.steps_per_epoch * self.config.epochs

    @property
    def stop_step(self) -> int:
        return min(self.total_steps, self.config.max_steps) if self.config.max_steps else self.total_steps

    @property
    def images_per_step(self) -> int:
        return self.config.batch_size * self.world * self.config.grad_accum

    def save(self, path: Path, metrics: dict) -> None:
        """A training checkpoint: weights, optimizer, random state and the objective's own state."""
        state = self.state
        state.optimizer, state.rng, state.objective = self.optimizer.state_dict(), rng_state(), self.objective.state()
        save_training_checkpoint(path, self.model, self.tokenizer, self.metadata(metrics), state)

    def metadata(self, metrics: dict) -> dict:
        """The checkpoint's record (release.ModelInfo): what it was trained on, and its validation scores."""
        config = self.config
        trained_on = (
            f"{Path(config.data).name} ({config.train_splits.replace(',', ' + ')}: {len(self.train_data)} photos"
        )
        if config.mix_data:
            trained_on += f", with photos of {Path(config.mix_data).name} mixed in"
        scores = {"metrics": metrics, "metrics_split": "val"} if metrics else {}
        return {"trained_on": trained_on + ")", "step": self.state.step} | scores


def setup(config: TrainConfig) -> Run:
    """Configuration, data, model (new, --init-from or --resume), objective and optimizer."""
    rank, world, device = setup_distributed(config)
    if rank == 0:
        claim_out_dir(config)  # before anything is written there
    _setup_logging(Path(config.out_dir), rank == 0)
    splits = training_splits(config)
    own = [item for split in config.train_splits.split(",") for item in splits[split]]
    trained_on = own + mixed_in(config, len(own))
    config, model, tokenizer, state = load_or_build_model(config, own, trained_on, world)
    logger.info("config: %s", config)
    model.to(device).train()
    if config.unfreeze_blocks > model.encoder.depth:
        raise ValueError(f"unfreeze_blocks={config.unfreeze_blocks} but the encoder has {model.encoder.depth} blocks")
    train_data = CaptionData(trained_on, model, tokenizer, config, flip=config.flip)
    val_data = CaptionData(splits["val"], model, tokenizer, config, flip=False)
    if len(val_data) < SMALL_VAL:
        logger.warning(
            "only %d val photos: their scores swing from epoch to epoch, so best.pt may be chosen by chance. Hold out "
            "more (--val-fraction, or a val/ folder), or use last.pt or an average of the last epochs (--keep-epochs, "
            "then hub.py release EPOCH.pt ... OUT.pt)", len(val_data),
        )  # fmt: skip
    if model.config.retrieval_k:
        datastore = train_data.datastore(model, device)
        train_data.retrieve(model, datastore, device, exclude_self=True)
        val_data.retrieve(model, datastore, device, exclude_self=False)
    objective = build_objective(config, model, train_data, device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config, objective.head), lr=config.lr, betas=(config.beta1, config.beta2), fused=False
    )
    dtype = autocast_dtype(config.precision, device)
    run = Run(
        config, model, tokenizer, objective, optimizer, torch.amp.GradScaler(enabled=dtype == torch.float16),
        state or TrainingState(optimizer={}, step=0, config=asdict(config), rng={}), train_data, val_data, device,
        dtype, rank, world, len(train_data) // (config.batch_size * world * config.grad_accum),
        _tensorboard(Path(config.out_dir)) if rank == 0 else None,
    )  # fmt: skip
    if run.steps_per_epoch == 0:
        raise DataError(f"{len(train_data)} training images is fewer than one step's {run.images_per_step}")
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        objective.load_state(state.objective)
        set_rng_state(state.rng)
        logger.info("resumed at step %d (epoch %d)", state.step, state.step // run.steps_per_epoch)
    logger.info(
        "%d train images (%d skipped), %d val images, %d steps per epoch, %d steps, precision %s, %s",
        len(train_data), train_data.skipped, len(val_data), run.steps_per_epoch, run.total_steps, dtype or "float32",
        f"cached encoder tokens after block {train_data.start_block}" if train_data.start_block
        else "images read every step",
    )  # fmt: skip
    return run


def load_or_build_model(
    config: TrainConfig, own: list[CaptionedImage], trained_on: list[CaptionedImage], world: int
) -> tuple[TrainConfig, CaptionModel, CaptionTokenizer, TrainingState | None]:
    """The run's model: resumed from last.pt (with its training state), fine-tuned from --init-from, or new; and
    the config with the kind of run's defaults filled in."""
    if config.resume:
        last_path = Path(config.out_dir) / "last.pt"
        model, tokenizer, state = load_training_checkpoint(last_path)
        config = resolve_defaults(config, own, world, saved=state.config)
        check_resumable(state.config, config, last_path)
        return config, model, tokenizer, state
    config = resolve_defaults(config, own, world)
    torch.manual_seed(config.seed)
    if config.init_from:
        model, tokenizer, _ = load_model_file(config.init_from)
        model = with_image_layout(model, config.image_size, config.image_pool)
    else:
        model, tokenizer = build_new(config, trained_on)
    with torch.random.fork_rng(devices=[]):  # the memory's init, from the seed, leaves the run's random state
        torch.manual_seed(config.seed)
        model = with_retrieval(model, config.retrieval_k, config.retrieval_reading)
    return config, model, tokenizer, None


# ---- the loop: sample a batch, loss, optimizer step; at an epoch's end, validate and save ----


def fit(run: Run) -> None:
    """Train from `run.state.step` to the stop step, validating and saving at each epoch's end."""
    config, state = run.config, run.state
    runner, encoder_training, progress = None, None, None
    epoch_started, log = time.perf_counter(), StepLog()
    while state.step < run.stop_step:
        epoch, position = divmod(state.step, run.steps_per_epoch)
        wanted = config.unfreeze_blocks > 0 and epoch >= config.unfreeze_epoch
        if runner is None or wanted != encoder_training:  # the set of trained parameters changes
            encoder_training = wanted
            run.model.encoder.set_trainable(config.unfreeze_blocks if encoder_training else 0)
            trained = run.objective.module(run.model)
            runner = trained if run.world == 1 else _distributed(trained, run.device)
        if progress is None:
            progress = tqdm(total=run.steps_per_epoch, initial=position, desc=f"epoch {epoch + 1}",
                            disable=not run.is_main)  # fmt: skip
            epoch_started = time.perf_counter()
        started = time.perf_counter()
        grad_norm = train_step(run, runner, epoch, position, log)
        state.step += 1
        log.seconds.append(time.perf_counter() - started)
        progress.update(1)
        if state.step % config.log_every == 0 and run.is_main:
            log.report(run, epoch, grad_norm)
        epoch_done = state.step % run.steps_per_epoch == 0
        if run.is_main and (
            state.step % config.checkpoint_every == 0 or (state.step == run.stop_step and not epoch_done)
        ):
            run.save(run.out_dir / "last.pt", state.history[-1] if state.history else {})
        if epoch_done:
            progress.close()
            progress = None
            end_of_epoch(run, epoch, time.perf_counter() - epoch_started)


def train_step(run: Run, runner: nn.Module, epoch: int, position: int, log: "StepLog") -> float:
    """One optimizer step: its micro-batches' gradients, then clip, learning rate, update; returns the grad norm."""
    config, step = run.config, run.state.step
    order = torch.randperm(len(run.train_data), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
    step_random = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # this step's data choices
    for micro in range(config.grad_accum):
        first = (position * config.grad_accum + micro) * config.batch_size * run.world + run.rank * config.batch_size
        batch = run.train_data.batch(order[first : first + config.batch_size].tolist(), step_random, run.device)
        last_micro = micro == config.grad_accum - 1
        with contextlib.nullcontext() if run.world == 1 or last_micro else runner.no_sync():
            with torch.autocast(run.device.type, dtype=run.dtype or torch.float32, enabled=run.dtype is not None):
                loss, logged = run.objective.loss(
                    runner, run.model, batch, (config.seed * 1_000_003 + step) * 64 + micro
                )
            run.scaler.scale(loss / config.grad_accum).backward()
        log.add(loss.item(), logged)
    return optimizer_step(run.optimizer, run.scaler, lr_at(step, config, run.total_steps), config.grad_clip)


@dataclass
class StepLog:
    """What the steps since the last log line measured."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    extras: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def add(self, loss: float, logged: dict[str, float]) -> None:
        self.losses.append(loss)
        for name, value in logged.items():
            self.extras.setdefault(name, []).append(value)

    def report(self, run: Run, epoch: int, grad_norm: float) -> None:
        """A log line (and TensorBoard scalars) with the means since the last, and the time left; then reset."""
        step, stop = run.state.step, run.stop_step
        seconds, mean_loss = sum(self.seconds) / len(self.seconds), sum(self.losses) / len(self.losses)
        current_lr = lr_at(step - 1, run.config, run.total_steps)
        means = {name: sum(values) / len(values) for name, values in self.extras.items()}
        epochs_left = -(-stop // run.steps_per_epoch) - epoch - 1
        left = (stop - step) * seconds + run.validation_seconds * epochs_left
        logger.info(
            "step %d/%d epoch %d loss %.4f lr %.2e grad-norm %.2f %.2f s/step %.1f img/s, run done in about %s%s",
            step, stop, epoch + 1, mean_loss, current_lr, grad_norm, seconds, run.images_per_step / seconds,
            _duration(left), "".join(f" {name} {value:.4f}" for name, value in means.items()),
        )  # fmt: skip
        scalars = {"train/loss": mean_loss, "train/lr": current_lr} | {f"train/{k}": v for k, v in means.items()}
        _board(run.board, scalars, step)
        self.seconds, self.losses, self.extras = [], [], {}


def end_of_epoch(run: Run, epoch: int, seconds: float) -> None:
    """Validate, keep the best model, record the epoch's metrics and save last.pt (rank 0); all ranks wait."""
    config, state = run.config, run.state
    metrics = {"epoch": epoch + 1, "step": state.step, "epoch_seconds": round(seconds, 1)}
    if run.is_main:
        if config.eval_every and ((epoch + 1) % config.eval_every == 0 or state.step == run.total_steps):
            started = time.perf_counter()
            metrics |= validate(run.model, run.tokenizer, run.val_data, config, run.device, run.dtype)
            run.validation_seconds = time.perf_counter() - started
            score = metrics.get("CIDEr", -metrics["val_loss"])
            if score > state.best_cider:
                state.best_cider = score
                run.save(run.out_dir / "best.pt", metrics)
        state.history.append(metrics)
        logger.info("epoch %d done in %.0f s: %s", epoch + 1, seconds, metrics)
        _append_csv(run.out_dir / "metrics.csv", metrics)
        _board(run.board, {f"val/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")}, state.step)
        run.save(run.out_dir / "last.pt", metrics)
        if config.keep_epochs:  # weights only: a third of last.pt's size
            save_captioner(run.out_dir / f"epoch-{epoch + 1}.pt", run.model, run.tokenizer, run.metadata(metrics))
    run.model.train()
    if run.world > 1:
        dist.barrier()


# ---- objectives: how a batch becomes a loss ----


class Objective:
    """Token cross-entropy. Subclasses change the loss; each owns its extra trainable parameters (`head`) and their
    state in the checkpoint, and names what it logs besides the loss."""

    head: nn.Module | None = None

    def __init__(self, config: TrainConfig):
        self.label_smoothing = config.label_smoothing

    def module(self, model: CaptionModel) -> nn.Module:
        """What the forward pass runs (wrapped for several processes)."""
        return model

    def loss(self, runner: nn.Module, model: CaptionModel, batch: "Batch", seed: int) -> tuple[Tensor, dict]:
        """The batch's loss under autocast, and what else to log; `seed` for any sampling of this micro-batch."""
        _, loss = runner(
            batch.images, batch.input_ids, batch.labels, start_block=batch.start_block, memory_ids=batch.memory_ids,
            label_smoothing=self.label_smoothing,
        )  # fmt: skip
        return loss, {}

    def state(self) -> dict:
        return {} if self.head is None else self.head.state_dict()

    def load_state(self, state: dict) -> None:
        if self.head is not None:
            self.head.load_state_dict(state)


class Distillation(Objective):
    """Cross-entropy plus `distill` times the ImageNet teacher's soft labels learned by a head on the class token
    (distill.py); the head is training-only."""

    def __init__(self, config: TrainConfig, model: CaptionModel, data: "CaptionData", device: torch.device):
        super().__init__(config)
        self.weight = config.distill
        self.teacher = teacher_logits(data.items, flips=config.flip, cache_dir=config.cache_dir)
        with torch.random.fork_rng(devices=[]):  # the head's init, from the seed, leaves the run's random state alone
            torch.manual_seed(config.seed)
            self.distiller = Distiller(model, config.distill_temperature).to(device)
        self.head = self.distiller.head

    def module(self, model: CaptionModel) -> nn.Module:
        return self.distiller

    def loss(self, runner: nn.Module, model: CaptionModel, batch: "Batch", seed: int) -> tuple[Tensor, dict]:
        teacher = _pick(self.teacher, batch.indices, batch.flips).to(batch.images.device)
        caption, distilled = runner(
            batch.images, batch.input_ids, batch.labels, teacher, start_block=batch.start_block,
            label_smoothing=self.label_smoothing,
        )  # fmt: skip
        return caption + self.weight * distilled, {"distill": distilled.item()}


class SelfCritical(Objective):
    """Self-critical sequence training (scst.py): sampled captions rewarded with their CIDEr-D."""

    def __init__(self, config: TrainConfig, data: "CaptionData"):
        super().__init__(config)
        self.samples, self.max_new_tokens = config.scst_samples, data.max_tokens
        self.reward = SelfCriticalReward([item.captions for item in data.items], data.tokenizer)

    def loss(self, runner: nn.Module, model: CaptionModel, batch: "Batch", seed: int) -> tuple[Tensor, dict]:
        loss, mean_reward = scst_loss(
            runner, model, batch.images, batch.start_block, batch.indices, self.reward, samples=self.samples,
            max_new_tokens=self.max_new_tokens, generator=torch.Generator(batch.images.device).manual_seed(seed),
        )  # fmt: skip
        return loss, {"reward": mean_reward}


def build_objective(config: TrainConfig, model: CaptionModel, data: "CaptionData", device: torch.device) -> Objective:
    if config.objective == "scst":
        return SelfCritical(config, data)
    if config.distill:
        return Distillation(config, model, data, device)
    return Objective(config)


# ---- setting up: the out_dir, the splits, the defaults of the kind of run ----

RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "train.log", "epoch-*.pt", "tensorboard")
SMALL_VAL = 100  # fewer val photos than this cannot tell epochs apart (CIDEr swings by +-0.1 and more)
MIN_VAL_PHOTOS = 10


def claim_out_dir(config: TrainConfig) -> None:
    """Refuse an out_dir that holds a run unless it is resumed, or replaced with --overwrite (its files deleted
    first, so that nothing of the old run mixes into the new one); every kind of run, fine-tunes included."""
    out_dir = Path(config.out_dir)
    found = sorted({path for pattern in RUN_FILES for path in out_dir.glob(pattern)})
    if config.resume or not found:
        return
    if not config.overwrite:
        names = ", ".join(path.name for path in found)
        raise CheckpointError(
            f"{out_dir} holds a run ({names}): pass --resume to continue it, --overwrite to replace it, or choose "
            "another --out-dir"
        )
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def training_splits(config: TrainConfig) -> dict[str, list[CaptionedImage]]:
    """The data set's splits; a data set without a val split (a flat folder of captioned photos) gets one: the
    `val_fraction` of its photos whose names hash lowest, the same every time and on every machine."""
    splits = load_captions(config.data)
    if not splits.get("val") and splits.get("train"):
        photos = splits["train"]
        count = max(MIN_VAL_PHOTOS, round(config.val_fraction * len(photos)))
        if len(photos) < 2 * count:
            raise DataError(
                f"{config.data}: {len(photos)} photos, too few to hold {count} out for validation: add photos, or "
                "give a val/ folder beside train/"
            )
        ranked = sorted(photos, key=lambda item: hashlib.sha256(item.image.name.encode()).hexdigest())
        held = {id(item) for item in ranked[:count]}
        splits = {
            **splits,
            "train": [i for i in photos if id(i) not in held],
            "val": [i for i in photos if id(i) in held],
        }
        logger.info("no val split: %d of %d photos held out for validation (--val-fraction)", count, len(photos))
    for split in ("val", *config.train_splits.split(",")):
        if not splits.get(split):
            found = ", ".join(f"{name} ({len(items)})" for name, items in sorted(splits.items())) or "none"
            raise DataError(
                f"{config.data}: no '{split}' split with captions (found: {found}); put photos in train/ and val/ "
                "folders, or give one folder of captioned photos and --val-fraction holds some out"
            )
    if "val" in config.train_splits.split(","):
        logger.warning("training on the val split too: its validation scores no longer measure unseen photos")
    return splits


def mixed_in(config: TrainConfig, count: int) -> list[CaptionedImage]:
    """`mix_weight` x `count` training photos of `mix_data`, trained beside the user's own so that a fine-tune keeps
    the world its starting model knew: the same photos every run (lowest name hashes), each with all its captions."""
    if not config.mix_data:
        return []
    photos = load_captions(config.mix_data).get("train")
    if not photos:
        raise DataError(f"{config.mix_data}: no 'train' split with captions to mix in (--mix-data)")
    wanted = min(len(photos), max(1, round(config.mix_weight * count)))
    chosen = sorted(photos, key=lambda item: hashlib.sha256(item.image.name.encode()).hexdigest())[:wanted]
    logger.info("mixing in %d training photos of %s (--mix-weight %g)", wanted, config.mix_data, config.mix_weight)
    return chosen


def resolve_defaults(
    config: TrainConfig, items: list[CaptionedImage], world: int, saved: dict | None = None
) -> TrainConfig:
    """`config` with its empty settings chosen for the kind of run, each logged: a new model trains its encoder's
    last 4 blocks at 5e-4 with 200 warm-up steps; a fine-tune of --init-from keeps the encoder frozen, learns at
    1e-4 and warms up for at most a tenth of the run; neither trains more captions per image than the data has. A
    resumed run takes them from the run it continues (`saved`)."""
    if saved is not None:
        return dataclasses.replace(
            config, **{name: saved.get(name) for name in RUN_KIND_DEFAULTS if getattr(config, name) is None}
        )
    fine_tune = bool(config.init_from)
    steps = max(1, len(items) // (config.batch_size * world * config.grad_accum)) * config.epochs
    chosen = {
        "unfreeze_blocks": 0 if fine_tune else 4,
        "lr": 1e-4 if fine_tune else 5e-4,
        "warmup_steps": min(200, max(1, steps // 10)) if fine_tune else 200,
        "captions_per_image": min(5, max(len(item.captions) for item in items)),
    }
    empty = {name: value for name, value in chosen.items() if getattr(config, name) is None}
    if empty:
        kind = "a fine-tune" if fine_tune else "a new model"
        logger.info("defaults for %s: %s", kind, ", ".join(f"{name}={value}" for name, value in empty.items()))
    return dataclasses.replace(config, **empty)


RUN_KIND_DEFAULTS = ("unfreeze_blocks", "lr", "warmup_steps", "captions_per_image")


# ---- the pieces of a step ----


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def caption_targets(
    token_lists: Sequence[Sequence[int]], tokenizer: CaptionTokenizer, max_tokens: int
) -> tuple[Tensor, Tensor]:
    """Decoder inputs and labels, the one place where labels are shifted.

    Each caption becomes [BOS] tokens [EOS]; the inputs drop the last position and the labels the first, so the
    model learns to predict every token and EOS from BOS onwards, exactly as it is run at inference. Padding is
    the pad token in the inputs and IGNORE_INDEX in the labels.
    """
    sequences = [[tokenizer.bos_token_id, *tokens[:max_tokens], tokenizer.eos_token_id] for tokens in token_lists]
    width = max(len(sequence) for sequence in sequences) - 1
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        labels[row, : len(sequence) - 1] = torch.tensor(sequence[1:])
    return input_ids, labels


@dataclass(frozen=True)
class Batch:
    """Encoder inputs for some images and `captions_per_image` captions of each, rows grouped by image."""

    indices: tuple[int, ...]  # the images' positions in their CaptionData
    images: Tensor  # pixels (B, 3, H, W), or cached encoder tokens (B, N, C_img) after `start_block` blocks
    start_block: int
    input_ids: Tensor  # (B * captions_per_image, T)
    labels: Tensor  # (B * captions_per_image, T)
    flips: tuple[bool, ...]  # which images are mirrored
    memory_ids: Tensor | None = None  # a retrieval model's memory: the nearest photos' captions (B, k * tokens)


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr: float, grad_clip: float
) -> float:
    """Set the learning rate (scaled per group), clip the gradient norm, update, and clear; returns the norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    scaler.unscale_(optimizer)
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, grad_clip or float("inf")))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---- data: images (cached or read each step) with their tokenised captions ----


class CaptionData:
    """A split's usable images, their encoder inputs and their tokenised captions, served as `Batch`es.

    Encoder inputs are the cached tokens after the frozen blocks where there is a cache, else pixels read from disk.
    Unreadable images are found before training starts (by the cache fill, or by one decoding pass), logged with a
    count, and left out, so an epoch never stops on a bad file.
    """

    def __init__(
        self, items: list[CaptionedImage], model: CaptionModel, tokenizer: CaptionTokenizer, config: TrainConfig,
        *, flip: bool,
    ):  # fmt: skip
        self.tokenizer = tokenizer
        self.captions_per_image = config.captions_per_image
        self.max_tokens = min(config.max_caption_tokens, model.config.n_positions - 1)  # BOS + caption must fit
        self.transform = ImageTransform.for_model(model.config)
        self.pool = ThreadPoolExecutor(config.workers)
        self.start_block, self.tokens, self.flipped = 0, None, None
        frozen = model.encoder.depth - config.unfreeze_blocks
        cached = frozen if config.cache_blocks is None else config.cache_blocks
        if cached > frozen:
            raise ValueError(f"cache_blocks={cached} exceeds the {frozen} frozen encoder blocks")
        if config.cache_dir and cached > 0:
            cache = FeatureCache(os.path.expanduser(config.cache_dir), model, cached)
            usable = cache.fill(items, flips=flip)
            self.items = [items[index] for index in usable]
            self.tokens = cache.load(self.items)
            self.flipped = cache.load(self.items, "flipped") if flip else None
            self.start_block = cached
        else:
            readable = list(self.pool.map(_readable, [item.image for item in items]))
            self.items = [item for item, ok in zip(items, readable, strict=True) if ok]
        self.skipped = len(items) - len(self.items)
        if self.skipped:
            logger.warning("%d of %d images unreadable and left out (see the warnings above)", self.skipped, len(items))
        self.caption_tokens = [[tokenizer.encode(caption) for caption in item.captions] for item in self.items]
        self.flippable = [flip and not any(_MENTIONS_SIDE.search(c) for c in item.captions) for item in self.items]
        self.neighbours: Tensor | None = None  # (N, k) datastore entries each image reads, for a retrieval model
        self.memory_captions: tuple[tuple[str, ...], ...] = ()
        self.memory_tokens = model.config.retrieval_tokens

    def class_tokens(self, model: CaptionModel, device: torch.device) -> Tensor:
        """Every image's class token (N, C_img) from the model's encoder as it is now, unmirrored."""
        rows = []
        with torch.inference_mode():
            for start in range(0, len(self), 64):
                indices = range(start, min(start + 64, len(self)))
                rows.append(model.encoder(self.encoder_inputs(indices, [False] * len(indices)).to(device),
                                          self.start_block)[:, 0].float().cpu())  # fmt: skip
        return torch.cat(rows)

    def datastore(self, model: CaptionModel, device: torch.device) -> Datastore:
        """These images and their captions as a retrieval datastore."""
        names = [item.image.name for item in self.items]
        return Datastore.build(self.class_tokens(model, device), [item.captions for item in self.items], names)

    def retrieve(self, model: CaptionModel, datastore: Datastore, device: torch.device, *, exclude_self: bool) -> None:
        """Find each image's `retrieval_k` nearest photos in `datastore` once (the encoder's class token changes
        little as its last blocks train). With `exclude_self` (the training split, which is the datastore), an image
        never retrieves itself: the model learns to use neighbours, not to copy its own captions."""
        queries = self.class_tokens(model, device) if not exclude_self else datastore.embeddings
        exclude = list(range(len(self))) if exclude_self else None
        self.neighbours = datastore.nearest(queries, model.config.retrieval_k, exclude)[0]
        self.memory_captions = datastore.captions
        logger.info("retrieval: %d nearest photos for each of %d images", self.neighbours.shape[1], len(self))

    def memory(self, indices: Sequence[int], random: torch.Generator | None) -> Tensor | None:
        """The memory of images `indices`: one caption of each neighbour (random with `random`, else the first)."""
        if self.neighbours is None:
            return None
        rows = []
        for index in indices:
            row = []
            for neighbour in self.neighbours[index].tolist():
                choices = self.memory_captions[neighbour]
                pick = int(torch.randint(len(choices), (1,), generator=random)) if random is not None else 0
                row.append(choices[pick])
            rows.append(row)
        return memory_ids(rows, self.tokenizer, self.memory_tokens)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: Sequence[int], random: torch.Generator | None, device: torch.device) -> Batch:
        """Images `indices` with `captions_per_image` captions each (cycled where an image has fewer). With
        `random`: a random first caption and random mirroring; without: the first captions, unmirrored."""
        flips = [
            self.flippable[i] and random is not None and bool(torch.rand(1, generator=random) < 0.5) for i in indices
        ]
        captions = []
        for index in indices:
            choices = self.caption_tokens[index]
            start = int(torch.randint(len(choices), (1,), generator=random)) if random is not None else 0
            captions += [choices[(start + k) % len(choices)] for k in range(self.captions_per_image)]
        input_ids, labels = caption_targets(captions, self.tokenizer, self.max_tokens)
        images = self.encoder_inputs(indices, flips).to(device)
        memory = self.memory(indices, random)
        return Batch(
            tuple(indices), images, self.start_block, input_ids.to(device), labels.to(device), tuple(flips),
            None if memory is None else memory.to(device),
        )  # fmt: skip

    def encoder_inputs(self, indices: Sequence[int], flips: Sequence[bool]) -> Tensor:
        if self.tokens is not None:
            return _pick({"tokens": self.tokens, "flipped": self.flipped}, indices, flips)
        pictures = list(self.pool.map(load_image, [self.items[index].image for index in indices]))
        return self.transform(pictures, flip=list(flips))


def _pick(variants: dict[str, Tensor], indices: Sequence[int], flips: Sequence[bool]) -> Tensor:
    """Rows `indices` of the "tokens" variant, or of the "flipped" one where the image is mirrored, in float32."""
    rows = [variants["flipped" if flip else "tokens"][index] for index, flip in zip(indices, flips, strict=True)]
    return torch.stack(rows).float()


def _readable(path: Path) -> bool:
    try:
        load_image(path)
        return True
    except ImageError as error:
        logger.warning("skipping unreadable image: %s", error)
        return False


# ---- building, resuming, optimizing ----


# The training settings that shape a new model: those named like a ModelConfig field. Two are applied apart: the
# vocabulary is the tokenizer's size, and retrieval is added to any model (`with_retrieval`).
MODEL_OVERRIDES = tuple(
    sorted(
        (
            {item.name for item in dataclasses.fields(TrainConfig)}
            & {item.name for item in dataclasses.fields(ModelConfig)}
        )
        - {"vocab_size", "retrieval_k"}
    )
)


def build_new(config: TrainConfig, train_items: list[CaptionedImage]) -> tuple[CaptionModel, CaptionTokenizer]:
    preset = PRESETS[config.preset]
    overrides = {name: getattr(config, name) for name in MODEL_OVERRIDES}
    base = dataclasses.replace(preset, **{name: value for name, value in overrides.items() if value is not None})
    if config.decoder:
        tokenizer = load_gpt2_tokenizer(config.decoder)
    else:
        captions = [caption for item in train_items for caption in item.captions]
        tokenizer = train_caption_tokenizer(captions, config.vocab_size or preset.vocab_size)
    model = from_parts(
        base.encoder,
        config.decoder or None,
        encoder_pretrained=config.encoder_pretrained,
        encoder_weights=config.encoder_weights or None,
        image_size=base.image_size,
        base=base,
        vocab_size=tokenizer.vocab_size,
    )
    if model.config.vocab_size != tokenizer.vocab_size:
        raise DataError(f"decoder vocabulary {model.config.vocab_size} != tokenizer's {tokenizer.vocab_size}")
    return model, tokenizer


def read_recipe(path: Path) -> dict:
    """A recipe file's settings: a JSON object whose keys are TrainConfig fields (a "//" key may say what it is)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a JSON object of training settings")
    values.pop("//", None)
    unknown = sorted(set(values) - {item.name for item in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)} (python train.py --help lists them)")
    return values


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    defaults = {item.name: item.default for item in dataclasses.fields(TrainConfig)}  # for fields added since
    different = [
        f"{name} ({saved.get(name, defaults[name])!r} there, {getattr(config, name)!r} now)"
        for name in RESUME_MUST_MATCH
        if saved.get(name, defaults[name]) != getattr(config, name)
    ]
    if different:
        raise CheckpointError(
            f"{path}: refusing to resume with a different configuration: {'; '.join(different)}. "
            "Use the original flags, or start a new --out-dir (--init-from to start from its weights)"
        )


def parameter_groups(model: CaptionModel, config: TrainConfig, head: nn.Module | None = None) -> list[dict]:
    """AdamW groups: matrices decay, biases and norms do not; the encoder's trainable blocks learn slower than the
    decoder and the objective's own `head` (if any: distillation's)."""
    encoder = {id(p) for p in model.encoder.trainable_parameters(config.unfreeze_blocks)}
    frozen = {id(p) for p in model.encoder.parameters()} - encoder
    groups: dict[tuple[str, bool], list] = {
        (part, decay): [] for part in ("decoder", "encoder", "objective head") for decay in (True, False)
    }
    for parameter in model.parameters():
        if id(parameter) not in frozen:
            part = "encoder" if id(parameter) in encoder else "decoder"
            groups[(part, parameter.dim() >= 2)].append(parameter)
    for parameter in head.parameters() if head is not None else ():
        groups[("objective head", parameter.dim() >= 2)].append(parameter)
    result = []
    for (part, decay), parameters in groups.items():
        if parameters:
            scale = config.encoder_lr_scale if part == "encoder" else 1.0
            weight_decay = config.weight_decay if decay else 0.0
            result.append({"params": parameters, "weight_decay": weight_decay, "lr_scale": scale, "name": part})
            logger.info(
                "optimizer group %s (decay %s): %d tensors, %d parameters",
                part, weight_decay, len(parameters), sum(p.numel() for p in parameters),
            )  # fmt: skip
    return result


def setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = default_device() if config.device == "auto" else torch.device(config.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _distributed(model: CaptionModel, device: torch.device) -> nn.Module:
    """The model wrapped for several processes; made anew when the set of trainable parameters changes."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---- validation ----


def validate(
    model: CaptionModel,
    tokenizer: CaptionTokenizer,
    data: CaptionData,
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict:
    """Validation loss on every image, caption metrics on `eval_images` images, and a few sample captions."""
    model.eval()
    total_loss, total_tokens, encoded = 0.0, 0, []
    count = len(data) if not config.eval_images else min(config.eval_images, len(data))
    for start in range(0, len(data), config.batch_size):
        batch = data.batch(range(start, min(start + config.batch_size, len(data))), None, device)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            image_tokens = model.encode(batch.images, batch.start_block, batch.memory_ids)  # once for loss and captions
            tokens = int((batch.labels != IGNORE_INDEX).sum())
            total_loss += float(caption_loss(model.decode(batch.input_ids, image_tokens), batch.labels)) * tokens
            total_tokens += tokens
            if start < count:
                encoded.append(image_tokens[: count - start].float())
    metrics = {"val_loss": round(total_loss / max(1, total_tokens), 4)}
    captioner = Captioner(model, tokenizer, device=device)
    decode = DecodeConfig(strategy="beam", num_beams=config.eval_beams, max_new_tokens=data.max_tokens)
    texts = [  # a batch at a time: the decoding cache of every val photo at once would not fit in memory
        caption.text
        for tokens in encoded
        for caption in captioner.caption(EncodedImages(tokens, includes_memory=True), decode)
    ]
    for item, text in list(zip(data.items, texts, strict=False))[:4]:
        logger.info("  %s: %s  (reference: %s)", item.image.name, text, item.captions[0])
    if texts:
        metrics["distinct"] = round(distinct_ratio(texts), 3)
        try:
            references = {str(i): list(item.captions) for i, item in enumerate(data.items[: len(texts)])}
            scores = score_captions(references, {str(i): text for i, text in enumerate(texts)})
            metrics |= {name: round(value, 4) for name, value in scores.items()}
            logger.info("validation: %s", format_metrics(scores))
        except JavaMissingError as error:
            logger.warning("no caption metrics: %s", error)
    return metrics


# ---- logs ----


def _setup_logging(out_dir: Path, is_main: bool) -> None:
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log, from rank 0
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(handler)


def _tensorboard(out_dir: Path):
    """A TensorBoard writer under out_dir/tensorboard where the `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _board(board, scalars: dict, step: int) -> None:
    if board is not None:
        for name, value in scalars.items():
            board.add_scalar(name, value, step)


CSV_COLUMNS = ("epoch", "step", "epoch_seconds", "val_loss", "distinct", *METRICS)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _append_csv(path: Path, metrics: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(metrics)


def main(argv: Sequence[str] | None = None) -> int:
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument(
        "--config", type=Path, help="a recipe: a JSON object of these settings (configs/); flags override it"
    )
    known, _ = recipe.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter, parents=[recipe]
    )
    try:
        defaults = read_recipe(known.config) if known.config else {}
    except (OSError, ValueError) as error:
        parser.error(str(error))
    add_arguments(parser, TrainConfig, defaults=defaults)
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train(from_arguments(TrainConfig, arguments))
    except (ValueError, CheckpointError, DataError, TeacherMissingError) as error:
        logger.error("error: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
