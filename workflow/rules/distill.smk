# Stage 1: distil an EPD table per NFE from the teacher trajectories.


rule distill:
    input:
        backbone=backbone_input,
        teacher=f"{RESULTS}/{{b}}/teacher/nfe{{nfe}}/manifest.json",
    output:
        f"{RESULTS}/{{b}}/distill/nfe{{nfe}}/table.safetensors",
    params:
        cfg=lambda wc: digest([sec(wc.b).get(k) for k in ("distill", "student")]),
        weights=lambda wc: weights_flag(wc.b),
        device=config["run"]["device"],
    log:
        "logs/distill/{b}_nfe{nfe}.log",
    benchmark:
        "benchmarks/snakemake/distill/{b}_nfe{nfe}.tsv"
    resources:
        gpu=lambda wc: 0 if config["run"]["device"] == "cpu" else 1,
    message:
        "Stage-1 distillation for {wildcards.b} at NFE {wildcards.nfe}"
    shell:
        "epd distill --config {RESOLVED_CONFIG} --backbone {wildcards.b} --nfe {wildcards.nfe} "
        "--teacher {RESULTS}/{wildcards.b}/teacher/nfe{wildcards.nfe} --out {RESULTS}/{wildcards.b}/distill/nfe{wildcards.nfe} "
        "{params.weights} --device {params.device} > {log} 2>&1"
