"""The files of a training run, beside its checkpoint: ckpt.pt -> ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt.

The log is one JSON record per line (train-loss records every --log-interval steps,
evaluation records at every evaluation), so it can be read while the run is going and
cut back to the checkpoint's step when a run resumes. The plot is redrawn from the log
at each evaluation; the samples file collects what the model wrote at each one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data.errors import UserError
from tanggpt.atomic import atomic_write, atomic_write_text, check_output, same_file


class RunFiles:
    """ckpt.pt -> ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt

    A run owns the files at its --out. `prepare` is called before any long work: it makes
    sure the checkpoint can be written there, and that a new run never deletes or mixes
    with another run's files unless asked (--overwrite), while --resume continues them.

    --overwrite deletes nothing up front. When training starts (`start`, after every input
    was checked) the previous run's files are moved aside into a hidden folder beside
    them (`previous`); they are deleted once the new run saves its first checkpoint
    (`replaced`), and put back if it stops before that (`put_back`), so an --overwrite
    run that fails or is interrupted never leaves the user with neither run. A kill
    (SIGKILL, power) in between leaves the folder: the next run at --out settles it.
    """

    def __init__(self, out: str | Path):
        out = Path(out)
        stem = out.with_suffix("")
        self.checkpoint = out
        self.log = Path(f"{stem}.log.jsonl")
        self.plot = Path(f"{stem}.loss.png")
        self.samples = Path(f"{stem}.samples.txt")
        self.previous = out.with_name(f".{out.name}.previous")  # the run an --overwrite run replaces

    def paths(self) -> tuple[Path, ...]:
        """Every file of the run."""
        return self.checkpoint, self.log, self.plot, self.samples

    def outputs(self) -> dict[str, Path]:
        """The run's files by name, for refuse_inputs_as_outputs."""
        return {"--out": self.checkpoint, "--out's log": self.log, "--out's plot": self.plot,
                "--out's samples": self.samples}

    def existing(self) -> list[Path]:
        return [p for p in self.paths() if p.exists()]

    def prepare(self, resume: bool, overwrite: bool) -> list[str]:
        """Check --out before any work: a file path in a folder we can write, holding no other
        run unless resuming it (or --overwrite). Returns notes to print."""
        out, folder = self.checkpoint, self.checkpoint.parent
        check_output(out, "--out", example=f"a checkpoint file, such as {out / 'ckpt.pt'}")
        notes = []
        for stale in folder.glob(f".{out.name}.tmp-*"):  # a save that a kill cut short; the checkpoint is whole
            stale.unlink(missing_ok=True)
            notes.append(f"removed {stale}, a partial save left by an interrupted run")
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one process settles it
            notes += self.settle_previous()
        existing = self.existing()
        if existing and not resume:
            names = ", ".join(p.name for p in existing)
            if not overwrite:
                raise UserError(f"--out {out}: a run is already there ({names}); continue it with --resume, "
                                "or replace it with --overwrite")
            notes.append(f"--overwrite: the previous run's {names} will be replaced when this run saves its first "
                         "checkpoint (kept until then)")
        return notes

    def start(self, resume_step: int | None, overwrite: bool = False) -> None:
        """A new run needs a clean --out (see prepare): with overwrite, the previous run is moved
        aside (see the class doc). A resumed run drops log records past its checkpoint."""
        if resume_step is None:
            existing = self.existing()
            if existing and not overwrite:
                raise UserError(f"--out {self.checkpoint}: a run is already there; use --resume or --overwrite")
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            if existing:
                self.previous.mkdir()
                for path in existing:
                    os.replace(path, self.previous / path.name)
            return
        if self.log.exists():
            kept = [r for r in self.records() if r["step"] <= resume_step]
            atomic_write_text(self.log, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def replaced(self) -> None:
        """The new run saved its first checkpoint: the run it replaces can go."""
        shutil.rmtree(self.previous, ignore_errors=True)

    def put_back(self) -> bool:
        """The new run stopped before its first checkpoint: remove what it wrote, and put the
        run it was to replace back in place. Returns whether there was one to put back."""
        if not self.previous.is_dir():
            return False
        for path in self.paths():
            path.unlink(missing_ok=True)
        for path in self.previous.iterdir():
            os.replace(path, self.checkpoint.parent / path.name)
        self.previous.rmdir()
        return True

    def settle_previous(self) -> list[str]:
        """A `previous` folder left by a killed --overwrite run: if that run saved a checkpoint,
        it replaced the old one (delete the folder); if not, the old run comes back."""
        if not self.previous.is_dir():
            return []
        if self.checkpoint.exists():
            self.replaced()
            return [f"removed {self.previous}: the run an --overwrite run replaced (that run had saved its checkpoint)"]
        self.put_back()
        return [f"put back the run in {self.previous}: the --overwrite run that was to replace it was stopped "
                "before its first checkpoint"]

    def append_log(self, record: dict) -> None:
        # backslashreplace: text that reached a run unchecked (half a UTF-16 pair) is escaped, never a crash
        with open(self.log, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def append_sample(self, header: str, text: str) -> None:
        with open(self.samples, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"=== {header}\n{text}\n\n")

    def records(self) -> list[dict]:
        """The log's records. A last line without its newline is a write a kill cut short: skipped."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(encoding="utf-8").split("\n")
        records = []
        for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or the cut-short write
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{self.log}:{number}: not a JSON record ({e.msg}); move the log aside to go on") from None
        return records

    def write_plot(self, title: str, ylabel: str = "loss (nats per token)") -> None:
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
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.plot, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)


def refuse_inputs_as_outputs(outputs: dict[str, Path], inputs: dict[str, Path], corpus: str | Path = "") -> None:
    """No output of a run is one of its inputs, nor another of its outputs: one line naming both.

    `outputs` and `inputs` map a name ("--out", "--out's log", "--pairs", "--init", ...) to
    a path; the flag to change is the name's first word. A JSON output in the `corpus`
    folder would be read as a poem file by the next run: refused too. Checked before
    anything is read for long or written, whatever the other flags (--overwrite included).
    """
    named = list(outputs.items())
    for i, (name, path) in enumerate(named):
        flag = name.split("'")[0]
        clashes = [(other, p) for other, p in named[:i] if same_file(path, p)] + \
                  [(other, p) for other, p in inputs.items() if p and same_file(path, Path(p))]
        if clashes:
            other = clashes[0][0]
            what = "one of its own inputs" if other in inputs else "another file it writes"
            raise UserError(f"{name} {path} is also {other}: the run would write over {what}; give another {flag}")
        if corpus and path.suffix == ".json" and same_file(path.parent, Path(corpus)):
            raise UserError(f"{name} {path} is in the --poems folder {corpus}: every .json file there is read as "
                            f"poems; give another {flag}")
