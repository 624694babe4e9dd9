"""The occasional tools, each run from the repository root as `python -m tools.NAME`:

    bench           training and generation speed, MFU, memory
    profile_step    where one pretraining step's time goes, part by part
    compare_lora    full tuning against LoRA ranks on the same run
    merge_lora      fold a LoRA adapter checkpoint into its base
    corpus          what the data pipeline makes of the corpus
    run_notebooks   execute the course notebooks and save their outputs
"""
