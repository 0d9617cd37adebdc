"""Progress bar, TensorBoard scalars, loss/AP history and the `curves.png` plot (rank 0 only)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgd_deploy.io_utils import atomic_open

logger = logging.getLogger(__name__)


class TrainingLog:
    """Everything a human watches during training.

    `history` holds one entry per logged step ({"iter", "lr", losses...}) and per evaluation
    ({"iter", "AP", ...}, marked "eval": True); it is stored in checkpoints so curves survive a
    resume.
    """

    def __init__(self, work_dir: Path, *, enabled: bool, log_every: int = 20) -> None:
        self.work_dir = work_dir
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.history: list[dict[str, Any]] = []
        self._bar = None
        self._tb = None
        self._sums: dict[str, float] = {}
        self._count = 0
        self._images = 0
        self._t0 = time.perf_counter()

    def start(self, total_iters: int, done: int) -> None:
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_iters,
                initial=done,
                desc="train",
                unit="it",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        except ImportError:
            self._bar = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.work_dir / "tensorboard"))
        except (ImportError, ModuleNotFoundError):
            self._tb = None
        self._t0 = time.perf_counter()

    def step(self, iteration: int, values: dict[str, float], images: int, lr: float) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        self._images += images
        if self._bar is not None:
            self._bar.update(1)
        if iteration % self.log_every and iteration != 1:
            return
        means = {k: v / self._count for k, v in self._sums.items()}
        elapsed = time.perf_counter() - self._t0
        rate = self._images / max(elapsed, 1e-9)
        self.history.append({"iter": iteration, "lr": lr, **means})
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        else:
            logger.info("iter %d loss %.4f lr %.2e %.1f img/s", iteration, means["loss"], lr, rate)
        if self._tb is not None:
            for k, v in means.items():
                self._tb.add_scalar(f"train/{k}", v, iteration)
            self._tb.add_scalar("train/lr", lr, iteration)
            self._tb.add_scalar("train/images_per_s", rate, iteration)
        self._sums, self._count, self._images = {}, 0, 0
        self._t0 = time.perf_counter()

    def eval(self, iteration: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        self.history.append({"iter": iteration, "eval": True, **metrics})
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"val/{k}", v, iteration)

    def epoch_summary(self, table: str, stats: Any) -> None:
        if not self.enabled:
            return
        message = table
        if stats.failures:  # each file is named once, when first found (Trainer)
            message += f"\n{len(stats.failures)} unreadable image(s) skipped in this epoch"
            if stats.skipped_batches:
                message += f" ({stats.skipped_batches} batch(es) without a readable image)"
        if self._bar is not None:
            self._bar.write(message)
        else:
            logger.info("\n%s", message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot_curves(self, path: Path) -> Path | None:
        """Losses (left) and validation AP (right) over iterations, as a PNG."""
        if not self.enabled or not self.history:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib not installed: no %s", path)
            return None
        steps = [h for h in self.history if not h.get("eval")]
        evals = [h for h in self.history if h.get("eval")]
        fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
        keys = sorted({k for h in steps for k in h if k not in ("iter", "lr")})
        for key in keys:
            pts = [(h["iter"], h[key]) for h in steps if key in h and math.isfinite(h[key])]
            if pts:
                ax_loss.plot(*zip(*pts), label=key, linewidth=2.0 if key == "loss" else 1.0)
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7, ncol=2)
        ax_loss.set_title("training losses")
        for key in ("AP", "AP50", "AP75", "MR2", "JI"):
            pts = [(h["iter"], 100 * h[key]) for h in evals if key in h]
            if pts:
                ax_ap.plot(*zip(*pts), marker="o", label=key)
        ax_ap.set_xlabel("iteration")
        ax_ap.set_ylabel("%")
        ax_ap.set_title("validation")
        if evals:
            ax_ap.legend()
        fig.suptitle(str(self.work_dir))
        fig.tight_layout()
        try:
            with atomic_open(path) as fh:
                fig.savefig(fh, format="png", dpi=100)
        finally:
            plt.close(fig)
        return path


class UnreadableImages:
    """Training images that could not be read: each named once, in a warning, when first found
    (they fail again in every epoch), and counted in the summary."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.reasons: dict[str, str] = {}  # file name -> reason, in order of discovery

    def note(self, failures: Sequence[tuple[str, str]]) -> None:
        """Record (file name, reason) pairs; warn about the new ones."""
        for name, reason in failures:
            if name not in self.reasons:
                self.reasons[name] = reason
                if self.enabled:
                    logger.warning("unreadable training image, skipped in every epoch: %s", reason)

    def __len__(self) -> int:
        return len(self.reasons)

    def listing(self) -> list[str]:
        return list(self.reasons.values())

    def summary(self) -> str:
        return f"{len(self)} unreadable training image(s) were skipped (each named when found)"
