# Evaluation: per-image scores (CSV) and summaries of every configured metric; one MLflow run per folder.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        f"{RESULTS}/{{b}}/eval/{{solver}}/nfe{{nfe}}/summary.json",
    params:
        images=lambda wc, input: str(Path(input.samples).parent),
        outdir=lambda wc, output: str(Path(output[0]).parent),
        metrics=lambda wc: ",".join(sec(wc.b)["metrics"]),
        weights=lambda wc: f"--weights-dir {backbone_dir(wc.b)}" if bb_class(wc.b).weights_folder else "",
        reference=lambda wc: (f"--reference-latents {RESULTS}/{wc.b}/samples/reference/latents.safetensors"
                              if "rmse_vs_teacher" in sec(wc.b)["metrics"] else ""),
        fid_ref=lambda wc: f"--fid-ref {RESULTS}/{wc.b}/samples/reference" if fid_vs_reference(wc.b) else "",
        device=config["run"]["device"],
    log:
        "logs/evaluate/{b}_{solver}_nfe{nfe}.log",
    benchmark:
        "benchmarks/snakemake/evaluate/{b}_{solver}_nfe{nfe}.tsv"
    resources:
        gpu=lambda wc: 0 if config["run"]["device"] == "cpu" else 1,
    message:
        "Evaluating {wildcards.b} {wildcards.solver} NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd evaluate --images {params.images} "
        "--metrics {params.metrics} {params.weights} {params.reference} {params.fid_ref} --device {params.device} "
        "--backbone {wildcards.b} --out-dir {params.outdir} > {log} 2>&1"
