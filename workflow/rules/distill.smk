# Stage 1: distil an EPD table per NFE from the teacher trajectories.


rule distill:
    input:
        backbone=backbone_input,
        teacher=f"{RESULTS}/{{b}}/teacher/nfe{{nfe}}/manifest.json",
    output:
        f"{RESULTS}/{{b}}/distill/nfe{{nfe}}/table.safetensors",
    params:
        config_file=RESOLVED_CONFIG,
        teacher_dir=lambda wc, input: str(Path(input.teacher).parent),
        outdir=lambda wc, output: str(Path(output[0]).parent),
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
    conda:
        "../../environment.yml"
    shell:
        "epd distill --config {params.config_file} --backbone {wildcards.b} --nfe {wildcards.nfe} "
        "--teacher {params.teacher_dir} --out {params.outdir} "
        "{params.weights} --device {params.device} > {log} 2>&1"
