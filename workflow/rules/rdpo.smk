# Stage 2: RDPO fine-tuning of the distilled table (best checkpoint chosen on held-out prompts/seeds).
# run.rdpo_gpus data-parallel processes (one GPU each); a preempted job (SIGTERM/SIGUSR1: exit 143/138) resumes
# from its run folder when the same job runs again.


rule rdpo:
    input:
        backbone=backbone_input,
        table=lambda wc: distilled_table(wc.b, wc.nfe),
    output:
        f"{RESULTS}/{{b}}/rdpo/nfe{{nfe}}/table_best.safetensors",
    params:
        config_file=RESOLVED_CONFIG,
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([sec(wc.b).get(k) for k in ("rdpo", "prompts")]),
        weights=lambda wc: weights_flag(wc.b),
        device=config["run"]["device"],
        gpus=config["run"].get("rdpo_gpus", 1),
    log:
        "logs/rdpo/{b}_nfe{nfe}.log",
    benchmark:
        "benchmarks/snakemake/rdpo/{b}_nfe{nfe}.tsv"
    threads: 2
    resources:
        gpu=lambda wc: 0 if config["run"]["device"] == "cpu" else config["run"].get("rdpo_gpus", 1),
    message:
        "RDPO for {wildcards.b} at NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd rdpo --config {params.config_file} --backbone {wildcards.b} --init {input.table} "
        "--out {params.outdir} {params.weights} --device {params.device} --gpus {params.gpus} > {log} 2>&1"
