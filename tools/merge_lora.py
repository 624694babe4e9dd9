"""Fold a LoRA adapter checkpoint into its base: an ordinary checkpoint, as fast as the base.

    python -m tools.merge_lora --ckpt ckpt_sft_lora.pt                      # -> ckpt_sft_lora_merged.pt
    python -m tools.merge_lora --ckpt ckpt_sft_lora.pt --out ckpt_sft_m.pt --base moved/ckpt.pt

A run with --lora-rank saves its adapters alone (a few percent of the model), with the
path and fingerprint of the base checkpoint they were trained on. sample.py and
evaluate.py read such a checkpoint as it is, merging on the fly; this script does the
merge once, W + (alpha / r) B A for every adapted layer (lora.merge_adapters), and writes
a checkpoint that needs no base: to share the model, to tune it further with another
--init, or to load it anywhere a full checkpoint goes. The merged model computes what
the adapted one did, to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.errors import UserError
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer, model_checkpoint, save_checkpoint
from tanggpt.atomic import check_output
from tanggpt.cli import flag, run_cli


@dataclass
class MergeConfig:
    ckpt: str = flag("", "the adapter checkpoint to merge (from finetune.py or align.py with --lora-rank)")
    out: str = flag("", "where to write the merged checkpoint (default: --ckpt's name with _merged)")
    base: str = flag("", "the base checkpoint, when it is no longer at the path the adapters recorded")
    overwrite: bool = flag(False, "replace --out if it exists (without it, an existing file is refused)")

    def output(self) -> Path:
        return Path(self.out) if self.out else Path(self.ckpt).with_name(f"{Path(self.ckpt).stem}_merged.pt")


def main(argv: list[str] | None = None) -> Path:
    return run_cli(run, MergeConfig, argv, __doc__.splitlines()[0])


def run(config: MergeConfig, explicit: set[str]) -> Path:
    if not config.ckpt:
        raise UserError("--ckpt: give the adapter checkpoint to merge, e.g. --ckpt ckpt_sft_lora.pt")
    out = config.output()
    check_output(out, "--out", {"the adapter checkpoint --ckpt": config.ckpt, "the base checkpoint --base": config.base})
    if out.exists() and not config.overwrite:
        raise UserError(f"--out {out} exists; give another --out, or --overwrite to replace it")
    ckpt = load_checkpoint(config.ckpt, "--ckpt")
    if "lora" not in ckpt:
        raise UserError(f"--ckpt {config.ckpt} holds no LoRA adapters (an ordinary checkpoint): nothing to merge")
    if not config.base:
        # The base is then read from the path the adapters recorded, or else from beside them
        # (checkpoint.base_model): --overwrite must not replace it with the merged model.
        recorded = Path(ckpt["lora"]["base"])
        base = recorded if recorded.is_file() else Path(config.ckpt).parent / recorded.name
        check_output(out, "--out", {"the base checkpoint of the adapters": base})
    model, tokenizer = model_and_tokenizer(ckpt, config.ckpt, config.base)
    spec = ckpt["lora"]
    # An ordinary checkpoint: what sample.py, evaluate.py and --init read. No training state:
    # the merged model starts new runs, it does not continue the adapters' one.
    save_checkpoint(out, model_checkpoint(ckpt["kind"], model, tokenizer,
                                          merged_from={"adapters": str(Path(config.ckpt).resolve()), **spec}))
    print(f"merged LoRA rank {spec['rank']} ({spec['targets']} layers) of {config.ckpt} into its base "
          f"{config.base or spec['base']}: {out} ({model.num_params():,} parameters, {out.stat().st_size / 2**20:.1f} MiB)")
    return out


if __name__ == "__main__":
    main()
