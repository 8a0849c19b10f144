# Teacher trajectories on each student grid (one set per distilled NFE).


rule teacher:
    input:
        backbone=backbone_input,
    output:
        f"{RESULTS}/{{b}}/teacher/nfe{{nfe}}/manifest.json",
    params:
        config_file=RESOLVED_CONFIG,
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([sec(wc.b).get(k) for k in ("teacher", "student", "guidance", "prompts")]),
        weights=lambda wc: weights_flag(wc.b),
        device=config["run"]["device"],
    log:
        "logs/teacher/{b}_nfe{nfe}.log",
    benchmark:
        "benchmarks/snakemake/teacher/{b}_nfe{nfe}.tsv"
    resources:
        gpu=lambda wc: 0 if config["run"]["device"] == "cpu" else 1,
    message:
        "Teacher trajectories for {wildcards.b} at NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd teacher --config {params.config_file} --backbone {wildcards.b} --nfe {wildcards.nfe} "
        "--out {params.outdir} {params.weights} --device {params.device} > {log} 2>&1"
