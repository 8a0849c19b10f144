# Learned-solver peers (AMED-Solver/-Plugin, LD3, GITS), trained from the same teacher as EPD: one rule per method.


wildcard_constraints:
    amed="amed|amed_plugin",
    base="[a-z0-9_]+",


rule peer_amed:
    input:
        backbone=backbone_input,
        teacher=f"{RESULTS}/{{b}}/teacher/nfe{{nfe}}/manifest.json",
    output:
        f"{RESULTS}/{{b}}/peers/{{amed}}/nfe{{nfe}}/table.safetensors",
    params:
        config_file=RESOLVED_CONFIG,
        teacher_dir=lambda wc, input: str(Path(input.teacher).parent),
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([sec(wc.b).get(k) for k in ("distill", "student")]),
        weights=lambda wc: weights_flag(wc.b),
        device=config["run"]["device"],
    log:
        "logs/peers/{b}_{amed}_nfe{nfe}.log",
    message:
        "AMED peer ({wildcards.amed}) for {wildcards.b} at NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd peer amed --config {params.config_file} --backbone {wildcards.b} --nfe {wildcards.nfe} "
        "--solver {wildcards.amed} --teacher {params.teacher_dir} --out {params.outdir} "
        "{params.weights} --device {params.device} > {log} 2>&1"


rule peer_ld3:
    input:
        backbone=backbone_input,
        teacher=f"{RESULTS}/{{b}}/teacher/nfe{{nfe}}/manifest.json",
    output:
        f"{RESULTS}/{{b}}/peers/ld3_{{base}}/nfe{{nfe}}/grid.json",
    params:
        config_file=RESOLVED_CONFIG,
        teacher_dir=lambda wc, input: str(Path(input.teacher).parent),
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([(sec(wc.b).get("peers") or {}).get("ld3"), sec(wc.b).get("student")]),
        weights=lambda wc: weights_flag(wc.b),
        device=config["run"]["device"],
    log:
        "logs/peers/{b}_ld3_{base}_nfe{nfe}.log",
    message:
        "LD3 grid for {wildcards.base} on {wildcards.b} at NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd peer ld3 --config {params.config_file} --backbone {wildcards.b} --nfe {wildcards.nfe} "
        "--solver {wildcards.base} --teacher {params.teacher_dir} --out {params.outdir} "
        "{params.weights} --device {params.device} > {log} 2>&1"


rule peer_gits:
    input:
        backbone=backbone_input,
    output:
        f"{RESULTS}/{{b}}/peers/gits_{{base}}/nfe{{nfe}}/grid.json",
    params:
        config_file=RESOLVED_CONFIG,
        outdir=lambda wc, output: str(Path(output[0]).parent),
        cfg=lambda wc: digest([(sec(wc.b).get("peers") or {}).get("gits")] + [sec(wc.b).get(k) for k in ("student", "teacher")]),
        weights=lambda wc: weights_flag(wc.b),
        device=config["run"]["device"],
    log:
        "logs/peers/{b}_gits_{base}_nfe{nfe}.log",
    message:
        "GITS grid for {wildcards.base} on {wildcards.b} at NFE {wildcards.nfe}"
    conda:
        "../../environment.yml"
    shell:
        "epd peer gits --config {params.config_file} --backbone {wildcards.b} --nfe {wildcards.nfe} "
        "--solver {wildcards.base} --out {params.outdir} {params.weights} --device {params.device} > {log} 2>&1"
