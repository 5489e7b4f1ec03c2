"""Metrics to experiment trackers, besides metrics.jsonl and its plot (`trainer.report_to`):

  tensorboard  event files under <output_dir>/tensorboard (needs the `tensorboard` package)
  wandb        a Weights & Biases run in <output_dir> (needs `wandb`; WANDB_MODE=offline works
               without an account or a network)

Every numeric metric of a record goes out as `<split>/<name>` at the record's step (train/loss,
eval/loss, ...), so the trackers show what metrics.jsonl holds. Only the main process reports.
"""

from __future__ import annotations

import os

from fastalign.errors import ConfigError

REPORTERS = ("tensorboard", "wandb")


def check_report_to(names) -> tuple:
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ConfigError(f"trainer.report_to: unknown tracker(s) {unknown}; choose from {list(REPORTERS)}")
    return tuple(dict.fromkeys(names))


def _scalars(record: dict) -> dict:
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, output_dir: str, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("trainer.report_to: tensorboard needs the tensorboard package "
                              "(pip install tensorboard)") from None
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, output_dir: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("trainer.report_to: wandb needs the wandb package (pip install wandb; "
                              "WANDB_MODE=offline runs without an account)") from None
        self.run = wandb.init(dir=output_dir, config=config)

    def write(self, record: dict) -> None:
        split = record.get("split", "train")
        self.run.log({f"{split}/{k}": v for k, v in _scalars(record).items()}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_reporters(names, output_dir: str, config: dict) -> list:
    """The trackers named in `names` (checked), opened for a run writing to output_dir."""
    kinds = {"tensorboard": TensorBoard, "wandb": WandB}
    return [kinds[n](output_dir, config) for n in check_report_to(names)]
