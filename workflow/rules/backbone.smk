# Backbone: train the embedded digits model, or resolve a real backbone's local weights and every scorer's
# (fails listing every missing file).


rule backbone_train:
    output:
        model=f"{RESULTS}/{{b}}/backbone/model.safetensors",
        classifier=f"{RESULTS}/{{b}}/backbone/classifier.safetensors",
    params:
        config_file=RESOLVED_CONFIG,
        outdir=lambda wc, output: str(Path(output.model).parent),
        cfg=lambda wc: digest(sec(wc.b).get("train", {})),
    log:
        "logs/backbone/{b}.log",
    benchmark:
        "benchmarks/snakemake/backbone/{b}.tsv"
    threads: 2
    message:
        "Training the embedded backbone {wildcards.b}"
    conda:
        "../../environment.yml"
    shell:
        "epd backbone train --config {params.config_file} --backbone {wildcards.b} "
        "--out {params.outdir} > {log} 2>&1"


rule backbone_check:
    output:
        f"{RESULTS}/{{b}}/backbone/weights.json",
    params:
        config_file=RESOLVED_CONFIG,
        cfg=lambda wc: digest({k: sec(wc.b).get(k) for k in ("kind", "model_path", "resolution", "metrics")}
                              | {"rewards": (sec(wc.b).get("rdpo") or {}).get("rewards")}),
    log:
        "logs/backbone/{b}.check.log",
    benchmark:
        "benchmarks/snakemake/backbone/{b}.check.tsv"
    message:
        "Resolving local weights of {wildcards.b}"
    conda:
        "../../environment.yml"
    shell:
        "epd backbone check --config {params.config_file} --backbone {wildcards.b} --out {output} > {log} 2>&1"


ruleorder: backbone_train > backbone_check
