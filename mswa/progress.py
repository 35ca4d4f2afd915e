"""What a run shows while it runs, and where its messages go.

A run's messages (its window table, one line per validation, its summary, warnings) go through ``logging``
under ``mswa``: train.py's Hydra logging config (conf/hydra/job_logging/mswa.yaml) writes them into the job's
``train.log``, and :func:`show_on_console` prints them as they are (warnings and errors on stderr), tagged with the
job in a multirun. Progress is a bar of steps on a terminal that one run has to itself, and one plain line per
validation everywhere else: parallel jobs' bars on one stream overwrite each other, and a bar written to a file
is hundreds of redraws.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

PACKAGE_LOGGER = "mswa"
# Lightning prints through loggers of its own; under train.py they go where the run's messages go
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
log = logging.getLogger(__name__)


class JobFormatter(logging.Formatter):
    """The message as it is, every line of it after the job's tag in a multirun (parallel jobs' lines interleave)."""

    def __init__(self, job: str | None):
        super().__init__("%(message)s")
        self.prefix = f"[{job}] " if job else ""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.prefix + line for line in super().format(record).split("\n"))


def console_handlers(job: str | None) -> list[logging.Handler]:
    """Messages on stdout, warnings and errors on stderr, each tagged with the job in a multirun."""
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(JobFormatter(job))
    return [out, err]


def show_on_console(job: str | None) -> None:
    """train.py, once Hydra has set up the job's log file on the root logger: the run's messages, Python warnings and
    Lightning's messages go to the console and into that file."""
    root = logging.getLogger()
    for handler in console_handlers(job):
        root.addHandler(handler)
    root.mswa_console = True  # messages_shown: train.py shows them already
    logging.captureWarnings(True)
    for name in LIGHTNING_LOGGERS:
        lightning = logging.getLogger(name)
        lightning.handlers.clear()
        lightning.propagate = True


@contextmanager
def messages_shown() -> Iterator[None]:
    """A train() call that nothing shows the messages of (a script, a notebook; train.py's logging does) prints them
    on the console for its duration."""
    package = logging.getLogger(PACKAGE_LOGGER)
    if getattr(logging.getLogger(), "mswa_console", False):  # not hasHandlers(): pytest's and notebooks' capture handlers show nothing
        yield
        return
    handlers, level = console_handlers(None), package.level
    for handler in handlers:
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            package.removeHandler(handler)
        package.setLevel(level)


def progress(job: str | None, shares_output: bool) -> ProgressBar:
    """Bars on a terminal the run has to itself; otherwise (a file, a pipe, parallel jobs on one stream) lines."""
    if sys.stdout.isatty() and not shares_output:
        return StepProgressBar(job)
    return ValidationLines()


def shown_metrics(metrics: dict) -> str:
    """The progress bar's metrics as words: ``val/bpc 2.3456, train/loss 1.2345, 10,963 tokens/s``."""
    words = []
    for name, value in metrics.items():
        if name == "perf/tokens_per_s":
            words.append(f"{value:,.0f} tokens/s")
        elif name == "perf/mfu":
            words.append(f"MFU {100 * value:.1f}%")
        elif isinstance(value, (int, float)):
            words.append(f"{name} {value:.4f}")
    return ", ".join(words)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ValidationLines(ProgressBar):
    """One line when training starts, one per validation (step, metrics, time spent and left) and one per final
    pass, through logging: readable in a file and when parallel jobs share one stream."""

    def __init__(self):
        super().__init__()
        self.enabled, self.started, self.first_step = True, 0.0, 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    @property
    def is_enabled(self) -> bool:
        return self.enabled

    def _say(self, line: str) -> None:
        if self.enabled:
            log.info(line)

    def on_train_start(self, trainer, pl_module):
        self.started, self.first_step = time.monotonic(), trainer.global_step
        self._say(f"training from step {trainer.global_step} to {trainer.max_steps}")

    def on_validation_start(self, trainer, pl_module):
        self.pass_started = time.monotonic()

    def on_test_start(self, trainer, pl_module):
        self.pass_started = time.monotonic()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._say(self._step_line(trainer))
        else:
            self._say(self._pass_line(trainer, "val", "full validation pass"))

    def on_test_end(self, trainer, pl_module):
        self._say(self._pass_line(trainer, "test", "test pass"))

    def _step_line(self, trainer) -> str:
        step, spent = trainer.global_step, time.monotonic() - self.started
        done = step - self.first_step
        left = f", ~{duration(spent / done * (trainer.max_steps - step))} left" if done else ""
        return f"step {step}/{trainer.max_steps}: {shown_metrics(trainer.progress_bar_metrics)} ({duration(spent)} in{left})"

    def _pass_line(self, trainer, stage: str, what: str) -> str:
        metrics = {name: value for name, value in trainer.progress_bar_metrics.items() if name.startswith(f"{stage}/")}
        return f"{what}: {shown_metrics(metrics)} ({duration(time.monotonic() - self.pass_started)})"


class StepProgressBar(TQDMProgressBar):
    """``step N/max_steps``, tagged with the job in a multirun. A run is one endless epoch, so Lightning's own bar
    reads ``Epoch 0/-2``, and a resume (mid-epoch) would count from 0: this one bar is made at the step training
    starts from, and only counts up from there (its rate is this attempt's steps over this attempt's time)."""

    def __init__(self, job: str | None = None):
        super().__init__()
        self.job = job

    def _tagged(self, text: str) -> str:
        return f"[{self.job}] {text}" if self.job else text

    @property
    def train_description(self) -> str:
        return self._tagged("step")

    @property
    def validation_description(self) -> str:
        return self._tagged("validation")

    @property
    def test_description(self) -> str:
        return self._tagged("test")

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(
            desc=self.train_description,
            total=trainer.max_steps,
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer, *args):
        """Nothing: Lightning's would reset the bar to the epoch's batches and name it ``Epoch 0``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the W&B run id, not progress
        return metrics

    def on_exception(self, trainer, pl_module, exception):
        for bar in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar):
            if bar is not None:
                bar.close()  # so the error is printed on a line of its own
