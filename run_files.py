"""The files of a training run, beside its checkpoint: ckpt.pt -> ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt.

The log is one JSON record per line (train-loss records every --log-interval steps,
evaluation records at every evaluation), so it can be read while the run is going and
cut back to the checkpoint's step when a run resumes. The plot is redrawn from the log
at each evaluation; the samples file collects what the model wrote at each one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class RunFiles:
    """ckpt.pt -> ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt"""

    def __init__(self, out: str | Path):
        out = Path(out)
        stem = out.with_suffix("")
        self.checkpoint = out
        self.log = Path(f"{stem}.log.jsonl")
        self.plot = Path(f"{stem}.loss.png")
        self.samples = Path(f"{stem}.samples.txt")

    def start(self, resume_step: int | None) -> None:
        """A new run starts fresh files; a resumed run drops log records past its checkpoint."""
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for path in (self.log, self.samples, self.plot):
                path.unlink(missing_ok=True)
            return
        if self.log.exists():
            kept = [r for r in self.records() if r["step"] <= resume_step]
            self.log.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    def append_log(self, record: dict) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def append_sample(self, header: str, text: str) -> None:
        with open(self.samples, "a", encoding="utf-8") as f:
            f.write(f"=== {header}\n{text}\n\n")

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_plot(self, title: str) -> None:
        """Train and val loss against tokens seen."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
        evals = [r for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if train:
            ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="train (batch)")
        for key, color, label in (("eval_train_loss", "tab:blue", "train (eval)"), ("val_loss", "tab:orange", "val")):
            points = [(r["tokens"], r[key]) for r in evals if key in r]
            if points:
                ax.plot(*zip(*points), "o-", color=color, ms=3, label=label)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot.with_name("." + self.plot.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.plot)
