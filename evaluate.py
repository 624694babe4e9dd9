"""Measure what instruction tuning changed: generate poems for unseen titles and score them.

    python evaluate.py --ckpt ckpt_sft.pt --compare ckpt.pt
    python evaluate.py --ckpt ckpt_sft.pt --num-titles 200 --temperature 0.8 --max-new-tokens 200 --json

Titles are the first --num-titles of the finetune-val split (never trained on). Each
checkpoint gets the same instruction prompt, <INS>請用以下題目寫一首詩<INP>{title}<RES>,
and the table reports per checkpoint: how often it stopped with end-of-text within the
limit, how often the poem has regular form, mean length and distinct-2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from data.corpus import load_corpus
from data.tokenizer import tokenizer_from_dict
from device import setup_runtime
from metrics import generation_figures
from sampling import answer_titles
from training import USER_ERRORS, load_checkpoint, model_from_checkpoint


def evaluate_checkpoint(path: str, titles: list[str], args, runtime) -> dict:
    ckpt = load_checkpoint(path, "--ckpt")
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    model = model_from_checkpoint(ckpt).to(runtime.device).eval()
    start = time.perf_counter()
    answers = answer_titles(model, tokenizer, titles, runtime, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, args.seed, args.batch_size)
    figures = generation_figures([a.poem for a in answers], [a.stopped for a in answers])
    figures["kind"] = ckpt["kind"]
    figures["seconds"] = time.perf_counter() - start
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", default="ckpt_sft.pt", help="checkpoint to evaluate")
    parser.add_argument("--compare", default="", help="a second checkpoint for a side-by-side column")
    parser.add_argument("--poems", default="", help="folder of poem JSON files (default: poems/)")
    parser.add_argument("--num-titles", type=int, default=200, help="finetune-val titles to write poems for")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="length limit of each poem, in tokens")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    parser.add_argument("--batch-size", type=int, default=50, help="titles generated together")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    args = parser.parse_args(argv)
    try:
        runtime = setup_runtime(args.device)
        splits = load_corpus(args.poems or None, verbose=False)
        titles = [p.title for p in splits["finetune_val"][: args.num_titles]]
        columns = {path: evaluate_checkpoint(path, titles, args, runtime) for path in filter(None, [args.ckpt, args.compare])}
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps({"titles": len(titles), "settings": vars(args), "checkpoints": columns}, ensure_ascii=False))
        return
    print(f"{len(titles)} finetune-val titles, temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, "
          f"limit {args.max_new_tokens} tokens, seed {args.seed}")
    rows = [("kind", "{}"), ("stop_rate", "{:.1%}"), ("regular_form_rate", "{:.1%}"), ("mean_length", "{:.1f}"),
            ("distinct_2", "{:.3f}"), ("seconds", "{:.1f}")]
    print(f"{'':20s}" + "".join(f"{path:>16s}" for path in columns))
    for name, fmt in rows:
        print(f"{name:20s}" + "".join(f"{fmt.format(col[name]):>16s}" for col in columns.values()))


if __name__ == "__main__":
    main()
