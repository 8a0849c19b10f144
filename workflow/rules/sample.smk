# Sampling: every configured solver x NFE, the distilled and RDPO tables, and a high-NFE reference solve.


rule sample:
    input:
        unpack(sample_inputs),
    output:
        f"{RESULTS}/{{b}}/samples/{{solver}}/nfe{{nfe}}/summary.json",
    params:
        config_file=RESOLVED_CONFIG,
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([sec(wc.b).get(k) for k in ("sample", "guidance", "student", "prompts")]),
        args=sample_args,
        weights=lambda wc: weights_flag(wc.b),
        seeds=lambda wc: sec(wc.b)["sample"]["seeds"],
        batch=lambda wc: sec(wc.b)["sample"]["batch"],
        latents=lambda wc: "--save-latents" if needs_reference(wc.b) else "",
        gpus=lambda wc, resources: sample_gpus(wc, resources.gpu),
        device=config["run"]["device"],
    log:
        "logs/sample/{b}_{solver}_nfe{nfe}.log",
    benchmark:
        "benchmarks/snakemake/sample/{b}_{solver}_nfe{nfe}.tsv"
    resources:
        gpu=lambda wc: 0 if config["run"]["device"] == "cpu" else 1,
    message:
        "Sampling {wildcards.b} with {wildcards.solver} at NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd sample --config {params.config_file} --backbone {wildcards.b} {params.args} --label {wildcards.solver} "
        "--seeds {params.seeds} --batch {params.batch} {params.latents} {params.weights} --device {params.device} "
        "{params.gpus} --outdir {params.outdir} > {log} 2>&1"


rule sample_reference:
    input:
        backbone=backbone_input,
    output:
        f"{RESULTS}/{{b}}/samples/reference/summary.json",
    params:
        config_file=RESOLVED_CONFIG,
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([sec(wc.b).get(k) for k in ("sample", "guidance", "prompts")]),
        weights=lambda wc: weights_flag(wc.b),
        solver=lambda wc: sec(wc.b)["sample"]["reference_solver"],
        steps=lambda wc: sec(wc.b)["sample"]["reference_steps"],
        seeds=lambda wc: sec(wc.b)["sample"]["seeds"],
        batch=lambda wc: sec(wc.b)["sample"]["batch"],
        device=config["run"]["device"],
    log:
        "logs/sample/{b}_reference.log",
    benchmark:
        "benchmarks/snakemake/sample/{b}_reference.tsv"
    message:
        "High-NFE reference solve for {wildcards.b}"
    conda:
        "../../environment.yml"
    shell:
        "epd sample --config {params.config_file} --backbone {wildcards.b} --solver {params.solver} --steps {params.steps} "
        "--label reference --seeds {params.seeds} --batch {params.batch} --save-latents {params.weights} "
        "--device {params.device} --outdir {params.outdir} > {log} 2>&1"


ruleorder: sample_reference > sample
