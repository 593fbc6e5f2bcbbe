"""Live training display: loss curve with ETA, it/s and GPU memory; static image when headless."""
from __future__ import annotations

import io
import time

from .widgets import headless


class LossPlot:
    """Call ``update(record)`` each step; the figure redraws at most every ``every_s`` seconds in
    a live notebook. Headless, it prints a line every ``print_every`` steps and draws once in
    ``finish()``, so executed notebooks hold one image instead of hundreds."""

    def __init__(self, total_steps: int, every_s: float = 2.0, print_every: int = 10):
        self.total = total_steps
        self.every_s = every_s
        self.print_every = print_every
        self.records: list[dict] = []
        self._last_draw = 0.0
        self._handle = None
        self.live = not headless()

    def update(self, rec: dict) -> None:
        self.records.append(rec)
        if self.live:
            if time.time() - self._last_draw >= self.every_s or rec["step"] >= self.total:
                self._draw()
        elif rec["step"] % self.print_every == 0 or rec["step"] == self.total:
            print(self.status_line(rec), flush=True)

    def status_line(self, rec: dict) -> str:
        mem = f", GPU {rec['mem_gib']:.1f} GiB" if "mem_gib" in rec else ""
        mem += f", eval loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else ""
        return (f"step {rec['step']}/{self.total}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                f"{rec['it_s']:.2f} it/s  ETA {_fmt_s(rec['eta_s'])}{mem}")

    def figure(self):
        import matplotlib

        if not self.live:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from ..report import plot_eval

        fig, ax = plt.subplots(figsize=(7, 3))
        steps = [r["step"] for r in self.records]
        losses = [r["loss"] for r in self.records]
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        if len(losses) >= 5:
            k = max(2, len(losses) // 20)
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
        plot_eval(ax, self.records)
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        if self.records:
            ax.set_title(self.status_line(self.records[-1]), fontsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def _draw(self) -> None:
        from IPython.display import Image, display
        import matplotlib.pyplot as plt

        fig = self.figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        img = Image(buf.getvalue())
        if self._handle is None:
            self._handle = display(img, display_id=True)
        else:
            self._handle.update(img)
        self._last_draw = time.time()

    def finish(self) -> None:
        if self.records:
            self._draw()


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
