"""tanggpt: the course's library. Every command (pretrain.py, finetune.py, align.py, rl.py,
sample.py, evaluate.py, chat.py, tools/) is a thin main over these modules; none of them imports a
command. Below it sit model.py (the transformer) and data/ (corpus, tokenizer, the
instruction format, the tasks, the poem forms), which import nothing from here.

    cli.py          flags from a config dataclass; bad input one line, exit 2
    device.py       --device auto and the precision policy
    distributed.py  torchrun: rank, world size, the collectives the loop needs
    atomic.py       every file a run writes, written whole or not at all
    checkpoint.py   the checkpoint dict, its kinds, save and weights-only load
    run_files.py    the files beside a checkpoint: log, loss plot, samples
    training.py     the loop every stage shares
    muon.py         Muon: orthogonalised momentum for the blocks' weight matrices
    tuning.py       what the stages that tune a checkpoint share (--init, epochs, LoRA)
    losses.py       every loss and score: causal LM, per-row NLL, DPO, rhyme group, GRPO
    generation.py   asking a model: sampling flags, requests in, answers out
    lora.py         LoRA from scratch
    metrics.py      what an answer is measured by
    prosody.py      the Pingshui rhyme and tone checks, the rhyme-constrained sampler
    rewards.py      the rules as RL rewards: one per rule in [0, 1], partial credit, a task's weighted mean
    rollouts.py     the requests the rules judge, groups of sampled answers, their rewards (rl.py)
    preference.py   preference pairs for DPO: building, scoring, caching, their DPO figures
    rule_targets.py where a rule names what to write (an acrostic head, a rhyme group): RL's
                    targets on the policy's answers, align's rhyme rows on real poems
    evaluation.py   what evaluate.py measures: every figure of its table, and the tables
    conversation_evaluation.py  a chat model in conversation: each follow-up's check, system prompts
    chat_server.py  the chat page's server (chat.py): the page, an answer streamed, requests bounded
    speed.py        what the speed tools share: the model they measure, its description, a device clock
"""
