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
an interrupted comparison continues where it stopped, and a finished one reprints its table.
What decides a variant's run (the --init weights, the corpus, --max-iters, --finetune-flags,
the rank) is recorded beside it (r{R}.settings.json) and checked before any variant runs: a
leftover run made otherwise is refused (give another --out-dir), never continued; figures
measured on another --num-titles are measured again, with a note.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from data.corpus import corpus_fingerprint, corpus_folder
from data.errors import UserError
from tanggpt.atomic import atomic_write_text, check_output, same_file
from tanggpt.checkpoint import load_checkpoint, model_fingerprint
from tanggpt.cli import flag, run_cli

REPO = Path(__file__).resolve().parents[1]  # the runs are the root commands finetune.py and evaluate.py

# finetune.py flags this tool sets itself for each variant: given again in --finetune-flags they
# would change a variant behind its label (--lora-rank 8 in the "full" row) or its files.
OWN_FLAGS = ("--init", "--out", "--lora-rank", "--poems", "--log-interval", "--max-iters", "--resume", "--overwrite")
# What one variant leaves in --out-dir: finetune.py's run files, then this tool's.
RUN_SUFFIXES = (".pt", ".log.jsonl", ".loss.png", ".samples.txt")
OWN_SUFFIXES = (".settings.json", ".rss", ".evaluate.json", ".json")
FIGURES = {"rank": int, "trainable": int, "total": int, "checkpoint_bytes": int, "peak_rss_bytes": int,
           "seconds_per_step": float, "steps": int, "val_loss": float, "stop_rate": float, "regular_form_rate": float,
           "title_gain": float, "settings": dict}


@dataclass
class CompareConfig:
    init: str = flag("ckpt.pt", "the pretrained checkpoint every variant tunes")
    ranks: str = flag("0,4,8,16,64", "comma-separated LoRA ranks to run; 0 = full tuning")
    out_dir: str = flag("lora_runs", "folder for the variants' checkpoints, logs, figures and the table")
    max_iters: int = flag(0, "steps of every run (0 = finetune.py's default: its --epochs over the samples)")
    num_titles: int = flag(200, "unseen finetune-val titles each variant writes poems for")
    poems: str = flag("", "folder of poem JSON files (default: poems/)")
    finetune_flags: str = flag("", "more finetune.py flags for every variant, e.g. '--lora-alpha 32 --device cpu' "
                                   f"(not {', '.join(OWN_FLAGS)}: this tool sets those itself)")

    def rank_list(self) -> list[int]:
        try:
            ranks = [int(r) for r in self.ranks.split(",") if r.strip()]
        except ValueError:
            raise UserError(f"--ranks must be comma-separated whole numbers, got {self.ranks!r}") from None
        if not ranks or any(r < 0 for r in ranks):
            raise UserError(f"--ranks must list ranks >= 0 (0 = full tuning), got {self.ranks!r}")
        if len(set(ranks)) < len(ranks):
            raise UserError(f"--ranks lists a rank twice, got {self.ranks!r}")
        return ranks

    def extra_flags(self) -> list[str]:
        """--finetune-flags as finetune.py's argv, split as a shell would; flags this tool sets are refused."""
        try:
            flags = shlex.split(self.finetune_flags)
        except ValueError as e:
            raise UserError(f"--finetune-flags {self.finetune_flags!r}: {e}") from None
        for token in flags:
            name = token.split("=", 1)[0]
            name = "--" + name[len("--no-"):] if name.startswith("--no-") else name
            if name in OWN_FLAGS:
                raise UserError(f"--finetune-flags: {token} is set by compare_lora itself for each variant "
                                f"({', '.join(OWN_FLAGS)}); use its own flags (--ranks, --init, --poems, --max-iters, "
                                "--out-dir)")
        return flags


def run_measured(argv: list[str], stdout: IO | None = None) -> int:
    """Run a script in its own process; return its peak resident memory in bytes (Linux reports KiB).
    A failed run is one line (the script has said why above it)."""
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=stdout)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise UserError(f"{argv[0]} failed (exit {process.returncode}): {shlex.join(argv)}; finished variants are "
                        "kept, and the same command continues from there")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def read_json(path: Path, remedy: str) -> object:
    """A JSON file this tool (or a run it started) wrote, or one line naming it and what is wrong."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {remedy}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}: cut short?); "
                        f"{remedy}") from None


def read_figures(path: Path, rank: int) -> dict:
    """A variant's saved figures, checked to hold every number the table prints."""
    remedy = f"delete it to measure rank {rank} again"
    figures = read_json(path, remedy)
    if not isinstance(figures, dict):
        raise UserError(f"{path}: expected a JSON object of figures; {remedy}")
    for key, kind in FIGURES.items():
        value = figures.get(key)
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise UserError(f"{path}: {key!r} is {'missing' if key not in figures else repr(value)}, not "
                            f"{'a number' if kind is not dict else 'an object'}; {remedy}")
    if figures["rank"] != rank or figures["total"] <= 0:
        raise UserError(f"{path}: holds the figures of rank {figures['rank']} (total {figures['total']}), not of "
                        f"rank {rank}; {remedy}")
    return figures


def read_log(path: Path) -> list[dict]:
    """finetune.py's log of a run: one JSON object per line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); delete the variant's files to run it "
                            "again") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def differences(saved: dict, now: dict) -> str:
    """What changed between two settings records, in words."""
    changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    return "; ".join(f"{key} {saved.get(key, 'not recorded')!r}, now {now.get(key, 'not recorded')!r}"
                     for key in changed)


def plan_variant(config: CompareConfig, rank: int, out_dir: Path, settings: dict) -> str:
    """What measure_variant does with rank `rank`, checked before any variant runs: "reuse" its
    figures, "measure" them again (a finished run, another --num-titles), "resume" its run, or
    "train" it. A leftover run of other settings is refused, never continued."""
    paths = variant_paths(out_dir, rank)
    if not paths[".pt"].exists():
        return "train"
    remedy = f"give another --out-dir (or delete {out_dir}/r{rank}.* to run rank {rank} again)"
    if not paths[".settings.json"].exists():
        raise UserError(f"--out-dir {out_dir}: {paths['.pt'].name} was left by a run whose settings were not "
                        f"recorded, so it cannot be told to match these; {remedy}")
    saved = read_json(paths[".settings.json"], remedy)
    train = {k: v for k, v in settings.items() if k != "num_titles"}
    if not isinstance(saved, dict) or saved != train:
        changed = differences(saved, train) if isinstance(saved, dict) else "not a JSON object"
        raise UserError(f"--out-dir {out_dir}: {paths['.pt'].name} was trained with other settings ({changed}); "
                        f"{remedy}")
    if not paths[".json"].exists():
        return "resume"
    figures = read_figures(paths[".json"], rank)
    if figures["settings"] == settings:
        return "reuse"
    if {k: v for k, v in figures["settings"].items() if k != "num_titles"} == train:
        print(f"note: {paths['.json'].name} was measured on --num-titles {figures['settings'].get('num_titles')}; "
              f"measuring rank {rank} again on {config.num_titles}")
        return "measure"
    raise UserError(f"--out-dir {out_dir}: {paths['.json'].name} was measured with other settings "
                    f"({differences(figures['settings'], settings)}); {remedy}")


def variant_paths(out_dir: Path, rank: int) -> dict[str, Path]:
    """Every file of rank `rank`'s variant, by suffix (absolute: the runs' working directory is the repository)."""
    return {suffix: out_dir.resolve() / f"r{rank}{suffix}" for suffix in (*RUN_SUFFIXES, *OWN_SUFFIXES)}


def measure_variant(config: CompareConfig, rank: int, out_dir: Path, settings: dict, plan: str) -> dict:
    """Train (or resume) one variant as `plan` says, evaluate it, and save its figures beside its checkpoint."""
    paths = variant_paths(out_dir, rank)
    ckpt_path, peak_path = paths[".pt"], paths[".rss"]
    if plan == "reuse":
        return read_figures(paths[".json"], rank)
    poems = ["--poems", settings["poems"]]
    if plan == "train":
        # A run killed before its first save left a log but no checkpoint: nothing to resume,
        # and its peak memory is not this run's. --overwrite clears its files.
        peak_path.unlink(missing_ok=True)
        atomic_write_text(paths[".settings.json"], json.dumps({k: v for k, v in settings.items() if k != "num_titles"},
                                                              indent=1))
        # --log-interval 1: every step's time is logged, and s/step is their median.
        argv = ["finetune.py", "--init", settings["init"], "--out", str(ckpt_path), "--lora-rank", str(rank), *poems,
                "--log-interval", "1", "--overwrite",
                *(["--max-iters", str(config.max_iters)] if config.max_iters else []), *settings["finetune_flags"]]
    else:
        argv = ["finetune.py", "--resume", "--out", str(ckpt_path), *poems]
    if plan in ("train", "resume"):
        # A resumed run's peak is the larger of its two processes' (kept in r{R}.rss between them).
        peak = max(run_measured(argv), read_peak(peak_path))
        atomic_write_text(peak_path, str(peak))
    else:
        peak = read_peak(peak_path)
    log = read_log(paths[".log.jsonl"])
    ckpt = load_checkpoint(ckpt_path, "--out-dir")
    trained = sum(t.numel() for t in ckpt["model"].values())
    with tempfile.TemporaryFile() as f:  # evaluate.py's JSON on stdout; kept only once it is whole
        run_measured(["evaluate.py", "--ckpt", str(ckpt_path), "--num-titles", str(config.num_titles),
                      "--task-prompts", "0", "--json", *poems], stdout=f)
        f.seek(0)
        evaluation = f.read().decode("utf-8", "replace")
    atomic_write_text(paths[".evaluate.json"], evaluation)
    report = read_json(paths[".evaluate.json"], "evaluate.py wrote no JSON report")
    columns = report.get("checkpoints", {}).get(str(ckpt_path)) if isinstance(report, dict) else None
    if not isinstance(columns, dict):
        raise UserError(f"{paths['.evaluate.json']}: evaluate.py reported no figures for {ckpt_path}")
    step_times = [r["seconds_per_step"] for r in log if "seconds_per_step" in r]
    val_losses = [r["val_loss"] for r in log if "val_loss" in r]
    if not step_times or not val_losses:
        raise UserError(f"{paths['.log.jsonl']}: the run logged no {'step time' if not step_times else 'val loss'}; "
                        f"delete {out_dir}/r{rank}.* to run rank {rank} again")
    figures = {
        "settings": settings, "rank": rank, "trainable": trained if rank else columns["parameters"], "total": columns["parameters"],
        "checkpoint_bytes": ckpt_path.stat().st_size, "peak_rss_bytes": peak,
        "seconds_per_step": statistics.median(step_times), "steps": ckpt["step"], "val_loss": val_losses[-1],
        "stop_rate": columns["stop_rate"], "regular_form_rate": columns["regular_form_rate"],
        "title_gain": columns["title_gain"],
    }
    atomic_write_text(paths[".json"], json.dumps(figures, indent=1))
    return figures


def read_peak(path: Path) -> int:
    """The peak memory a variant's earlier process recorded (0: none)."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit():
        raise UserError(f"{path}: expected a number of bytes, got {text[:40]!r}; delete it (the peak is then this "
                        "process's alone)")
    return int(text)


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
    extra = config.extra_flags()
    if config.max_iters < 0 or config.num_titles <= 0:
        raise UserError("--max-iters must not be negative and --num-titles must be positive")
    out_dir = Path(config.out_dir)
    check_output(out_dir / "table.md", "--out-dir")  # a folder we can write in, not a file
    init = load_checkpoint(config.init, "--init")  # a bad --init fails now, not inside the first run
    poems = corpus_folder(config.poems or None)
    if same_file(poems, out_dir):
        raise UserError(f"--out-dir {out_dir} is the --poems folder: the variants' JSON files would join the corpus; "
                        "give another --out-dir")
    for rank in ranks:
        for path in variant_paths(out_dir, rank).values():
            check_output(path, "--out-dir", {"--init": config.init})
    # What decides a variant's run: a leftover one is reused only if all of it matches.
    settings = {"init": str(Path(config.init).resolve()), "init_weights": model_fingerprint(init["model"]),
                "poems": str(poems.resolve()), "corpus": corpus_fingerprint(poems), "max_iters": config.max_iters,
                "finetune_flags": extra, "num_titles": config.num_titles}
    del init
    plans = {rank: plan_variant(config, rank, out_dir, {**settings, "rank": rank}) for rank in ranks}
    rows = []
    for rank in ranks:
        print(f"=== {'full tuning' if rank == 0 else f'LoRA rank {rank}'} ===", flush=True)
        rows.append(measure_variant(config, rank, out_dir, {**settings, "rank": rank}, plans[rank]))
    table = format_table(rows, config.num_titles)
    atomic_write_text(out_dir / "table.md", table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
