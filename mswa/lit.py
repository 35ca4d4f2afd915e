"""Lightning glue: the training task (around a model built elsewhere: it knows no model family), the data
module and the callbacks a run needs."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as LightningThroughput
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from mswa.atomic import write_atomic
from mswa.config import OptimConfig
from mswa.data.batches import IGNORE, EvalChunks, RandomCrops
from mswa.data.corpus import Corpus
from mswa.flops import machine_matmul_rate
from mswa.metrics import SummedNLL, by_distance, by_kind, metrics_from_sums


class RunError(RuntimeError):
    """A run stopped by a fault the user can act on; the message says what to do."""


class NonFiniteLossError(RunError):
    pass


class RunInterrupted(BaseException):
    """A signal that stops a run now. Not a KeyboardInterrupt: Lightning turns those into a bare `SystemExit: 1`.
    ``status`` is what the run records: ``interrupted`` (Ctrl-C) or ``preempted`` (a scheduler's signal)."""

    def __init__(self, message: str, status: str = "interrupted"):
        super().__init__(message)
        self.status = status


# The signals that stop a run at a step boundary: how a message names each, and what the stop records.
# SIGTERM is what a scheduler sends to stop a job (preemption, `scancel`, the time limit); SIGUSR1 is the
# warning SLURM sends some seconds before the time limit when asked to (`--signal=USR1@120`, conf/launcher/slurm.yaml).
STOP_SIGNALS = {
    signal.SIGINT: ("Ctrl-C", "interrupted"),
    signal.SIGTERM: ("SIGTERM", "preempted"),
    signal.SIGUSR1: ("SIGUSR1", "preempted"),
}


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LanguageModelTask(L.LightningModule):
    """Trains and evaluates ``model`` (``token_nll(x, y)``, ``n_params()``, and optionally ``training_penalty()``: a
    term added to the training loss, with values to log); ``spec``, the keywords it was built
    from, and the name of the ``dataset`` it trains on are saved with every checkpoint so that a resume can check
    it is of the same model (and say when it comes from another dataset)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig | None,
        unit: str,
        compile: bool = False,
        spec: dict | None = None,
        dataset: str | None = None,
    ):
        super().__init__()
        hyper = {"model": spec, "optim": optim and dataclasses.asdict(optim), "unit": unit, "compile": compile, "dataset": dataset}
        self.save_hyperparameters(hyper)
        self.model = model
        self.frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        self.strict_loading = not self.frozen  # checkpoints of a partly frozen model hold only what trains
        self.unit, self.optim = unit, optim
        self.token_nll = torch.compile(self.model.token_nll) if compile else self.model.token_nll
        self.eval_nll = SummedNLL()
        self.eval_results: dict[str, float] = {}  # full-precision copy of the last val/test metrics
        self.eval_details: dict[str, dict] = {}  # "val" / "test" -> cost, loss by distance, bpc by kind

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.token_nll(x, y).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True)
        penalty = self.model.training_penalty() if hasattr(self.model, "training_penalty") else None
        if penalty is not None:  # a term the model adds to what it minimises (learned spans: their budget)
            term, logged = penalty
            self.log_dict(logged)
            return loss + term
        return loss

    def _eval_step(self, batch) -> None:
        x, y, *kinds = batch
        self.eval_nll.update(self.token_nll(x, y), y != IGNORE, *kinds)

    def _eval_epoch_end(self, stage: str) -> None:
        sums = {name: value.cpu() for name, value in self.eval_nll.compute().items()}
        self.eval_nll.reset()
        scalars = metrics_from_sums(sums["nll_sum"].item(), sums["count"].item(), self.unit)
        data = self.trainer.datamodule  # None when the trainer was given bare dataloaders
        if isinstance(data, CorpusDataModule):
            self.eval_details[stage] = data.breakdown(stage, sums)
            scalars |= {f"bpc_{row['kind']}": row["bpc"] for row in self.eval_details[stage].get("by_kind", [])}
        for name, value in scalars.items():
            self.eval_results[f"{stage}/{name}"] = value
            # already summed across ranks by the metric, so no sync_dist
            self.log(f"{stage}/{name}", value, prog_bar=name in ("bpc", "ppl"))
        self.log("step", float(self.measured_step()))  # Lightning logs the metrics at this step, not its own count

    def measured_step(self) -> int:
        """The optimizer steps the weights being evaluated have taken, the step every metric is logged at (as the
        training loss, computed before its batch's update, is): validation after 125 steps at 125, a checkpoint
        evaluated after training at the step it was saved."""
        trainer = self.trainer
        if trainer.state.fn != "fit" and trainer.ckpt_path:
            return self.loaded_step
        return trainer.global_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loaded_step = checkpoint["global_step"]

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave out frozen weights (a 7B base model would make every checkpoint 13 GB); they are
        reloaded from the pretrained checkpoint, not from ours."""
        for name in self.frozen:
            checkpoint["state_dict"].pop(name, None)

    def on_train_start(self) -> None:
        """A resumed optimiser and scheduler come back with the checkpoint's hyper-parameters; the configured
        optim.* replace them (moments and step count are kept), so a run resumed with a lower optim.lr uses it.
        On a fresh run, or a resume with the same settings, this sets the values they already hold."""
        optimizer, scheduler = self.optimizers(use_pl_optimizer=False), self.lr_schedulers()
        lr = self.optim.lr
        factor = warmup_cosine(scheduler.last_epoch, self.optim.warmup_steps, self.trainer.max_steps, self.optim.min_lr_ratio)
        for group, decay in zip(optimizer.param_groups, (self.optim.weight_decay, 0.0)):
            group.update(initial_lr=lr, lr=lr * factor, betas=tuple(self.optim.betas), weight_decay=decay)
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    def configure_optimizers(self):
        """AdamW; matrices decay, norms, biases and the 1-D rest do not."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.optim.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas))
        max_steps = self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.optim.warmup_steps, max_steps, self.optim.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CorpusDataModule(L.LightningDataModule):
    """Random crops for training (batch index = global step, so resuming continues the data order);
    evaluation chunks of ``eval_seq_len`` advancing by ``eval_stride`` (defaults: ``seq_len``, then
    ``eval_seq_len``), with the kind of every target when the corpus labels them."""

    STAGE_SPLITS = {"val": "valid", "test": "test"}

    def __init__(
        self,
        corpus: Corpus,
        seq_len: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        val_max_tokens: int | None = None,
        aligned_chunks: bool = False,
        eval_seq_len: int | None = None,
        eval_stride: int | None = None,
    ):
        super().__init__()
        self.corpus, self.seq_len, self.seed, self.aligned_chunks = corpus, seq_len, seed, aligned_chunks
        self.batch_size, self.eval_batch_size, self.val_max_tokens = batch_size, eval_batch_size, val_max_tokens
        self.eval_seq_len = eval_seq_len or seq_len
        self.eval_stride = eval_stride or self.eval_seq_len

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world_size = self._rank_world()
        start = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0
        crops = RandomCrops(
            self.corpus.splits["train"], self.seq_len, self.batch_size, self.seed, rank, start, self.aligned_chunks, world_size
        )
        return DataLoader(crops, batch_size=None)

    def eval_chunks(self, split: str, max_tokens: int | None = None, rank: int = 0, world_size: int = 1) -> EvalChunks:
        kinds = (self.corpus.kinds or {}).get(split)
        return EvalChunks(self.corpus.splits[split], self.eval_seq_len, rank, world_size, max_tokens, self.eval_stride, kinds)

    def _eval_loader(self, split: str, max_tokens: int | None) -> DataLoader:
        chunks = self.eval_chunks(split, max_tokens, *self._rank_world())
        return DataLoader(chunks, batch_size=self.eval_batch_size, shuffle=False)

    def val_dataloader(self):
        return self._eval_loader("valid", self.val_max_tokens)

    def test_dataloader(self):
        return self._eval_loader("test", None)

    @property
    def eval_settings(self) -> dict:
        return {"seq_len": self.eval_seq_len, "stride": self.eval_stride}

    def breakdown(self, stage: str, sums: dict) -> dict:
        """What a finished evaluation pass of ``stage`` adds to its metrics: its cost (forward tokens
        per scored target), loss by distance and, for corpora that label kinds, bpc per kind."""
        split = self.STAGE_SPLITS[stage]
        max_tokens = self.val_max_tokens if stage == "val" else None
        details = {
            "targets": int(sums["count"]),
            "forward_tokens_per_target": self.eval_chunks(split, max_tokens).forward_tokens_per_target,
            "by_distance": by_distance(sums, self.corpus.unit, self.eval_seq_len),
        }
        if self.corpus.kinds and split in self.corpus.kinds:
            whole = max_tokens is None or max_tokens + 1 >= len(self.corpus.splits[split])  # floors are the whole split's
            floors = self.corpus.kind_floor_bpb[split] if whole else [None] * len(self.corpus.kind_names)
            details["by_kind"] = by_kind(sums, self.corpus.kind_names, floors)
            details["floor_bpc"] = self.corpus.split_floor_bpb[split] if whole else None
        return details


class Throughput(L.Callback):
    """Logs training tokens/s and, given the model's FLOPs per token, MFU (all ranks); keeps the run's means for
    results.json. MFU is the model's FLOPs per second (`mswa.flops`: window-aware) over this machine's peak matmul
    rate (fp32 on CPU, bf16 on a GPU), measured when training starts and, for results.json, again when it ends,
    keeping the faster: a run that starts while the machine is busy would otherwise divide by a slow rate and
    read high. Lightning's `Throughput` meter averages it over the last `window` batches for the progress bar."""

    def __init__(self, batch_size: int, seq_len: int, flops_per_token: float | None = None, skip_first: int = 2, window: int = 5):
        self.batch_size, self.tokens_per_batch = batch_size, batch_size * seq_len
        self.flops_per_token, self.skip_first, self.window = flops_per_token, skip_first, window
        self.peak_flops_per_s, self.meter, self.world_size = None, None, 1
        self.tokens, self.seconds, self._last, self._seen, self._train_seconds = 0, 0.0, None, 0, 0.0

    def on_train_start(self, trainer, pl_module):
        self.world_size = trainer.world_size
        if self.flops_per_token is not None:
            self.peak_flops_per_s = machine_matmul_rate(pl_module.device)
            self.meter = LightningThroughput(available_flops=self.peak_flops_per_s, world_size=trainer.world_size, window_size=self.window)

    def on_train_end(self, trainer, pl_module):
        if self.peak_flops_per_s is not None:
            self.peak_flops_per_s = max(self.peak_flops_per_s, machine_matmul_rate(pl_module.device, again=True))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._last
        self._seen += 1
        tokens = self.tokens_per_batch * trainer.world_size
        if self._seen > self.skip_first:  # the first batches pay for warm-up and compilation
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + elapsed
        pl_module.log("perf/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)
        if self.meter is not None:
            self._train_seconds += elapsed
            self.meter.update(
                time=self._train_seconds,
                batches=self._seen,
                samples=self._seen * self.batch_size,
                lengths=self._seen * self.tokens_per_batch,
                flops=self.tokens_per_batch * self.flops_per_token,
            )
            mfu = self.meter.compute().get("device/mfu")
            if mfu is not None:
                pl_module.log("perf/mfu", mfu, prog_bar=True)

    @property
    def mean_tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    @property
    def mean_mfu(self) -> float | None:
        """The run's mean MFU (after the first batches), per device."""
        if self.mean_tokens_per_s is None or self.peak_flops_per_s is None:
            return None
        return self.mean_tokens_per_s / self.world_size * self.flops_per_token / self.peak_flops_per_s


def save_resumable_checkpoint(trainer, path) -> None:
    """Save a full checkpoint (weights, optimizer, loops) to resume from. Lightning's `weights_only` argument is
    passed (as False) so that it does not log that it was left unset; it concerns what is saved, not how a file is
    loaded: every checkpoint is read with torch's weights_only=True (`read_checkpoint`)."""
    trainer.save_checkpoint(path, False)


class GracefulInterrupt(L.Callback):
    """A context for the whole run. The first stop signal (:data:`STOP_SIGNALS`) during training finishes the
    current step (or the validation under way), saves ``last.ckpt`` there and stops, so that the run resumes
    exactly (a checkpoint taken mid-step would resume one step off). A second signal, or one before or after
    training (setup, final evaluation), raises RunInterrupted at once. Under DDP the ranks agree at each step
    boundary on a signal any of them received, so a signal to one process stops them all there."""

    def __init__(self, path: str):
        self.path, self.training, self._previous = path, False, {}
        self.received: signal.Signals | None = None  # the first signal this process received
        self.stopped_by: signal.Signals | None = None  # the signal the ranks agreed to stop on

    @property
    def requested(self) -> bool:
        return self.stopped_by is not None

    def stop(self) -> RunInterrupted:
        """What the run raises once training has stopped at the signal's step boundary."""
        name, status = STOP_SIGNALS[self.stopped_by]
        return RunInterrupted(name, status)

    def __enter__(self) -> GracefulInterrupt:
        self._install()
        return self

    def __exit__(self, *_) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _install(self) -> None:
        """Our handler for every stop signal (from the main thread, the only one Python lets set them)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.signal(signum, self._on_signal)
                self._previous.setdefault(signum, previous)

    def _on_signal(self, signum: int, _frame) -> None:
        name, status = STOP_SIGNALS[signal.Signals(signum)]
        if self.received is not None:  # the first signal's status stands: a requeue after SIGUSR1 then SIGTERM
            first, status = STOP_SIGNALS[self.received]
            raise RunInterrupted(f"a second {name}" if first == name else f"{name} after {first}", status)
        if not self.training:
            raise RunInterrupted(name, status)
        self.received = signal.Signals(signum)
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
        # a raw write: print() here could re-enter a stderr write the progress bar is in the middle of
        os.write(2, f"\n{name}: finishing this step, then saving checkpoints/last.ckpt; {again} stops at once\n".encode())

    def on_train_start(self, trainer, pl_module):
        self.training = True
        # Lightning set its own SIGTERM handler as fit began (it raises mid-loop, after the batch, without a
        # checkpoint of ours); during training ours alone answer, and Lightning restores them when fit ends
        self._install()

    def on_train_end(self, trainer, pl_module):
        self.training = False

    def _stop_at_boundary(self, trainer) -> None:
        if trainer.should_stop:
            return
        signum = self.received or 0
        if trainer.world_size > 1:  # a signal any rank received (the highest number, 0: none); every rank calls this here
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device), reduce_op="max"))
        if signum:
            self.stopped_by = signal.Signals(signum)
            save_resumable_checkpoint(trainer, self.path)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stop_at_boundary(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self.training:  # a validation during fit: the step it follows is complete
            self._stop_at_boundary(trainer)


class Heartbeat(L.Callback):
    """Calls ``beat`` when training starts (after a resumed checkpoint has loaded), then at most every
    ``every_s`` seconds during training, validation and testing, so that a run's record tells a live run
    from one killed without a word."""

    def __init__(self, beat: Callable[[], None], every_s: float):
        self.beat, self.every_s, self._last = beat, every_s, time.monotonic()

    def _maybe_beat(self, *_) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.beat()

    def on_train_start(self, trainer, pl_module):
        self._last = time.monotonic()
        self.beat()

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _maybe_beat


class FolderCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saved state names its files relative to its folder, and is re-based on the folder
    it is loaded into: a copied or moved run resumes with, and evaluates, its own checkpoints. Always one
    file per name (no ``best-v1.ckpt`` beside a stale ``best.ckpt`` after a resume)."""

    PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def __init__(self, **kwargs):
        super().__init__(enable_version_counter=False, **kwargs)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("dirpath")
        state.update({key: Path(state[key]).name if state[key] else "" for key in self.PATH_KEYS})
        state["best_k_models"] = {Path(path).name: score for path, score in state["best_k_models"].items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Names (or the absolute paths of older checkpoints) become paths in this callback's folder. A best
        checkpoint that is not there (a resume from another run's checkpoint) starts the tracking afresh."""
        if state_dict.get("best_model_path") and not Path(self._here(state_dict["best_model_path"])).is_file():
            return
        state = {**state_dict, "dirpath": self.dirpath}
        state.update({key: self._here(state[key]) for key in self.PATH_KEYS if key in state})
        state["best_k_models"] = {self._here(path): score for path, score in state.get("best_k_models", {}).items()}
        super().load_state_dict(state)

    def _here(self, path: str) -> str:
        return str(Path(self.dirpath, Path(path).name)) if path else ""


class UnsafeCheckpointError(ValueError):
    """A file that would run code when loaded: refused unread."""


def read_checkpoint(path: str | Path, map_location="cpu", mmap: bool = True) -> dict:
    """A checkpoint as AtomicCheckpointIO wrote it, on the CPU and memory-mapped unless told otherwise (a tensor is
    read when used). Only tensors and plain values are unpickled (``weights_only``: our checkpoints hold nothing
    else), so a crafted file cannot run code: it raises UnsafeCheckpointError naming what it holds. Torch's own
    error when the file is not a checkpoint at all."""
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:
        try:  # names the objects without unpickling them
            foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a zip checkpoint: nothing to name
            foreign = []
        if not foreign:
            raise
        raise UnsafeCheckpointError(
            f"{path} holds objects that could run code on loading ({', '.join(sorted(foreign))}), which no checkpoint of "
            "train.py holds; it was not loaded: give a .ckpt that train.py wrote"
        ) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name in their own folder and renamed when complete: a full disk or
    a kill never leaves half a checkpoint under its real name. (Lightning's own transaction writes to the
    system's temp folder and copies across file systems, which is not atomic.) Read back, by Lightning's
    ``ckpt_path=`` too, through :func:`read_checkpoint`, whatever ``weights_only`` Lightning asks for."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(Path(path), buffer.getbuffer())

    def load_checkpoint(self, path, map_location="cpu", weights_only=None) -> dict:
        return read_checkpoint(path, map_location, mmap=False)  # read whole, as Lightning does: its states are updated in place
