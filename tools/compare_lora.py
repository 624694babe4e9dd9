"""LoRA against full tuning, on the same run: the table of docs/lora.md.

    python -m tools.compare_lora --init ckpt.pt                          # full tuning and r = 4, 8, 16, 64
    python -m tools.compare_lora --init ckpt.pt --ranks 0,8 --max-iters 200 --num-titles 50   # a quicker look

Each variant is one `python finetune.py --init ckpt.pt --lora-rank R` (R = 0: full tuning),
with every other flag the same, so all see the same samples in the same order for the
same steps; each runs in a process of its own, so its peak memory is its own. Then
`evaluate.py` writes poems for --num-titles unseen titles with each. Printed, and written
to --out-dir/table.md:

    trainable parameters (count, share)   what reaches the optimizer
    checkpoint                            the file on disk (weights or adapters, with the optimizer state)
    peak RSS                              the process's maximum resident memory (the CPU's peak memory)
    s/step                                median of the steps' times in the log (evaluation excluded)
    finetune-val loss                     the response loss of title -> poem on finetune-val, at the end
    stop, regular form                    on the unseen titles (evaluate.py)

A variant whose run at --out-dir/r{R}.pt already finished is measured from its saved
figures (--out-dir/r{R}.json) instead of trained again; an unfinished one is resumed. So
an interrupted comparison continues where it stopped, and a finished one reprints its table
(figures measured with other settings are refused: give another --out-dir).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError
from tanggpt.atomic import atomic_write_text
from tanggpt.checkpoint import load_checkpoint
from tanggpt.cli import flag, run_cli

REPO = Path(__file__).resolve().parents[1]  # the runs are the root commands finetune.py and evaluate.py


@dataclass
class CompareConfig:
    init: str = flag("ckpt.pt", "the pretrained checkpoint every variant tunes")
    ranks: str = flag("0,4,8,16,64", "comma-separated LoRA ranks to run; 0 = full tuning")
    out_dir: str = flag("lora_runs", "folder for the variants' checkpoints, logs, figures and the table")
    max_iters: int = flag(0, "steps of every run (0 = finetune.py's default: its --epochs over the samples)")
    num_titles: int = flag(200, "unseen finetune-val titles each variant writes poems for")
    poems: str = flag("", "folder of poem JSON files (default: poems/)")
    finetune_flags: str = flag("", "more finetune.py flags for every variant, e.g. '--lora-alpha 32 --device cpu'")

    def rank_list(self) -> list[int]:
        try:
            ranks = [int(r) for r in self.ranks.split(",") if r.strip()]
        except ValueError:
            raise UserError(f"--ranks must be comma-separated whole numbers, got {self.ranks!r}") from None
        if not ranks or any(r < 0 for r in ranks):
            raise UserError(f"--ranks must list ranks >= 0 (0 = full tuning), got {self.ranks!r}")
        return ranks


def run_measured(argv: list[str]) -> int:
    """Run a script in its own process; return its peak resident memory in bytes (Linux reports KiB)."""
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise UserError(f"{' '.join(argv[:1])} failed (exit {process.returncode}): {' '.join(argv)}")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_variant(config: CompareConfig, rank: int, out_dir: Path) -> dict:
    """Train (or resume) one variant, evaluate it, and save its figures beside its checkpoint."""
    # Absolute paths: the runs' working directory is the repository, wherever this was started from.
    ckpt_path, figures_path, peak_path = (out_dir.resolve() / f"r{rank}{suffix}" for suffix in (".pt", ".json", ".rss"))
    settings = {"init": str(Path(config.init).resolve()), "max_iters": config.max_iters,
                "finetune_flags": config.finetune_flags, "num_titles": config.num_titles}
    if figures_path.exists() and ckpt_path.exists():
        figures = json.loads(figures_path.read_text(encoding="utf-8"))
        if figures["settings"] != settings:
            raise UserError(f"--out-dir {out_dir}: {figures_path} was measured with other settings "
                            f"({figures['settings']}); give another --out-dir")
        return figures
    poems = ["--poems", str(Path(config.poems).resolve())] if config.poems else []
    # --log-interval 1: every step's time is logged, and s/step is their median.
    argv = ["finetune.py", "--init", settings["init"], "--out", str(ckpt_path), "--lora-rank", str(rank), *poems,
            "--log-interval", "1",
            *(["--max-iters", str(config.max_iters)] if config.max_iters else []), *config.finetune_flags.split()]
    if ckpt_path.exists():
        argv = ["finetune.py", "--resume", "--out", str(ckpt_path), *poems]
    # A resumed run's peak is the larger of its two processes' (kept in r{R}.rss between them).
    peak = max(run_measured(argv), int(peak_path.read_text()) if peak_path.exists() else 0)
    atomic_write_text(peak_path, str(peak))
    log = [json.loads(line) for line in ckpt_path.with_suffix(".log.jsonl").read_text(encoding="utf-8").splitlines()]
    ckpt = load_checkpoint(ckpt_path, "--out-dir")
    trained = sum(t.numel() for t in ckpt["model"].values())
    evaluation = out_dir / f"r{rank}.evaluate.json"
    with open(evaluation, "w", encoding="utf-8") as f:
        subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(ckpt_path), "--num-titles",
                        str(config.num_titles), "--task-prompts", "0", "--json", *poems], cwd=REPO, check=True,
                       stdout=f)
    columns = json.loads(evaluation.read_text(encoding="utf-8"))["checkpoints"][str(ckpt_path)]
    figures = {
        "settings": settings, "rank": rank, "trainable": trained if rank else columns["parameters"], "total": columns["parameters"],
        "checkpoint_bytes": ckpt_path.stat().st_size, "peak_rss_bytes": peak,
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in log if "seconds_per_step" in r),
        "steps": ckpt["step"], "val_loss": [r["val_loss"] for r in log if "val_loss" in r][-1],
        "stop_rate": columns["stop_rate"], "regular_form_rate": columns["regular_form_rate"],
        "title_gain": columns["title_gain"],
    }
    atomic_write_text(figures_path, json.dumps(figures, indent=1))
    return figures


def format_table(rows: list[dict], num_titles: int) -> str:
    full = next((r for r in rows if r["rank"] == 0), None)
    lines = ["| tuning | trainable parameters | checkpoint | peak RSS | s/step | finetune-val loss | stop | "
             "regular form | title gain |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "full" if r["rank"] == 0 else f"LoRA r = {r['rank']}"
        speed = f"{r['seconds_per_step']:.3f}" + (f" ({r['seconds_per_step'] / full['seconds_per_step']:.2f}×)"
                                                  if full and r is not full else "")
        lines.append(f"| {name} | {r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | "
                     f"{r['checkpoint_bytes'] / 2**20:.2f} MiB | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {speed} | "
                     f"{r['val_loss']:.3f} | {r['stop_rate']:.1%} | {r['regular_form_rate']:.1%} | "
                     f"{r['title_gain']:.2f} |")
    return "\n".join(lines) + f"\n\n{rows[0]['steps']} steps each; stop and regular form on {num_titles} unseen titles."


def main(argv: list[str] | None = None) -> str:
    return run_cli(run, CompareConfig, argv, __doc__.splitlines()[0])


def run(config: CompareConfig, explicit: set[str]) -> str:
    ranks = config.rank_list()
    if config.max_iters < 0 or config.num_titles <= 0:
        raise UserError("--max-iters must not be negative and --num-titles must be positive")
    load_checkpoint(config.init, "--init")  # a bad --init fails now, not inside the first run
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rank in ranks:
        print(f"=== {'full tuning' if rank == 0 else f'LoRA rank {rank}'} ===", flush=True)
        rows.append(measure_variant(config, rank, out_dir))
    table = format_table(rows, config.num_titles)
    atomic_write_text(out_dir / "table.md", table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
